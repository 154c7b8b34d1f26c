"""Bytes per device that XLA's buffer assignment allocates for buffers with known live ranges.

Live bytes at the busiest moment are a lower bound on what a program allocates: XLA places
each temporary at a fixed offset for its whole life, so the holes left between buffers of
different sizes and lifetimes cost memory too. This module replays the placement rules of XLA's
buffer assignment (``xla/service/buffer_assignment.cc`` and ``heap_simulator``), as facts
about the compiler, on the buffers the cost model predicts:

* each argument and each result has an allocation of its own (``memory_analysis`` counts them
  apart from the temporaries);
* buffers are visited largest first, and a temporary goes into the smallest result allocation
  that holds it and is free for its whole life (a result is written late in a training step,
  so its allocation holds activations and gradients before then);
* the other temporaries share one heap, placed by a global decreasing-size best-fit: each at
  the lowest-waste gap among the buffers it overlaps in time, or on top; XLA runs it ordered
  by size and ordered by lifetime and keeps the smaller heap.

The live-bytes peak alone falls short of the compiled peak by those holes; replaying the
placement closes most of the gap.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def assigned_bytes(arguments: int, results: Sequence[tuple[int, int]],
                   temporaries: Sequence[tuple[int, int, int]]) -> int:
    """Argument bytes + result allocations + the temporaries' heap.

    ``results``: (bytes, position written), each held from there to the end of the step;
    ``temporaries``: (bytes, first position, position after the last), half-open."""
    temps = sorted(((int(b), int(s), int(e)) for b, s, e in temporaries if b > 0 and e > s),
                   key=lambda t: -t[0])
    # result allocations, largest first; a temporary tries the smallest one that holds it
    allocations = sorted(((int(b), int(w)) for b, w in results if b > 0), key=lambda r: -r[0])
    sizes = [b for b, _ in allocations]
    busy = [[(w, None)] for _, w in allocations]           # (from, until); None: to the end
    heap = []
    for size, start, end in temps:
        placed = False
        for k in range(len(allocations) - 1, -1, -1):
            if sizes[k] < size:
                continue
            if all(end <= lo or (hi is not None and hi <= start) for lo, hi in busy[k]):
                busy[k].append((start, end))
                placed = True
                break
        if not placed:
            heap.append((size, start, end))
    return int(arguments) + sum(sizes) + heap_bytes(heap)


def heap_bytes(buffers: Sequence[tuple[int, int, int]]) -> int:
    """Size of the heap that holds ``buffers`` (bytes, start, end), the smaller of the
    size-ordered and the lifetime-ordered best fit."""
    if not len(buffers):
        return 0
    array = np.asarray(buffers, np.int64).reshape(-1, 3)
    size, start, end = array[:, 0], array[:, 1], array[:, 2]
    length = end - start
    index = np.arange(len(array))
    by_size = np.lexsort((index, -length, -size))
    by_life = np.lexsort((index, -size, -length))
    return min(_best_fit(array, by_size), _best_fit(array, by_life))


def _best_fit(array: np.ndarray, order: np.ndarray) -> int:
    size, start, end = array[:, 0], array[:, 1], array[:, 2]
    offset = np.zeros(len(array), np.int64)
    done = np.zeros(len(array), bool)
    top = 0
    for i in order:
        overlapping = np.flatnonzero(done & (start < end[i]) & (start[i] < end))
        chunks = sorted(zip(offset[overlapping].tolist(),
                            (offset[overlapping] + size[overlapping]).tolist()))
        best, best_gap, floor = None, None, 0
        for lo, hi in chunks:
            gap = lo - floor
            if gap >= size[i] and (best_gap is None or gap < best_gap):
                best, best_gap = floor, gap
            floor = max(floor, hi)
        offset[i] = floor if best is None else best
        done[i] = True
        top = max(top, int(offset[i] + size[i]))
    return top
