"""The local-polytope linear program of a strategy problem, solved with HiGHS (through SciPy).

A strategy problem is a pairwise MAP problem. Its standard LP relaxation (the *local polytope*:
one variable per node strategy, one per edge pair, the edge variables' marginals equal to the
node variables; Wainwright and Jordan, "Graphical Models, Exponential Families, and Variational
Inference", 2008, ch. 4 and 8) is tight whenever the graph is a tree and, in practice, on the
problems autoshard builds from programs: resharding costs are small where layouts agree and
large where they do not, and the LP's optimum comes out integral. An integral optimum is a
proven optimal plan, found by a deterministic simplex in seconds (HiGHS' dual simplex, one
thread: on these problems faster than OR-Tools' GLOP and CLP and than HiGHS' interior point,
and exact where PDLP leaves fractions; the model is handed over as sparse arrays, since
building it term by term through a modelling API costs more than the solve); CP-SAT's
linearisation of the same problem (booleans per pair with ``y >= x_a + x_b - 1``) has no
useful LP bound and stalls far from it. When the LP is fractional (memory limits can do that),
``solve_lagrangian`` moves the memory rows into the objective at the prices the LP's duals put
on them (Lagrangian relaxation; Fisher, "The Lagrangian Relaxation Method for Solving Integer
Programming Problems", Management Science 1981): holding a byte live where memory binds costs
what the LP says it is worth. The priced problem has no memory rows, so its LP is integral
again; the price scale is searched for the cheapest plan that fits. Only when that fails does
the caller fall back to the combinatorial search.

The LP is kept small: groups (identical layers, followers) are merged into one node; an edge's
rows and columns that are equal (strategies that produce, or need, the same layout) share one
marginal.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.optimize import linprog

from autoshard.solver.elimination import eliminate
from autoshard.solver.problem import Problem, evaluate, usage_profile


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
    iterations: int = 0                       # the simplex's, to cap a re-solve of a variant
    #: the iterations the LP before elimination would have taken, estimated (``iterations``
    #: times its node variables over those solved): to cap a variant that is not eliminated
    whole_iterations: int = 0
    #: per node, the sum of the duals of the memory rows it is live in (``memory_prices`` is
    #: its usage times this); None without memory rows
    memory_weights: np.ndarray | None = None


def _representatives(problem: Problem) -> np.ndarray:
    rep = np.arange(problem.num_nodes)
    for group in problem.groups:
        rep[list(group)] = group[0]
    return rep


def _unique_rows(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct rows, index of each row's distinct row)."""
    distinct, inverse = np.unique(matrix, axis=0, return_inverse=True)
    return distinct, inverse.reshape(-1)


@dataclass(frozen=True)
class PairBlock:
    """One edge's pair variables and marginal rows in the local polytope: ``table`` (row classes
    x column classes) holds the cost of each pair variable, numbered row-major from the first
    variable given; ``rows``, ``cols``, ``vals`` are the equality rows' entries (right-hand
    sides 0), numbered from the first row given, row classes first."""

    table: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    vals: np.ndarray
    row_of: np.ndarray | None = None    # each row's class
    col_of: np.ndarray | None = None    # each column's class


def pair_block(rest: np.ndarray, first_a: int, first_b: int, first_var: int,
               first_row: int, marks: np.ndarray | None = None) -> PairBlock:
    """The pair variables of an edge whose cost matrix is ``rest`` (its row and column minima
    already moved into the node costs) between nodes whose strategy variables start at
    ``first_a`` and ``first_b``. Rows (columns) of ``rest`` that are equal share one class, so
    an edge with a few distinct layouts costs a few variables: Σ_h y_gh = Σ_{s in g} x_as for
    each row class g, Σ_g y_gh = Σ_{t in h} x_bt for each column class h. ``marks`` (a stack
    of 0/1 matrices shaped like ``rest``) splits classes further, so that every pair of one
    cell carries the same marks (the fixed charges' member pairs)."""
    if marks is None or not len(marks):
        distinct, row_of = _unique_rows(rest)
        distinct_t, col_of = _unique_rows(distinct.T)
        table = distinct_t.T
    else:
        _, row_of = _unique_rows(np.hstack([rest, *marks]))
        _, col_of = _unique_rows(np.vstack([rest, *marks]).T)
        first_row_of = np.unique(row_of, return_index=True)[1]
        first_col_of = np.unique(col_of, return_index=True)[1]
        table = rest[np.ix_(first_row_of, first_col_of)]
    g_n, h_n = table.shape
    cells = first_var + np.arange(g_n * h_n)
    ones = np.ones(g_n * h_n)
    rows = np.concatenate([first_row + np.repeat(np.arange(g_n), h_n), first_row + row_of,
                           first_row + g_n + np.tile(np.arange(h_n), g_n),
                           first_row + g_n + col_of])
    cols = np.concatenate([cells, first_a + np.arange(len(row_of)), cells,
                           first_b + np.arange(len(col_of))])
    vals = np.concatenate([ones, -np.ones(len(row_of)), ones, -np.ones(len(col_of))])
    return PairBlock(table, rows, cols, vals, row_of, col_of)


@dataclass(frozen=True)
class FixedCharge:
    """A cost paid once where any of its entries is chosen (the start-up latency of one
    combined collective: passes/latency.py): flat node-strategy and flat edge-pair indices of the
    problem. In the LP, a variable y in [0, 1] pays ``cost`` and is at least the sum of the
    member strategies' variables of each node and of the member pairs' variables of each edge:
    exact where the optimum is integral."""

    cost: float
    nodes: np.ndarray
    edges: np.ndarray


def _charge_members(problem: Problem, rep: np.ndarray, charges):
    """(per charge: representative -> its member strategies, per charge: representative edge
    (a, b) -> 0/1 matrix of member pairs, oriented a < b)."""
    k = problem.num_strategies
    node_members: list[dict[int, set[int]]] = []
    edge_members: list[dict[tuple[int, int], np.ndarray]] = []
    for charge in charges:
        nodes: dict[int, set[int]] = {}
        edges: dict[tuple[int, int], np.ndarray] = {}
        flat = np.asarray(charge.nodes, np.int64)
        owner = np.searchsorted(problem.offsets, flat, side="right") - 1
        for i, f in zip(owner.tolist(), flat.tolist()):
            nodes.setdefault(int(rep[i]), set()).add(f - int(problem.offsets[i]))
        flat = np.asarray(charge.edges, np.int64)
        owner = np.searchsorted(problem.edge_offsets, flat, side="right") - 1
        for e, f in zip(owner.tolist(), flat.tolist()):
            u, v = (int(x) for x in problem.edges[e])
            su, sv = divmod(f - int(problem.edge_offsets[e]), int(k[v]))
            a, b = int(rep[u]), int(rep[v])
            if a == b:                           # a group's own edge: its diagonal
                if su == sv:
                    nodes.setdefault(a, set()).add(su)
                continue
            if a > b:
                a, b, su, sv = b, a, sv, su
            mark = edges.get((a, b))
            if mark is None:
                mark = edges[(a, b)] = np.zeros((k[a], k[b]))
            mark[su, sv] = 1.0
        node_members.append(nodes)
        edge_members.append(edges)
    return node_members, edge_members


def representative_graph(problem: Problem, rep: np.ndarray
                         ) -> tuple[dict[int, np.ndarray], dict[tuple[int, int], np.ndarray]]:
    """The problem with each group merged into its representative (``rep``): node costs per
    representative (its members' costs and the edges inside the group), edge matrices per
    pair of representatives (a, b), a < b (parallel edges summed)."""
    costs: dict[int, np.ndarray] = {}
    for i in range(problem.num_nodes):
        r = int(rep[i])
        c = problem.node_costs(i)
        costs[r] = costs[r] + c if r in costs else c.astype(np.float64, copy=True)
    edges: dict[tuple[int, int], np.ndarray] = {}
    for e, (u, v) in enumerate(problem.edges):
        a, b = int(rep[u]), int(rep[v])
        matrix = problem.edge_matrix(e)
        if a == b:
            costs[a] += np.diag(matrix)
            continue
        if a > b:
            a, b, matrix = b, a, matrix.T
        edges[(a, b)] = edges[(a, b)] + matrix if (a, b) in edges else matrix.copy()
    return costs, edges


def _lp_arrays(problem: Problem, rep: np.ndarray, charges=(), with_ties: bool = True):
    """The LP as arrays: (costs c with the tie-break, the tie-break on the node variables,
    equality rows (A, b), memory rows (A, b, live nodes of each) or None, fixed-charge rows
    (A, b) or None, node variable offsets per representative, the constant moved out of c).
    Built with numpy: these LPs reach hundreds of thousands of variables, and building one term
    by term through a modelling API costs more than solving it."""
    k = problem.num_strategies
    reps = np.unique(rep)
    off = np.zeros(problem.num_nodes + 1, np.int64)      # x offsets, indexed by representative
    sizes = np.zeros(problem.num_nodes, np.int64)
    sizes[reps] = k[reps]
    off[1:] = np.cumsum(sizes)
    nvar = int(off[-1])
    costs, edges = representative_graph(problem, rep)
    node_cost = np.concatenate([costs[int(r)] for r in reps]) if len(reps) else np.zeros(0)
    rows, cols, vals = [np.arange(len(reps)).repeat(k[reps])], [np.arange(nvar)], [np.ones(nvar)]
    nrow = len(reps)                                     # Σ_a x_ra = 1 per representative
    node_members, edge_members = _charge_members(problem, rep, charges)
    # fixed-charge rows: (charge, LP variables whose sum the charge's variable bounds)
    charge_terms: list[tuple[int, np.ndarray]] = [
        (j, off[a] + np.array(sorted(members), np.int64))
        for j, per_node in enumerate(node_members) for a, members in sorted(per_node.items())]
    pair_costs = []
    for (a, b), matrix in edges.items():
        low = matrix.min(axis=1)                 # the part only a's choice decides
        node_cost[off[a]:off[a + 1]] += low
        rest = matrix - low[:, None]
        col_low = rest.min(axis=0)               # the part only b's choice decides
        node_cost[off[b]:off[b + 1]] += col_low
        rest = rest - col_low[None, :]
        marked = [(j, m[(a, b)]) for j, m in enumerate(edge_members) if (a, b) in m]
        if not rest.any() and not marked:
            continue
        block = pair_block(rest, off[a], off[b], nvar, nrow,
                           np.array([mark for _, mark in marked]) if marked else None)
        for j, mark in marked:
            cells = np.zeros(block.table.shape, bool)
            rows_m, cols_m = np.nonzero(mark)
            cells[block.row_of[rows_m], block.col_of[cols_m]] = True
            charge_terms.append((j, nvar + np.flatnonzero(cells.reshape(-1))))
        pair_costs.append(block.table.reshape(-1))
        rows.append(block.rows)
        cols.append(block.cols)
        vals.append(block.vals)
        nvar += block.table.size
        nrow += sum(block.table.shape)
    # a tie-break far below any real cost difference (TIE_BREAK per strategy index), so that
    # the optimum is unique and every process finds the same one (the costs of an eliminated
    # problem hold it already)
    ties = np.zeros(int(off[-1]))
    constant = 0.0
    for r in reps:
        seg = node_cost[off[r]:off[r + 1]]
        if with_ties:
            ties[off[r]:off[r + 1]] = np.arange(len(seg)) * TIE_BREAK
        base = seg.min()
        seg -= base
        constant += float(base)
    first_charge = nvar
    nvar += len(charges)
    c = np.concatenate([node_cost + ties] + pair_costs +
                       [np.array([charge.cost for charge in charges], np.float64)])
    a_eq = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                         shape=(nrow, nvar))
    b_eq = np.zeros(nrow)
    b_eq[:len(reps)] = 1.0
    memory = _memory_rows(problem, rep, off, nvar) if problem.usage_limit is not None else None
    fixed = None
    if charge_terms:                       # Σ members - y_j <= 0
        r = np.concatenate([np.full(len(t) + 1, i) for i, (_, t) in enumerate(charge_terms)])
        col = np.concatenate([np.append(t, first_charge + j) for j, t in charge_terms])
        val = np.concatenate([np.append(np.ones(len(t)), -1.0) for _, t in charge_terms])
        fixed = (sp.csr_matrix((val, (r, col)), shape=(len(charge_terms), nvar)),
                 np.zeros(len(charge_terms)))
    return c, ties, a_eq, b_eq, memory, fixed, off, constant


#: The LP's tie-break: this many nanoseconds per strategy index, far below any real cost
#: difference.
TIE_BREAK = 1e-6

#: The seconds one dual-simplex iteration takes, a fixed part and a part per LP variable, fitted
#: on a 2-core machine (one core used) to LPs of 11k to 196k variables: they turn a time limit
#: into an iteration cap, the same on every machine.
ITERATION_SECONDS = 6e-5
ITERATION_SECONDS_PER_VARIABLE = 3e-10
MIN_ITERATIONS = 1000
#: The wall clock stops an LP only at this multiple of its limit, and not before
#: ``WALL_CLOCK_FLOOR`` seconds: a safety stop against a machine far slower than this one, far
#: beyond what a loaded machine takes to reach the iteration cap (a stop there could make two
#: processes disagree, so it warns).
WALL_CLOCK_GUARD = 20.0
WALL_CLOCK_FLOOR = 300.0


def lp_iteration_limit(variables: int, time_limit: float) -> int:
    """The simplex iteration cap of an LP with ``variables`` under ``time_limit`` seconds: a
    count, not a time, so that every process solving the same LP stops at the same point; as
    many iterations as the calibrated rate fits in the limit (a cap proportional to the
    variables alone would stop a small LP long before a short limit is up)."""
    per_iteration = ITERATION_SECONDS + ITERATION_SECONDS_PER_VARIABLE * variables
    return int(time_limit / per_iteration) + MIN_ITERATIONS


def solve_local_polytope(problem: Problem, *, time_limit: float = 60.0,
                         max_iterations: int | None = None,
                         charges: tuple[FixedCharge, ...] = ()) -> LPResult:
    """The local polytope's optimum, its rounding and memory prices (module docstring);
    ``time_limit`` sets the simplex's iteration cap (``lp_iteration_limit``), ``max_iterations``
    a lower one (a re-solve that is only worth its cost when it is quick); ``charges`` are
    fixed charges the objective adds (``FixedCharge``; ``objective`` then counts them).

    Without charges, the LP is that of the problem left after eliminating the nodes with at
    most two neighbours (elimination.py): the same integer optimum, at least as tight a bound,
    about half the variables on a train step. Under a memory limit only nodes whose memory
    does not depend on their strategy are eliminated; each stays in the memory rows as a node
    with one strategy holding that memory."""
    if charges:
        return _solve_polytope(problem, time_limit, max_iterations, charges)
    start = time.perf_counter()
    rep = _representatives(problem)
    costs, edges = representative_graph(problem, rep)
    # the LP's tie-break goes into the costs before elimination, so that the eliminated
    # nodes and the LP left pick the optimum the whole LP would
    costs = {r: c + TIE_BREAK * np.arange(len(c)) for r, c in costs.items()}
    budgeted = problem.usage_limit is not None
    reduced = eliminate(costs, edges, _varying_usage(problem, rep) if budgeted else ())
    kept = sorted(reduced.costs)
    if not kept and not budgeted:                # a forest: elimination solved it exactly
        result = LPResult(np.zeros(0, np.int64), 0.0, True, 0.0, "optimal", 0)
        left_choice = {}
    else:
        left, position = _left_problem(problem, rep, reduced, kept)
        result = _solve_polytope(left, time_limit, max_iterations, (), with_ties=False)
        left_choice = {j: int(result.choice[position[j]]) for j in kept}
    picked = reduced.expand(left_choice)
    choice = np.array([picked[int(r)] for r in rep], np.int64)
    # the objective without the tie-break: the chosen strategies' where the LP is integral,
    # else the most any solution's can be (a bound stays a bound)
    ties = (sum(picked[int(r)] for r in costs) if result.integral else
            sum(len(c) - 1 for c in costs.values())) * TIE_BREAK
    solved = sum(len(reduced.costs[j]) for j in kept)
    whole = round(result.iterations * sum(len(c) for c in costs.values()) / solved) \
        if solved else 0
    prices = None
    if result.memory_weights is not None:     # back on the problem's own nodes and strategies
        prices = problem.usages * np.repeat(result.memory_weights, problem.num_strategies)
    return dataclasses.replace(result, choice=choice, objective=result.objective +
                               reduced.constant - ties, seconds=time.perf_counter() - start,
                               whole_iterations=whole, memory_prices=prices)


def _varying_usage(problem: Problem, rep: np.ndarray) -> set[int]:
    """Representatives some live member of which holds memory that depends on its strategy."""
    k = problem.num_strategies
    off = problem.offsets
    first = problem.usages[off[:-1]]
    per_strategy = problem.usages != np.repeat(first, k)
    differs = np.add.reduceat(per_strategy, off[:-1]) > 0 if len(per_strategy) else \
        np.zeros(problem.num_nodes, bool)
    live = problem.intervals[:, 1] > problem.intervals[:, 0]
    return {int(rep[i]) for i in np.flatnonzero(differs & live)}


def _left_problem(problem: Problem, rep: np.ndarray, reduced, kept: list[int]):
    """(the problem the LP solves after elimination, position of each kept representative
    in it). Without a memory limit: the kept representatives alone. With one, the problem's
    nodes in order (so the memory rows' duals are per node of ``problem``): a kept
    representative's members keep their strategies, usages and group (the representative
    holding the reduced costs, the others zeros); an eliminated node becomes one strategy
    holding its (strategy-independent) memory, so the memory rows still count it."""
    if problem.usage_limit is None:
        index = {j: r for r, j in enumerate(kept)}
        return Problem.from_lists(
            [reduced.costs[j] for j in kept], [np.zeros(len(reduced.costs[j]), np.int64)
                                               for j in kept],
            [(0, 0)] * len(kept), [(index[a], index[b]) for a, b in reduced.edges],
            list(reduced.edges.values()), name=problem.name), index
    kept_set = set(kept)
    k = problem.num_strategies
    costs, usages = [], []
    for i in range(problem.num_nodes):
        r = int(rep[i])
        if r in kept_set:
            costs.append(reduced.costs[r] if r == i else np.zeros(int(k[i])))
            usages.append(problem.node_usages(i))
        else:
            costs.append(np.zeros(1))
            usages.append(problem.node_usages(i)[:1])
    groups = [g for g in problem.groups if int(rep[g[0]]) in kept_set]
    left = Problem.from_lists(costs, usages, problem.intervals, list(reduced.edges),
                              list(reduced.edges.values()), usage_limit=problem.usage_limit,
                              name=problem.name, groups=groups)
    return left, {j: j for j in kept}


def _solve_polytope(problem: Problem, time_limit: float, max_iterations: int | None,
                    charges: tuple[FixedCharge, ...], with_ties: bool = True) -> LPResult:
    start = time.perf_counter()
    rep = _representatives(problem)
    c, tie_break, a_eq, b_eq, memory, fixed, off, constant = _lp_arrays(problem, rep, charges,
                                                                       with_ties)
    a_ub, b_ub, live_sets = memory if memory is not None else (None, None, [])
    if fixed is not None:                   # after the memory rows: their duals come first
        a_ub = fixed[0] if a_ub is None else sp.vstack([a_ub, fixed[0]]).tocsr()
        b_ub = fixed[1] if b_ub is None else np.concatenate([b_ub, fixed[1]])
    nvar = len(c)
    cap = lp_iteration_limit(nvar, time_limit)
    if max_iterations is not None:
        cap = min(cap, max_iterations)
    # HiGHS' serial dual simplex (SciPy runs it on one thread) under an iteration limit, so
    # that a loaded machine stops where an idle one does; the wall clock is only a guard
    guard = max(WALL_CLOCK_GUARD * time_limit, WALL_CLOCK_FLOOR)

    def simplex(presolve: bool):
        return linprog(c, A_ub=a_ub, b_ub=b_ub, A_eq=a_eq, b_eq=b_eq, bounds=(0.0, 1.0),
                       method="highs-ds",
                       options={"presolve": presolve, "disp": False,
                                "maxiter": cap,
                                "time_limit": guard})

    res = simplex(True)
    if res.status in (3, 4):
        # "unbounded" (every variable lies in [0, 1]) or numerical trouble: HiGHS can lose its
        # way after presolve on a large LP with memory rows; the same LP without presolve, once
        res = simplex(False)
    status = {0: "optimal", 2: "infeasible"}.get(res.status, "not solved")
    if res.status == 1:     # the iteration cap or the wall-clock guard (SciPy's message says)
        status = f"stopped: {res.message.split('(')[0].strip().rstrip('.').lower()}"
        if res.nit < cap:
            warnings.warn(
                f"autoshard: the LP relaxation ({nvar:,} variables) reached its wall-clock "
                f"safety stop of {guard:.0f} s after {res.nit:,} of its {cap:,} simplex "
                "iterations; this plan depends on the machine's speed and load (another "
                "machine may plan differently). Lower solver_time_limit to cap the iterations "
                "instead.", RuntimeWarning, stacklevel=2)
    choice = np.zeros(problem.num_nodes, np.int64)
    integral = False
    if res.x is not None and res.status in (0, 1):
        values = {r: res.x[off[r]:off[r + 1]] for r in np.unique(rep)}
        choice = np.array([int(np.argmax(values[r])) for r in rep], np.int64)
        integral = status == "optimal" and all(
            np.all((v < 1e-6) | (v > 1 - 1e-6)) for v in values.values())
    value = (float(res.fun) - float(tie_break @ res.x[:len(tie_break)]) + constant
             if status == "optimal" else float("nan"))
    prices = weight = None
    if live_sets and status == "optimal":
        duals = np.abs(res.ineqlin.marginals)
        weight = np.zeros(problem.num_nodes)
        for dual, live in zip(duals, live_sets):
            weight[live] += dual
        prices = problem.usages * np.repeat(weight, problem.num_strategies)
    return LPResult(choice, value, bool(integral), time.perf_counter() - start, status, nvar,
                    prices, int(res.nit), int(res.nit), weight)


def solve_lagrangian(problem: Problem, lp: LPResult, *, time_limit: float = 60.0,
                     rounds: int = 8, progress=None) -> tuple[np.ndarray, int] | None:
    """A plan within ``problem.usage_limit`` from the priced problem (module docstring), or
    None. Prices are the LP's duals (or, where those are all zero, the LP's cost per byte of
    the limit) times a scale: the smallest scale whose plan fits is searched for (factors of 4
    until one scale fits and another does not or stops at its iteration cap, then three
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
        # ``time_limit`` only sets each solve's iteration cap
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


def _memory_rows(problem: Problem, rep: np.ndarray, off: np.ndarray, nvar: int):
    """Σ usage · x ≤ limit at each distinct set of live nodes (a set contained in another
    never binds first, so only maximal ones are kept); returns (A, b, live nodes of each row),
    or None when no row has a term."""
    iv = problem.intervals
    times = sorted({int(t) for t in iv[:, 0]} | {int(t) for t in iv[:, 1]})
    live_sets = []
    for t in times:
        live = frozenset(np.flatnonzero((iv[:, 0] <= t) & (t < iv[:, 1])).tolist())
        if live:
            live_sets.append(live)
    maximal = [s for s in set(live_sets) if not any(s < other for other in live_sets)]
    rows, cols, vals, kept = [], [], [], []
    for live in sorted(maximal, key=sorted):
        terms_c, terms_v = [], []
        for i in sorted(live):
            usage = problem.node_usages(i)
            nz = np.flatnonzero(usage)
            if len(nz):
                terms_c.append(off[rep[i]] + nz)
                terms_v.append(usage[nz].astype(np.float64))
        if terms_c:
            rows.append(np.full(sum(len(t) for t in terms_c), len(kept)))
            cols += terms_c
            vals += terms_v
            kept.append(np.array(sorted(live)))
    if not kept:
        return None
    a_ub = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                         shape=(len(kept), nvar))   # duplicate entries (a group) are summed
    return a_ub, np.full(len(kept), float(problem.usage_limit)), kept
