"""The pipelines ``pipeline="auto"`` weighs: which mesh axis to pipeline over, how many stages,
and which schedules.

The mesh's own axis comes first because its devices are already laid out the way the caller
asked; other stage counts factor the same devices in the same order, so consecutive stages
stay on consecutive devices and a stage never straddles a node it did not straddle before.
"""

from __future__ import annotations

from jax.sharding import Mesh

from autoshard.ir.pipeline import Pipeline


def auto_pipeline_candidates(mesh: Mesh) -> list[tuple[Mesh, list[Pipeline]]]:
    """The pipelines ``"auto"`` weighs, one group per stage count, the first group the
    mesh's own: over the axis named ``"stage"`` if the mesh has one (and only that), else
    over its first axis of size > 1 (on multi-node profiles the first axis is the one that
    crosses nodes), renamed ``"stage"`` on the same devices; each schedule (interleaved with
    two virtual stages), microbatches by simulation. Without a ``"stage"`` axis the devices
    are also factored into every other stage count ``s`` x the rest (a ``("stage",
    "inner")`` mesh over the same devices in the same order, so stages stay on consecutive
    devices and nodes): those groups hold the 1F1B schedule, which ``compile`` replaces by
    the first group's best predicted schedule."""
    names = list(mesh.axis_names)
    if "stage" in names:
        axis = "stage"
    else:
        axis = next((a for a in names if int(mesh.shape[a]) > 1), None)
        if axis is None:
            return []
        names[names.index(axis)] = "stage"
    own = Mesh(mesh.devices, tuple(names), axis_types=mesh.axis_types)
    stages = int(own.shape["stage"])
    groups = []
    if stages >= 2:
        groups.append((own, [Pipeline(stages, None, "1f1b"), Pipeline(stages, None, "gpipe"),
                             Pipeline(stages, None, "interleaved", virtual_stages=2)]))
    if "stage" in mesh.axis_names:
        return groups
    devices = mesh.devices.flatten()
    for count in range(2, devices.size + 1):
        if devices.size % count or count == stages:
            continue
        rest = devices.size // count
        shape, axes = ((count, rest), ("stage", "inner")) if rest > 1 else ((count,), ("stage",))
        factored = Mesh(devices.reshape(shape), axes,
                        axis_types=(mesh.axis_types[0],) * len(axes))
        groups.append((factored, [Pipeline(count, None, "1f1b")]))
    return groups
