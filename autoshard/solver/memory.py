"""Memory of reduced choices: exact profiles over time and the linear constraints a search needs.

A reduced node's usage is a sum over the original nodes merged into it, each live on its own
interval, so its usage is a step function of time per strategy. Members whose usage is the same
under every strategy of their reduced node add a constant, folded into ``baseline`` with the
nodes presolve fixed; only the *variable* members enter the constraints. Usage changes only where
a variable member starts or ends, so a constraint per such *segment*, against the smallest slack
inside it, is exact; dropping the segments that cannot bind or that a neighbouring segment implies
leaves several times fewer constraints than segments.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from autoshard.solver.problem import Problem, usage_profile
from autoshard.solver.presolve import Reduced


@dataclass(frozen=True, eq=False)
class MemoryModel:
    """``starts[j]``, ``ends[j]``: intervals of reduced node j's variable members;
    ``usage[j]``: (k_j, variable members) their usage per strategy of j; ``baseline``: usage at
    every time that no choice changes; ``limit``: the usage limit (None: unlimited)."""

    starts: tuple[np.ndarray, ...]
    ends: tuple[np.ndarray, ...]
    usage: tuple[np.ndarray, ...]
    baseline: np.ndarray
    limit: int | None

    @property
    def horizon(self) -> int:
        return len(self.baseline)

    def rows(self, j: int, times: np.ndarray) -> np.ndarray:
        """(len(times), k_j) int64: usage of node j per strategy at each of ``times`` (sorted),
        by difference arrays over the members' intervals."""
        k = self.usage[j].shape[0]
        out = np.zeros((len(times) + 1, k), np.int64)
        if len(self.starts[j]) and len(times):
            lo = np.searchsorted(times, self.starts[j])
            hi = np.searchsorted(times, self.ends[j])
            np.add.at(out, lo, self.usage[j].T)
            np.add.at(out, hi, -self.usage[j].T)
        return np.cumsum(out, axis=0)[:-1]

    def profile(self, choice) -> np.ndarray:
        """Total usage at every time under a reduced choice (int64)."""
        delta = np.zeros(self.horizon + 1, np.int64)
        for j, a in enumerate(choice):
            if len(self.starts[j]):
                np.add.at(delta, self.starts[j], self.usage[j][a])
                np.add.at(delta, self.ends[j], -self.usage[j][a])
        return self.baseline + np.cumsum(delta)[:self.horizon]

    def node_extent(self, j: int) -> tuple[int, int]:
        """First and last+1 time at which node j's choice matters (0, 0 if never)."""
        if not len(self.starts[j]):
            return 0, 0
        return int(self.starts[j].min()), int(self.ends[j].max())


def memory_model(problem: Problem, reduced: Reduced) -> MemoryModel:
    """Split each reduced node's members into variable ones (kept) and constant ones (baseline)."""
    iv = problem.intervals
    horizon = int(iv[:, 1].max()) if len(iv) else 0
    base_choice = reduced.fixed.copy()
    starts, ends, usage = [], [], []
    for j in range(reduced.num_nodes):
        mem, pk = reduced.members[j], reduced.picks[j]
        base_choice[mem] = pk[0]
        u = problem.usages[problem.offsets[mem][None, :] + pk]
        live = iv[mem, 1] > iv[mem, 0]
        var = live & (u != u[:1]).any(axis=0)
        # constant members stay in the baseline at strategy 0; variable ones count as the
        # difference from strategy 0, so profile = baseline + Σ variable parts
        starts.append(np.maximum(iv[mem[var], 0], 0))
        ends.append(iv[mem[var], 1])
        usage.append(u[:, var] - u[:1, var])
    if len(base_choice) and (base_choice < 0).any():
        raise AssertionError("presolve left an original node without a strategy")
    baseline = usage_profile(problem, base_choice) if horizon else np.zeros(0, np.int64)
    return MemoryModel(tuple(starts), tuple(ends), tuple(usage), baseline, problem.usage_limit)


@dataclass(frozen=True)
class Cuts:
    """Memory constraints of a part: row r is Σ coef[r] * x[idx[r]] <= rhs[r], where x lists
    the free nodes' strategies in order (node 0's k_0 strategies, then node 1's, ...)."""

    idx: list
    coef: list
    rhs: np.ndarray

    def __len__(self) -> int:
        return len(self.rhs)


def part_cuts(memory: MemoryModel, free: np.ndarray, choice, profile: np.ndarray) -> Cuts:
    """Exact memory constraints for freeing the nodes ``free`` with every other node at
    ``choice`` (whose usage profile is ``profile``): one per segment where the free nodes' usage
    is constant, against the fullest time of the rest of the program inside it. Each node's
    smallest usage moves to the right-hand side; constraints that cannot bind, and those another
    one implies (larger coefficients, smaller right-hand side; checked between neighbours in
    time, which catches the long monotone runs of a training step's memory curve), are dropped."""
    empty = Cuts([], [], np.zeros(0, np.int64))
    if memory.limit is None:
        return empty
    starts = [memory.starts[j] for j in free]
    ends = [memory.ends[j] for j in free]
    if not sum(len(x) for x in starts):
        return empty
    bounds = np.unique(np.concatenate(starts + ends + [np.array([0])]))
    seg = bounds[bounds < memory.horizon]
    part = np.zeros(memory.horizon + 1, np.int64)
    blocks = []
    for j in free:
        d = memory.usage[j][choice[j]]
        np.add.at(part, memory.starts[j], d)
        np.add.at(part, memory.ends[j], -d)
        blocks.append(memory.rows(j, seg))
    rest = profile - np.cumsum(part)[:memory.horizon]
    rhs = memory.limit - np.maximum.reduceat(rest, seg)
    mins = np.zeros(len(seg), np.int64)
    most = np.zeros(len(seg), np.int64)
    for b in blocks:
        lo = b.min(axis=1)
        mins += lo
        most += b.max(axis=1) - lo
    rhs = rhs - mins
    keep = np.flatnonzero(most > rhs)
    if not len(keep):
        return empty
    mat = np.hstack([b[keep] - b[keep].min(axis=1, keepdims=True) for b in blocks])
    rhs = rhs[keep]
    kept: list[int] = []
    for r in range(len(keep)):
        while kept and (mat[r] >= mat[kept[-1]]).all() and rhs[r] <= rhs[kept[-1]]:
            kept.pop()
        if kept and (mat[kept[-1]] >= mat[r]).all() and rhs[kept[-1]] <= rhs[r]:
            continue
        kept.append(r)
    idx = [np.flatnonzero(mat[r]) for r in kept]
    return Cuts(idx, [mat[r][i] for r, i in zip(kept, idx)], rhs[kept])
