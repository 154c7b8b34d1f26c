"""Exact elimination of the nodes of a memory-free strategy problem that touch at most two others.

Without a memory limit a node v with one neighbour u is a cost on u alone, min over v's
strategies of v's cost plus the edge (its best strategy is a function of u's), and a node with
two neighbours u, w is an edge between them, ``M[s, t] = min_r c_v[r] + E_uv[s, r] + E_vw[r, t]``
(variable elimination in a pairwise model: Dechter, "Bucket elimination", Artificial
Intelligence 1999; the degree-one and degree-two rules of the IOPDDL contest's reductions).
Both keep every optimum's cost, so the LP of what is left has the same integer optimum and a
bound at least as tight. Programs are full of such nodes (an elementwise op between two others,
a reshape, a fanout read once more), and on a GPT train step the LP left is half the size.

Memory is preserved only where an eliminated node's usage does not depend on its strategy, so
under a memory limit the other nodes are kept (lp.py keeps the eliminated ones' memory in its
rows); the LP with fixed charges never runs on an eliminated problem.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection

import numpy as np

#: A degree-two node is kept when its elimination table (k_u x k_v x k_w) would hold more
#: entries than this (a few MB of float64).
MAX_TABLE = 2_000_000


@dataclass(frozen=True)
class Eliminated:
    """What is left of a pairwise problem (``costs`` per kept node id, ``edges`` keyed (a, b)
    with a < b, ``constant``) and how to recover the eliminated nodes' strategies: ``steps`` in
    elimination order, each (node, neighbours, table), the node's best strategy indexed by its
    neighbours' strategies."""

    costs: dict[int, np.ndarray]
    edges: dict[tuple[int, int], np.ndarray]
    constant: float
    steps: tuple

    def expand(self, kept: dict[int, int]) -> dict[int, int]:
        """Every node's strategy, given the kept nodes' ones (``kept``)."""
        out = dict(kept)
        for v, neighbours, table in reversed(self.steps):
            out[v] = int(table[tuple(out[u] for u in neighbours)])
        return out


def eliminate(costs: dict[int, np.ndarray], edges: dict[tuple[int, int], np.ndarray],
              kept: Collection[int] = ()) -> Eliminated:
    """Eliminate nodes of degree 0, 1 and 2 until none is left, visiting nodes in id order
    (deterministic; ties go to the lower strategy index), except the nodes in ``kept`` (those
    whose memory depends on their strategy, under a memory limit). ``edges`` maps (a, b),
    a < b, to a k_a x k_b matrix; neither argument is changed."""
    kept = set(kept)
    cost = {j: np.asarray(c, np.float64) for j, c in costs.items()}
    adj: dict[int, dict[int, np.ndarray]] = {j: {} for j in cost}

    def add(a: int, b: int, m: np.ndarray) -> None:
        if b in adj[a]:
            m = adj[a][b] + m
        adj[a][b] = m
        adj[b][a] = m.T

    for (a, b), m in edges.items():
        add(a, b, np.asarray(m, np.float64))
    steps = []
    constant = 0.0
    pending = sorted(cost)
    while pending:
        touched = set()
        for v in pending:
            if v not in cost or v in kept:
                continue
            near = sorted(adj[v])
            if len(near) == 0:
                best = int(np.argmin(cost[v]))
                constant += float(cost[v][best])
                steps.append((v, (), np.array(best)))
            elif len(near) == 1:
                (u,) = near
                total = cost[v][:, None] + adj[v][u]           # k_v x k_u
                cost[u] = cost[u] + total.min(axis=0)
                steps.append((v, (u,), total.argmin(axis=0)))
                del adj[u][v]
            elif len(near) == 2:
                u, w = near
                if len(cost[u]) * len(cost[v]) * len(cost[w]) > MAX_TABLE:
                    continue
                total = (cost[v][None, :, None] + adj[v][u].T[:, :, None]
                         + adj[v][w][None, :, :])              # k_u x k_v x k_w
                steps.append((v, (u, w), total.argmin(axis=1)))
                del adj[u][v], adj[w][v]
                add(u, w, total.min(axis=1))
            else:
                continue
            touched.update(near)
            del adj[v], cost[v]
        pending = sorted(j for j in touched if j in cost)
    kept_edges = {(a, b): m for a in sorted(adj) for b, m in adj[a].items() if a < b}
    return Eliminated(cost, kept_edges, constant, tuple(steps))
