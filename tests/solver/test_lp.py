"""The local-polytope LP and its memory-priced (Lagrangian) form on problems small enough to
check by enumeration."""

import itertools

import numpy as np
import pytest

from autoshard.solver.lp import FixedCharge, solve_lagrangian, solve_local_polytope
from autoshard.solver.problem import Problem, evaluate, usage_profile


def _brute_force(problem):
    best = None
    for choice in itertools.product(*(range(k) for k in problem.num_strategies)):
        choice = np.array(choice)
        if usage_profile(problem, choice).max() <= problem.usage_limit:
            cost = evaluate(problem, choice).cost
            best = cost if best is None else min(best, cost)
    return best


def test_memory_prices_find_the_plan_the_fractional_lp_misses():
    """Two tensors live together; shrinking the first saves 8 bytes for 2 ns (0.25 ns a byte),
    the second 5 bytes for 1 ns (0.2 a byte). Limit 16: the LP shrinks 0.8 of the second
    (fractional); memory priced between 0.2 and 0.25 ns a byte shrinks exactly the second."""
    problem = Problem.from_lists(costs=[[0, 2], [0, 1]], usages=[[10, 2], [10, 5]],
                                 intervals=[(0, 2), (0, 2)], usage_limit=16)
    lp = solve_local_polytope(problem)
    # 1e-5: a fractional LP's bound allows for its tie-break (1e-6 per strategy index)
    assert not lp.integral and abs(lp.objective - 0.8) < 1e-5 and lp.objective <= 0.8
    assert lp.memory_prices is not None and lp.memory_prices.any()
    choice, solves = solve_lagrangian(problem, lp)
    assert choice.tolist() == [0, 1] and solves >= 2
    assert evaluate(problem, choice).cost == _brute_force(problem) == 1


def test_memory_prices_give_up_when_nothing_fits():
    problem = Problem.from_lists(costs=[[0, 2], [0, 1]], usages=[[10, 9], [10, 9]],
                                 intervals=[(0, 2), (0, 2)], usage_limit=16)
    lp = solve_local_polytope(problem)
    assert lp.status == "infeasible"
    assert solve_lagrangian(problem, lp) is None


def test_memory_price_is_the_lps_marginal_cost_of_a_byte():
    """In the problem above the LP meets the limit by shrinking the second tensor, 0.2 ns a
    byte: that is the memory row's dual, so every strategy is priced at 0.2 ns per byte it
    holds."""
    problem = Problem.from_lists(costs=[[0, 2], [0, 1]], usages=[[10, 2], [10, 5]],
                                 intervals=[(0, 2), (0, 2)], usage_limit=16)
    lp = solve_local_polytope(problem)
    # rtol: the LP's tie-break moves costs by 1e-6 ns per strategy index
    np.testing.assert_allclose(lp.memory_prices, 0.2 * problem.usages, rtol=1e-5)


def test_an_lp_stopped_by_its_iteration_cap_is_reported_and_not_used(monkeypatch):
    """The cap is a count of simplex iterations, so a loaded machine stops where an idle one
    does; a stopped LP gives neither a plan nor a bound, and the planner searches instead."""
    from autoshard.solver import lp as solve_lp
    from autoshard.passes.search import solve_plan_problem

    # every pair of 4 nodes joined (each has 3 neighbours: no elimination.py shortcut); the
    # layouts agreeing is free
    edges = list(itertools.combinations(range(4), 2))
    problem = Problem.from_lists(costs=[[0, 3], [0, 3], [0, 3], [3, 0]], usages=[[1, 1]] * 4,
                                 intervals=[(0, 1)] * 4, edges=edges,
                                 edge_costs=[[[0, 5], [5, 0]]] * len(edges))
    assert solve_local_polytope(problem).status == "optimal"
    monkeypatch.setattr(solve_lp, "ITERATION_SECONDS", float("inf"))
    monkeypatch.setattr(solve_lp, "MIN_ITERATIONS", 0)
    lp = solve_local_polytope(problem)
    assert lp.status == "stopped: iteration limit reached"
    assert not lp.integral and np.isnan(lp.objective)
    choice, stats = solve_plan_problem(problem, time_limit=5.0)
    assert stats.engine != "lp (highs)"
    assert evaluate(problem, choice).cost == 3      # all 0, paying node 2's 3: the optimum


def test_the_iteration_cap_lets_a_small_lp_finish_within_a_short_limit():
    """The cap is the iterations the calibrated simplex rate fits in the time limit: this LP
    (21k variables, 7.5k iterations, about 0.5 s) finishes at a 5 s limit, where a cap
    proportional to the variables (nvar x 5 / 30 + 1000 = 4.6k) stopped it and sent the planner
    to the combinatorial search; ``max_iterations`` caps a re-solve below that."""
    rng = np.random.default_rng(0)
    n, k = 600, 4
    edges = [(i, i + 1) for i in range(n - 1)] + [(i, i + 7) for i in range(n - 7)]
    problem = Problem.from_lists(costs=rng.uniform(0, 10, (n, k)).tolist(),
                                 usages=[[1] * k] * n, intervals=[(0, 1)] * n, edges=edges,
                                 edge_costs=[rng.uniform(0, 10, (k, k)).tolist() for _ in edges])
    lp = solve_local_polytope(problem, time_limit=5.0)
    assert lp.status == "optimal" and lp.iterations > lp.variables * 5 / 30 + 1000
    capped = solve_local_polytope(problem, time_limit=5.0, max_iterations=lp.iterations // 2)
    assert capped.status == "stopped: iteration limit reached"


def _fixed_total(problem, choice, charges):
    """A plan's cost plus each fixed charge one of its strategies or edge pairs makes."""
    flat_nodes = set((problem.offsets[:-1] + np.asarray(choice)).tolist())
    k = problem.num_strategies
    flat_edges = {int(problem.edge_offsets[e] + choice[u] * k[v] + choice[v])
                  for e, (u, v) in enumerate(problem.edges)}
    return evaluate(problem, choice).cost + sum(
        c.cost for c in charges
        if flat_nodes & set(c.nodes.tolist()) or flat_edges & set(c.edges.tolist()))


def test_a_fixed_charge_is_paid_once_for_all_its_members():
    """Two ops whose cheap strategy makes one combined collective: 6 + 6 + the charge against
    10 + 10. Below 8 ns the charge is worth paying for both; above it for neither (paying it
    for one alone is never optimal). The LP with the charge finds the enumerated optimum."""
    problem = Problem.from_lists(costs=[[10, 6], [10, 6]], usages=[[0, 0], [0, 0]],
                                 intervals=[(0, 1), (0, 1)])
    for latency, expected in ((5.0, [1, 1]), (9.0, [0, 0])):
        charges = (FixedCharge(latency, np.array([1, 3]), np.array([], np.int64)),)
        lp = solve_local_polytope(problem, charges=charges)
        assert lp.integral and lp.choice.tolist() == expected
        best = min(_fixed_total(problem, c, charges)
                   for c in itertools.product(range(2), range(2)))
        assert _fixed_total(problem, lp.choice, charges) == best
        assert lp.objective == pytest.approx(best, abs=1e-4)


def test_a_fixed_charge_on_edge_pairs_counts_only_the_member_pair():
    """Node 1's strategy 1 saves 3 ns and needs node 0 at layout 1 (the pair (1, 1) is free,
    (0, 1) costs 7); the pair (1, 1) makes a combined collective of 4 ns. Without the charge
    the plan is (1, 1) at 0 ns against 3 for (0, 0); with it (1, 1) costs 4 and (0, 0) 3."""
    problem = Problem.from_lists(costs=[[0, 0], [3, 0]], usages=[[0, 0], [0, 0]],
                                 intervals=[(0, 1), (0, 1)], edges=[(0, 1)],
                                 edge_costs=[[[0, 7], [7, 0]]])
    assert solve_local_polytope(problem).choice.tolist() == [1, 1]
    member = np.array([3])                 # flat index of the pair (1, 1)
    charges = (FixedCharge(4.0, np.array([], np.int64), member),)
    lp = solve_local_polytope(problem, charges=charges)
    assert lp.integral and lp.choice.tolist() == [0, 0]
    assert lp.objective == pytest.approx(3.0, abs=1e-4)
    cheaper = (FixedCharge(2.0, np.array([], np.int64), member),)
    assert solve_local_polytope(problem, charges=cheaper).choice.tolist() == [1, 1]
