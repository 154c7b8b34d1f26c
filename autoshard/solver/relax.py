"""The local-polytope LP of a reduced problem: a lower bound and marginals to guide the search.

The standard LP relaxation of a pairwise MAP problem (Wainwright and Jordan, "Graphical Models,
Exponential Families, and Variational Inference", 2008, ch. 4 and 8): one variable per node
strategy summing to one, one per edge pair whose row and column sums equal the two nodes'
variables. Here it is built on presolve's core (``Reduced``) with the exact memory constraints of
``memory.part_cuts`` (every node free), so its optimum plus ``reduced.constant`` is a lower
bound on the original problem, and its marginals say which strategies a good plan uses. Rows and
columns of an edge's matrix that are equal after moving the row and column minima into the node
costs share one pair variable (a strategy class), which keeps the LP a few times smaller. A
forbidden pair has its variable fixed at zero.

Solved with HiGHS' dual simplex through ``scipy.optimize.linprog`` (one thread). In
deterministic mode only an iteration limit applies, so the answer does not depend on the clock.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.optimize import linprog

from autoshard.solver.lp import pair_block
from autoshard.solver.memory import MemoryModel, part_cuts
from autoshard.solver.problem import FORBIDDEN
from autoshard.solver.presolve import Reduced

#: Simplex iterations per LP variable allowed in deterministic mode.
ITERATIONS_PER_VARIABLE = 4
#: LPs with more variables are not attempted (they do not solve within a contest's time limit).
MAX_VARIABLES = 150_000


@dataclass(frozen=True)
class Relaxation:
    """``marginals[j]``: the LP's weight on each strategy of reduced node j (None if the LP was
    not solved); ``bound``: a lower bound on the reduced cost, ``reduced.constant`` included
    (None unless solved to optimality); ``integral``: every marginal is 0 or 1."""

    marginals: list | None
    bound: float | None
    integral: bool
    status: str
    variables: int
    seconds: float


def relax(reduced: Reduced, memory: MemoryModel, choice: np.ndarray, *, time_limit: float,
          deterministic: bool) -> Relaxation:
    """Solve the local-polytope LP of ``reduced`` with memory rows; ``choice`` is any reduced
    choice (the memory rows do not depend on it when every node is free)."""
    start = time.perf_counter()
    n = reduced.num_nodes
    if n == 0:
        return Relaxation([], reduced.constant, True, "optimal", 0, 0.0)
    k = np.array([len(c) for c in reduced.costs], np.int64)
    off = np.concatenate([[0], np.cumsum(k)]).astype(np.int64)
    cost = [np.array(c, np.float64) for c in reduced.costs]
    ub_x = np.ones(off[-1])
    for j in range(n):
        bad = cost[j] >= FORBIDDEN
        if bad.all():
            bad[:] = False
        ub_x[off[j]:off[j + 1]][bad] = 0.0
        cost[j] = np.where(cost[j] >= FORBIDDEN, 0.0, cost[j])
    rows, cols, vals, rhs_eq = [], [], [], []
    r = 0
    for j in range(n):                                   # Σ_a x_ja = 1
        rows.append(np.full(k[j], r))
        cols.append(np.arange(off[j], off[j + 1]))
        vals.append(np.ones(k[j]))
        rhs_eq.append(1.0)
        r += 1
    nvar = off[-1]
    pair_cost, pair_ub = [], []
    for (j, l), m in sorted(reduced.edges.items()):
        bad = m >= FORBIDDEN
        mm = np.where(bad, np.inf, m)
        row = mm.min(axis=1)
        row = np.where(np.isfinite(row), row, 0.0)
        mm = mm - row[:, None]
        col = np.min(mm, axis=0)
        col = np.where(np.isfinite(col), col, 0.0)
        mm = mm - col[None, :]
        cost[j] = cost[j] + row
        cost[l] = cost[l] + col
        if not (np.isinf(mm) | (mm > 0)).any():
            continue
        block = pair_block(mm, off[j], off[l], nvar, r)
        flat = block.table.reshape(-1)
        pair_cost.append(np.where(np.isinf(flat), 0.0, flat))
        pair_ub.append(np.where(np.isinf(flat), 0.0, 1.0))
        rows.append(block.rows)
        cols.append(block.cols)
        vals.append(block.vals)
        nvar += block.table.size
        rhs_eq += [0.0] * sum(block.table.shape)
        r += sum(block.table.shape)
    if nvar > MAX_VARIABLES:
        return Relaxation(None, None, False, "too large", nvar, time.perf_counter() - start)
    a_eq = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                         shape=(r, nvar))
    shift = np.array([c.min() for c in cost])
    c_vec = np.concatenate([c - s for c, s in zip(cost, shift)] + pair_cost)
    ub = np.concatenate([ub_x] + pair_ub)
    a_ub = b_ub = None
    cuts = part_cuts(memory, np.arange(n), choice, memory.profile(choice))
    if len(cuts):
        u_rows = np.concatenate([np.full(len(i), q) for q, i in enumerate(cuts.idx)])
        u_cols = np.concatenate([np.asarray(i, np.int64) for i in cuts.idx])
        u_vals = np.concatenate([np.asarray(c, np.float64) for c in cuts.coef])
        a_ub = sp.csr_matrix((u_vals, (u_rows, u_cols)), shape=(len(cuts), nvar))
        b_ub = np.asarray(cuts.rhs, np.float64)
    opts = {"presolve": True, "disp": False}
    if deterministic:
        opts["maxiter"] = int(ITERATIONS_PER_VARIABLE * nvar) + 1000
    else:
        opts["time_limit"] = max(time_limit, 0.1)
    res = linprog(c_vec, A_ub=a_ub, b_ub=b_ub, A_eq=a_eq, b_eq=np.array(rhs_eq),
                  bounds=np.stack([np.zeros(nvar), ub], axis=1), method="highs-ds",
                  options=opts)
    seconds = time.perf_counter() - start
    if res.x is None:
        return Relaxation(None, None, False, res.message, nvar, seconds)
    x = res.x[:off[-1]]
    marg = [np.clip(x[off[j]:off[j + 1]], 0.0, 1.0) for j in range(n)]
    integral = all(((v < 1e-6) | (v > 1 - 1e-6)).all() for v in marg)
    bound = None
    if res.status == 0:
        bound = float(res.fun) + float(shift.sum()) + reduced.constant
    return Relaxation(marg, bound, integral, "optimal" if res.status == 0 else res.message,
                      nvar, seconds)
