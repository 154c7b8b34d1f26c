"""What a chosen plan costs: one step's compute, collectives (by kind, with counts and bytes)
and peak memory, for the plan's ``Prediction`` and ``autoshard.verify``.

The strategy problem is pairwise and counts each value in its producer's layout over its
problem lifetime, so the prediction re-walks the chosen strategies instead: it adds the
start-up latency each combined collective pays once (latency.py), and holds in memory the
buffers the plan's moves make that no problem node holds (operands gathered for their readers,
slices read later, results returned in another layout), with the lifetimes XLA's scheduler
gives them (early_updates.py, liveness.py, loop_liveness.py).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from autoshard.cost_model.collectives import collective_time
from autoshard.cost_model.compute import compute_time, node_flops, strategy_bytes
from autoshard.cost_model.hardware import Hardware
from autoshard.cost_model.reshard import reshard_steps
from autoshard.ir.mesh import MeshSpec
from autoshard.ir.plan import Prediction
from autoshard.ir.sharding import ShardingSpec
from autoshard.passes.latency import class_seconds, combined_ops
from autoshard.passes.prediction.early_updates import early_updates
from autoshard.passes.prediction.liveness import assigned_peak, packed_profile
from autoshard.passes.prediction.loop_liveness import expanded
from autoshard.passes.problem import PlanningProblem, Transfer
from autoshard.solver.problem import Problem


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
        entry[0] += times if latency else 0.0   # combined members: counted per op below
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
    # the combined ops: their start-up latency and their count, once per op (latency.py)
    ops = combined_ops(pp, choice, mesh)
    for kind, t in class_seconds(ops, mesh, hw).items():
        seconds[kind] = seconds.get(kind, 0.0) + t
    for (kind, _, _), n in ops.items():
        counts.setdefault(kind, [0.0, 0.0])[0] += n
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
    op's layout, which misses most of a parameter updated split and returned replicated."""
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
    the maker to its readers. Returns (slot -> its shortened end, the slices). Held whole to
    the backward pass, such a value (attention probabilities, where the plan keeps attention
    replicated) overstates the peak.

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
    gathers a value once per layout). A loop gathers inside its body (a stacked operand a
    step's slice at a time), so a state value loops read is not gathered before the forward
    pass for them (a scanned model's stacked weights are not held gathered from the first
    position to the update)."""
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
