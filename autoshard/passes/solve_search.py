"""Search on a reduced problem: a greedy start, memory repair, then CP-SAT.

- *Start*: each node's cheapest strategy, improved by a few sweeps of iterated conditional modes
  (Besag 1986) on the pairwise costs, ignoring memory; then a greedy *repair* that, at the worst
  overflowing time, takes the strategy change with the smallest extra cost per byte saved (the
  repair step of the 1st and 3rd IOPDDL teams).
- *Start, large cores*: the same greedy on cost + λ · usage for a bisection of one global λ
  (soft memory, as the 1st IOPDDL team did with per-node penalties and toulbar2), repaired.
- *Small cores*, first: the local-polytope LP (``solve_relax``), whose rounded marginals are a
  start (on IOPDDL's B, C, D and G far better than the greedy one) and whose optimum is a bound.
- *Small cores* (presolve leaves a few hundred nodes on half the contest instances): the whole
  problem in CP-SAT with exact memory constraints (``solve_memory.part_cuts``), hinted with the
  start; its bound is a lower bound of the original problem.
- *Large cores*: large-neighbourhood search (Shaw 1998; as in CP-SAT's own LNS): a breadth-first
  ball of nodes is freed, the rest fixed, and CP-SAT solves the part exactly against the memory
  the rest leaves at every segment where the part's usage changes.

Every decision is a function of the inputs, the seed and CP-SAT's deterministic time, except
wall-clock limits in contest mode (``deterministic=False``).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from autoshard.passes.solve_cpsat import Limits, solve_part
from autoshard.passes.solve_memory import MemoryModel, part_cuts
from autoshard.passes.solve_problem import FORBIDDEN
from autoshard.passes.solve_reduce import Reduced
from autoshard.passes.solve_relax import relax

#: Cores up to this size go to CP-SAT whole; larger ones to LNS.
WHOLE_MAX_NODES = 1500
#: Largest share of the search budget the LP relaxation may take (contest mode).
LP_SHARE = 0.5
#: Deterministic budget units charged per LP variable (about CP-SAT's units per second).
LP_UNITS_PER_VARIABLE = 1e-4
#: Free nodes per LNS move (grows when moves prove optimal quickly).
LNS_NODES = 120


@dataclass(frozen=True)
class SearchResult:
    """The best reduced choice found; ``feasible``: it meets the memory limit; ``lower_bound``
    on the reduced cost (None if unknown); ``engine``: what found it; ``optimal``: proven."""

    choice: np.ndarray
    feasible: bool
    lower_bound: float | None
    engine: str
    optimal: bool
    rounds: int


class _Budget:
    """Deterministic units (CP-SAT's deterministic time) or a wall-clock deadline."""

    def __init__(self, limit: float, deterministic: bool, start: float):
        self.limit, self.deterministic, self.start, self.used = limit, deterministic, start, 0.0

    def left(self) -> float:
        if self.deterministic:
            return self.limit - self.used
        return self.limit - (time.monotonic() - self.start)

    def spend(self, det: float) -> None:
        self.used += det

    def limits(self, part: float, workers: int, seed: int) -> Limits:
        deadline = None if self.deterministic else self.start + self.limit
        return Limits(max(part, 0.05), self.deterministic, workers, seed, deadline)


def adjacency(reduced: Reduced) -> list[dict[int, np.ndarray]]:
    adj: list[dict[int, np.ndarray]] = [{} for _ in range(reduced.num_nodes)]
    for (j, l), m in reduced.edges.items():
        adj[j][l] = m
        adj[l][j] = m.T
    return adj


def reduced_cost(reduced: Reduced, choice) -> float:
    total = reduced.constant + sum(float(c[a]) for c, a in zip(reduced.costs, choice))
    return total + sum(float(m[choice[j], choice[l]]) for (j, l), m in reduced.edges.items())


def cost_scale(reduced: Reduced) -> float:
    """Multiplier that makes the costs CP-SAT sees integers: 1 for integral costs, else a power
    of two that keeps the whole objective below 2**50."""
    arrays = list(reduced.costs) + list(reduced.edges.values())
    finite = [a[a < FORBIDDEN] for a in arrays]
    integral = all(np.all(f == np.round(f)) for f in finite)
    span = sum(float(np.abs(f).max()) for f in finite if len(f)) or 1.0
    if integral and span < 2**50:
        return 1.0
    return float(2 ** np.floor(np.log2(2**50 / span)))


def _local_cost(costs, adj, choice, j) -> np.ndarray:
    c = np.array(costs[j], np.float64)
    for l, m in adj[j].items():
        c = c + m[:, choice[l]]
    return c


def greedy(costs, adj, sweeps: int = 4, penalty=None, start=None) -> np.ndarray:
    """Cheapest strategy per node (or ``start``), then iterated conditional modes in node
    order; ``penalty`` (one vector per node) is added to the node costs."""
    if penalty is not None:
        costs = [c + p for c, p in zip(costs, penalty)]
    choice = (np.array([int(np.argmin(c)) for c in costs]) if start is None
              else np.array(start, np.int64))
    for _ in range(sweeps):
        changed = False
        for j in range(len(costs)):
            a = int(np.argmin(_local_cost(costs, adj, choice, j)))
            if a != choice[j]:
                choice[j], changed = a, True
        if not changed:
            break
    return choice


def repair(costs, adj, memory: MemoryModel, choice: np.ndarray, max_rounds: int) -> np.ndarray:
    """Greedy memory repair: at the worst overflowing time, rank the strategy changes by extra
    cost per byte saved there (against the neighbours' current strategies) and apply them in
    that order until that time fits; repeat for the next worst time, at most ``max_rounds``
    times."""
    choice = choice.copy()
    profile = memory.profile(choice)
    live_nodes = _nodes_by_time(memory)
    for _ in range(max_rounds):
        if memory.limit is None or not len(profile) or profile.max() <= memory.limit:
            break
        t = int(np.argmax(profile))
        cands = []
        for j in live_nodes(t):
            use = memory.rows(j, np.array([t]))[0]
            saved = use[choice[j]] - use
            if not (saved > 0).any():
                continue
            local = _local_cost(costs, adj, choice, j)
            for b in np.flatnonzero(saved > 0):
                extra = local[b] - local[choice[j]]
                if extra < FORBIDDEN:
                    cands.append((max(extra, 0.0) / saved[b], -saved[b], j, int(b)))
        if not cands:
            break
        cands.sort()
        moved = set()
        for _, _, j, b in cands:
            if profile[t] <= memory.limit:
                break
            if j in moved:
                continue
            moved.add(j)
            _apply(memory, profile, j, choice[j], b)
            choice[j] = b
    return choice


def _apply(memory: MemoryModel, profile: np.ndarray, j: int, old: int, new: int) -> None:
    """Update ``profile`` in place for node j moving from strategy old to new."""
    diff = memory.usage[j][new] - memory.usage[j][old]
    for s, e, d in zip(memory.starts[j], memory.ends[j], diff):
        if d:
            profile[s:e] += d


def _nodes_by_time(memory: MemoryModel):
    """A function t -> nodes whose choice changes usage at t."""
    ext = [memory.node_extent(j) for j in range(len(memory.starts))]
    lo = np.array([e[0] for e in ext])
    hi = np.array([e[1] for e in ext])

    def live(t: int):
        cand = np.flatnonzero((lo <= t) & (t < hi))
        return [int(j) for j in cand
                if ((memory.starts[j] <= t) & (t < memory.ends[j])).any()]
    return live


def _feasible(memory: MemoryModel, profile: np.ndarray) -> bool:
    return memory.limit is None or not len(profile) or profile.max() <= memory.limit


def search(reduced: Reduced, memory: MemoryModel, *, time_limit: float, deterministic: bool,
           seed: int, workers: int, progress=None) -> SearchResult:
    start = time.monotonic()
    budget = _Budget(time_limit, deterministic, start)
    costs, adj = reduced.costs, adjacency(reduced)
    n = reduced.num_nodes
    scale = cost_scale(reduced)
    report = _Reporter(progress, start)
    if n == 0:
        return SearchResult(np.zeros(0, np.int64), _feasible(memory, memory.baseline),
                            reduced.constant, "presolve", True, 0)
    choice = greedy(costs, adj)
    engine = "greedy"
    if not _feasible(memory, memory.profile(choice)):
        choice = repair(costs, adj, memory, choice, max_rounds=4 * n + 100)
        engine = "greedy+repair"
    best = _Best(reduced, memory, choice, engine)
    if n > WHOLE_MAX_NODES and memory.limit is not None:
        _penalised_starts(reduced, memory, costs, adj, budget, best, report)
    report(f"start: cost {best.cost:.6g}, feasible {best.feasible}")
    if n <= WHOLE_MAX_NODES:
        lp_bound = _lp_start(reduced, memory, costs, adj, budget, best, report)
        lb, optimal, rounds = _whole(reduced, memory, costs, adj, scale, budget, seed, workers,
                                     best, report)
        if lp_bound is not None and (lb is None or lp_bound > lb):
            lb = lp_bound
    else:
        lb, optimal, rounds = None, False, 0
    if not optimal and n > 1:
        rounds += _lns(memory, costs, adj, scale, budget, seed, workers, best, report)
    return SearchResult(best.choice, best.feasible, lb, best.engine, optimal, rounds)


class _Reporter:
    """Calls ``progress`` with a status line at most every 2 s (wall clock only decides when to
    print, never what the search does)."""

    def __init__(self, progress, start):
        self.progress, self.start, self.last = progress, start, -1e9

    def __call__(self, msg: str, force: bool = False) -> None:
        now = time.monotonic()
        if self.progress is not None and (force or now - self.last >= 2.0):
            self.last = now
            self.progress(f"[{now - self.start:6.1f}s] {msg}")


class _Best:
    """Incumbent: feasible beats infeasible, then lower cost."""

    def __init__(self, reduced, memory, choice, engine):
        self.reduced, self.memory = reduced, memory
        self.choice, self.engine = choice, engine
        self.profile = memory.profile(choice)
        self.feasible = _feasible(memory, self.profile)
        self.cost = reduced_cost(reduced, choice)

    def offer(self, choice, engine) -> bool:
        profile = self.memory.profile(choice)
        feasible = _feasible(self.memory, profile)
        cost = reduced_cost(self.reduced, choice)
        if (feasible and not self.feasible) or (feasible == self.feasible and cost < self.cost):
            self.choice, self.engine, self.profile = choice, engine, profile
            self.feasible, self.cost = feasible, cost
            return True
        return False


def _penalised_starts(reduced, memory, costs, adj, budget, best, report, tries: int = 10):
    """Soft memory (the 1st IOPDDL team's idea, here with one global multiplier): greedy on
    cost + λ · usage for a geometric bisection of λ, each result repaired; the best feasible
    one becomes the incumbent. Uses at most a fifth of the budget."""
    weight = [u.sum(axis=1).astype(np.float64) for u in memory.usage]
    cost_span = sum(float(np.ptp(c[c < FORBIDDEN])) for c in costs if (c < FORBIDDEN).any())
    use_span = sum(float(np.ptp(w)) for w in weight) or 1.0
    lo, hi = -6.0, 3.0  # log10 of λ relative to cost_span / use_span
    stop = budget.left() - 0.2 * budget.limit
    for _ in range(tries):
        if budget.left() < stop:
            break
        mid = (lo + hi) / 2
        lam = 10.0 ** mid * cost_span / use_span
        choice = greedy(costs, adj, penalty=[lam * w for w in weight])
        fits = _feasible(memory, memory.profile(choice))
        if not fits:
            choice = repair(costs, adj, memory, choice, max_rounds=4 * len(costs) + 100)
        better = best.offer(choice, "penalised greedy")
        report(f"penalty 10^{mid:.2f}: fits {fits}, cost {reduced_cost(reduced, choice):.6g}"
               f"{' (best)' if better else ''}", force=True)
        if fits:
            hi = mid
        else:
            lo = mid
        if budget.deterministic:
            budget.spend(0.002 * len(costs))  # greedy work counts against the budget


def _lp_start(reduced, memory, costs, adj, budget, best, report) -> float | None:
    """The local-polytope LP (``solve_relax``) on the core, with at most ``LP_SHARE`` of the
    budget; its marginals rounded to their largest strategy, then improved by iterated
    conditional modes and repaired, are offered as incumbents (on instances G and B of IOPDDL
    the rounding alone is the best-known plan). Returns the LP's bound (None if unsolved)."""
    rel = relax(reduced, memory, best.choice, time_limit=LP_SHARE * budget.left(),
                deterministic=budget.deterministic)
    if budget.deterministic:
        budget.spend(LP_UNITS_PER_VARIABLE * rel.variables)
    report(f"local-polytope LP: {rel.status}, {rel.variables} variables, bound {rel.bound}, "
           f"{rel.seconds:.1f}s", force=True)
    if rel.marginals is None:
        return None
    rounded = np.array([int(np.argmax(v)) for v in rel.marginals])
    for cand in (rounded, greedy(costs, adj, start=rounded)):
        if not _feasible(memory, memory.profile(cand)):
            cand = repair(costs, adj, memory, cand, max_rounds=4 * len(costs) + 100)
        if best.offer(cand, "lp rounding"):
            report(f"lp rounding: cost {best.cost:.6g}", force=True)
    return rel.bound


def _whole(reduced, memory, costs, adj, scale, budget, seed, workers, best, report):
    """CP-SAT on the whole core with exact memory constraints; returns (bound, optimal,
    rounds). The bound is a lower bound of the original problem."""
    free = np.arange(reduced.num_nodes)
    cuts = part_cuts(memory, free, best.choice, best.profile)
    report(f"cp-sat on the whole core: {len(free)} nodes, {len(cuts)} memory constraints",
           force=True)
    res = solve_part(costs, adj, free, best.choice, cuts, scale,
                     budget.limits(budget.left(), workers, seed),
                     hint=best.choice)
    budget.spend(res.det_time)
    if res.choice is None:
        return (float("inf"), True, 1) if res.infeasible else (None, False, 1)
    best.offer(res.choice, "cp-sat")
    lb = res.bound + reduced.constant
    report(f"cp-sat: cost {best.cost:.6g}, bound {lb:.6g}", force=True)
    return lb, res.optimal, 1


def _ball(adj, seed_node: int, size: int) -> np.ndarray:
    seen = {seed_node}
    queue = deque([seed_node])
    while queue and len(seen) < size:
        j = queue.popleft()
        for l in sorted(adj[j]):
            if l not in seen:
                seen.add(l)
                queue.append(l)
                if len(seen) >= size:
                    break
    return np.array(sorted(seen))


def _lns(memory, costs, adj, scale, budget, seed, workers, best, report) -> int:
    """Large-neighbourhood search from the incumbent; returns the number of moves."""
    rng = np.random.default_rng(seed)
    n = len(costs)
    size = min(LNS_NODES, n)
    moves = 0
    while budget.left() > 0.02 * budget.limit and budget.left() > 0.1:
        moves += 1
        free = _ball(adj, int(rng.integers(n)), size)
        cuts = part_cuts(memory, free, best.choice, best.profile)
        part_budget = min(max(0.5, 0.02 * budget.limit), budget.left())
        res = solve_part(costs, adj, free, best.choice, cuts, scale,
                         budget.limits(part_budget, workers, seed + moves),
                         hint=best.choice[free])
        budget.spend(res.det_time)
        if res.choice is None:
            continue
        cand = best.choice.copy()
        cand[free] = res.choice
        if best.offer(cand, "lns"):
            report(f"lns move {moves}: cost {best.cost:.6g}")
        if res.optimal and size < n and res.det_time < 0.25 * part_budget:
            size = min(n, int(size * 1.25) + 1)
        elif not res.optimal and size > 20:
            size = max(20, int(size * 0.8))
    return moves
