"""Where XLA's scheduler runs a training step's update: as soon as each gradient is ready.

The jaxpr computes every gradient, then every optimizer update. XLA's memory-minimising
scheduler moves each parameter's update chain (elementwise ops from its gradient and optimizer
state to the new parameter and state) up to just after that gradient is made, since that frees
the gradient early. Two things follow for memory: the gradient dies there, and the new
parameter and state are written there, so XLA's buffer assignment can no longer keep
temporaries of the rest of the backward pass in those results' buffers (``liveness``). A
compiled plan that reduce-scatters each gradient on its own shows it: a layer's new parameter
is written midway through the backward pass, where the jaxpr order writes it after it.

Gradients all-reduced on their way are different: XLA's all-reduce combiner makes one
all-reduce of all of them (``Transfer.combined``), which runs once the last of them is made,
so what is computed from any of them waits for that (data parallel: the updates stay after the
backward pass). Reduce-scatters are not combined in the CPU build.

The moved ops keep their own order right after the position they wait for, and every lifetime
is renumbered (``_resequenced``). This is the prediction's schedule; the solvers keep the
jaxpr order's lifetimes.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from autoshard.cost_model.reshard import reshard_steps
from autoshard.ir.mesh import MeshSpec
from autoshard.ir.primitives import ELEMENTWISE
from autoshard.passes.problem import (PlanningProblem, Transfer, reader_map,
                                      readers_through_fanouts)

#: Ops an update chain is made of: XLA fuses them into kernels it can schedule anywhere after
#: their operands.
CHAIN_OPS = ELEMENTWISE | {"broadcast_in_dim", "reshape", "squeeze", "expand_dims"}


def early_updates(pp: PlanningProblem, choice, mesh: MeshSpec) -> PlanningProblem:
    """``pp`` with each update chain at the position its operands are ready (module docstring):
    its ops' lifetimes, the results' positions (``result_starts``) and the lifetimes of the
    values the chains read (shortened where the chain was their last reader)."""
    position = {i: pp.result_starts.get(i, slot.interval[0])
                for i, slot in enumerate(pp.slots) if slot.kind == "op"}
    readers = reader_map(pp)
    operands: dict[int, list] = {}
    for t in pp.transfers:
        operands.setdefault(t.consumer, []).append(t)
    chain = _chain_slots(pp, position, readers)
    if not chain:
        return pp
    # XLA's all-reduce combiner makes one all-reduce of every combined value reduced on its
    # way: what is computed from any of them waits until all of them are made
    waits: set[int] = set()
    combined_at = 0
    for slot in sorted(position, key=position.get):
        for t in operands.get(slot, ()):
            maker = _maker(pp, t.producer)
            if maker in waits:
                waits.add(slot)
            elif t.combined and t.value.id not in pp.head and _all_reduced(pp, t, choice, mesh):
                waits.add(slot)
                combined_at = max(combined_at, position.get(maker, 0))
    moved: dict[int, int] = {}
    now = dict(position)
    for slot in sorted(chain, key=position.get):
        ready = max((_made_at(pp, now, t.producer) for t in operands.get(slot, ())),
                    default=0)
        if slot in waits:
            ready = max(ready, combined_at)
        if ready < position[slot]:
            moved[slot] = now[slot] = ready
    # an op before the chain's result runs just before its first reader there, not as soon
    # as it can (XLA's scheduler does not run early what only holds memory longer: weight
    # decay's multiple of a parameter, gathered for it)
    for slot in sorted(chain, key=position.get, reverse=True):
        later = [now[r] for r in _op_readers(pp, slot, readers) if r in chain]
        if slot in pp.result_starts or not later:
            continue
        moved.pop(slot, None)
        now[slot] = position[slot]
        if min(later) < position[slot]:
            moved[slot] = now[slot] = min(later)
    if not moved:
        return pp
    return _resequenced(pp, position, moved, readers)


def _resequenced(pp: PlanningProblem, position: dict[int, int], moved: dict[int, int],
                 readers: dict[int, list[int]]) -> PlanningProblem:
    """``pp`` with the moved ops (slot -> the position they run after) right after those
    positions, in their own order, and every lifetime renumbered: a value read by ops lives
    to its last reader in the new order (as far past it as before: 0 where that reader
    writes over it), any other to where the position it ended at went."""
    horizon = int(pp.problem.intervals[:, 1].max()) if len(pp.problem.intervals) else 0
    after = {position[slot]: at for slot, at in moved.items()}
    order = sorted(range(1, horizon), key=lambda p: (after[p], 1, p) if p in after else (p, 0, p))
    remap = np.arange(horizon + 1)
    remap[np.asarray(order, np.int64)] = np.arange(1, horizon)
    new_position = {slot: int(remap[p]) for slot, p in position.items()}
    intervals = pp.problem.intervals.copy()
    slots = list(pp.slots)
    for i, slot in enumerate(pp.slots):
        start, end = (int(x) for x in intervals[i])
        if end <= start or start == 0 and end >= horizon:
            continue
        ops = _op_readers(pp, i, readers)
        new_start = int(remap[start]) if start else 0
        if ops and 0 <= end - max(position[r] for r in ops) <= 1 and end < horizon:
            new_end = max(new_position[r] for r in ops) + end - max(position[r] for r in ops)
        else:
            new_end = int(remap[end - 1]) + 1 if 0 < end <= horizon - 1 else end
        interval = (new_start, max(new_end, new_start + 1))
        intervals[i] = interval
        if slot.interval == (start, end):
            slots[i] = replace(slot, interval=interval)
    intervals.flags.writeable = False
    starts = {slot: int(remap[at]) for slot, at in pp.result_starts.items()}
    return replace(pp, slots=slots, result_starts=starts,
                   problem=replace(pp.problem, intervals=intervals), memo={})


def _chain_slots(pp: PlanningProblem, position: dict[int, int],
                 readers: dict[int, list[int]]) -> set[int]:
    """Op slots of update chains: chain ops run once per step whose every reader is a chain
    op or a result's sink, and that lead to a result."""
    chain: set[int] = set()
    for slot in sorted(position, key=position.get, reverse=True):
        s = pp.slots[slot]
        if s.node.op not in CHAIN_OPS or s.times != 1.0 or not s.node.outputs:
            continue
        if slot in pp.result_starts:
            chain.add(slot)
            continue
        # a result's sink does not count; a loop port is never a chain op
        kept = [r for r in readers_through_fanouts(pp, slot, readers)
                if pp.slots[r].kind != "sink"]
        if kept and all(r in chain for r in kept):
            chain.add(slot)
    return chain


def _op_readers(pp: PlanningProblem, slot: int, readers: dict[int, list[int]]) -> list[int]:
    """The op slots reading ``slot``'s values (through fanouts)."""
    return [r for r in readers_through_fanouts(pp, slot, readers) if pp.slots[r].kind == "op"]


def _all_reduced(pp: PlanningProblem, t: Transfer, choice, mesh: MeshSpec) -> bool:
    """Whether ``t``'s value is all-reduced on its way, by its maker's strategy or the move:
    XLA's all-reduce combiner merges those into one op after the last matmul. Reduce-scatters
    stay apart in the CPU build."""
    maker = _maker(pp, t.producer)
    slot = pp.slots[maker]
    if slot.kind == "op" and any(kind == "all-reduce" for kind, _, _ in
                                 slot.strategies[choice[maker]].comm):
        return True
    src = pp.source(t, choice[t.producer])
    dst = t.required[choice[t.consumer]]
    return dst is not None and src != dst and any(
        step.kind == "all-reduce" for step in reshard_steps(src, dst, mesh))


def _made_at(pp: PlanningProblem, position: dict[int, int], slot: int) -> int:
    maker = _maker(pp, slot)
    return position.get(maker, pp.slots[maker].interval[0])


def _maker(pp: PlanningProblem, slot: int) -> int:
    """The slot that makes the value ``slot`` passes on (a fanout's source)."""
    while pp.slots[slot].kind == "fanout" and pp.slots[slot].source is not None:
        slot = pp.slots[slot].source
    return slot
