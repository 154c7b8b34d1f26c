"""Read the plan off a solver's choice of strategies.

The plan pins every value to the layout its producer's strategy gives it, so XLA's partitioner
has nothing left to guess, except where a pin would make XLA move more than the problem
priced: a partial sum is reduced where its reader's layout forces it (one read more than once
takes the layout its fanout reduces it to, so XLA reduces it once), a value XLA makes from
nothing (an iota, a broadcast scalar) is left to its readers, and a whole value a fanout moves
is pinned at the moved layout only where a third layout is read from it (``moved_state``). With
the hardware, the plan carries its explanation and memory curve.
"""

from __future__ import annotations

from autoshard.cost_model.hardware import Hardware
from autoshard.ir.graph import Graph, Value
from autoshard.ir.mesh import MeshSpec
from autoshard.ir.plan import SOLVER_CHOSEN, Plan, Prediction, SolverStats
from autoshard.ir.sharding import ShardingSpec
from autoshard.passes.fusion import made_from_nothing
from autoshard.passes.pins import Pins
from autoshard.passes.prediction.explain import explain
from autoshard.passes.prediction.predict import memory_profile
from autoshard.passes.problem import PlanningProblem, Slot, stacked

METHOD = "cost-model search"


def fanout_source(pp: PlanningProblem, fanout: Slot, choice) -> ShardingSpec:
    """The layout the value a fanout moves leaves its maker in."""
    return pp.slots[fanout.source].strategies[choice[fanout.source]].outputs[
        fanout.source_output]


def moved_state(pp: PlanningProblem, choice) -> dict[int, ShardingSpec]:
    """Value id -> the layout a fanout moves a whole (not partial) value to, where the lowering
    must pin it there: some reader needs a third layout, which XLA would otherwise reshard to
    from the value's own layout rather than from the moved one, as the problem prices it. Where
    every reader needs the moved layout or the value's own, XLA's one reshard per layout is the
    problem's, and the value is left unconstrained (``plan_from_choice`` pins it where it is
    made: pinned at the moved layout, XLA can move an op's operands there rather than its
    result, gathering large operands for a small result)."""
    needs: dict[int, set] = {}
    for t in pp.transfers:
        if pp.slots[t.producer].kind == "fanout":
            needs.setdefault(t.producer, set()).add(t.required[choice[t.consumer]])
    pinned = {}
    for index, slot in enumerate(pp.slots):
        if slot.kind != "fanout":
            continue
        moved = slot.strategies[choice[index]].outputs[0]
        own = fanout_source(pp, slot, choice)
        if not own.has_partial and moved != own and needs.get(index, set()) - {moved, own, None}:
            pinned[slot.value.id] = moved
    return pinned

def scan_operand_specs(pp: PlanningProblem, choice, graph: Graph
                       ) -> dict[int, tuple[ShardingSpec | None, ...]]:
    """Per scan node, the layout each operand has where the loop reads it: its body input's
    port, stacked for a scanned operand. The problem moves an argument stored in another layout
    (split over the layers, say) to it before the loop; pinned as the scan's operand layouts, the
    lowering makes XLA move it there too."""
    out = {}
    for node, _ in graph.walk():
        if node.op != "scan":
            continue
        first_x = node.params["num_consts"] + node.params["num_carry"]
        specs = []
        for j, (atom, inner) in enumerate(zip(node.inputs, node.regions[0].inputs)):
            entry = pp.value_slot.get(inner.id)
            if not isinstance(atom, Value) or entry is None:
                specs.append(None)
                continue
            slot, k = entry
            spec = pp.slots[slot].strategies[choice[slot]].outputs[k]
            specs.append(stacked(spec) if j >= first_x else spec)
        out[node.id] = tuple(specs)
    return out


def plan_from_choice(pp: PlanningProblem, choice, graph: Graph, mesh: MeshSpec, *, in_tree,
                     out_tree, pins: Pins, prediction: Prediction | None,
                     solver: SolverStats | None, hw: Hardware | None = None) -> Plan:
    """The plan ``choice`` makes; with ``hw``, explained (``explain``, ``memory_curve``)."""
    def spec_of(value: Value) -> ShardingSpec:
        slot, k = pp.value_slot[value.id]
        return pp.slots[slot].strategies[choice[slot]].outputs[k]

    input_specs = tuple(spec_of(v) for v in graph.inputs)
    replicated = ShardingSpec.replicated(mesh.ndim)
    output_specs = tuple(
        replicated if sink is None else pp.slots[sink].strategies[choice[sink]].outputs[0]
        for sink in pp.sink_slots)
    inputs = {v.id for v in graph.inputs}

    def produced(slot: int, k: int) -> ShardingSpec:
        # a fanout reduces its producer's partial sum once, to the layout it chose: the value
        # takes that layout, so the lowering constrains it there and the readers reshard from
        # it (left to the readers' operand layouts, XLA reduces once per layout they need); a
        # fanout that keeps the sum partial leaves the producer's layout (unconstrained)
        # (a whole value the fanout moves stays where it is made: ``moved_state``)
        fanout = pp.slots[slot]
        if fanout.kind == "fanout":
            reduced = fanout.strategies[choice[slot]].outputs[0]
            own = fanout_source(pp, fanout, choice)
            return reduced if own.has_partial and not reduced.has_partial else own
        return pp.slots[slot].strategies[choice[slot]].outputs[k]

    # a broadcast of a scalar constrained to a split layout, where its reader needs it, makes
    # XLA move its reader's other operands instead (a GPT's loss activations and labels)
    value_specs = {vid: produced(s, k) for vid, (s, k) in pp.value_slot.items()
                   if vid not in inputs and not (pp.slots[s].kind == "op"
                                                 and made_from_nothing(pp.slots[s].node))}
    moved = moved_state(pp, choice)
    made_specs = {vid: value_specs[vid] for vid in moved
                  if vid in value_specs and value_specs[vid] != moved[vid]}
    value_specs.update(moved)
    reasons = dict(pins.reasons)
    for i in range(len(graph.inputs)):
        reasons.setdefault(f"in:{i}", SOLVER_CHOSEN)
    for o in range(len(graph.outputs)):
        reasons.setdefault(f"out:{o}", SOLVER_CHOSEN)
    operand_specs = {slot.node.id: slot.strategies[c].inputs
                     for slot, c in zip(pp.slots, choice) if slot.kind == "op"}
    operand_specs.update(scan_operand_specs(pp, choice, graph))
    explanation = {} if hw is None else explain(pp, choice, mesh, hw)
    curve = () if hw is None else tuple(memory_profile(pp, choice, mesh).tolist())
    return Plan(graph, mesh, input_specs, output_specs, value_specs, in_tree, out_tree, METHOD,
                reasons, tuple(pp.unplanned), prediction, solver, operand_specs, explanation,
                curve, "" if hw is None else hw.name, made_specs=made_specs)
