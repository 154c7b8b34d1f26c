"""Compare the user's sharding annotations with the searched plan: the annotation report.

Method (``AnnotationReport`` in ir/plan.py). The step is solved twice: once with every
annotation a hard pin (``annotations="require"``) and once with annotations as preferences
(``"hint"``). ``compile`` runs the plan of the mode the user asked for and solves the other one
here. The report's total, ``cost_seconds``, is the difference of the two plans' predicted step
times: what following the annotations costs per step when the rest of the plan adapts to them,
which is the number a user deciding whether to keep an annotation needs.

That total is a joint figure; a per-argument split of it does not exist in general (two
annotations can be cheap alone and dear together). Per differing argument the report gives a
local price instead: the searched plan with only that argument's layout switched to its
annotation and every other choice held fixed, i.e. the resharding this one argument would add
between itself and its readers (and its updated result), minus what it saves. It is the price
``prediction.explain`` gives a rejected strategy, so the viewer and the report agree.
"""

from __future__ import annotations

import numpy as np

from autoshard.cost_model.hardware import Hardware
from autoshard.ir.plan import AnnotationDiff, AnnotationReport, Plan
from autoshard.passes.pins import Pins
from autoshard.passes.prediction.explain import local_costs
from autoshard.passes.problem import NS, PlanningProblem, build_problem, preference_penalty


def annotation_report(plan: Plan, other: Plan, hint_pins: Pins, mode: str, hw: Hardware, *,
                      donated: set[int], updated: dict[int, int]) -> AnnotationReport:
    """The report for ``plan`` (solved in ``mode``), given ``other``, the same step solved in
    the other mode, and ``hint_pins``, the pins of the hint solve."""
    searched, annotated = (plan, other) if mode == "hint" else (other, plan)
    graph = plan.graph
    differing = [i for i, spec in sorted(hint_pins.annotated.items())
                 if searched.input_specs[i] != spec]
    prices = _local_prices(searched, hint_pins, differing, hw, donated, updated)
    differing.sort(key=lambda i: -prices[i] if prices[i] == prices[i] else 0.0)
    diffs = tuple(AnnotationDiff(graph.inputs[i].name or f"in[{i}]", hint_pins.annotated[i],
                                 searched.input_specs[i], prices[i], mode == "require")
                  for i in differing)
    return AnnotationReport(mode, len(hint_pins.annotated), diffs,
                            _step(annotated), _step(searched), _peak(annotated), _peak(searched))


def _local_prices(searched: Plan, pins: Pins, positions: list[int], hw: Hardware,
                  donated: set[int], updated: dict[int, int]) -> dict[int, float]:
    """Seconds per step of switching each input position in ``positions`` from the searched
    layout to its annotation, every other choice fixed (module docstring)."""
    if not positions:
        return {}
    graph = searched.graph
    pp = build_problem(graph, searched.mesh, hw, pins, donated=donated, updated=updated,
                       share_layers=False)
    choice = choice_of(pp, searched)
    local = local_costs(pp.problem, choice)
    prices = {}
    for i in positions:
        value = graph.inputs[i]
        slot = pp.value_slot[value.id][0]
        specs = [s.outputs[0] for s in pp.slots[slot].strategies]
        first = int(pp.problem.offsets[slot])
        if pins.annotated[i] not in specs:      # pinned by in_specs: no alternative here
            prices[i] = float("nan")
            continue
        want, have = specs.index(pins.annotated[i]), int(choice[slot])
        # the preference penalty is a tie-breaker, not a cost of the step
        delta = local[first + want] - local[first + have] + preference_penalty(value, hw)
        prices[i] = float(delta) / NS
    return prices


def choice_of(pp: PlanningProblem, plan: Plan) -> np.ndarray:
    """The strategy index per slot of ``pp`` that ``plan`` chose, read back from its specs (a
    slot whose specs match no strategy exactly takes its cheapest one)."""
    graph = plan.graph
    position = {v.id: i for i, v in enumerate(graph.inputs)}
    sink_output = {slot: o for o, slot in enumerate(pp.sink_slots) if slot is not None}
    choice = []
    for index, slot in enumerate(pp.slots):
        if slot.kind == "op":
            node = slot.node
            outs = tuple(plan.value_specs.get(v.id) for v in node.outputs)
            ins = plan.operand_specs.get(node.id)
            match = [k for k, s in enumerate(slot.strategies)
                     if s.outputs == outs and (ins is None or s.inputs == ins)]
        else:
            if slot.kind == "sink":
                want = plan.output_specs[sink_output[index]]
            elif slot.value.id in position:
                want = plan.input_specs[position[slot.value.id]]
            else:
                want = plan.value_specs.get(slot.value.id)
            match = [k for k, s in enumerate(slot.strategies) if s.outputs[0] == want]
        if match:
            choice.append(min(match, key=lambda k: slot.costs[k]))
        else:
            choice.append(int(np.argmin(slot.costs)))
    return np.asarray(choice, np.int64)


def _step(plan: Plan) -> float:
    return plan.prediction.step_seconds if plan.prediction is not None else 0.0


def _peak(plan: Plan) -> int:
    return plan.prediction.peak_memory_bytes if plan.prediction is not None else 0
