"""The solver: choose one strategy per node to minimise cost within a memory limit.

    problem = load_iopddl("asplos-2025-iopddl-B.json.gz")      # or Problem.from_lists(...)
    sol = solve(problem, time_limit=60)
    sol.choice, sol.cost, sol.feasible, sol.lower_bound, sol.gap

The pipeline (the design card, "Solver"): exact presolve (``presolve``: forbidden pruning,
dominance, folding single-strategy nodes, merging functional edges, groups) shrinks the contest's
instances from tens of thousands of nodes to hundreds on half of them; then ``search``:
a greedy start with memory repair; on a small core toulbar2 with memory constraints added
lazily, the local-polytope LP's rounding (``relax``) and CP-SAT on the whole core; on a
large one, memory prices with each priced problem solved by toulbar2 (``priced``), then
large-neighbourhood search with CP-SAT. Memory is checked exactly, at every time, on the original
problem before a solution is returned.

With ``deterministic=True`` the same inputs give the same choice in any process (a fixed seed,
CP-SAT's deterministic time as the budget, no wall-clock decision); the wall time is then roughly,
not exactly, ``time_limit``. ``deterministic=False`` is the contest mode: wall-clock limits,
``time_limit`` includes presolve.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from autoshard.ir.errors import PlanInfeasibleError
from autoshard.solver.memory import memory_model
from autoshard.solver.problem import (FORBIDDEN, Evaluation, Problem, evaluate,
                                            load_iopddl, usage_profile)
from autoshard.solver.presolve import presolve
from autoshard.solver.search import search

__all__ = ["Problem", "Solution", "Evaluation", "solve", "evaluate", "load_iopddl",
           "min_peak_bound"]


@dataclass(frozen=True)
class Solution:
    """``choice``: one strategy index per node; ``cost``: its exact cost (``evaluate``);
    ``feasible``: within the memory limit with no forbidden choice; ``lower_bound``: a proven
    lower bound on the optimal cost (None when unknown); ``gap``: (cost - bound) / cost;
    ``seconds``: wall time of the solve; ``status``: "optimal" or "feasible" ("forbidden" when
    every plan that fits takes a forbidden choice); ``peak_usage``: the plan's peak memory;
    ``stats``: nodes and edges before and after presolve, what presolve did (strategies pruned
    and dominated, nodes folded and merged), ``variables`` (strategy booleans left for the
    search), which ``engine`` found the incumbent, search ``rounds``."""

    choice: list[int]
    cost: float
    feasible: bool
    lower_bound: float | None
    gap: float | None
    seconds: float
    status: str
    peak_usage: int
    stats: dict = field(default_factory=dict)


def min_peak_bound(problem: Problem) -> tuple[int, int, np.ndarray]:
    """(bound, time, choice): the peak memory when every node takes its smallest usage among
    strategies that are not forbidden, the time of that peak, and that choice. Without groups no
    plan peaks lower; with groups it is a lower bound."""
    off = problem.offsets
    allowed = problem.costs < FORBIDDEN
    node_any = np.logical_or.reduceat(allowed, off[:-1])
    allowed |= np.repeat(~node_any, np.diff(off))
    big = np.iinfo(np.int64).max
    masked = np.where(allowed, problem.usages, big)
    choice = np.array([int(np.argmin(masked[off[i]:off[i + 1]]))
                       for i in range(problem.num_nodes)], np.int64)
    profile = usage_profile(problem, choice)
    if not len(profile):
        return 0, 0, choice
    t = int(np.argmax(profile))
    return int(profile[t]), t, choice


def _infeasible(problem: Problem, bound: int, t: int, found: int | None) -> PlanInfeasibleError:
    limit = problem.usage_limit
    exact = not problem.groups
    msg = (f"problem {problem.name!r}: no plan fits the memory limit of {limit:,} bytes. "
           f"The smallest peak any plan can reach is {'exactly' if exact else 'at least'} "
           f"{bound:,} bytes (lower bound: every node at its smallest non-forbidden usage; "
           f"the peak is at time {t})")
    if found is not None:
        msg += (f"; the search found plans peaking at {found:,} bytes at best, which is the "
                f"smallest peak found, not a proven minimum")
    msg += ". Raise the memory budget, or allow more strategies (shardings) per node."
    return PlanInfeasibleError(msg)


def solve(problem: Problem, *, time_limit: float = 60.0, deterministic: bool = True,
          seed: int = 0, workers: int = 2, progress=None, toulbar2: bool = True) -> Solution:
    """Best plan found within ``time_limit``; raises ``PlanInfeasibleError`` when no plan fits
    the memory limit, stating the smallest peak that can be reached. ``toulbar2``: let
    toulbar2 take a small core before the LP start and CP-SAT (``toulbar2``), and a large
    core's memory-priced problems (``priced``)."""
    start = time.monotonic()
    bound, t_peak, _ = min_peak_bound(problem)
    if problem.usage_limit is not None and bound > problem.usage_limit:
        raise _infeasible(problem, bound, t_peak, None)
    reduced = presolve(problem)
    memory = memory_model(problem, reduced)
    if deterministic:
        search_budget = time_limit
    else:
        # keep back time to map the answer back and check it (about a second on 65k nodes)
        search_budget = max(0.3, time_limit - (time.monotonic() - start) - 0.5
                            - 0.02 * time_limit)
    result = search(reduced, memory, time_limit=search_budget, deterministic=deterministic,
                    seed=seed, workers=workers, progress=progress, toulbar2=toulbar2)
    choice = reduced.expand(result.choice)
    ev = evaluate(problem, choice)
    if not ev.feasible:
        raise _infeasible(problem, bound, t_peak, ev.peak_usage)
    lb = result.lower_bound
    if lb is not None and lb > ev.cost:  # float rounding on integral costs
        lb = float(ev.cost)
    gap = None if lb is None or ev.cost == 0 else max(0.0, (ev.cost - lb) / abs(ev.cost))
    feasible = ev.feasible and ev.forbidden == 0
    status = "optimal" if result.optimal and feasible else ("feasible" if feasible else
                                                             "forbidden")
    stats = dict(reduced.stats, engine=result.engine, rounds=result.rounds,
                 variables=int(sum(len(c) for c in reduced.costs)))
    return Solution(choice=[int(a) for a in choice], cost=ev.cost, feasible=feasible,
                    lower_bound=lb, gap=gap, seconds=time.monotonic() - start, status=status,
                    peak_usage=ev.peak_usage, stats=stats)
