"""A reduced problem as a cost function network, solved by toulbar2 (branch and bound).

The IOPDDL contest's winner (ASPLOS 2025) solved each problem as a cost function network with
toulbar2 (Hurley et al., Constraints 2016: soft arc consistency bounds, hybrid best-first
search). A node is a variable whose domain is its strategies, its cost vector a unary cost
function, an edge matrix a binary one, kept as a table: no boolean per strategy pair, which is
what makes CP-SAT slow where edge tables are large. Memory constraints (``part_cuts``) become
generalized linear constraints over (variable, value) pairs. They are cheap to state only when
there are few of them (``suits``); with thousands the search adds them lazily
(``search._network``).

On cores with about a hundred memory constraints toulbar2 proves the optimum, or comes within
a fraction of a percent of it, in seconds where CP-SAT takes minutes or stalls far above it,
large edge tables included. With thousands of constraints stated at once it finds nothing within
a contest's time limit; added lazily, a few dozen of them suffice to prove the optimum.

Determinism: a fixed seed and, in deterministic mode, a backtrack limit instead of a time limit.
"""

from __future__ import annotations

import time

import numpy as np

from autoshard.solver.cpsat import Limits, SubResult
from autoshard.solver.memory import Cuts
from autoshard.solver.problem import FORBIDDEN

#: Cores with at most this many memory constraints, and nonzeros in them, go to toulbar2.
MAX_CUTS = 1000
MAX_CUT_NONZEROS = 200_000
#: Deterministic budget units (CP-SAT's: about a second of one worker) per backtrack: a fixed
#: part, one per cost-table entry and one per variable and memory-constraint nonzero (the
#: linear constraints' propagation), fitted on a 2-core machine to cores of 142 to 954
#: variables with 3.5k to 730k table entries; it errs on the high side.
UNITS_PER_BACKTRACK = 4e-4
UNITS_PER_BACKTRACK_AND_ENTRY = 2.7e-9
UNITS_PER_BACKTRACK_VARIABLE_AND_NONZERO = 2.4e-10


def available() -> bool:
    try:
        import pytoulbar2  # noqa: F401
    except ImportError:
        return False
    return True


def suits(cuts: Cuts) -> bool:
    """Whether toulbar2 should take a core with these memory constraints."""
    return len(cuts) <= MAX_CUTS and sum(len(i) for i in cuts.idx) <= MAX_CUT_NONZEROS


def solve_network(costs, edges: dict, cuts: Cuts, scale: float, limits: Limits,
                  upper: float | None = None) -> SubResult:
    """Optimise every node of a reduced problem (``costs``, ``edges`` as in ``Reduced``, without
    its constant) under ``cuts``. ``upper``: the cost of a plan that fits (the search looks only
    for plans at or below it; ``choice`` is None when it finds none, and a complete search
    then proves that plan optimal). ``scale`` makes costs integers. In contest mode a search
    gets at least one second (toulbar2's limit is whole seconds).
    ``det_time`` of the result is in deterministic units (backtracks times the
    ``UNITS_PER_BACKTRACK*`` estimate of one backtrack's cost)."""
    import pytoulbar2

    started = time.monotonic()
    unary = [np.asarray(c, np.float64) for c in costs]
    pair = {key: np.asarray(m, np.float64) for key, m in edges.items()}
    offset = 0.0
    tables = []
    for j, c in enumerate(unary):
        base = _finite_min(c)
        offset += base
        tables.append(([j], c - base, c >= FORBIDDEN))
    for (j, l), m in pair.items():
        base = _finite_min(m)
        offset += base
        tables.append(([j, l], m - base, m >= FORBIDDEN))
    finite_max = sum(float(t[np.logical_not(bad)].max(initial=0.0)) for _, t, bad in tables)
    top = int(round(finite_max * scale)) + 1
    if upper is not None:
        top = min(top, int(np.floor((upper - offset) * scale)) + 1)
    if top <= 0:
        return SubResult(None, float("inf"), float("-inf"), False, False, 0.0)
    _reset_options()
    cfn = pytoulbar2.CFN(top, seed=max(1, limits.seed + 1), verbose=-1)
    for j, c in enumerate(unary):
        cfn.AddVariable(f"x{j}", range(len(c)))
    for scope, table, bad in tables:
        scaled = np.where(bad, top, np.minimum(np.round(table * scale), top)).astype(np.int64)
        cfn.AddFunction(scope, scaled.ravel().tolist())
    starts = np.concatenate([[0], np.cumsum([len(c) for c in unary])])
    for idx, coef, rhs in zip(cuts.idx, cuts.coef, cuts.rhs):
        if not len(idx):
            if rhs < 0:  # the fixed usage alone overflows
                return SubResult(None, float("inf"), float("-inf"), False, True, 0.0)
            continue
        var = np.searchsorted(starts, idx, side="right") - 1
        terms = [(int(v), int(i - starts[v]), int(c)) for v, i, c in zip(var, idx, coef)]
        cfn.AddGeneralizedLinearConstraint(terms, "<=", int(rhs))
    per_backtrack = (UNITS_PER_BACKTRACK
                     + UNITS_PER_BACKTRACK_AND_ENTRY * sum(t.size for _, t, _ in tables)
                     + UNITS_PER_BACKTRACK_VARIABLE_AND_NONZERO * len(unary)
                     * sum(len(i) for i in cuts.idx))
    if limits.deterministic:
        backtracks = max(1, int(limits.budget / per_backtrack))
        cfn.Option.backtrackLimit = backtracks
        seconds = 0
    else:
        backtracks = None
        left = limits.budget
        if limits.deadline is not None:
            left = min(left, limits.deadline - time.monotonic())
        seconds = max(1, int(left))
    search_start = time.monotonic()
    res = cfn.Solve(timeLimit=seconds)
    if seconds:
        cfn.CFN.timerStop()   # Solve leaves its alarm armed when the search ends early
    done = cfn.GetNbBacktracks()
    # toulbar2 stops at a limit or when its search is complete; complete means optimal
    complete = (done < backtracks) if backtracks is not None else (
        time.monotonic() - search_start < seconds - 0.5)
    det = done * per_backtrack if limits.deterministic else time.monotonic() - started
    if res is None:
        # nothing below ``top``: with a complete search, the plan at ``upper`` is optimal, and
        # without one, no plan fits
        return SubResult(None, float("inf"), float("-inf"), complete and upper is not None,
                         complete and upper is None, det)
    choice = np.array([int(v) for v in res[0][:len(unary)]], np.int64)
    objective = float(res[1]) / scale + offset
    # after a complete search GetDDualBound is not the optimum (it stays at an earlier bound)
    bound = objective if complete else float(cfn.GetDDualBound()) / scale + offset
    return SubResult(choice, objective, bound, complete, False, det)


def _reset_options() -> None:
    """Put toulbar2's global settings back to what a fresh process has (``pytb2.init``;
    ``CFN()`` only calls ``reinit``, which keeps them). A search changes some: the hybrid
    best-first setting goes 1 -> 256 -> 1 ..., the backtrack limit stays, and a search whose
    upper bound admits only cost 0 lowers the soft consistency level for every later search.
    Without this the same problem can get different plans on alternate calls in one process,
    and after such a search (a small core proven optimal at its incumbent's cost)."""
    import pytoulbar2

    pytoulbar2.pytb2.init()


def _finite_min(a: np.ndarray) -> float:
    finite = a[a < FORBIDDEN]
    return float(finite.min()) if finite.size else 0.0

