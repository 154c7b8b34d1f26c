"""The strategy selection problem the solver works on, its loader and its exact evaluation.

The problem has exactly the form of the ASPLOS 2025 / EuroSys 2025 IOPDDL contest (Intra-Operator
Parallelism for Distributed Deep Learning, google/iopddl): node ``i`` picks one of ``k_i``
strategies with a cost and a memory usage, live during the half-open interval
``[start, end)``; an edge ``(u, v)`` adds ``matrix[s_u, s_v]``; the choice is feasible when at
every time ``t`` the usages of the nodes live at ``t`` sum to at most ``usage_limit``. autoshard's
planner builds the same problem from a graph, so one solver serves both, and the contest's
instances are its benchmark.

Ragged data are kept flat with offsets (CSR style) so that 65k-node instances load and evaluate
with numpy, without a Python loop per strategy.
"""

from __future__ import annotations

import gzip
import itertools
import json
import math
from dataclasses import dataclass, field

import numpy as np

from autoshard.ir.errors import PlanError

#: Costs at or above this mark a forbidden choice (XLA's "infinity" in the contest files).
FORBIDDEN = 1e18


@dataclass(frozen=True, eq=False)
class Problem:
    """A strategy selection problem (IOPDDL form). Build it with :meth:`from_lists` or
    :func:`load_iopddl`.

    Fields (all numpy arrays are read-only):
      ``offsets`` (n+1,): node i's strategies are the flat entries ``offsets[i]:offsets[i+1]``;
      ``costs``, ``usages`` (Σk,): float64 cost and int64 memory of each node strategy;
      ``intervals`` (n, 2): ``[start, end)`` when node i's memory is live (start >= end: never);
      ``edges`` (m, 2), ``edge_offsets`` (m+1,), ``edge_costs``: edge e's ``k_u x k_v`` matrix
      flattened row-major;
      ``usage_limit``: the memory limit, ``None`` for unlimited;
      ``groups``: tuples of node ids that must all choose the same strategy index (identical
      layers share one plan); the nodes of a group have the same k; groups are disjoint.
    """

    name: str
    offsets: np.ndarray
    costs: np.ndarray
    usages: np.ndarray
    intervals: np.ndarray
    edges: np.ndarray
    edge_offsets: np.ndarray
    edge_costs: np.ndarray
    usage_limit: int | None = None
    groups: tuple[tuple[int, ...], ...] = field(default=())

    def __post_init__(self):
        n = len(self.offsets) - 1
        k = np.diff(self.offsets)
        if n < 0 or (k <= 0).any():
            raise PlanError(f"problem {self.name!r}: every node needs at least one strategy "
                            f"(nodes with none: {np.flatnonzero(k <= 0)[:10].tolist()})")
        if len(self.costs) != self.offsets[-1] or len(self.usages) != self.offsets[-1]:
            raise PlanError(f"problem {self.name!r}: {self.offsets[-1]} strategies in offsets "
                            f"but {len(self.costs)} costs and {len(self.usages)} usages")
        if self.intervals.shape != (n, 2):
            raise PlanError(f"problem {self.name!r}: intervals must have shape ({n}, 2), got "
                            f"{self.intervals.shape}")
        m = len(self.edges)
        if self.edges.shape != (m, 2) or (m and (self.edges.min() < 0 or self.edges.max() >= n)):
            raise PlanError(f"problem {self.name!r}: edges must be (u, v) pairs of node ids "
                            f"in [0, {n})")
        if m and (self.edges[:, 0] == self.edges[:, 1]).any():
            raise PlanError(f"problem {self.name!r}: an edge joins a node to itself "
                            f"(edge {int(np.flatnonzero(self.edges[:, 0] == self.edges[:, 1])[0])})")
        sizes = k[self.edges[:, 0]] * k[self.edges[:, 1]] if m else np.zeros(0, np.int64)
        if len(self.edge_offsets) != m + 1 or (np.diff(self.edge_offsets) != sizes).any():
            bad = np.flatnonzero(np.diff(self.edge_offsets) != sizes)[:5].tolist()
            raise PlanError(f"problem {self.name!r}: edge cost matrices must have k_u * k_v "
                            f"entries; wrong for edges {bad}")
        for g in self.groups:
            if min(g) < 0 or max(g) >= n:
                raise PlanError(f"problem {self.name!r}: group {list(g)[:8]} names nodes outside "
                                f"[0, {n})")
            if len({int(k[i]) for i in g}) > 1:
                raise PlanError(f"problem {self.name!r}: group {list(g)[:8]} mixes nodes with "
                                f"different strategy counts {sorted({int(k[i]) for i in g})}")
        grouped = [i for g in self.groups for i in g]
        if len(grouped) != len(set(grouped)):
            raise PlanError(f"problem {self.name!r}: groups must be disjoint; merge groups that "
                            f"share a node into one")
        for a in (self.offsets, self.costs, self.usages, self.intervals, self.edges,
                  self.edge_offsets, self.edge_costs):
            a.flags.writeable = False

    @classmethod
    def from_lists(cls, costs, usages, intervals, edges=(), edge_costs=(), usage_limit=None,
                   name="problem", groups=()) -> Problem:
        """Build from ragged Python lists, as in the contest's JSON: ``costs[i][s]``,
        ``usages[i][s]``, ``intervals[i] = (start, end)``, ``edges[e] = (u, v)``,
        ``edge_costs[e]`` the flattened k_u x k_v matrix (or a 2-D array)."""
        return cls(
            name=name,
            offsets=_offsets(costs),
            costs=_flat(costs, np.float64),
            usages=_flat(usages, np.int64),
            intervals=np.asarray(intervals, dtype=np.int64).reshape(len(costs), 2),
            edges=np.asarray(edges, dtype=np.int64).reshape(len(edges), 2),
            edge_offsets=_offsets(edge_costs, flatten=True),
            edge_costs=_flat([np.ravel(c) for c in edge_costs], np.float64),
            usage_limit=None if usage_limit is None else int(usage_limit),
            groups=tuple(tuple(int(i) for i in g) for g in groups if len(g) > 1),
        )

    @property
    def num_nodes(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_edges(self) -> int:
        return len(self.edges)

    @property
    def num_strategies(self) -> np.ndarray:
        """k_i for every node, int64 (n,)."""
        return np.diff(self.offsets)

    def node_costs(self, i: int) -> np.ndarray:
        return self.costs[self.offsets[i]:self.offsets[i + 1]]

    def node_usages(self, i: int) -> np.ndarray:
        return self.usages[self.offsets[i]:self.offsets[i + 1]]

    def edge_matrix(self, e: int) -> np.ndarray:
        u, v = self.edges[e]
        k = self.num_strategies
        return self.edge_costs[self.edge_offsets[e]:self.edge_offsets[e + 1]].reshape(k[u], k[v])

    def with_usage_limit(self, usage_limit: int | None) -> Problem:
        """The same problem under another memory limit."""
        return Problem(self.name, self.offsets, self.costs, self.usages, self.intervals,
                       self.edges, self.edge_offsets, self.edge_costs, usage_limit, self.groups)


def _offsets(ragged, flatten=False) -> np.ndarray:
    sizes = np.fromiter((np.size(r) if flatten else len(r) for r in ragged), np.int64,
                        count=len(ragged))
    out = np.zeros(len(sizes) + 1, np.int64)
    np.cumsum(sizes, out=out[1:])
    return out


def _flat(ragged, dtype) -> np.ndarray:
    if len(ragged) == 0:
        return np.zeros(0, dtype)
    if isinstance(ragged[0], np.ndarray):
        return np.concatenate([np.asarray(r, dtype).ravel() for r in ragged])
    count = sum(len(r) for r in ragged)
    return np.fromiter(itertools.chain.from_iterable(ragged), dtype, count=count)


def load_iopddl(path) -> Problem:
    """Read a contest instance (``.json`` or ``.json.gz``, format in google/iopddl's README)."""
    path = str(path)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        data = json.load(f)
    try:
        p = data["problem"]
        nodes, edges = p["nodes"], p["edges"]
        return Problem.from_lists(nodes["costs"], nodes["usages"], nodes["intervals"],
                                  edges["nodes"], edges["costs"], p.get("usage_limit"),
                                  name=p.get("name", path))
    except KeyError as e:
        raise PlanError(f"{path}: not an IOPDDL problem file, missing key {e}; expected "
                        '{"problem": {"name", "nodes": {"intervals", "costs", "usages"}, '
                        '"edges": {"nodes", "costs"}, "usage_limit"}}') from None


@dataclass(frozen=True)
class Evaluation:
    """``cost``: Σ chosen node and edge costs (an exact int when they are integral);
    ``feasible``: the contest's rule, the memory limit holds at every time (a forbidden choice
    does not make a solution infeasible there, it only costs ≥ 1e18: see ``forbidden``);
    ``peak_usage``: the largest total usage over time; ``forbidden``: how many chosen node or
    edge entries cost ≥ 1e18."""

    cost: float
    feasible: bool
    peak_usage: int
    forbidden: int = 0


def usage_profile(problem: Problem, choice) -> np.ndarray:
    """Total usage at every time 0..max_end-1 under ``choice`` (the contest's rule: node i counts
    at t for start <= t < end, so an interval with start >= end counts nowhere)."""
    choice = np.asarray(choice, np.int64)
    iv = problem.intervals
    horizon = int(iv[:, 1].max()) if len(iv) else 0
    use = problem.usages[problem.offsets[:-1] + choice]
    live = (iv[:, 1] > iv[:, 0]) & (use != 0)
    delta = np.zeros(horizon + 1, np.int64)
    np.add.at(delta, np.maximum(iv[live, 0], 0), use[live])
    np.add.at(delta, iv[live, 1], -use[live])
    return np.cumsum(delta)[:horizon]


def evaluate(problem: Problem, choice) -> Evaluation:
    """Cost, feasibility and peak memory of ``choice`` (one strategy index per node), by the rule
    of the contest's ``Evaluate`` (google/iopddl, iopddl.cc)."""
    choice = np.asarray(choice, np.int64)
    k = problem.num_strategies
    if choice.shape != (problem.num_nodes,):
        raise PlanError(f"a choice needs one strategy per node ({problem.num_nodes}), got shape "
                        f"{choice.shape}")
    if ((choice < 0) | (choice >= k)).any():
        i = int(np.flatnonzero((choice < 0) | (choice >= k))[0])
        raise PlanError(f"node {i} has {k[i]} strategies, choice {int(choice[i])} is out of range")
    node = problem.costs[problem.offsets[:-1] + choice]
    if problem.num_edges:
        u, v = problem.edges[:, 0], problem.edges[:, 1]
        edge = problem.edge_costs[problem.edge_offsets[:-1] + choice[u] * k[v] + choice[v]]
    else:
        edge = np.zeros(0)
    chosen = np.concatenate([node, edge])
    if np.all(chosen == np.floor(chosen)):
        cost = sum(int(x) for x in chosen[chosen != 0])
    else:
        cost = math.fsum(chosen)
    profile = usage_profile(problem, choice)
    peak = int(profile.max()) if len(profile) else 0
    feasible = problem.usage_limit is None or peak <= problem.usage_limit
    return Evaluation(cost, bool(feasible), peak, int((chosen >= FORBIDDEN).sum()))
