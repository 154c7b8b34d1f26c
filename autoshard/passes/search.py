"""Choose a plan by search: build the strategy problem, solve it, read the plan off the choice.

This is Alpa's intra-operator pass (Zheng et al., OSDI 2022): every op picks a strategy, edges
charge resharding, memory is bounded at every point of the schedule. The plan pins *every*
value to the layout its producer's strategy gives it (partial sums stay unconstrained and are
reduced where the consumer's layout forces it), so XLA's partitioner has nothing left to guess.

``predict`` re-walks the chosen strategies to split the objective into compute, each collective
kind and resharding, and to count the collectives a step performs (for ``autoshard.measure.verify``).
``explain`` prices, per op, the chosen strategy and the cheapest rejected ones with every other
choice held fixed, and lists the collectives the choice causes (the viewer, ``autoshard.dump``).
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Callable

import numpy as np

from autoshard.cost_model.collectives import collective_time
from autoshard.cost_model.compute import compute_time, node_flops, strategy_bytes
from autoshard.cost_model.hardware import Hardware
from autoshard.cost_model.reshard import reshard_affine, reshard_steps
from autoshard.ir.errors import PlanInfeasibleError
from autoshard.ir.graph import Graph, Value
from autoshard.ir.mesh import MeshSpec
from autoshard.ir.plan import (CollectiveCause, NodeExplanation, Plan, Prediction, SolverStats,
                               StrategyCost)
from autoshard.ir.sharding import ShardingSpec
from autoshard.passes.latency import (PENALTY_PLANS, class_entries, class_seconds, classes_used,
                                      latency_bound, refine_latency, total_nanoseconds)
from autoshard.passes.pins import Pins
from autoshard.passes.problem import (NS, PlanningProblem, Slot, Transfer, build_problem,
                                      made_from_nothing)
from autoshard.solver.solve import solve
from autoshard.solver.lp import (MIN_ITERATIONS, FixedCharge, solve_lagrangian,
                                       solve_local_polytope)
from autoshard.passes.prediction.early_updates import early_updates
from autoshard.passes.prediction.liveness import assigned_peak, packed_profile
from autoshard.passes.prediction.loop_liveness import expanded
from autoshard.solver.problem import FORBIDDEN, Problem, evaluate

METHOD = "cost-model search"
#: Rejected strategies an op's explanation keeps, cheapest first.
REJECTED_KEPT = 3


def predict(pp: PlanningProblem, choice, mesh: MeshSpec, hw: Hardware,
            memory_budget: int | None) -> Prediction:
    """Compute, collectives and memory of one step under ``choice``."""
    compute = 0.0
    seconds: dict[str, float] = {}
    counts: dict[str, list[float]] = {}

    def collective(kind: str, axes, nbytes: float, times: float, latency: bool = True) -> None:
        t = collective_time(hw, mesh, kind, nbytes, axes, latency=latency) * times
        seconds[kind] = seconds.get(kind, 0.0) + t
        entry = counts.setdefault(kind, [0.0, 0.0])
        entry[0] += times
        entry[1] += nbytes * times

    for slot, c in zip(pp.slots, choice):
        if slot.kind != "op":
            continue
        s = slot.strategies[c]
        node = slot.node
        frac_in = [None if x is None else x.shard_fraction(mesh) for x in s.inputs]
        frac_out = [x.shard_fraction(mesh) for x in s.outputs]
        compute += compute_time(hw, node, node_flops(node) / max(s.divisor, 1),
                                strategy_bytes(node, frac_in, frac_out)) * slot.times
        for kind, axes, nbytes in s.comm:
            collective(kind, axes, nbytes, slot.times, not slot.combined)
    reshard = 0.0
    for t in pp.transfers:
        src = pp.source(t, choice[t.producer])
        dst = t.required[choice[t.consumer]]
        if dst is None:
            continue
        for step in reshard_steps(src, dst, mesh):
            before = seconds.get(step.kind, 0.0)
            collective(step.kind, step.axes, step.factor * t.value.nbytes, t.times,
                       not t.combined)
            reshard += seconds[step.kind] - before
    # the combined ops' start-up latency, once per op (latency.py)
    for kind, t in class_seconds(classes_used(pp, choice, mesh), mesh, hw).items():
        seconds[kind] = seconds.get(kind, 0.0) + t
    problem, buffers, starts, _ = expanded(pp, *predicted_buffers(pp, choice, mesh))
    peak = assigned_peak(problem, choice, starts, buffers)
    total = compute + sum(seconds.values())
    return Prediction(total, compute, seconds, reshard,
                      {k: (v[0], v[1]) for k, v in counts.items()}, peak, memory_budget)


def memory_profile(pp: PlanningProblem, choice, mesh: MeshSpec) -> np.ndarray:
    """Predicted live bytes per device at every step position (``liveness.packed_profile``
    with the gathered operands' buffers): the viewer's memory curve. The peak ``predict``
    reports is what XLA allocates for the same buffers (``liveness.assigned_peak``), above the
    curve's top by the holes between buffers."""
    problem, buffers, starts, scale = expanded(pp, *predicted_buffers(pp, choice, mesh))
    curve = packed_profile(problem, choice, starts, buffers)
    if scale == 1:
        return curve
    # the top of each step position's stretch: one point per position, as without loops
    return np.pad(curve, (0, -len(curve) % scale)).reshape(-1, scale).max(axis=1)


def predicted_buffers(pp: PlanningProblem, choice, mesh: MeshSpec
                      ) -> tuple[Problem, list[tuple[int, int, int]], dict[int, int]]:
    """The problem with the lifetimes the chosen layouts and XLA's schedule imply, the buffers
    (bytes per device, start, end) the plan's moves add, and where each result is written:
    what the prediction holds in memory. The solvers keep to the problem's own lifetimes, an
    upper bound."""
    pp = early_updates(pp, choice, mesh)
    ends, sliced = sliced_reads(pp, choice, mesh)
    problem = pp.problem
    if ends:
        intervals = problem.intervals.copy()
        for slot, end in ends.items():
            intervals[slot, 1] = end
        intervals.flags.writeable = False
        problem = replace(problem, intervals=intervals)
    held, moved = result_layouts(pp, choice, mesh)
    if held:
        usages = problem.usages.copy()
        for slot, nbytes in held.items():
            usages[problem.offsets[slot] + choice[slot]] = nbytes
        usages.flags.writeable = False
        problem = replace(problem, usages=usages)
    return problem, [*gathered_buffers(pp, choice, mesh), *sliced, *moved], pp.result_starts


def result_layouts(pp: PlanningProblem, choice, mesh: MeshSpec
                   ) -> tuple[dict[int, int], list[tuple[int, int, int]]]:
    """Results the step returns in a layout other than the one their op makes (a parameter
    updated on a shard and returned in its argument's replicated layout: a ZeRO-2 style
    update): XLA's result buffer has the returned layout, and the made one is a temporary
    until the collective that moves it. Returns (result slot -> bytes per device it is
    returned in, the made buffers (bytes, start, end)). The problem counts a result in its
    op's layout; on the plan-quality MoE (8 devices, h100), whose plan updates the parameters
    8-way split and returns them replicated, that missed 10.5 of the 30 MiB of results."""
    held: dict[int, int] = {}
    made_bytes: dict[int, int] = {}
    for sink in pp.sink_slots:
        if sink is None:
            continue
        value = pp.slots[sink].value
        producer, output = pp.value_slot[value.id]
        if producer not in pp.result_starts:
            continue
        made = pp.slots[producer].strategies[choice[producer]].outputs[output]
        returned = pp.slots[sink].strategies[choice[sink]].outputs[0]
        if made is None or returned is None or made == returned:
            continue
        held[producer] = max(held.get(producer, 0),
                             int(value.nbytes * returned.shard_fraction(mesh)))
        made_bytes[producer] = int(value.nbytes * made.shard_fraction(mesh))
    return held, [(nbytes, pp.result_starts[p], pp.result_starts[p] + 1)
                  for p, nbytes in made_bytes.items()]


def sliced_reads(pp: PlanningProblem, choice, mesh: MeshSpec
                 ) -> tuple[dict[int, int], list[tuple[int, int, int]]]:
    """Values read later in a layout that is a local slice of the one they are made in (a
    replicated forward activation the backward pass reads batch-split): XLA's scheduler slices
    them right after they are made, as that frees memory, so the made buffer lives only until
    its last reader in its own layout (or in one a collective moves it to), and each slice from
    the maker to its readers. Returns (slot -> its shortened end, the slices). On the
    plan-quality MoE (8 devices, h100-2node), whose plan keeps attention replicated, the
    replicated 32 MiB attention probabilities were held to the backward pass: predicted /
    compiled peak 1.38.

    Only an op's single result whose every reader is an op (or a fanout that leaves it as
    made) is shortened, and only where those readers are all its readers (a value a fused
    reader recomputes from lives longer)."""
    reads: dict[int, list[Transfer]] = {}
    for t in pp.transfers:
        reads.setdefault(t.producer, []).append(t)
    ends: dict[int, int] = {}
    sliced: list[tuple[int, int, int]] = []
    for producer, transfers in reads.items():
        slot = pp.slots[producer]
        if slot.kind != "op" or len(slot.node.outputs) != 1 or producer in pp.result_starts:
            continue
        made = slot.strategies[choice[producer]].outputs[0]
        readers = _reads_in_layouts(pp, choice, reads, transfers, made)
        if readers is None:
            continue
        start, end = slot.interval
        keep, slices, last = start + 1, {}, start + 1
        for at, src, dst in readers:
            until = at + 1
            last = max(last, until)
            if dst is None or dst == src or reshard_steps(src, dst, mesh):
                keep = max(keep, until)
            else:
                slices[dst] = max(slices.get(dst, 0), until)
        if not slices or keep >= end or last < end:
            continue
        ends[producer] = keep
        value = slot.node.outputs[0]
        sliced.extend((int(value.nbytes * dst.shard_fraction(mesh)), start, until)
                      for dst, until in slices.items())
    return ends, sliced


def _reads_in_layouts(pp: PlanningProblem, choice, reads: dict[int, list[Transfer]],
                      transfers: list[Transfer], made: ShardingSpec
                      ) -> list[tuple[int, ShardingSpec, ShardingSpec]] | None:
    """(position, layout read from, layout needed) of each op that reads a value, through a
    fanout that leaves it as made; None where some reader is anything else."""
    readers = []
    for t in transfers:
        consumer = pp.slots[t.consumer]
        if consumer.kind == "op":
            at = pp.result_starts.get(t.consumer, consumer.interval[0])
            readers.append((at, pp.source(t, choice[t.producer]), t.required[choice[t.consumer]]))
        elif (consumer.kind == "fanout" and not consumer.shared
              and consumer.strategies[choice[t.consumer]].outputs[0] == made):
            inner = _reads_in_layouts(pp, choice, reads, reads.get(t.consumer, []), made)
            if inner is None:
                return None
            readers.extend(inner)
        else:
            return None
    return readers


def gathered_buffers(pp: PlanningProblem, choice, mesh: MeshSpec) -> list[tuple[int, int, int]]:
    """(bytes per device, start, end) of each operand the plan all-gathers for its readers: a
    buffer the problem's nodes do not hold (memory is per node, and the gathered layout is an
    edge's). Values gathered from the state alone (FSDP's parameters) are gathered together
    before the forward pass and held until their last reader, as XLA's combined all-gather
    does; others just before their reader. Readers needing one layout share one buffer (XLA
    gathers a value once per layout). On the plan-quality GPT under FSDP (2x4) they are 31 MiB
    and took predicted / compiled peak from 0.74 to 0.87. A loop gathers inside its body (a
    stacked operand a step's slice at a time), so a state value loops read is not gathered
    before the forward pass for them: the scanned GPT's stacked MLP weights (2x4, 12 MiB
    each) were held gathered from the first position to the update."""
    spans: dict[tuple, tuple[int, int, int]] = {}
    in_loops: list[tuple[int, int, int]] = []
    readers = shared_fanout_readers(pp)
    ports = shared_fanout_readers(pp, "port")
    loop_at = None
    for t in pp.transfers:
        consumer = pp.slots[t.consumer]
        loops = []
        if consumer.kind == "op":
            dst = t.required[choice[t.consumer]]
            positions = [pp.result_starts.get(t.consumer, consumer.interval[0])]
        elif consumer.kind == "fanout" and consumer.shared:
            # a shared fanout's move serves all its readers: held from the first to the last
            dst = consumer.strategies[choice[t.consumer]].outputs[0]
            positions = [pp.result_starts.get(r, pp.slots[r].interval[0])
                         for r in readers.get(t.consumer, ())]
            loops = ports.get(t.consumer, [])
        elif consumer.kind == "port":
            dst, positions, loops = t.required[choice[t.consumer]], [], [t.consumer]
        else:
            continue
        if dst is None or not positions and not loops:
            continue
        src = pp.source(t, choice[t.producer])
        if src == dst or not any(step.kind == "all-gather"
                                 for step in reshard_steps(src, dst, mesh)):
            continue
        nbytes = int(t.value.nbytes * dst.shard_fraction(mesh))
        # a loop gathers what it reads inside its body, a stacked operand's slice per step
        # (XLA's partitioner gathers the slice), not the whole value before the loop
        for port in loops:
            if loop_at is None:
                loop_at = _loop_positions(pp)
            at = loop_at.get(port)
            if at is not None:
                value = pp.slots[port].value
                whole = value is None or value.shape != t.value.shape[1:]
                in_loops.append((nbytes if whole else nbytes // t.value.shape[0], at, at + 1))
        if not positions:
            continue
        at = max(positions)
        first = 1 if t.combined and t.value.id in pp.head and not loops else min(positions)
        key = (t.value.id, dst)
        if key in spans:
            _, start, end = spans[key]
            first, at = min(first, start), max(at, end - 1)
        spans[key] = (nbytes, first, at + 1)
    return [*spans.values(), *in_loops]


def _loop_positions(pp: PlanningProblem) -> dict[int, int]:
    """Loop port slot -> the position of the loop whose body reads it (its ops sit there)."""
    at: dict[int, int] = {}
    for t in pp.transfers:
        if pp.slots[t.producer].kind == "port" and pp.slots[t.consumer].kind == "op":
            at.setdefault(t.producer, pp.slots[t.consumer].interval[0])
    return at


def shared_fanout_readers(pp: PlanningProblem, kind: str = "op") -> dict[int, list[int]]:
    """Shared fanout slot -> the slots of ``kind`` (ops, or loop ports) that read from it."""
    readers: dict[int, list[int]] = {}
    for t in pp.transfers:
        producer = pp.slots[t.producer]
        if producer.kind == "fanout" and producer.shared and pp.slots[t.consumer].kind == kind:
            readers.setdefault(t.producer, []).append(t.consumer)
    return readers


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
    made: pinned at the moved layout, XLA moved an op's operands there rather than its result,
    the plan-quality MoE's expert matmul on 4x2 gathering 12 MiB of operands for a 2 MiB
    result)."""
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


def local_costs(problem: Problem, choice) -> np.ndarray:
    """Per flat strategy entry: its node cost plus each incident edge's cost against the
    neighbour's chosen strategy, i.e. what the objective's share of that node would be if it
    alone switched (row ``choice[v]`` / column ``choice[u]`` of every edge matrix, gathered
    without a Python loop)."""
    choice = np.asarray(choice, np.int64)
    k, offsets = problem.num_strategies, problem.offsets
    local = np.array(problem.costs, np.float64)
    if problem.num_edges:
        u, v = problem.edges[:, 0], problem.edges[:, 1]
        start = problem.edge_offsets[:-1]
        e, s = _ragged(k[u])       # entry (s, choice[v]) of edge e, for u's strategies s
        np.add.at(local, offsets[u[e]] + s,
                  problem.edge_costs[start[e] + s * k[v[e]] + choice[v[e]]])
        e, s = _ragged(k[v])       # entry (choice[u], s), for v's strategies s
        np.add.at(local, offsets[v[e]] + s,
                  problem.edge_costs[start[e] + choice[u[e]] * k[v[e]] + s])
    return local


def _ragged(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row, position within row) for every entry of rows of the given lengths."""
    rows = np.repeat(np.arange(len(lengths)), lengths)
    return rows, np.arange(len(rows)) - np.repeat(np.cumsum(lengths) - lengths, lengths)


def explain(pp: PlanningProblem, choice, mesh: MeshSpec, hw: Hardware,
            keep: int = REJECTED_KEPT) -> dict[int, NodeExplanation]:
    """Per op node id: the chosen strategy and the ``keep`` cheapest rejected ones, each split
    into compute, own collectives and resharding in / out with every other choice fixed, and
    the collectives the choice causes. Linear in slots + edges; about 1% of planning time."""
    problem = pp.problem
    local = local_costs(problem, choice)
    into: dict[int, list[Transfer]] = {}
    for t in pp.transfers:
        into.setdefault(t.consumer, []).append(t)

    prices = _Prices(mesh, hw)
    table = {}
    for i, slot in enumerate(pp.slots):
        if slot.kind != "op":
            continue
        first = int(problem.offsets[i])
        here = local[first:first + len(slot.strategies)]
        c = int(choice[i])
        incoming = [(t, pp.source(t, choice[t.producer])) for t in into.get(i, ())]
        rejected = [int(s) for s in np.argsort(here, kind="stable")[:keep + 1]
                    if s != c and here[s] < FORBIDDEN][:keep]
        priced = [prices.price(slot, s, float(problem.costs[first + s]), float(here[s]),
                               incoming) for s in (c, *rejected)]
        table[slot.node.id] = NodeExplanation(priced[0], tuple(priced[1:]),
                                              _causes(slot, c, incoming, mesh),
                                              len(slot.strategies))
    return table


class _Prices:
    """Prices strategies for ``explain``; memoizes per layout pair and per strategy, as the
    layers of a model repeat the same few (the cost model's own caches hash the hardware
    profile on every call)."""

    def __init__(self, mesh: MeshSpec, hw: Hardware):
        self.mesh, self.hw = mesh, hw
        self.affine: dict = {}
        self.own: dict = {}

    def price(self, slot: Slot, s: int, node_ns: float, local_ns: float, incoming
              ) -> StrategyCost:
        strategy = slot.strategies[s]
        key = (id(strategy), slot.combined)      # strategies live as long as the problem
        own = self.own.get(key)
        if own is None:
            own = self.own[key] = (strategy.describe(self.mesh), sum(
                collective_time(self.hw, self.mesh, kind, nbytes, axes,
                                latency=not slot.combined)
                for kind, axes, nbytes in strategy.comm))
        label, comm = own[0], own[1] * slot.times
        reshard_in = 0.0
        for t, src in incoming:
            dst = t.required[s]
            if dst is not None and src != dst:
                pair = self.affine.get((src, dst))
                if pair is None:
                    pair = self.affine[(src, dst)] = reshard_affine(self.hw, self.mesh, src, dst)
                fixed, slope = pair
                reshard_in += ((0.0 if t.combined else fixed) + slope * t.value.nbytes) * t.times
        node = node_ns / NS
        return StrategyCost(label, strategy.inputs, strategy.outputs, max(node - comm, 0.0), comm,
                            reshard_in, max(local_ns / NS - node - reshard_in, 0.0))


def _causes(slot: Slot, c: int, incoming, mesh: MeshSpec) -> tuple[CollectiveCause, ...]:
    names = mesh.axis_names
    strategy = slot.strategies[c]
    found = [CollectiveCause(kind, tuple(names[a] for a in axes), nbytes, slot.times,
                             "strategy") for kind, axes, nbytes in strategy.comm]
    for t, src in incoming:
        dst = t.required[c]
        if dst is None:
            continue
        label = f"reshards operand %{t.value.id}{' ' + t.value.name if t.value.name else ''}"
        found += [CollectiveCause(step.kind, tuple(names[a] for a in step.axes),
                                  step.factor * t.value.nbytes, t.times, label)
                  for step in reshard_steps(src, dst, mesh)]
    return tuple(found)


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

    # a broadcast of a scalar constrained to a split layout, where its reader needs it, made
    # XLA move the GPT's loss activations and labels (2x4, 2 nodes: 48.6 MiB of collectives,
    # compiled 0.536 ms, against 40.6 MiB, 0.379 ms left unconstrained)
    value_specs = {vid: produced(s, k) for vid, (s, k) in pp.value_slot.items()
                   if vid not in inputs and not (pp.slots[s].kind == "op"
                                                 and made_from_nothing(pp.slots[s].node))}
    moved = moved_state(pp, choice)
    made_specs = {vid: value_specs[vid] for vid in moved
                  if vid in value_specs and value_specs[vid] != moved[vid]}
    value_specs.update(moved)
    reasons = dict(pins.reasons)
    for i in range(len(graph.inputs)):
        reasons.setdefault(f"in:{i}", "chosen by the solver")
    for o in range(len(graph.outputs)):
        reasons.setdefault(f"out:{o}", "chosen by the solver")
    operand_specs = {slot.node.id: slot.strategies[c].inputs
                     for slot, c in zip(pp.slots, choice) if slot.kind == "op"}
    explanation = {} if hw is None else explain(pp, choice, mesh, hw)
    curve = () if hw is None else tuple(memory_profile(pp, choice, mesh).tolist())
    return Plan(graph, mesh, input_specs, output_specs, value_specs, in_tree, out_tree, METHOD,
                reasons, tuple(pp.unplanned), prediction, solver, operand_specs, explanation,
                curve, "" if hw is None else hw.name, made_specs=made_specs)


LP_ENGINE = "lp (highs)"
#: A priced plan further than this above the LP bound is checked against the search.
PRICED_GAP = 0.10
#: Without a budget, a replicated-state plan this close to the search's is taken: the two price
#: a gradient all-reduce and its reduce-scatter + all-gather alike, but the latter are two ops
#: and a gathered copy of the state (the test conv model on 8 devices: 0.0201 ms against 0.0200
#: predicted).
REPLICATED_STATE_TIE = 0.01
#: A start-up-latency re-solve stops at this multiple of the first LP's simplex iterations.
RESOLVE_ITERATIONS = 1.5
#: The LP with fixed charges is solved for problems up to this many strategies: on the
#: plan-quality GPT (14k) it ran 16 s into its iteration cap without a budget, fractional, its
#: rounding 2.6 times dearer, and under a budget (4x2, 2 nodes) 124 s into the wall clock for
#: no plan; the conv model (1.9k) and the MoE (8.7k) solve in seconds.
FIXED_CHARGE_MAX_STRATEGIES = 10_000


def search_plan(graph: Graph, mesh: MeshSpec, hw: Hardware, pins: Pins, *, in_tree, out_tree,
                donated: set[int], updated: dict[int, int], memory_budget: int | None,
                time_limit: float, progress: Callable[[str], None] | None = None) -> Plan:
    """Plan ``graph``: the local-polytope LP first (solver/lp.py); when its optimum is integral it
    is a proven optimal plan; when a memory limit makes it fractional, the LP priced by its
    memory duals (``solve_lagrangian``), and the combinatorial search (solve.py) as well when
    that plan is more than ``PRICED_GAP`` above the LP bound or none fits, keeping the cheaper.
    The LP optimum is the lower bound the gap is reported against."""
    pp = build_problem(graph, mesh, hw, pins, donated=donated, updated=updated,
                       usage_limit=memory_budget)
    problem = pp.problem
    if progress:
        progress(f"{problem.num_nodes} choices, {int(problem.num_strategies.sum())} strategies, "
                 f"{problem.num_edges} edges; solving the LP relaxation")
    start = time.perf_counter()
    choice, stats = solve_plan_problem(problem, time_limit, progress)
    refined_by_lp = stats.engine == LP_ENGINE
    # a variant of the LP is the same LP with some costs raised or rows added: one that takes
    # many times the first solve's iterations is degenerate and given up (an NNX GPT with its
    # annotations required: 2 min at the full cap for no plan, against 3 s for the first
    # solve) (a plan of the search, whose stats hold no LP iterations, gets the floor)
    iterations = stats.details.get("lp_iterations")  # the first LP's, where it was solved
    resolve_cap = int(max(MIN_ITERATIONS, RESOLVE_ITERATIONS * iterations)
                      ) if iterations else MIN_ITERATIONS

    def resolve(variant: Problem):
        # the LP alone: re-solving where it is fractional (a binding budget) takes the
        # memory-priced LPs and the combinatorial search, minutes on the plan-quality LLaMA
        # (solved as the first LP was: without the memory rows where it was, kept if it fits)
        budget_free = stats.details.get("budget_free", False)
        lp = solve_local_polytope(replace(variant, usage_limit=None) if budget_free else variant,
                                  time_limit=time_limit, max_iterations=resolve_cap)
        fits = lp.integral and (not budget_free or evaluate(variant, lp.choice).feasible)
        return lp.choice if fits else None

    refined, forbidden = (refine_latency(pp, choice, mesh, hw, resolve, progress)
                          if refined_by_lp else (choice, ()))
    # on every path: a plan of the memory-priced LPs or the search is priced by bandwidth as
    # much as the first LP's (the conv model, 2x4 across two nodes under a budget, whose
    # budget-free LP no longer fit once a strided convolution's input gradient cost what its
    # forward does: the priced plan 0.088 ms predicted, 0.085 compiled; with the charges
    # 0.054 ms predicted)
    refined, forbidden = _fixed_charge_plan(pp, mesh, hw, (refined, forbidden), time_limit,
                                            resolve_cap, progress)
    if refined_by_lp and memory_budget is None:
        refined, forbidden = _replicated_state_seed(pp, graph, updated, mesh, hw, resolve,
                                                    (refined, forbidden), progress)
    if forbidden:
        cost = evaluate(problem, refined).cost
        bound = stats.bound
        choice = refined
        stats = replace(stats, seconds=time.perf_counter() - start, objective=cost / NS,
                        status="feasible", gap=None if bound is None or not cost else
                        max(0.0, (cost - bound * NS) / cost),
                        details=dict(stats.details, latency_forbidden=[
                            key if isinstance(key, str) else " ".join(map(str, key))
                            for key in forbidden]))
    choice = least_held_free_layouts(pp, choice)
    prediction = predict(pp, choice, mesh, hw, memory_budget)
    if memory_budget is not None:
        # the peak the budget constraint saw (below the predicted peak, which adds the buffers
        # resharding makes and the allocator's holes): a caller that finds the compiled program
        # over budget scales this one down, or the same plan fits the next budget again
        stats = replace(stats, details=dict(
            stats.details, constrained_peak=int(evaluate(problem, choice).peak_usage)))
    return plan_from_choice(pp, choice, graph, mesh, in_tree=in_tree, out_tree=out_tree,
                            pins=pins, prediction=prediction, solver=stats, hw=hw)


def least_held_free_layouts(pp: PlanningProblem, choice) -> np.ndarray:
    """``choice`` with each value made from nothing (``problem.made_from_nothing``) in the
    layout that holds least among those its readers' layouts make equally cheap. Its layouts
    cost no time, so the solvers pick among them arbitrarily: the LP left the GPT loss
    gradient's 64 MiB broadcast of zeros replicated, which its scatter reads split, and the
    predicted peak counted it whole (2x4, h100: predicted / compiled peak 1.22 -> 0.97). A
    pass after the solve, not a tie-break in the costs: 0.01 ns ties on every broadcast made
    HiGHS report the budgeted GPT LP (2x4, 2 nodes) unbounded after 35k iterations."""
    problem = pp.problem
    choice = np.array(choice, np.int64)
    local = local_costs(problem, choice)
    for i, slot in enumerate(pp.slots):
        if slot.kind != "op" or not made_from_nothing(slot.node):
            continue
        costs = local[problem.offsets[i]:problem.offsets[i + 1]]
        tied = np.flatnonzero(costs <= costs[choice[i]] + 1e-9 * max(1.0, abs(costs[choice[i]])))
        choice[i] = int(tied[np.argmin(slot.usages[tied])])
    return choice


def _fixed_charge_plan(pp: PlanningProblem, mesh: MeshSpec, hw: Hardware, found,
                       time_limit: float, max_iterations: int, progress):
    """``found`` (choice, forbidden classes), or the optimum of the LP in which each class of
    combined op pays its start-up latency once (``FixedCharge``; rounded where fractional)
    where that fits and is cheaper with the fixed charges counted. ``refine_latency`` only
    forbids classes the plan makes, one move at a time, so it cannot reach a plan of other
    classes that is cheaper only once their latency is counted: on the plan-quality conv
    model (4x2, 2 nodes, under a budget) it stopped at three combined ops over the whole mesh
    (predicted 0.091 ms, compiled 0.087 against Megatron's 0.063); this LP finds 0.057
    predicted, 0.054 compiled. Solved only where the start-up charges are at least
    ``LATENCY_SHARE`` of the step, and for small problems (``FIXED_CHARGE_MAX_STRATEGIES``)."""
    choice, forbidden = found
    problem = pp.problem
    if not latency_bound(pp, choice, mesh, hw) or \
            int(problem.num_strategies.sum()) > FIXED_CHARGE_MAX_STRATEGIES:
        return found
    charges = tuple(FixedCharge(sum(class_seconds([key], mesh, hw).values()) * NS,
                                entries.nodes, entries.edges)
                    for key, entries in sorted(class_entries(pp, mesh).items()))
    # the charges' rows make each simplex iteration several times slower; under a budget the
    # greedy walk has no replicated-state seed to fall back on, so it gets more of them
    lp = solve_local_polytope(problem, time_limit=time_limit, charges=charges,
                              max_iterations=max_iterations * (
                                  1 if problem.usage_limit is None else 4))
    fits = lp.status == "optimal" and evaluate(problem, lp.choice).feasible
    base = total_nanoseconds(pp, choice, mesh, hw)
    # its argmax rounding where fractional: a plan like any other, priced the same way
    total = total_nanoseconds(pp, lp.choice, mesh, hw) if fits else float("inf")
    cheaper = total < base * (1 - 1e-6)
    if progress:
        progress(f"start-up latency: the LP with fixed charges: {lp.status}" + (
            f", {'integral' if lp.integral else 'rounded'} {total / NS * 1e3:.4f} ms against "
            f"{base / NS * 1e3:.4f}" if fits else ", no plan") + ("; taken" if cheaper else ""))
    if not cheaper:
        return found
    return np.asarray(lp.choice, np.int64), forbidden or ("fixed start-up charges",)


def _replicated_state_seed(pp: PlanningProblem, graph: Graph, updated: dict[int, int],
                           mesh: MeshSpec, hw: Hardware, resolve, found, progress):
    """``found`` (choice, forbidden classes), or the plan that keeps the state (the arguments
    the step updates) replicated, refined for start-up latency, where that is cheaper with the
    fixed charges counted, or within ``REPLICATED_STATE_TIE`` of it.

    The LP prices collectives by bandwidth and leaves the latency of each combined op to
    ``refine_latency``, a greedy walk that can stop in a mix of gathers, scatters and
    reductions when data parallel's single all-reduce is cheaper: on the plan-quality conv
    model (2x4, h100) the searched plan measured 0.037 ms against data parallel's 0.022, its
    prediction 0.040 ms against 0.031 for the replicated-state plan. Solved only where the
    latency refinement ran (start-up charges at least ``LATENCY_SHARE`` of the step) and
    without a memory budget (replicated state is the plan a budget rules out)."""
    choice, forbidden = found
    if not latency_bound(pp, choice, mesh, hw):
        return found
    problem = pp.problem
    base = total_nanoseconds(pp, choice, mesh, hw)
    costs = np.array(problem.costs)
    penalty = PENALTY_PLANS * base
    pinned = 0
    for i in sorted(set(updated.values())):
        slot_index = pp.value_slot.get(graph.inputs[i].id, (None,))[0]
        if slot_index is None:
            continue
        whole = [st.outputs[0].is_replicated for st in pp.slots[slot_index].strategies]
        if any(whole) and not all(whole):
            first = int(problem.offsets[slot_index])
            costs[first:first + len(whole)] += np.where(whole, 0.0, penalty)
            pinned += 1
    if not pinned:
        return found
    seeded = resolve(replace(problem, costs=costs))
    if seeded is None or not evaluate(problem, seeded).feasible:
        return found
    seeded, seeded_forbidden = refine_latency(pp, seeded, mesh, hw, resolve, progress)
    seeded_total = total_nanoseconds(pp, seeded, mesh, hw)
    cheaper = seeded_total < base * (1 + REPLICATED_STATE_TIE)
    if progress:
        progress(f"replicated state: {seeded_total / NS * 1e3:.4f} ms against "
                 f"{base / NS * 1e3:.4f}; " + ("planning the state replicated" if cheaper
                                               else "kept the search's plan"))
    if not cheaper:
        return found
    return np.asarray(seeded, np.int64), seeded_forbidden or ("replicated state",)


def solve_plan_problem(problem: Problem, time_limit: float,
                       progress: Callable[[str], None] | None = None):
    """(choice, SolverStats) of ``problem`` by ``search_plan``'s solver sequence."""
    start = time.perf_counter()
    lp, budget_free = None, False
    if problem.usage_limit is not None:
        # the optimum without the budget, where it fits, is the optimum with it, and the LP
        # without memory rows is many times faster (the plan-quality LLaMA, 4x2, 2 nodes: 4.8 s
        # integral and within the budget, against the 120 s limit and no bound with them)
        free = solve_local_polytope(replace(problem, usage_limit=None), time_limit=time_limit)
        fits = free.integral and evaluate(problem, free.choice).feasible
        if progress:
            progress(f"LP relaxation without the memory budget: {free.status} in "
                     f"{free.seconds:.1f}s, " + ("integral and within the budget" if fits else
                                                 "not a plan within the budget"))
        if fits:
            lp, budget_free = free, True
    if lp is None:
        lp = solve_local_polytope(problem, time_limit=time_limit)
        if progress:
            progress(f"LP relaxation: {lp.status} in {lp.seconds:.1f}s "
                     f"({lp.iterations:,} simplex iterations), "
                     f"{'integral' if lp.integral else 'fractional'}, bound "
                     f"{lp.objective / NS * 1e3:.3f} ms")
    if lp.integral:
        choice = lp.choice
        cost = evaluate(problem, choice).cost
        stats = SolverStats(LP_ENGINE, problem.num_nodes, problem.num_edges,
                            int(problem.num_strategies.sum()), time.perf_counter() - start,
                            cost / NS, lp.objective / NS, 0.0, "optimal",
                            {"lp_variables": lp.variables, "lp_iterations": lp.iterations,
                             "groups": len(problem.groups),
                             "budget_free": budget_free})
    else:
        priced = solve_lagrangian(problem, lp, time_limit=time_limit, progress=progress) \
            if lp.status == "optimal" and problem.usage_limit is not None else None
        stats = None
        if priced is not None:
            choice, solves = priced
            cost = evaluate(problem, choice).cost
            stats = SolverStats("lp + memory prices (highs)", problem.num_nodes,
                                problem.num_edges, int(problem.num_strategies.sum()),
                                time.perf_counter() - start, cost / NS, lp.objective / NS,
                                max(0.0, (cost - lp.objective) / cost) if cost else 0.0,
                                "feasible", {"lp_variables": lp.variables,
                                             "lp_iterations": lp.iterations,
                                             "groups": len(problem.groups),
                                             "priced_lp_solves": solves})
        if stats is None or (stats.gap or 0.0) > PRICED_GAP:
            # uniformly scaled prices jump between very lean and over-budget plans on some
            # problems (a 2-node GPT under a budget: 2.53 ms priced against an LP bound of
            # 0.58; the search found 0.94): search as well and keep the cheaper plan
            if progress:
                progress("searching" if stats is None else
                         f"searching (the priced plan is {stats.gap:.0%} above the LP bound)")
            try:
                # twice the per-solve limit: CP-SAT needs it on these problems (the GPT above:
                # 1.69 ms at 30 s of deterministic time, 0.94 ms at 60 s)
                # CP-SAT only: toulbar2 with every memory row stated gave none of the 48
                # plan-quality rows a better plan and added up to 44 s of planning (its
                # preprocessing of a 954-node GPT core with 120 memory rows alone takes 20 s);
                # the lazy rows came later and were not tried here
                solution = solve(problem, time_limit=2 * time_limit if stats else time_limit,
                                 deterministic=True, progress=progress, toulbar2=False)
            except PlanInfeasibleError:
                if stats is None:
                    raise
                solution = None            # the priced plan fits; the search found none
            if solution is not None and (stats is None or solution.cost < stats.objective * NS):
                choice = np.asarray(solution.choice, np.int64)
                bound = solution.lower_bound
                if lp.status == "optimal":
                    bound = max(bound or 0.0, lp.objective)
                gap = None if bound is None or solution.cost == 0 else max(
                    0.0, (solution.cost - bound) / solution.cost)
                stats = SolverStats(
                    str(solution.stats.get("engine", "search")), problem.num_nodes,
                    problem.num_edges, int(problem.num_strategies.sum()),
                    time.perf_counter() - start, solution.cost / NS,
                    None if bound is None else bound / NS, gap, solution.status,
                    dict(solution.stats, lp_seconds=lp.seconds, lp_status=lp.status,
                         time_limit_reached=solution.status != "optimal"))
    return np.asarray(choice, np.int64), stats
