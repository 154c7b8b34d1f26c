"""Pipeline schedules: which forward / backward op each pipeline device runs, in what order, and
when, given the ops' durations.

A pipeline of ``stages`` devices holds ``stages * virtual`` model chunks; chunk ``c`` lives on
device ``c % stages`` (Megatron's interleaving, Narayanan et al., "Efficient Large-Scale Language
Model Training on GPU Clusters Using Megatron-LM", SC'21; ``virtual = 1`` is the plain pipeline).
``F(m, c)`` is chunk c's forward on microbatch m, ``B(m, c)`` its backward. A schedule is one
op order per device:

- ``gpipe`` (Huang et al., 2019): every forward, then every backward.
- ``1f1b`` (PipeDream-Flush, Narayanan et al., 2019/2021): ``stages - d - 1`` warm-up forwards,
  then one forward one backward, then the remaining backwards; same bubble as GPipe, at most
  ``stages`` microbatches' activations alive instead of ``microbatches``.
- ``interleaved`` (Megatron's interleaved 1F1B): forwards in groups of ``stages`` microbatches
  chunk by chunk, warm-up ``(stages - d - 1) * 2 + (virtual - 1) * stages``; bubble shrinks by
  ``virtual``.

``timeline`` places the orders in time: an op starts when its device is free and its inputs
exist (the previous chunk's forward, the next chunk's backward, and its own forward), which is
exactly what the SPMD runtime does tick by tick, so with unit durations the same function gives
the runtime's static tick table and, with measured durations, the simulator's timeline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

SCHEDULES = ("gpipe", "1f1b", "interleaved")


@dataclass(frozen=True, slots=True)
class PipelineOp:
    kind: str        # "F" or "B"
    microbatch: int
    chunk: int


@dataclass(frozen=True, slots=True)
class TimedOp:
    op: PipelineOp
    device: int
    start: float
    end: float


def chunk_device(chunk: int, stages: int) -> int:
    return chunk % stages


def device_orders(schedule: str, stages: int, microbatches: int,
                  virtual: int = 1) -> list[list[PipelineOp]]:
    """Per device, the order in which it runs its forward and backward ops."""
    if schedule not in SCHEDULES:
        raise ValueError(f"pipeline schedule must be one of {SCHEDULES}, got {schedule!r}")
    if stages < 1 or microbatches < 1 or virtual < 1:
        raise ValueError(f"stages, microbatches and virtual stages must be >= 1, got "
                         f"{stages}, {microbatches}, {virtual}")
    if schedule != "interleaved" and virtual != 1:
        raise ValueError(f"virtual_stages={virtual} needs schedule='interleaved'")
    if schedule == "interleaved" and microbatches % stages:
        raise ValueError(f"the interleaved schedule needs microbatches ({microbatches}) to be a "
                         f"multiple of the stages ({stages})")
    orders = []
    for d in range(stages):
        chunks = [v * stages + d for v in range(virtual)]
        if schedule == "gpipe":
            order = ([PipelineOp("F", m, chunks[0]) for m in range(microbatches)]
                     + [PipelineOp("B", m, chunks[0]) for m in range(microbatches)])
        elif schedule == "1f1b":
            order = _one_f_one_b(
                [PipelineOp("F", m, chunks[0]) for m in range(microbatches)],
                [PipelineOp("B", m, chunks[0]) for m in range(microbatches)],
                min(stages - d - 1, microbatches))
        else:
            forwards = [PipelineOp("F", m, c) for g in range(0, microbatches, stages)
                        for c in chunks for m in range(g, g + stages)]
            backwards = [PipelineOp("B", m, c) for g in range(0, microbatches, stages)
                         for c in reversed(chunks) for m in range(g, g + stages)]
            warmup = min((stages - d - 1) * 2 + (virtual - 1) * stages, len(forwards))
            order = _one_f_one_b(forwards, backwards, warmup)
        orders.append(order)
    return orders


def _one_f_one_b(forwards: list, backwards: list, warmup: int) -> list:
    order = list(forwards[:warmup])
    f, b = warmup, 0
    while f < len(forwards) or b < len(backwards):
        if f < len(forwards):
            order.append(forwards[f])
            f += 1
        if b < len(backwards):
            order.append(backwards[b])
            b += 1
    return order


def timeline(orders: list[list[PipelineOp]], stages: int, virtual: int,
             forward_time: Callable[[int], float], backward_time: Callable[[int], float],
             link_time: float = 0.0) -> list[TimedOp]:
    """Start and end of every op, each device running its order as early as its inputs allow;
    ``link_time`` is added to every transfer between devices."""
    chunks = stages * virtual
    done: dict[PipelineOp, float] = {}
    device_free = [0.0] * stages
    position = [0] * stages
    placed: list[TimedOp] = []
    total = sum(len(o) for o in orders)
    while len(placed) < total:
        progressed = False
        for d in range(stages):
            while position[d] < len(orders[d]):
                op = orders[d][position[d]]
                deps = _dependencies(op, chunks)
                if any(dep not in done for dep in deps):
                    break
                ready = max([device_free[d]] + [
                    done[dep] + (link_time if chunk_device(dep.chunk, stages) != d else 0.0)
                    for dep in deps])
                duration = (forward_time if op.kind == "F" else backward_time)(op.chunk)
                placed.append(TimedOp(op, d, ready, ready + duration))
                done[op] = ready + duration
                device_free[d] = ready + duration
                position[d] += 1
                progressed = True
        if not progressed:
            stuck = {d: orders[d][position[d]] for d in range(stages)
                     if position[d] < len(orders[d])}
            raise ValueError(f"pipeline schedule deadlocks; next ops per device: {stuck}")
    return sorted(placed, key=lambda t: (t.start, t.device))


def _dependencies(op: PipelineOp, chunks: int) -> list[PipelineOp]:
    if op.kind == "F":
        return [PipelineOp("F", op.microbatch, op.chunk - 1)] if op.chunk > 0 else []
    deps = [PipelineOp("F", op.microbatch, op.chunk)]
    if op.chunk < chunks - 1:
        deps.append(PipelineOp("B", op.microbatch, op.chunk + 1))
    return deps


def tick_table(schedule: str, stages: int, microbatches: int,
               virtual: int = 1) -> list[list[PipelineOp | None]]:
    """``table[t][d]``: the op device d runs at tick t (None: idle), every op one tick; the
    SPMD runtime steps through it in lock-step."""
    orders = device_orders(schedule, stages, microbatches, virtual)
    timed = timeline(orders, stages, virtual, lambda c: 1.0, lambda c: 1.0)
    ticks = int(max(t.end for t in timed))
    table: list[list[PipelineOp | None]] = [[None] * stages for _ in range(ticks)]
    for t in timed:
        table[int(t.start)][t.device] = t.op
    return table
