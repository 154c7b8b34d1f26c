"""Steps written in JAX's explicit sharding mode, and the mesh context a step is traced in.

A step is traced on sharding-free abstract arguments under an empty abstract mesh, whatever
mesh the caller has set (``jax.set_mesh``): an Explicit context mesh would otherwise be baked
into the jaxpr's avals and ``sharding`` params, which the lowering (on an Auto view of the mesh)
cannot re-bind. A step written in explicit mode (``jnp.einsum(..., out_sharding=P("data"))``,
``jax.sharding.reshard``) cannot trace without a mesh naming its axes; when the plain trace
fails, it is traced again under an Explicit abstract view of the compile mesh, and the lifter
reads every ``sharding`` / ``out_sharding`` param and every ``reshard`` as a pin, as it reads
``with_sharding_constraint``, then drops it from the params.

A spec that names no mesh axis is not a pin: in the explicit trace every argument is typed
replicated (the plan chooses its layout), so jax writes replicated specs for everything it
derives from an argument (a parameter's gradient), which are not what the user asked for.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any, Iterator

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

#: Params that carry an explicit-mode layout (``dot_general``'s ``out_sharding``,
#: ``broadcast_in_dim`` / ``reshape`` / ``iota``'s ``sharding``, ...); None is the mode-free value.
SHARDING_PARAMS = ("sharding", "out_sharding")
#: The primitive of ``jax.sharding.reshard``, and its target.
RESHARD = "reshard"
RESHARD_PARAM = "dst_sharding"

_SHARDING_ERROR = re.compile(r"mesh|shard|PartitionSpec|axis_types|Explicit|axis name",
                             re.IGNORECASE)


@contextlib.contextmanager
def neutral_mesh() -> Iterator[None]:
    """No abstract mesh in scope, whatever the caller set: avals and params stay mode-free."""
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())):
        yield


@contextlib.contextmanager
def explicit_mesh(mesh: Mesh) -> Iterator[None]:
    """An Explicit abstract view of ``mesh`` in scope: explicit-mode calls naming its axes
    trace (an Auto mesh rejects ``out_sharding`` specs naming its axes)."""
    view = mesh.abstract_mesh.update(axis_types=(AxisType.Explicit,) * len(mesh.axis_names))
    with jax.sharding.use_abstract_mesh(view):
        yield


def is_sharding_error(err: BaseException) -> bool:
    """Whether an error raised while tracing is about meshes or shardings (so retrying under the
    explicit view, or a note about explicit sharding, is relevant)."""
    return bool(_SHARDING_ERROR.search(f"{type(err).__name__}: {err}"))


def pinned_spec(sharding: Any) -> PartitionSpec | None:
    """The spec an explicit-mode layout pins, or None: not a NamedSharding, or naming no axis
    (module docstring). ``unreduced`` / ``reduced`` axes are dropped (the pin is the layout)."""
    if not isinstance(sharding, NamedSharding):
        return None
    entries = tuple(sharding.spec)
    if any(e is PartitionSpec.UNCONSTRAINED for e in entries):
        return None
    if not any(e is not None and e != () for e in entries):
        return None
    return PartitionSpec(*entries)


def explicit_layout(params: dict) -> tuple[dict, PartitionSpec | None]:
    """(``params`` without their explicit-mode layouts, the spec they pin or None)."""
    found = [k for k in SHARDING_PARAMS if isinstance(params.get(k), NamedSharding)]
    if not found:
        return params, None
    stripped = dict(params)
    spec = None
    for key in found:
        spec = spec or pinned_spec(stripped[key])
        stripped[key] = None
    return stripped, spec
