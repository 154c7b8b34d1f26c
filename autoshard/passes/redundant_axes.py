"""Mesh axes a searched plan leaves unused, and what the best plan that uses each would cost.

Along a mesh axis no op's chosen strategy splits (every operand and result whole on it), its
devices compute the same thing. The cost model can prefer that (a step so small that any
collective costs more than the compute it saves), but the user should see it, priced: the
step is solved once more with the batch arguments' leading dim split over that axis (as the
data-parallel rule splits it), and both predictions are recorded on the plan
(``RedundantAxis``, printed by ``Plan.summary``). Where that plan is predicted cheaper, the
solver missed it; it is in the search space, so it is taken and the log says so.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Callable

from autoshard.ir.errors import PlanInfeasibleError, ShardingError
from autoshard.ir.graph import Graph
from autoshard.ir.mesh import MeshSpec
from autoshard.ir.plan import Plan, RedundantAxis
from autoshard.ir.sharding import B, Broadcast, ShardingSpec, Split
from autoshard.passes.fusion import made_from_nothing
from autoshard.passes.pins import Pins
from autoshard.passes.problem import PlanningProblem

log = logging.getLogger("autoshard")

#: A plan that splits the batch over an unused axis replaces the chosen one only where it is
#: predicted cheaper by more than this fraction (rounding never changes a plan).
MISS_MARGIN = 1e-9
NO_FIT = "no plan that uses it fits"
NO_BATCH = "no batch argument's leading dim divides over it"

#: What a re-solve returns: the plan, its problem and its choice of strategies.
Solved = tuple[Plan, PlanningProblem, object]


def unused_axes(pp: PlanningProblem, choice, mesh: MeshSpec) -> tuple[int, ...]:
    """The mesh axes (of size > 1) along which no op's chosen strategy splits its work: every
    operand and result of every op is whole (broadcast) on them. A value made from nothing (an
    iota, a broadcast scalar) does not count: its layout is a memory tie-break
    (``least_held_free_layouts``), not work."""
    used: set[int] = set()
    for slot, c in zip(pp.slots, choice):
        if slot.kind != "op" or made_from_nothing(slot.node):
            continue
        strategy = slot.strategies[c]
        for spec in (*strategy.inputs, *strategy.outputs):
            if spec is not None:
                used.update(i for i, e in enumerate(spec.sbp) if not isinstance(e, Broadcast))
    return tuple(a for a, size in enumerate(mesh.axis_sizes) if size > 1 and a not in used)


def batch_split_pins(graph: Graph, mesh: MeshSpec, pins: Pins,
                     input_specs: tuple[ShardingSpec, ...], batch_inputs: tuple[int, ...],
                     axis: int) -> Pins | None:
    """``pins`` with each batch argument the user left free pinned to its chosen layout plus
    its leading dim split over ``axis`` (or split over ``axis`` alone where that does not
    divide); None where no batch argument can be split so. Batch arguments are those of the
    common leading dim, as the data-parallel rule takes them (passes/rules.py)."""
    sizes = {graph.inputs[i].shape[0] for i in batch_inputs if graph.inputs[i].ndim}
    if len(sizes) != 1:
        return None
    (size,) = sizes
    name = mesh.axis_names[axis]
    forced: dict[int, ShardingSpec] = {}
    for i in batch_inputs:
        value = graph.inputs[i]
        if i in pins.inputs or not value.ndim or value.shape[0] != size:
            continue
        chosen = list(input_specs[i].sbp)
        chosen[axis] = Split(0)
        alone = [Split(0) if a == axis else B for a in range(mesh.ndim)]
        for sbp in (chosen, alone):
            spec = ShardingSpec(tuple(sbp))
            try:
                spec.validate(value.shape, mesh)
            except ShardingError:
                continue
            forced[i] = spec
            break
    if not forced:
        return None
    reason = f"batch argument: dim 0 split over {name!r} (the plan that uses every mesh axis)"
    return replace(pins, inputs={**pins.inputs, **forced},
                   reasons={**pins.reasons, **{f"in:{i}": reason for i in forced}})


def with_redundant_axes(found: Solved, graph: Graph, mesh: MeshSpec, pins: Pins,
                        batch_inputs: tuple[int, ...], solve: Callable[[Pins], Solved],
                        progress: Callable[[str], None] | None = None) -> Plan:
    """The searched plan of ``found``, with a ``RedundantAxis`` for each mesh axis it leaves
    unused, priced against ``solve`` (the search again, same budget and time limit) with the
    batch split over that axis; or that plan, where it is predicted cheaper (a solver miss).
    Axes the plan uses are not solved again, so such a plan is returned as it was."""
    current = found
    tried: dict[int, Plan | str] = {}
    while True:
        todo = [a for a in unused_axes(current[1], current[2], mesh) if a not in tried]
        if not todo:
            break
        axis = todo[0]
        name = mesh.axis_names[axis]
        forced_pins = batch_split_pins(graph, mesh, pins, current[0].input_specs,
                                       batch_inputs, axis)
        if forced_pins is None:
            tried[axis] = NO_BATCH
            continue
        if progress:
            progress(f"mesh axis {name!r} is unused by the plan; solving with the batch split "
                     f"over it, to price the plan that uses it")
        try:
            solved = solve(forced_pins)
        except PlanInfeasibleError:
            tried[axis] = NO_FIT
            continue
        tried[axis] = solved[0]
        chosen_s, forced_s = _step(current[0]), _step(solved[0])
        if forced_s < chosen_s * (1 - MISS_MARGIN):
            log.warning("autoshard: the solver's plan left mesh axis %r unused (predicted "
                        "%.4g ms), but the plan that splits the batch over it is predicted "
                        "cheaper (%.4g ms): a solver miss; using the cheaper plan", name,
                        chosen_s * 1e3, forced_s * 1e3)
            if progress:
                progress(f"the plan that splits the batch over {name!r} is predicted cheaper "
                         f"({forced_s * 1e3:.4g} ms against {chosen_s * 1e3:.4g}): "
                         "a solver miss; taking it")
            current = solved
    plan = current[0]
    notes = []
    for axis in unused_axes(current[1], current[2], mesh):
        other = tried.get(axis, NO_BATCH)
        notes.append(RedundantAxis(
            mesh.axis_names[axis], mesh.axis_sizes[axis], _step(plan),
            None if isinstance(other, str) else _step(other),
            other if isinstance(other, str) else ""))
    return replace(plan, redundant_axes=tuple(notes)) if notes else plan


def _step(plan: Plan) -> float:
    return plan.prediction.step_seconds if plan.prediction is not None else float("inf")
