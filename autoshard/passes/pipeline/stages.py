"""Stage slicing: cut the graph of a per-microbatch loss into pipeline chunks.

Layer clustering works on the forward graph in program order. Ops computed from the batch and
constants alone (masks, positions, one-hot labels) are *recomputed* in every chunk that needs
them rather than passed down the pipeline, so what crosses a cut is the model's own state
(the residual stream of a transformer). A cut between two ops is a *candidate* when what crosses
it is as small as the narrowest interior cut (within ``CUT_SLACK``, widened while that leaves
the chunks unbalanced: ``BALANCE_TOLERANCE``): in a layered model those are the layer
boundaries and the points between a layer's sub-blocks, so repeated structure is found
without matching names. A scanned layer stack arrives unrolled (passes/pipeline/unroll.py: scans over
parameters, up to 128 layers), so its layer boundaries are cut candidates like any others;
other scans and while loops stay whole.

Among candidates, a dynamic program picks the cuts that minimise the slowest chunk's forward
time (Alpa's inter-operator DP, Zheng et al., OSDI'22, reduced to one SPMD program: every stage
has the same device group, so only the layer ranges and, in ``choose_pipeline``, the
microbatches and schedule are chosen), ties broken by fewer bytes crossing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from autoshard.cost_model.compute import MATMUL_OPS, compute_time, node_flops, strategy_bytes
from autoshard.cost_model.hardware import Hardware
from autoshard.ir.errors import PlanError
from autoshard.ir.graph import Graph, Node, Value, dtype_name
from autoshard.ir.interpret import evaluate
from autoshard.ir.pipeline import Chunk

CUT_SLACK = 1.5
#: When the best cuts among candidates leave the slowest chunk this much above an even split,
#: the slack doubles (a long skip connection makes every between-layer cut carry two arrays,
#: so only the cuts before it are narrowest) until balance is reached or every cut is a
#: candidate.
BALANCE_TOLERANCE = 1.3


@dataclass(frozen=True)
class Slicing:
    """Where the loss was cut: work-op positions ``bounds`` (chunk c runs work ops
    ``bounds[c]:bounds[c+1]``), the forward seconds of each chunk on one device, the bytes
    crossing each cut, and the chunks."""

    bounds: tuple[int, ...]
    forward_seconds: tuple[float, ...]
    matmul_flops: tuple[float, ...]
    crossing_bytes: tuple[int, ...]
    parameter_bytes: tuple[int, ...]
    chunks: tuple[Chunk, ...]
    dtype: str = "float32"          # of the matmuls' operands (the rate matmul_flops run at)


def slice_loss(graph: Graph, num_params: int, num_chunks: int, hw: Hardware,
               *, what: str = "the loss") -> Slicing:
    """Cut ``graph`` (inputs: ``num_params`` differentiated leaves, then the batch leaves;
    output: the scalar loss) into ``num_chunks`` chunks."""
    if len(graph.outputs) != 1 or tuple(graph.outputs[0].shape) != ():
        raise PlanError(f"{what} must return one scalar (the loss) to be pipelined; it returns "
                        f"{len(graph.outputs)} outputs")
    params = {v.id for v in graph.inputs[:num_params]}
    recomputed = _recomputable(graph, params)
    work = [n for n in graph.nodes if n.id not in recomputed]
    if len(work) < num_chunks:
        raise PlanError(f"{what} has {len(work)} ops that depend on parameters, fewer than the "
                        f"{num_chunks} pipeline chunks (stages x virtual stages) asked for; use "
                        "fewer stages or virtual stages")
    seconds = np.array([_forward_seconds(hw, n) for n in work])
    crossing = _crossing_bytes(graph, work)
    prefix = np.concatenate([[0.0], np.cumsum(seconds)])
    even = prefix[-1] / num_chunks
    candidates = _candidates(crossing, seconds)
    if len(candidates) < num_chunks - 1:
        raise PlanError(f"{what} has {len(candidates)} places to cut at its narrowest (between "
                        f"layers), fewer than the {num_chunks - 1} cuts {num_chunks} chunks need; "
                        "use fewer stages or virtual stages")

    def slowest(cuts):
        bounds = (0, *cuts, len(work))
        return max(prefix[b] - prefix[a] for a, b in zip(bounds, bounds[1:]))

    cuts = _balance(candidates, prefix, crossing, num_chunks)
    slack = CUT_SLACK
    # widen the candidates while the chunks stay unbalanced; a wider cut is taken only if it
    # shortens the slowest chunk by more than 10%
    while slowest(cuts) > BALANCE_TOLERANCE * even and len(candidates) < len(work) - 1 \
            and slack < 2 ** 20:
        slack *= 2
        candidates = _candidates(crossing, seconds, slack)
        wider = _balance(candidates, prefix, crossing, num_chunks)
        if slowest(wider) < 0.9 * slowest(cuts):
            cuts = wider
    bounds = (0, *cuts, len(work))
    chunks = _build_chunks(graph, work, bounds, recomputed, num_params)
    parameter_bytes = tuple(sum(graph.inputs[i].nbytes for i in c.params) for c in chunks)
    matmul = np.array([node_flops(n) if n.op in MATMUL_OPS else 0.0 for n in work])
    heaviest = work[int(np.argmax(matmul))] if matmul.any() else None
    dtype = dtype_name(heaviest.inputs[0].dtype) if heaviest is not None else "float32"
    spans = list(zip(bounds, bounds[1:]))
    return Slicing(bounds, tuple(float(seconds[a:b].sum()) for a, b in spans),
                   tuple(float(matmul[a:b].sum()) for a, b in spans),
                   tuple(int(crossing[k]) for k in cuts), parameter_bytes, tuple(chunks), dtype)


def _recomputable(graph: Graph, params: set[int]) -> set[int]:
    """Node ids computed from the batch and constants only (no parameter reaches them)."""
    tainted = set(params)
    out = set()
    for node in graph.nodes:
        if any(isinstance(a, Value) and a.id in tainted for a in node.inputs) or any(
                _reads_outer(r, tainted) for r in node.regions):
            tainted.update(v.id for v in node.outputs)
        else:
            out.add(node.id)
    return out


def _reads_outer(region: Graph, tainted: set[int]) -> bool:
    return any(isinstance(a, Value) and a.id in tainted
               for n, _ in region.walk() for a in n.inputs)


def _forward_seconds(hw: Hardware, node: Node) -> float:
    flops = node_flops(node)
    nbytes = strategy_bytes(node, [1.0] * len(node.inputs), [1.0] * len(node.outputs))
    return compute_time(hw, node, flops, nbytes)


def _crossing_bytes(graph: Graph, work: list[Node]) -> np.ndarray:
    """``crossing[k]``: bytes of values made by work ops before position k and read at or
    after it (the loss counts as read at the end)."""
    position = {v.id: p for p, n in enumerate(work) for v in n.outputs}
    last = {}
    for q, node in enumerate(work):
        for a in node.inputs:
            if isinstance(a, Value) and a.id in position:
                last[a.id] = q
    for a in graph.outputs:
        if isinstance(a, Value) and a.id in position:
            last[a.id] = len(work)
    diff = np.zeros(len(work) + 2, np.int64)
    sizes = {v.id: v.nbytes for n in work for v in n.outputs}
    for vid, q in last.items():
        p = position[vid]
        if q > p:
            diff[p + 1] += sizes[vid]
            diff[q + 1] -= sizes[vid]
    return np.cumsum(diff)[: len(work) + 1]


def _candidates(crossing: np.ndarray, seconds: np.ndarray, slack: float = CUT_SLACK
                ) -> list[int]:
    total = float(seconds.sum()) or 1.0
    before = np.concatenate([[0.0], np.cumsum(seconds)]) / total
    interior = [k for k in range(1, len(seconds)) if 0.05 <= before[k] <= 0.95] or \
        list(range(1, len(seconds)))
    if not interior:
        return []
    narrowest = min(crossing[k] for k in interior)
    return [k for k in range(1, len(seconds)) if crossing[k] <= slack * narrowest]


def _balance(candidates: list[int], prefix: np.ndarray, crossing: np.ndarray,
             num_chunks: int) -> tuple[int, ...]:
    """Cuts minimising (slowest chunk, total bytes crossing), by DP over candidate cuts."""
    points = [0, *candidates, len(prefix) - 1]
    n = len(points)
    inf = (float("inf"), float("inf"))
    # best[j][i]: (max chunk time, bytes) covering points[0]..points[i] with j chunks
    best = [[inf] * n for _ in range(num_chunks + 1)]
    back = [[-1] * n for _ in range(num_chunks + 1)]
    best[0][0] = (0.0, 0.0)
    for j in range(1, num_chunks + 1):
        for i in range(1, n):
            for h in range(i):
                prev = best[j - 1][h]
                if prev == inf:
                    continue
                span = prefix[points[i]] - prefix[points[h]]
                if span == 0 and points[i] == points[h]:
                    continue
                cost = (max(prev[0], span), prev[1] + (crossing[points[h]] if h else 0))
                if cost < best[j][i]:
                    best[j][i], back[j][i] = cost, h
    cuts, i = [], n - 1
    for j in range(num_chunks, 0, -1):
        h = back[j][i]
        if h < 0:
            raise PlanError(f"cannot cut the loss into {num_chunks} non-empty chunks")
        if h:
            cuts.append(points[h])
        i = h
    return tuple(sorted(cuts))


def _build_chunks(graph: Graph, work: list[Node], bounds: tuple[int, ...],
                  recomputed: set[int], num_params: int) -> list[Chunk]:
    producer = {v.id: n for n in graph.nodes for v in n.outputs}
    order = {n.id: i for i, n in enumerate(graph.nodes)}
    input_index = {v.id: i for i, v in enumerate(graph.inputs)}
    loss = graph.outputs[0]
    loss_ids = {loss.id} if isinstance(loss, Value) else set()
    values = {v.id: v for v in graph.all_values()}
    made_before: set[int] = set()
    chunks = []
    for c, (a, b) in enumerate(zip(bounds, bounds[1:])):
        nodes = work[a:b]
        later = work[b:]
        extra = _recompute_closure(_inputs_of(nodes) | loss_ids, producer, recomputed)
        body = sorted(extra + nodes, key=lambda n: order[n.id])
        reads = _inputs_of(body)
        made_here = {v.id for n in nodes for v in n.outputs}
        read_later = _inputs_of(later) | loss_ids
        crossing_in = sorted(i for i in reads | read_later if i in made_before)
        last = c == len(bounds) - 2
        crossing_out = [] if last else sorted(
            i for i in read_later if i in made_here or i in crossing_in)
        param_idx = tuple(sorted(input_index[i] for i in reads
                                 if i in input_index and input_index[i] < num_params))
        batch_idx = tuple(sorted(input_index[i] - num_params for i in reads
                                 if i in input_index and input_index[i] >= num_params))
        inputs = ([graph.inputs[i] for i in param_idx]
                  + [graph.inputs[num_params + i] for i in batch_idx]
                  + [values[i] for i in crossing_in])
        outputs = [loss] if last else [values[i] for i in crossing_out]
        constants = {v.id: graph.constants[v.id] for v in graph.constant_values
                     if v.id in reads}
        sub = Graph(tuple(inputs), tuple(outputs), tuple(body), constants,
                    tuple(v for v in graph.constant_values if v.id in constants))
        chunks.append(Chunk(_chunk_fn(sub), param_idx, batch_idx,
                            f"chunk {c}: ops {a}-{b - 1}"))
        made_before |= made_here
    return chunks


def _inputs_of(nodes: list[Node]) -> set[int]:
    ids = set()
    for n in nodes:
        ids.update(a.id for a in n.inputs if isinstance(a, Value))
        for r in n.regions:
            for inner, _ in r.walk():
                ids.update(a.id for a in inner.inputs if isinstance(a, Value))
    return ids


def _recompute_closure(needed: set[int], producer: dict, recomputed: set[int]) -> list[Node]:
    out, seen, stack = [], set(), list(needed)
    while stack:
        vid = stack.pop()
        node = producer.get(vid)
        if node is None or node.id not in recomputed or node.id in seen:
            continue
        seen.add(node.id)
        out.append(node)
        stack.extend(a.id for a in node.inputs if isinstance(a, Value))
        for r in node.regions:
            for inner, _ in r.walk():
                stack.extend(a.id for a in inner.inputs if isinstance(a, Value))
    return out


def _chunk_fn(sub: Graph):
    def run(params: list, batch: list, crossing: list) -> list:
        return evaluate(sub, [*params, *batch, *crossing])
    return run

