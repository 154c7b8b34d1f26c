"""Search on a reduced problem: a greedy start, memory repair, then toulbar2 or CP-SAT.

- *Start*: each node's cheapest strategy, improved by a few sweeps of iterated conditional modes
  (Besag 1986) on the pairwise costs, ignoring memory; then a greedy *repair* that, at the worst
  overflowing time, takes the strategy change with the smallest extra cost per byte saved (the
  repair step of the 1st and 3rd IOPDDL teams).
- *Large cores*, first: the local search of ``local_search``: tree-block steps (exact dynamic
  programming over an induced forest) from the greedy plan, then Lagrangian prices on memory
  per time step (soft memory, as the 1st IOPDDL team did with penalties and toulbar2), each
  priced plan repaired and improved by single-node moves that fit. Each priced problem goes
  to toulbar2 (``priced``) where it is installed and ``toulbar2`` is asked for, else to
  tree-block steps (``local_search.priced_search``, which end at costlier plans than toulbar2).
  A price per time step, not one global λ on the greedy plan: a single price cannot say where
  memory must be saved, and its plans stay several times the best known.
- *Small cores*, first: toulbar2 (``toulbar2``), which keeps edge matrices as tables, with
  the memory constraints all at once where they are few, else added lazily (cutting planes);
  it often proves the optimum well within the contest's time limit. When it proves nothing,
  the rest below follows with its plans.
- *Small cores*, first: the local-polytope LP (``relax``), whose rounded marginals are a
  start (often far better than the greedy one) and whose optimum is a bound.
- *Small cores* (presolve leaves a few hundred nodes on half the contest instances): the whole
  problem in CP-SAT with exact memory constraints (``memory.part_cuts``), hinted with the
  start; its bound is a lower bound of the original problem.
  A small core whose LP is too large to try gets the same local search as its start, where
  toulbar2 did not take it first.
- *Large cores*, then: large-neighbourhood search (Shaw 1998; as in CP-SAT's own LNS): a
  breadth-first ball of nodes is freed, the rest fixed, and CP-SAT solves the part exactly
  against the memory the rest leaves at every segment where the part's usage changes.

Every decision is a function of the inputs, the seed, CP-SAT's deterministic time and
toulbar2's backtrack count, except wall-clock limits in contest mode (``deterministic=False``).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from autoshard.solver import toulbar2
from autoshard.solver.cpsat import Limits, solve_part
from autoshard.solver.local_search import LocalSearch, priced_search
from autoshard.solver.memory import Cuts, MemoryModel, part_cuts
from autoshard.solver.priced import network_priced_search
from autoshard.solver.problem import FORBIDDEN
from autoshard.solver.presolve import Reduced
from autoshard.solver.relax import relax

#: Cores up to this size go to CP-SAT whole; larger ones to LNS.
WHOLE_MAX_NODES = 1500
#: Share of the search budget toulbar2 takes on a small core with few memory constraints
#: (``toulbar2.suits``), all stated at once; the LP start and CP-SAT get the rest, with its
#: plan as the incumbent, when it proves nothing.
NETWORK_SHARE = 0.75
#: With many memory constraints, added lazily: the most violated rows added per round, and the
#: share of the budget left that one round may take.
LAZY_ROWS = 20
LAZY_SHARE = 0.15
#: Largest share of the search budget the LP relaxation may take (contest mode).
LP_SHARE = 0.5
#: Deterministic budget units charged per LP variable (about CP-SAT's units per second).
LP_UNITS_PER_VARIABLE = 1e-4
#: Free nodes per LNS move (grows when moves prove optimal quickly).
LNS_NODES = 120
#: Share of the search budget the local search (``local_search``) takes on large cores (the
#: LNS after it gains little, while the priced search still improves at the end of its share).
LOCAL_SHARE = 0.85
#: Share of the budget the local search takes on small cores whose LP is too large to try
#: (CP-SAT without a start ends far above what the local search reaches in seconds).
LOCAL_SHARE_NO_LP = 0.25
#: Rounds without a new incumbent after which the priced search gives way to the LNS.
LOCAL_PATIENCE = 150
#: Most tree-block steps without memory before the first repair (a cheaper plan to repair
#: gives a cheaper repaired plan; the steps stop early once they gain little).
START_TREE_STEPS = 20
#: Budget of one toulbar2 call on a priced large core (``priced``), in seconds or
#: deterministic units: a core of 5k-16k nodes takes a few seconds a call (toulbar2's time
#: limit is whole seconds), so a few dozen calls fit in a contest's time limit.
PRICED_CALL = 5.0
_NO_CUTS = Cuts([], [], np.zeros(0, np.int64))
#: Deterministic budget units charged per node and edge for one round of the local search.
LOCAL_UNITS_PER_ELEMENT = 1e-4


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
    return scale_for(reduced.costs, reduced.edges)


def scale_for(costs, edges: dict) -> float:
    """``cost_scale`` for node costs ``costs`` and edge matrices ``edges``."""
    arrays = list(costs) + list(edges.values())
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


def greedy(costs, adj, sweeps: int = 4, start=None) -> np.ndarray:
    """Cheapest strategy per node (or ``start``), then iterated conditional modes in node
    order."""
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
           seed: int, workers: int, progress=None, toulbar2: bool = True) -> SearchResult:
    """``toulbar2``: let toulbar2 take a small core first (``_network``) and solve a large
    core's priced problems (``_network_priced``)."""
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
    if n > WHOLE_MAX_NODES:
        _local_phase(memory, costs, adj, budget, seed, best, report, LOCAL_SHARE,
                     edges=reduced.edges if toulbar2 else None)
    report(f"start: cost {best.cost:.6g}, feasible {best.feasible}")
    if n <= WHOLE_MAX_NODES:
        # with every node free the constraints do not depend on the incumbent: built once
        cuts = part_cuts(memory, np.arange(n), best.choice, best.profile)
        network = _network(reduced, memory, cuts, costs, adj, scale, budget, seed, best,
                           report) if toulbar2 else None
        if network is not None and network[1]:
            lb, optimal, rounds = network
        else:
            lp_bound, lp_too_large = _lp_start(reduced, memory, costs, adj, budget, best,
                                               report)
            if lp_too_large and n > 1 and best.engine != "toulbar2":
                # no LP start (too many LP variables) and no plan of toulbar2's that met
                # every constraint: the local search gives CP-SAT one
                _local_phase(memory, costs, adj, budget, seed, best, report, LOCAL_SHARE_NO_LP)
            lb, optimal, rounds = _whole(reduced, cuts, costs, adj, scale, budget, seed,
                                         workers, best, report)
            for other in (lp_bound, network[0] if network else None):
                if other is not None and (lb is None or other > lb):
                    lb = other
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


def _local_phase(memory, costs, adj, budget, seed, best, report, share: float,
                 edges: dict | None = None) -> None:
    """Large cores: tree-block steps (``local_search``) from the greedy plan, which is far from
    a local optimum (a few steps cut its cost without memory several times), then the
    Lagrangian priced search for ``share`` of the budget left; every plan
    that fits is offered to the incumbent. Given the core's ``edges``, toulbar2 solves each
    priced problem (``priced``) where it is installed; else tree-block steps do."""
    search_ = LocalSearch(costs, adj, memory)
    rng = np.random.default_rng(seed)
    n = len(costs)
    units = LOCAL_UNITS_PER_ELEMENT * (n + sum(len(a) for a in adj) // 2)
    choice = best.choice
    cost = search_.cost(choice)
    for _ in range(START_TREE_STEPS):
        choice = search_.tree_step(choice, search_.forest(rng.permutation(n)))
        if budget.deterministic:
            budget.spend(units / 4)
        before, cost = cost, search_.cost(choice)
        if before - cost <= 1e-4 * abs(before) or budget.left() < 0.5 * budget.limit:
            break

    def fit(c):
        return repair(costs, adj, memory, c, max_rounds=4 * n + 100)

    def offer(c) -> bool:
        if best.offer(c, "local search"):
            report(f"local search: cost {best.cost:.6g}")
            return True
        return False

    def descend_and_offer(c):
        if not _feasible(memory, memory.profile(c)):
            c = fit(c)
        c, _ = search_.descend(c, memory.profile(c), sweeps=2)
        offer(c)

    descend_and_offer(choice)
    if memory.limit is None:
        return
    stop = budget.left() - share * budget.left()
    if edges is not None and toulbar2.available():
        _network_priced(search_, edges, budget, stop, seed, best, fit, offer, report, units)
        return
    priced_search(search_, choice, rng=rng, repair=fit, offer=offer,
                  keep_going=lambda: budget.left() > stop, patience=LOCAL_PATIENCE,
                  spend=(lambda: budget.spend(units)) if budget.deterministic else None)
    report(f"local search done: cost {best.cost:.6g}", force=True)


def _network_priced(search_, edges, budget, stop, seed, best, fit, offer, report,
                    units: float) -> None:
    """``priced`` until the budget left falls to ``stop``, each priced problem given
    toulbar2 for at most ``PRICED_CALL`` (seconds, or deterministic units); where a call ends
    without a plan, two tree-block steps from the last priced plan stand in for it. A
    deterministic budget is also charged ``units`` per round, for the work around the search
    (building the network, repair, descent): toulbar2's backtracks alone charge almost nothing
    where it solves priced problems at once, so a small budget would run thousands of rounds."""
    calls, found, last = 0, 0, best.choice
    rng = np.random.default_rng(seed)

    def minimise(priced):
        nonlocal calls, found, last
        left = budget.left() - stop
        if left < (0.05 if budget.deterministic else 1.0):
            return None
        calls += 1
        res = toulbar2.solve_network(priced, edges, _NO_CUTS, scale_for(priced, edges),
                                      budget.limits(min(PRICED_CALL, left), 1, seed + calls))
        budget.spend(res.det_time + units)
        if res.choice is not None:
            found += 1
            last = res.choice
            return last
        # no plan within the call (rare): tree-block steps from the last one
        extra = [p - c for p, c in zip(priced, search_.costs)]
        for _ in range(2):
            last = search_.tree_step(last, search_.forest(rng.permutation(len(last))), extra)
        return last

    rounds = network_priced_search(search_, minimise=minimise, repair=fit, offer=offer,
                                   keep_going=lambda: budget.left() > stop)
    report(f"priced toulbar2 done: {rounds} priced problems ({found} solved by toulbar2), "
           f"cost {best.cost:.6g}", force=True)


def _lp_start(reduced, memory, costs, adj, budget, best, report) -> tuple[float | None, bool]:
    """The local-polytope LP (``relax``) on the core, with at most ``LP_SHARE`` of the
    budget; its marginals rounded to their largest strategy, then improved by iterated
    conditional modes and repaired, are offered as incumbents (the rounding alone can be the
    best-known plan). Returns the LP's bound (None if unsolved) and
    whether the LP was too large to try."""
    rel = relax(reduced, memory, best.choice, time_limit=LP_SHARE * budget.left(),
                deterministic=budget.deterministic)
    if budget.deterministic:
        budget.spend(LP_UNITS_PER_VARIABLE * rel.variables)
    report(f"local-polytope LP: {rel.status}, {rel.variables} variables, bound {rel.bound}, "
           f"{rel.seconds:.1f}s", force=True)
    if rel.marginals is None:
        return None, rel.status == "too large"
    rounded = np.array([int(np.argmax(v)) for v in rel.marginals])
    for cand in (rounded, greedy(costs, adj, start=rounded)):
        if not _feasible(memory, memory.profile(cand)):
            cand = repair(costs, adj, memory, cand, max_rounds=4 * len(costs) + 100)
        if best.offer(cand, "lp rounding"):
            report(f"lp rounding: cost {best.cost:.6g}", force=True)
    return rel.bound, False


def _network(reduced, memory, cuts, costs, adj, scale, budget, seed, best, report):
    """toulbar2 on the whole core (``toulbar2``); (bound, optimal, rounds), or None where it
    is not installed.

    With few memory constraints (``toulbar2.suits``) all of them go in at once, for
    ``NETWORK_SHARE`` of the budget. With many, they are added lazily (cutting planes): solve
    with the active ones, add the ``LAZY_ROWS`` most violated by the answer, repeat; an answer
    that violates none is optimal for the whole problem. Only a few segments bind (a few dozen
    of thousands of constraints are active when the optimum is proven), so few rounds are
    needed. The loop stops when toulbar2 proves nothing within ``LAZY_SHARE`` of the budget
    left; the rest of the search then goes on from its plans."""
    if not toulbar2.available():
        report("toulbar2 (pytoulbar2) is not installed: CP-SAT takes the core", force=True)
        return None
    lazy = not toulbar2.suits(cuts)
    active = np.zeros(len(cuts), bool) if lazy else np.ones(len(cuts), bool)
    rows = _cut_matrix(cuts, sum(len(c) for c in reduced.costs))
    starts = np.concatenate([[0], np.cumsum([len(c) for c in reduced.costs])[:-1]])
    lb, rounds = None, 0
    while budget.left() > 0.1:
        rounds += 1
        part = Cuts([cuts.idx[r] for r in np.flatnonzero(active)],
                    [cuts.coef[r] for r in np.flatnonzero(active)], cuts.rhs[active])
        report(f"toulbar2 on the whole core: {reduced.num_nodes} nodes, {len(part)} of "
               f"{len(cuts)} memory constraints", force=True)
        upper = best.cost - reduced.constant if best.feasible else None
        share = LAZY_SHARE if lazy else NETWORK_SHARE
        res = toulbar2.solve_network(reduced.costs, reduced.edges, part, scale,
                                      budget.limits(share * budget.left(), 1, seed), upper)
        budget.spend(res.det_time)
        if res.infeasible:   # no plan meets even the active constraints
            return float("inf"), True, rounds
        if res.choice is None:
            # nothing at or below the incumbent: proven optimal if the search was complete
            return (best.cost, True, rounds) if res.optimal else (lb, False, rounds)
        if res.optimal:
            lb = max(lb or -np.inf, res.objective + reduced.constant)
        chosen = np.zeros(rows.shape[1])
        chosen[starts + res.choice] = 1.0
        violated = rows @ chosen - cuts.rhs
        bad = np.flatnonzero(violated > 0)
        if not len(bad):
            best.offer(res.choice, "toulbar2")
            if res.optimal:
                report(f"toulbar2: optimal, cost {best.cost:.6g}", force=True)
                return best.cost, True, rounds
            report(f"toulbar2: cost {best.cost:.6g}, bound {lb}", force=True)
            return (res.bound + reduced.constant if lb is None else lb), False, rounds
        if best.offer(repair(costs, adj, memory, res.choice,
                             max_rounds=4 * reduced.num_nodes + 100), "toulbar2+repair"):
            report(f"toulbar2+repair: cost {best.cost:.6g}", force=True)
        if not res.optimal:
            break
        active[bad[np.argsort(-violated[bad], kind="stable")][:LAZY_ROWS]] = True
    return lb, False, rounds


def _cut_matrix(cuts: Cuts, width: int) -> sp.csr_matrix:
    """The memory constraints' left-hand sides as a sparse (rows, strategies) matrix."""
    indptr = np.concatenate([[0], np.cumsum([len(i) for i in cuts.idx])]).astype(np.int64)
    idx = np.concatenate(cuts.idx) if len(cuts) else np.zeros(0, np.int64)
    coef = np.concatenate(cuts.coef) if len(cuts) else np.zeros(0, np.int64)
    return sp.csr_matrix((coef.astype(np.float64), idx, indptr), shape=(len(cuts), width))


def _whole(reduced, cuts, costs, adj, scale, budget, seed, workers, best, report):
    """CP-SAT on the whole core with exact memory constraints; returns (bound, optimal,
    rounds). The bound is a lower bound of the original problem."""
    free = np.arange(reduced.num_nodes)
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
