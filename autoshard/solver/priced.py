"""Memory prices on a large core, each priced problem solved by toulbar2.

Large cores (5,000-16,000 nodes on IOPDDL's K, M, N, R, S, T, U) have a memory limit far below
the peak of the cheapest plan (K: 11x), so which plan is best depends on where memory is saved.
Memory gets a price per time step, ``mu[t]`` (Lagrangian relaxation of the memory rows; Fisher,
Management Science 1981). A strategy then costs its own cost plus Σ_t mu[t] · usage_t, and the
priced problem is a plain cost function network (no memory rows), which toulbar2 solves far
better than tree-block steps do: this is how the IOPDDL contest's winner used it (soft memory
limits with adaptive penalties, each penalised problem solved by toulbar2). Each priced plan is
repaired to fit and improved by feasible single-node moves (``LocalSearch.descend``).

The prices follow a sawtooth around the limit: from the plan without memory, one subgradient
step (the overflow, scaled so that pricing it costs about ``1 / FIRST_STEP_DIV`` of the plan);
while plans fit, the prices shrink (by ``FAST_DECAY`` until a plan first overflows again, then
by ``DECAY``); when a plan overflows, the prices grow where it overflows, by ``BUMP`` times their
current total. The best plans come from priced plans at the edge of the limit.

Measured at the contest's timeouts on this 2-core machine (``benchmarks/iopddl.py``, run 6),
cost / best known, against the tree-block priced search (``local_search.priced_search``), each
followed by the LNS: K 1.519 -> 1.002, M 1.047 -> 1.004, N 1.129 -> 1.071, R 1.323 -> 1.085,
S 1.123 -> 1.060, T 1.148 -> 1.099, U 1.075 -> 1.045.
"""

from __future__ import annotations

import numpy as np

from autoshard.solver.local_search import LocalSearch
from autoshard.solver.problem import FORBIDDEN

#: The first price step: the overflow of the plan without memory, priced at its cost over this.
FIRST_STEP_DIV = 1e4
#: Factor on the prices after a plan that fits, before and after the first overflow that
#: follows the first step (K: the first step prices memory at ~1e5 x the plan's cost; 0.5 took
#: 13 rounds of 6 s to come back to the edge, 0.1 takes 4).
FAST_DECAY = 0.1
DECAY = 0.5
#: Growth of the prices after a plan that overflows, as a share of their current total, put
#: where it overflows (a fixed subgradient step overshot T's limit by 1e4x and stalled at 7.7e11).
BUMP = 1.0


def network_priced_search(search: LocalSearch, *, minimise, repair, offer, keep_going) -> int:
    """The sawtooth of the module docstring. ``minimise(costs) -> choice | None`` solves the
    problem with node costs ``costs`` (the edges unchanged) and no memory limit; None stops the
    search. ``repair(choice) -> choice`` makes a plan fit; ``offer(choice)`` takes every repaired
    and improved plan. Runs while ``keep_going()``; returns the number of priced problems."""
    limit = search.limit
    if limit is None:
        return 0
    mu = np.zeros(search.memory.horizon)
    rounds, bracketed = 0, False
    while keep_going():
        costs = search.costs
        if mu.any():
            costs = [np.where(c >= FORBIDDEN, c, c + p)
                     for c, p in zip(search.costs, search.prices(mu))]
        choice = minimise(costs)
        if choice is None:
            break
        rounds += 1
        over = np.maximum(search.profile(choice) - limit, 0)
        fitted = repair(choice) if over.any() else choice
        fitted, _ = search.descend(fitted, search.profile(fitted), sweeps=2)
        offer(fitted)
        if not over.any():
            if not mu.any():   # the plan without memory prices fits: nothing to price
                break
            mu *= DECAY if bracketed else FAST_DECAY
            continue
        share = over / float(over.sum())
        if mu.any():
            bracketed = True
            mu += BUMP * float(mu.sum()) * share
        else:
            # (at least a unit of cost: a plan that costs nothing still gets a price step)
            mu += max(abs(search.cost(choice)), 1.0) / FIRST_STEP_DIV * share
    return rounds
