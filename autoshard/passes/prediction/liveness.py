"""How long values hold memory, beyond "from the producer to the last reader": what XLA's
buffer assignment does that the plain schedule misses, as ``memory_analysis()`` and XLA's
buffer-assignment dumps (``--xla_dump_to``) of compiled train steps show.

* A value XLA fuses into its readers is recomputed there, so what it is computed from lives
  until those readers run (``recomputed_liveness``).
* An op may write its result over an operand that dies there (``in_place_values``).
* A step's results have buffers of their own, and XLA keeps temporaries in them until the
  results are written (``packed_profile``).
* What the program allocates is more than its live bytes at the peak: XLA places each buffer
  at one offset for its whole life (``assigned_peak``, ``cost_model.buffers``).
"""

from __future__ import annotations

import numpy as np

from autoshard.cost_model.buffers import assigned_bytes
from autoshard.ir.graph import Graph, Value
from autoshard.ir.primitives import ELEMENTWISE
from autoshard.solver.problem import Problem


def recomputed_liveness(graph: Graph, last_use: dict[int, int], fused: set[int]
                        ) -> dict[int, int]:
    """``last_use`` with the operands of each fused value kept live until that value's last
    reader: an activation saved for the backward pass behind a fused bias add or relu mask is
    read by the backward kernels that recompute them; without this the prediction misses the
    activations XLA holds for them."""
    extended = dict(last_use)
    for position in range(len(graph.nodes), 0, -1):
        node = graph.nodes[position - 1]
        if not node.outputs or not all(v.id in fused for v in node.outputs):
            continue
        until = max(extended.get(v.id, position) for v in node.outputs)
        for atom in node.inputs:
            if isinstance(atom, Value) and extended.get(atom.id, 0) < until:
                extended[atom.id] = until
    return extended


#: Ops whose result XLA may write over an operand that dies there (same shape and dtype).
IN_PLACE_OPS = ELEMENTWISE | {"scatter-add", "scatter_add", "scatter", "scatter-mul",
                              "scatter_mul", "scatter-min", "scatter_min", "scatter-max",
                              "scatter_max", "dynamic_update_slice"}


def in_place_values(graph: Graph, last_use: dict[int, int]) -> set[int]:
    """Ids of the values whose last reader writes its result into their buffer, so they are
    not live beside that result (a loss gradient scattered into a broadcast of zeros is one
    buffer in XLA, not two). Arguments keep their buffers (donation is counted apart) and
    results are written to buffers of their own."""
    keep = {v.id for v in graph.inputs} | {a.id for a in graph.outputs if isinstance(a, Value)}
    reused: set[int] = set()
    for position, node in enumerate(graph.nodes, start=1):
        if node.op not in IN_PLACE_OPS or len(node.outputs) != 1:
            continue
        out = node.outputs[0]
        for atom in node.inputs:
            if (isinstance(atom, Value) and atom.id not in keep and atom.id not in reused
                    and last_use.get(atom.id) == position and atom.shape == out.shape
                    and atom.dtype == out.dtype):
                reused.add(atom.id)
                break
    return reused


def packed_profile(problem: Problem, choice, result_starts: dict[int, int],
                   buffers: list[tuple[int, int, int]] = ()) -> np.ndarray:
    """Bytes per device at every step position, with the temporaries XLA keeps in the results'
    buffers before the results are written.

    The problem counts each result from the start of the step (``usage_profile``: an upper
    bound the solvers keep to). XLA's results have buffers of their own, and its buffer
    assignment puts a temporary in one of them while that result is not yet written and the
    temporary fits (activations and gradients in a replicated parameter's buffer, say).
    ``buffers`` are more temporaries, (bytes, start, end): the operands the plan gathers
    (``gathered_buffers``), which the problem's nodes do not hold. So at each position:
    arguments, the temporaries larger than every result (they fit in none), and the larger of
    all results' buffers and the results written so far plus the smaller temporaries. Counting
    results from the start overstates the peak where the results are large (a replicated train
    state); where they are small (FSDP, Megatron) this changes little.
    """
    choice = np.asarray(choice, np.int64)
    use = problem.usages[problem.offsets[:-1] + choice].astype(np.int64)
    iv = problem.intervals
    horizon = int(iv[:, 1].max()) if len(iv) else 0      # usage_profile's positions
    if len(buffers):
        extra = np.asarray(buffers, np.int64).reshape(-1, 3)
        use = np.concatenate([use, extra[:, 0]])
        iv = np.concatenate([iv, extra[:, 1:]])
    live = (iv[:, 1] > iv[:, 0]) & (use != 0)

    def profile(mask, begin):
        mask = mask & live
        delta = np.zeros(horizon + 1, np.int64)
        np.add.at(delta, np.clip(begin[mask], 0, horizon), use[mask])
        np.add.at(delta, np.clip(iv[mask, 1], 0, horizon), -use[mask])
        return np.cumsum(delta)[:horizon]

    conservative = profile(np.ones(len(use), bool), iv[:, 0])
    if not result_starts or not horizon:
        return conservative
    results = np.fromiter(result_starts, np.int64)
    starts = np.fromiter(result_starts.values(), np.int64)
    is_result = np.zeros(len(use), bool)
    is_result[results] = True
    whole = (iv[:, 0] <= 0) & (iv[:, 1] >= horizon)
    largest = int(use[results].max())
    small = ~is_result & ~whole & (use <= largest)
    unwritten = np.zeros(horizon + 1, np.int64)          # results not yet made at each position
    unwritten[0] = use[results].sum()
    np.add.at(unwritten, np.clip(starts, 0, horizon), -use[results])
    unwritten = np.cumsum(unwritten)[:horizon]
    made_so_far = conservative - unwritten               # results from where they are made
    # all results' buffers, with the small temporaries inside them
    in_results = conservative - profile(small, iv[:, 0])
    return np.maximum(made_so_far, in_results)


def assigned_peak(problem: Problem, choice, result_starts: dict[int, int],
                  buffers: list[tuple[int, int, int]] = ()) -> int:
    """Bytes per device XLA's buffer assignment allocates for the plan (``assigned_bytes``):
    the arguments (what lives the whole step and is not a result made by an op), each result
    written at its position, and every other node's buffer and the gathered ``buffers`` as
    temporaries. Above the live-bytes peak (``packed_profile``) by the holes between buffers,
    and so closer to the compiled peak."""
    choice = np.asarray(choice, np.int64)
    use = problem.usages[problem.offsets[:-1] + choice].astype(np.int64)
    iv = problem.intervals
    horizon = int(iv[:, 1].max()) if len(iv) else 0
    live = (iv[:, 1] > iv[:, 0]) & (use > 0)
    is_result = np.zeros(len(use), bool)
    is_result[np.fromiter(result_starts, np.int64, len(result_starts))] = True
    whole = live & ~is_result & (iv[:, 0] <= 0) & (iv[:, 1] >= horizon)
    results = [(int(use[i]), result_starts[i]) for i in np.flatnonzero(live & is_result)]
    temporaries = [(int(use[i]), int(iv[i, 0]), int(iv[i, 1]))
                   for i in np.flatnonzero(live & ~is_result & ~whole)]
    return assigned_bytes(int(use[whole].sum()), results, [*temporaries, *buffers])
