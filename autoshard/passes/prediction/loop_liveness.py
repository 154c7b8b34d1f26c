"""Lifetimes inside a loop body, for the prediction.

The problem puts every op of a loop body (a scan's or a while's) at the loop's one position:
all of the body's temporaries count at once, an upper bound the solvers keep to. XLA's buffer
assignment sees the body as a sequence of its own, where a temporary dies at its last reader
in the body, so counting a long body's temporaries at once can exceed everything the compiled
step allocates for temporaries. Not modelled: XLA's CPU build unrolls short loops and holds
more across their steps than one body's lifetimes say, so the prediction can fall below the
compiled peak there.

``expanded`` spreads each body over positions of its own: every position of the step becomes
``scale`` positions, and the body's slots take the ones inside their loop's, in program order,
each living to its last reader in the body (to the body's end where a loop output or the next
iteration reads it). Values outside the loops keep their lifetimes, scaled.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from autoshard.passes.problem import PlanningProblem, reader_map, readers_through_fanouts
from autoshard.solver.problem import Problem

Buffers = list[tuple[int, int, int]]


def expanded(pp: PlanningProblem, problem: Problem, buffers: Buffers, starts: dict[int, int]
             ) -> tuple[Problem, Buffers, dict[int, int], int]:
    """(problem, buffers, result positions, scale) with the bodies spread out (module
    docstring); ``scale`` 1 and the inputs as they are where the step has no loop."""
    if not pp.bodies:
        return problem, buffers, starts, 1
    scale = max(len(body) for body in pp.bodies.values()) + 1
    intervals = problem.intervals.astype(np.int64) * scale
    readers = reader_map(pp)
    for at, body in pp.bodies.items():
        local = {slot: k for k, slot in enumerate(body)}
        base = at * scale
        for slot, k in local.items():
            last = k
            for r in readers_through_fanouts(pp, slot, readers):
                last = max(last, local.get(r, scale - 1))
            intervals[slot] = (base + k, base + last + 1)
    intervals.flags.writeable = False
    return (replace(problem, intervals=intervals),
            [(b, s * scale, e * scale) for b, s, e in buffers],
            {slot: at * scale for slot, at in starts.items()}, scale)

