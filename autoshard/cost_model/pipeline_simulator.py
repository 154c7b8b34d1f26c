"""The pipeline schedule simulator: per-chunk forward / backward times, microbatches, stages and
schedule -> timeline, step time, bubble fraction and peak in-flight activations per stage.

The timeline is ``ir.pipeline_schedule``'s list scheduling with real durations: every device
runs its order, each op as early as its inputs allow, a transfer between devices costing
``link_time``.
The bubble fraction is the mean idle share of a device over the step. With equal stages it is
(S-1)/(M+S-1) for GPipe and 1F1B (Huang et al., 2019; Narayanan et al., 2021) and, with ``V``
virtual stages per device and backward = 2x forward, (S-1)/(V*M+S-1) for interleaved 1F1B:
the warm-up and cool-down still take (S-1) chunk-slots of forward and backward, but a chunk is
1/V of a stage, while the useful work per device stays M*(f+b) (derived in
tests/ir/test_pipeline_schedule.py, which checks the simulator against both formulas).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from autoshard.ir.pipeline_schedule import TimedOp, device_orders, timeline


@dataclass(frozen=True)
class Simulation:
    """``step_seconds``: makespan; ``bubble_fraction``: mean idle share per device;
    ``in_flight[d]``: the most microbatch-chunks whose forward ran and backward has not (what a
    freeing runtime must keep stashed); ``ops``: the timeline."""

    step_seconds: float
    bubble_fraction: float
    in_flight: tuple[int, ...]
    ops: tuple[TimedOp, ...]


def simulate(schedule: str, stages: int, microbatches: int, virtual: int,
             forward_seconds: Sequence[float], backward_seconds: Sequence[float],
             link_seconds: float = 0.0) -> Simulation:
    """Simulate one step; ``forward_seconds[c]`` / ``backward_seconds[c]`` per chunk and
    microbatch."""
    orders = device_orders(schedule, stages, microbatches, virtual)
    ops = timeline(orders, stages, virtual, lambda c: forward_seconds[c],
                   lambda c: backward_seconds[c], link_seconds)
    span = max(t.end for t in ops)
    busy = [0.0] * stages
    for t in ops:
        busy[t.device] += t.end - t.start
    bubble = sum(1.0 - b / span for b in busy) / stages if span > 0 else 0.0
    in_flight = []
    for d in range(stages):
        events = sorted((t.end if t.op.kind == "F" else t.start, 1 if t.op.kind == "F" else -1)
                        for t in ops if t.device == d)
        live = peak = 0
        # at equal times a forward's stash counts before a backward frees one
        for _, delta in sorted(events, key=lambda e: (e[0], -e[1])):
            live += delta
            peak = max(peak, live)
        in_flight.append(peak)
    return Simulation(span, bubble, tuple(in_flight), tuple(ops))
