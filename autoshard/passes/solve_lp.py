"""The local-polytope linear program of a strategy problem, solved with HiGHS through OR-Tools.

A strategy problem is a pairwise MAP problem. Its standard LP relaxation (the *local polytope*:
one variable per node strategy, one per edge pair, the edge variables' marginals equal to the
node variables; Wainwright and Jordan, "Graphical Models, Exponential Families, and Variational
Inference", 2008, ch. 4 and 8) is tight whenever the graph is a tree and, in practice, on the
problems autoshard builds from programs: resharding costs are small where layouts agree and
large where they do not, and the LP's optimum comes out integral. An integral optimum is a
proven optimal plan, found by a deterministic simplex in seconds (HiGHS' dual simplex, one
thread; measured on autoshard's GPT problems about twice as fast as OR-Tools' GLOP and CLP and
exact where PDLP leaves fractions); CP-SAT's linearisation of the
same problem (booleans per pair with ``y >= x_a + x_b - 1``) has no useful LP bound and stalls
far from it. When the LP is fractional (memory limits can do that), ``solve_lagrangian`` moves
the memory rows into the objective at the prices the LP's duals put on them (Lagrangian
relaxation; Fisher, "The Lagrangian Relaxation Method for Solving Integer Programming
Problems", Management Science 1981): holding a byte live where memory binds costs what the LP
says it is worth. The priced problem has no memory rows, so its LP is integral again; the
price scale is searched for the cheapest plan that fits. Only when that fails does the caller
fall back to the combinatorial search.

The LP is kept small: groups (identical layers, followers) are merged into one node; an edge's
rows and columns that are equal (strategies that produce, or need, the same layout) share one
marginal.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np
from ortools.linear_solver import pywraplp

from autoshard.passes.solve_problem import Problem, evaluate, usage_profile


@dataclass(frozen=True)
class LPResult:
    """``choice``: one strategy per node (the LP optimum when ``integral``, else its rounding);
    ``objective``: the LP optimum (a lower bound on every plan's cost); ``status``: the LP's."""

    choice: np.ndarray
    objective: float
    integral: bool
    seconds: float
    status: str
    variables: int
    memory_prices: np.ndarray | None = None   # per flat strategy: its usage x the rows' duals


def _representatives(problem: Problem) -> np.ndarray:
    rep = np.arange(problem.num_nodes)
    for group in problem.groups:
        rep[list(group)] = group[0]
    return rep


def _unique_rows(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct rows, index of each row's distinct row)."""
    distinct, inverse = np.unique(matrix, axis=0, return_inverse=True)
    return distinct, inverse.reshape(-1)


def solve_local_polytope(problem: Problem, *, time_limit: float = 60.0) -> LPResult:
    start = time.perf_counter()
    k = problem.num_strategies
    rep = _representatives(problem)
    solver = pywraplp.Solver.CreateSolver("HIGHS_LP")
    solver.SuppressOutput()
    # no banner on stdout; one thread, serial dual simplex, fixed seed: deterministic
    solver.SetSolverSpecificParametersAsString(
        "output_flag=false\nthreads=1\nparallel=off\nsimplex_strategy=1\nrandom_seed=0")
    solver.SetNumThreads(1)
    solver.SetTimeLimit(int(time_limit * 1000))
    reps = np.unique(rep)
    x = {int(r): [solver.NumVar(0.0, 1.0, "") for _ in range(k[r])] for r in reps}
    for r in reps:
        solver.Add(solver.Sum(x[int(r)]) == 1)
    node_cost = {int(r): np.zeros(k[r]) for r in reps}
    for i in range(problem.num_nodes):
        node_cost[int(rep[i])] += problem.node_costs(i)
    edges: dict[tuple[int, int], np.ndarray] = {}
    for e, (u, v) in enumerate(problem.edges):
        a, b = int(rep[u]), int(rep[v])
        matrix = problem.edge_matrix(e)
        if a == b:
            node_cost[a] += np.diag(matrix)
            continue
        if a > b:
            a, b, matrix = b, a, matrix.T
        edges[(a, b)] = edges[(a, b)] + matrix if (a, b) in edges else matrix.copy()
    objective = []
    for (a, b), matrix in edges.items():
        low = matrix.min(axis=1)                 # the part only a's choice decides
        node_cost[a] += low
        rest = matrix - low[:, None]
        col_low = rest.min(axis=0)               # the part only b's choice decides
        node_cost[b] += col_low
        rest = rest - col_low[None, :]
        if not rest.any():
            continue
        rows, row_of = _unique_rows(rest)
        cols, col_of = _unique_rows(rows.T)
        table = cols.T                           # distinct rows x distinct columns
        y = [[solver.NumVar(0.0, 1.0, "") for _ in range(table.shape[1])]
             for _ in range(table.shape[0])]
        for g in range(table.shape[0]):
            members = [x[a][s] for s in np.flatnonzero(row_of == g)]
            solver.Add(solver.Sum(y[g]) == solver.Sum(members))
        for h in range(table.shape[1]):
            members = [x[b][t] for t in np.flatnonzero(col_of == h)]
            solver.Add(solver.Sum(y[g][h] for g in range(table.shape[0])) ==
                       solver.Sum(members))
        objective += [float(table[g, h]) * y[g][h] for g in range(table.shape[0])
                      for h in range(table.shape[1]) if table[g, h] > 0]
    for r, costs in node_cost.items():
        # a tie-break far below any real cost difference (1e-6 ns per strategy index), so that
        # the optimum is unique and every process finds the same one
        costs = costs + np.arange(len(costs)) * 1e-6
        base = costs.min()
        objective += [float(c - base) * var for c, var in zip(costs, x[r]) if c > base]
    rows = _memory_rows(solver, problem, rep, x) if problem.usage_limit is not None else []
    solver.Minimize(solver.Sum(objective))
    status = solver.Solve()
    names = {pywraplp.Solver.OPTIMAL: "optimal", pywraplp.Solver.FEASIBLE: "feasible",
             pywraplp.Solver.INFEASIBLE: "infeasible", pywraplp.Solver.NOT_SOLVED: "not solved"}
    solved = status in (pywraplp.Solver.OPTIMAL, pywraplp.Solver.FEASIBLE)
    values = {r: (np.array([v.solution_value() for v in x[r]]) if solved else
                  np.eye(len(x[r]))[0]) for r in x}
    choice = np.array([int(np.argmax(values[int(rep[i])])) for i in range(problem.num_nodes)])
    integral = status == pywraplp.Solver.OPTIMAL and all(
        np.all((vals < 1e-6) | (vals > 1 - 1e-6)) for vals in values.values())
    base_total = sum(float(c.min()) for c in node_cost.values())
    value = solver.Objective().Value() + base_total if status == pywraplp.Solver.OPTIMAL \
        else float("nan")
    prices = None
    if rows and status == pywraplp.Solver.OPTIMAL:
        weight = np.zeros(problem.num_nodes)
        for row, live in rows:
            weight[live] += abs(row.dual_value())
        prices = problem.usages * np.repeat(weight, problem.num_strategies)
    return LPResult(choice, value, bool(integral), time.perf_counter() - start,
                    names.get(status, str(status)), solver.NumVariables(), prices)


def solve_lagrangian(problem: Problem, lp: LPResult, *, time_limit: float = 60.0,
                     rounds: int = 8, progress=None) -> tuple[np.ndarray, int] | None:
    """A plan within ``problem.usage_limit`` from the priced problem (module docstring), or
    None. Prices are the LP's duals (or, where those are all zero, the LP's cost per byte of
    the limit) times a scale: the smallest scale whose plan fits is searched for (factors of 4
    until one scale fits and another does not or does not solve in ``time_limit``, then three
    bisection steps in log space); lower prices give cheaper plans. Returns (choice, LP
    solves)."""
    limit = problem.usage_limit
    if limit is None or lp.status != "optimal":      # no limit, or not even the LP fits
        return None
    prices = lp.memory_prices
    if prices is None or not prices.any():
        prices = problem.usages * (max(lp.objective, 1.0) / max(limit, 1))

    def priced(scale: float) -> np.ndarray | None:
        # a fixed number of solves, not a wall-clock budget, so every process decides alike;
        # ``time_limit`` only guards each solve
        relaxed = dataclasses.replace(problem, costs=problem.costs + scale * prices,
                                      usage_limit=None)
        result = solve_local_polytope(relaxed, time_limit=time_limit)
        if progress:
            peak = usage_profile(problem, result.choice).max()
            progress(f"memory prices x{scale:.3g}: {result.status} in {result.seconds:.1f}s, "
                     f"peak {peak:,} bytes ({'fits' if peak <= limit else 'over'}), cost "
                     f"{evaluate(problem, result.choice).cost / 1e6:.3f} ms")
        return result.choice if result.status == "optimal" else None

    # find a fitting scale and a failing one around it (factors of 4), then bisect in log space
    scale, solves, bisections = 1.0, 0, 0
    fitting = fitting_scale = failing_scale = None
    while solves < rounds + 3:
        choice = priced(scale)
        solves += 1
        if choice is None and fitting_scale is None:
            break
        if choice is not None and usage_profile(problem, choice).max() <= limit:
            fitting, fitting_scale = choice, scale
        else:
            # over the limit, or a solve that did not finish below a fitting scale: lower
            # prices only get closer to the unpriced LP, so bisect back towards the fitting one
            failing_scale = scale
        if fitting_scale is None:
            scale *= 4.0
        elif failing_scale is None:
            scale /= 4.0
        elif bisections < 3:
            bisections += 1
            scale = (fitting_scale * failing_scale) ** 0.5
        else:
            break
    if fitting is None:
        return None
    return fitting, solves


def _memory_rows(solver, problem: Problem, rep: np.ndarray, x) -> list:
    """Σ usage · x ≤ limit at each distinct set of live nodes (a set contained in another
    never binds first, so only maximal ones are kept); returns (row, its live nodes)."""
    iv = problem.intervals
    times = sorted({int(t) for t in iv[:, 0]} | {int(t) for t in iv[:, 1]})
    live_sets = []
    for t in times:
        live = frozenset(np.flatnonzero((iv[:, 0] <= t) & (t < iv[:, 1])).tolist())
        if live:
            live_sets.append(live)
    maximal = [s for s in set(live_sets) if not any(s < other for other in live_sets)]
    rows = []
    for live in sorted(maximal, key=sorted):
        terms = []
        for i in sorted(live):
            usage = problem.node_usages(i)
            if usage.any():
                terms += [float(u) * var for u, var in zip(usage, x[int(rep[i])]) if u]
        if terms:
            rows.append((solver.Add(solver.Sum(terms) <= float(problem.usage_limit)),
                         np.array(sorted(live))))
    return rows

