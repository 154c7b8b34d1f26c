"""Memory prices on a large core, each priced problem solved by toulbar2.

Large cores (thousands of nodes) can have a memory limit many times below the peak of the
cheapest plan, so which plan is best depends on where memory is saved.
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
``benchmarks/iopddl.py`` compares this with the tree-block priced search
(``local_search.priced_search``) on the contest's instances.
"""

from __future__ import annotations

import numpy as np

from autoshard.solver.local_search import LocalSearch
from autoshard.solver.problem import FORBIDDEN

#: The first price step: the overflow of the plan without memory, priced at its cost over this.
FIRST_STEP_DIV = 1e4
#: Factor on the prices after a plan that fits, before and after the first overflow that
#: follows the first step (the first step can price memory far above the plan's cost; a fast
#: fall brings the plans back to the edge of the limit in a few rounds, not a dozen).
FAST_DECAY = 0.1
DECAY = 0.5
#: Growth of the prices after a plan that overflows, as a share of their current total, put
#: where it overflows (a fixed subgradient step can overshoot by orders of magnitude and stall).
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
