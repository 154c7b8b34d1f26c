"""Eliminating nodes with at most two neighbours keeps every optimum's cost (checked against
enumeration), and the LP built on what is left is still a lower bound."""

import itertools

import numpy as np
import pytest

from autoshard.solver.elimination import eliminate
from autoshard.solver.lp import solve_local_polytope
from autoshard.solver.problem import Problem, evaluate


def _random_problem(rng, n, edge_prob, groups=()):
    k = rng.integers(2, 4, size=n)
    costs = [rng.uniform(0, 10, size=int(k[i])).round(2) for i in range(n)]
    edges, matrices = [], []
    for u in range(n):
        for v in range(u + 1, n):
            if rng.random() < edge_prob or v == u + 1:       # a chain plus random chords
                edges.append((u, v))
                matrices.append(rng.uniform(0, 10, size=(int(k[u]), int(k[v]))).round(2))
    if groups:
        for g in groups:                # a group's nodes need the same strategy count
            for i in g:
                costs[i] = rng.uniform(0, 10, size=len(costs[g[0]])).round(2)
        k = [len(c) for c in costs]
        matrices = [rng.uniform(0, 10, size=(k[u], k[v])).round(2) for u, v in edges]
    return Problem.from_lists(costs, [np.zeros(len(c), np.int64) for c in costs],
                              [(0, 0)] * n, edges, matrices, groups=groups)


def _optimum(problem):
    groups = {i: g for g in problem.groups for i in g}
    best = None
    for choice in itertools.product(*(range(k) for k in problem.num_strategies)):
        if any(choice[i] != choice[g[0]] for i, g in groups.items()):
            continue
        cost = evaluate(problem, np.array(choice)).cost
        best = cost if best is None else min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(12))
def test_the_kept_nodes_choices_expand_to_an_optimum(seed):
    rng = np.random.default_rng(seed)
    problem = _random_problem(rng, 7, edge_prob=0.15 + 0.05 * (seed % 4))
    costs = {i: problem.node_costs(i) for i in range(problem.num_nodes)}
    edges = {tuple(int(x) for x in problem.edges[e]): problem.edge_matrix(e)
             for e in range(problem.num_edges)}
    reduced = eliminate(costs, edges)
    kept = sorted(reduced.costs)
    assert all(len(m_adj) >= 3 for m_adj in [
        [e for e in reduced.edges if j in e] for j in kept]), "a node of degree <= 2 was kept"
    best_reduced, best_cost = None, None
    for sub in itertools.product(*(range(len(reduced.costs[j])) for j in kept)):
        picked = reduced.expand(dict(zip(kept, sub)))
        choice = np.array([picked[i] for i in range(problem.num_nodes)])
        reduced_cost = reduced.constant + sum(reduced.costs[j][s] for j, s in zip(kept, sub)) \
            + sum(m[picked[a], picked[b]] for (a, b), m in reduced.edges.items())
        # the reduced problem prices each kept choice at the cost of its best expansion
        assert evaluate(problem, choice).cost == pytest.approx(reduced_cost, abs=1e-6)
        if best_cost is None or reduced_cost < best_cost:
            best_reduced, best_cost = choice, reduced_cost
    assert best_cost == pytest.approx(_optimum(problem), abs=1e-6)
    assert evaluate(problem, best_reduced).cost == pytest.approx(_optimum(problem), abs=1e-6)


def test_a_tree_is_solved_by_elimination_alone():
    rng = np.random.default_rng(3)
    problem = _random_problem(rng, 8, edge_prob=0.0)          # a chain
    costs = {i: problem.node_costs(i) for i in range(problem.num_nodes)}
    edges = {tuple(int(x) for x in problem.edges[e]): problem.edge_matrix(e)
             for e in range(problem.num_edges)}
    reduced = eliminate(costs, edges)
    assert not reduced.costs and reduced.constant == pytest.approx(_optimum(problem))
    lp = solve_local_polytope(problem)
    assert lp.integral and lp.variables == 0
    assert evaluate(problem, lp.choice).cost == pytest.approx(_optimum(problem))


@pytest.mark.parametrize("seed", range(8))
def test_the_lp_after_elimination_is_a_bound_and_exact_when_integral(seed):
    rng = np.random.default_rng(100 + seed)
    groups = ((0, 4),) if seed % 2 else ()
    problem = _random_problem(rng, 7, edge_prob=0.45, groups=groups)
    lp = solve_local_polytope(problem)
    optimum = _optimum(problem)
    assert lp.status == "optimal"
    assert lp.objective <= optimum + 1e-6
    if lp.integral:
        assert evaluate(problem, lp.choice).cost == pytest.approx(optimum, abs=1e-6)
        assert lp.objective == pytest.approx(optimum, abs=1e-4)
    for g in problem.groups:
        assert len({int(lp.choice[i]) for i in g}) == 1


@pytest.mark.parametrize("seed", range(10))
def test_under_a_memory_limit_only_nodes_of_fixed_memory_are_eliminated(seed):
    """Random chains with chords, memory live over random intervals, some nodes holding the
    same memory whatever they choose: the LP's bound is below the best plan within the limit
    and, where integral, its plan is that best plan; the memory of eliminated nodes still
    counts (a limit that only fits with the fixed nodes' memory left out is infeasible)."""
    from autoshard.solver.lp import _representatives, _varying_usage
    from autoshard.solver.problem import usage_profile

    rng = np.random.default_rng(200 + seed)
    base = _random_problem(rng, 7, edge_prob=0.2)
    k = base.num_strategies
    usages = [np.full(int(k[i]), 6) if i % 3 == 1 else rng.integers(1, 12, size=int(k[i]))
              for i in range(7)]
    starts = rng.integers(0, 3, size=7)
    intervals = [(int(a), int(a) + int(rng.integers(1, 4))) for a in starts]
    costs = [base.node_costs(i) for i in range(7)]
    matrices = [base.edge_matrix(e) for e in range(base.num_edges)]

    def with_limit(limit):
        return Problem.from_lists(costs, usages, intervals, base.edges.tolist(), matrices,
                                  usage_limit=limit)

    peaks = sorted({int(usage_profile(with_limit(None), np.array(c)).max()) for c in
                    itertools.product(*(range(int(x)) for x in k))})
    problem = with_limit(peaks[len(peaks) // 3])
    assert {1, 4} - _varying_usage(problem, _representatives(problem))   # fixed ones exist
    best = None
    for choice in itertools.product(*(range(int(x)) for x in k)):
        choice = np.array(choice)
        if usage_profile(problem, choice).max() <= problem.usage_limit:
            cost = evaluate(problem, choice).cost
            best = cost if best is None else min(best, cost)
    lp = solve_local_polytope(problem)
    assert lp.status == "optimal" and lp.objective <= best + 1e-5
    if lp.integral:
        assert usage_profile(problem, lp.choice).max() <= problem.usage_limit
        assert evaluate(problem, lp.choice).cost == pytest.approx(best, abs=1e-5)
    below = with_limit(peaks[0] - 1)          # no plan fits
    assert solve_local_polytope(below).status == "infeasible"
