"""CP-SAT model of a reduced problem, or of part of it with the rest fixed (one LNS move).

Alpa's intra-operator ILP (Zheng et al., OSDI 2022): one boolean per (node, strategy), exactly
one per node. An edge between two free nodes costs an integer variable bounded below per row,
``e >= Σ_b M[a, b] x_b`` enforced by ``x_a``, after moving the matrix's row and column minima
into node terms; forbidden pairs become ``x_a => Σ_forbidden x_b = 0``. The alternative, one
boolean per finite pair with the local-polytope constraints, has a far tighter LP but, with
many more booleans, ends at far costlier plans in the same time where the row-bound form finds
the optimum; it stays available (``local_polytope=True``). An edge to a fixed node is a node
cost. Memory constraints come from ``memory.part_cuts``.

Determinism: a fixed seed, ``interleave_search`` when more than one worker runs, and
``max_deterministic_time`` in deterministic mode; wall-clock limits only in contest mode.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from ortools.sat.python import cp_model

from autoshard.solver.memory import Cuts
from autoshard.solver.problem import FORBIDDEN

#: Above this many pair booleans, edges use the row-bound formulation.
MAX_PAIR_BOOLS = 250_000
#: Scaled cost of a forbidden pair kept possible because its whole row or column is forbidden.
_HUGE = float(2**42)


@dataclass(frozen=True)
class Limits:
    """How long one CP-SAT call may run: ``budget`` deterministic units when
    ``deterministic``, else wall-clock seconds, and never past ``deadline`` (time.monotonic(),
    contest mode), which also counts the time spent building the model."""

    budget: float
    deterministic: bool
    workers: int
    seed: int
    deadline: float | None = None


@dataclass(frozen=True)
class SubResult:
    """``choice``: the free nodes' strategies (None if CP-SAT found nothing); ``objective``:
    its cost over the free part, in cost units; ``bound``: CP-SAT's lower bound on it;
    ``optimal``: proven optimal for the model solved; ``infeasible``: proven to have no
    solution; ``det_time``: CP-SAT's deterministic time spent."""

    choice: np.ndarray | None
    objective: float
    bound: float
    optimal: bool
    infeasible: bool
    det_time: float


def solve_part(costs, adj, free: np.ndarray, current: np.ndarray, cuts: Cuts, scale: float,
               limits: Limits, hint: np.ndarray | None = None,
               local_polytope: bool = False) -> SubResult:
    """Optimise the nodes ``free`` with every other node at ``current``.

    ``costs[j]``/``adj[j]`` (neighbour -> matrix with j's strategies as rows) describe the
    reduced problem; ``cuts``: memory constraints over the free nodes' strategies;
    ``scale`` turns costs into integers; ``local_polytope``: pair booleans for edges (a tighter
    LP, but a slower search than the row-bound form: module docstring)."""
    model = cp_model.CpModel()
    pos = {int(j): i for i, j in enumerate(free)}
    x = []
    for j in free:
        j = int(j)
        x.append([model.NewBoolVar("") for _ in range(len(costs[j]))])
        model.AddExactlyOne(x[-1])
    node_cost = [np.array(costs[int(j)], np.float64) for j in free]
    inner = []
    pairs = 0
    for i, j in enumerate(free):
        for l, m in adj[int(j)].items():
            if l in pos:
                if pos[l] > i:
                    inner.append((i, pos[l], m))
                    pairs += int((m < FORBIDDEN).sum())
            else:
                node_cost[i] = node_cost[i] + m[:, current[l]]
    terms_v, terms_c = [], []
    for i, c in enumerate(node_cost):
        finite = c < FORBIDDEN
        if not finite.any():
            finite[:] = True
        base = _base(c)
        for a in range(len(c)):
            if not finite[a]:
                model.Add(x[i][a] == 0)
            elif c[a] != base:
                terms_v.append(x[i][a])
                terms_c.append(int(round((c[a] - base) * scale)))
    y_hint = []
    local_polytope = local_polytope and pairs <= MAX_PAIR_BOOLS
    for i, l, m in inner:
        allowed = m < FORBIDDEN
        allowed |= ~allowed.any(axis=1, keepdims=True)  # a row or column with nothing finite
        allowed |= ~allowed.any(axis=0, keepdims=True)  # stays possible, at a huge cost
        mm = np.where(m < FORBIDDEN, m, _HUGE / scale)
        # move row and column minima into node terms: smaller coefficients, same problem
        row = np.where(allowed, mm, np.inf).min(axis=1)
        mm = mm - row[:, None]
        col = np.where(allowed, mm, np.inf).min(axis=0)
        mm = mm - col[None, :]
        for a in range(len(row)):
            if row[a] != 0:
                terms_v.append(x[i][a])
                terms_c.append(int(round(row[a] * scale)))
        for b in range(len(col)):
            if col[b] != 0:
                terms_v.append(x[l][b])
                terms_c.append(int(round(col[b] * scale)))
        if local_polytope:
            rows = [[] for _ in range(m.shape[0])]
            cols = [[] for _ in range(m.shape[1])]
            for a, b in zip(*np.nonzero(allowed)):
                y = model.NewBoolVar("")
                rows[a].append(y)
                cols[b].append(y)
                if mm[a, b] != 0:
                    terms_v.append(y)
                    terms_c.append(int(round(mm[a, b] * scale)))
                if hint is not None:
                    y_hint.append((y, int(hint[i] == a and hint[l] == b)))
            for a in range(m.shape[0]):
                model.Add(sum(rows[a]) == x[i][a])
            for b in range(m.shape[1]):
                model.Add(sum(cols[b]) == x[l][b])
        else:
            hi = int(np.ceil(np.where(allowed, mm, 0).max() * scale)) + 1
            e = model.NewIntVar(0, hi, "")
            terms_v.append(e)
            terms_c.append(1)
            for a in range(m.shape[0]):
                bad = [x[l][b] for b in range(m.shape[1]) if not allowed[a, b]]
                if bad:
                    model.Add(sum(bad) == 0).OnlyEnforceIf(x[i][a])
                row_terms = [(x[l][b], int(round(mm[a, b] * scale)))
                             for b in range(m.shape[1]) if allowed[a, b] and mm[a, b] != 0]
                if row_terms:
                    model.Add(e >= sum(c * v for v, c in row_terms)).OnlyEnforceIf(x[i][a])
    flat = [v for row in x for v in row]
    for idx, coef, rhs in zip(cuts.idx, cuts.coef, cuts.rhs):
        if len(idx):
            model.Add(cp_model.LinearExpr.WeightedSum([flat[i] for i in idx],
                                                      [int(c) for c in coef]) <= int(rhs))
        elif rhs < 0:
            model.AddBoolOr([])  # the rest alone overflows: no solution
    model.Minimize(cp_model.LinearExpr.WeightedSum(terms_v, terms_c) if terms_v else 0)
    if hint is not None:
        for i, row in enumerate(x):
            for a, v in enumerate(row):
                model.AddHint(v, int(hint[i] == a))
        for y, val in y_hint:
            model.AddHint(y, val)
    solver = cp_model.CpSolver()
    prm = solver.parameters
    prm.random_seed = limits.seed
    prm.num_workers = max(1, limits.workers)
    if limits.deterministic:
        prm.max_deterministic_time = limits.budget
        if limits.workers > 1:
            prm.interleave_search = True
    else:
        left = limits.budget
        if limits.deadline is not None:
            left = min(left, limits.deadline - time.monotonic())
        prm.max_time_in_seconds = max(left, 0.05)
    status = solver.Solve(model)
    det = float(solver.deterministic_time)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return SubResult(None, float("inf"), float("-inf"), False,
                         status == cp_model.INFEASIBLE, det)
    choice = np.array([next(a for a, v in enumerate(row) if solver.BooleanValue(v)) for row in x])
    offset = sum(_base(c) for c in node_cost)
    return SubResult(choice, solver.ObjectiveValue() / scale + offset,
                     solver.BestObjectiveBound() / scale + offset, status == cp_model.OPTIMAL,
                     False, det)


def _base(c: np.ndarray) -> float:
    """The part of a node's cost vector the model leaves out (its smallest finite entry)."""
    finite = c < FORBIDDEN
    return float(c[finite].min()) if finite.any() else float(c.min())
