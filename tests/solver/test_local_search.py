"""The local search of large cores (autoshard/solver/local_search.py) against brute force and
exact recomputation."""

import dataclasses
import itertools

import numpy as np
import pytest

from autoshard.solver import search as solve_search
from autoshard.solver.solve import Problem, evaluate, solve
from autoshard.solver.local_search import LocalSearch, priced_search
from autoshard.solver.memory import memory_model
from autoshard.solver.presolve import presolve
from autoshard.solver.search import adjacency, reduced_cost, repair


def _random_reduced(seed: int, n: int, tree: bool, limit_factor: float | None = 1.3):
    """A random problem reduced without dominance (so most nodes survive), with its memory
    model; ``tree``: the edges form a tree."""
    rng = np.random.default_rng(seed)
    k = rng.integers(2, 5, size=n)
    costs = [rng.integers(0, 100, size=x).astype(float) for x in k]
    usages = [rng.integers(1, 30, size=x) for x in k]
    intervals = [(int(s), int(s + rng.integers(1, 6))) for s in rng.integers(0, 8, size=n)]
    edges, mats = [], []
    for v in range(1, n):
        parents = {int(rng.integers(0, v))} if tree else {v - 1, int(rng.integers(0, v))}
        for u in parents:
            edges.append((u, v))
            mats.append(rng.integers(0, 60, size=(k[u], k[v])).astype(float))
    p = Problem.from_lists(costs, usages, intervals, edges, mats, name=f"r{seed}")
    if limit_factor is not None:
        lo = evaluate(p, [int(np.argmin(u)) for u in usages]).peak_usage
        p = p.with_usage_limit(int(lo * limit_factor))
    red = presolve(p, dominance=False)
    return p, red, memory_model(p, red)


def _brute(red, mem, fits: bool):
    """Cheapest reduced choice (that fits, when ``fits``)."""
    best, arg = float("inf"), None
    for combo in itertools.product(*[range(len(c)) for c in red.costs]):
        c = np.array(combo)
        if fits and mem.limit is not None and mem.profile(c).max() > mem.limit:
            continue
        cost = reduced_cost(red, c)
        if cost < best:
            best, arg = cost, c
    return best, arg


@pytest.mark.parametrize("seed", range(6))
def test_tree_step_is_exact_on_a_tree(seed):
    """With every node of a tree inside, one tree step is the optimum without memory."""
    _, red, mem = _random_reduced(seed, 7, tree=True, limit_factor=None)
    search = LocalSearch(red.costs, adjacency(red), mem)
    inside = search.forest(np.arange(red.num_nodes))
    assert inside[search.k >= 2].all()
    got = search.tree_step(np.zeros(red.num_nodes, np.int64), inside)
    best, _ = _brute(red, mem, fits=False)
    assert reduced_cost(red, got) == pytest.approx(best)


@pytest.mark.parametrize("seed", range(6))
def test_forest_has_no_cycle_and_tree_step_never_worsens(seed):
    _, red, mem = _random_reduced(seed, 40, tree=False, limit_factor=None)
    adj = adjacency(red)
    search = LocalSearch(red.costs, adj, mem)
    rng = np.random.default_rng(seed)
    choice = np.array([int(np.argmax(c)) for c in red.costs])
    for _ in range(4):
        inside = search.forest(rng.permutation(red.num_nodes))
        nodes = np.flatnonzero(inside)
        inner = sum(1 for j in nodes for l in adj[j] if inside[l]) // 2
        parent = {int(j): int(j) for j in nodes}  # a forest: edges = nodes - components

        def root(x):
            while parent[x] != x:
                x = parent[x]
            return x
        for j in nodes:
            for l in adj[j]:
                if inside[l]:
                    parent[root(int(j))] = root(int(l))
        assert inner == len(nodes) - len({root(int(j)) for j in nodes})
        new = search.tree_step(choice, inside)
        assert reduced_cost(red, new) <= reduced_cost(red, choice) + 1e-9
        assert (new[~inside] == choice[~inside]).all()
        choice = new


def test_prices_are_usage_times_price_summed_over_time():
    _, red, mem = _random_reduced(1, 12, tree=False)
    search = LocalSearch(red.costs, adjacency(red), mem)
    mu = np.random.default_rng(0).random(mem.horizon)
    prices = search.prices(mu)
    times = np.arange(mem.horizon)
    for j in range(red.num_nodes):
        expected = (mem.rows(j, times) * mu[:, None]).sum(axis=0)
        assert prices[j] == pytest.approx(expected)


@pytest.mark.parametrize("seed", range(4))
def test_fits_move_and_descend_agree_with_the_profile(seed):
    p, red, mem = _random_reduced(seed, 30, tree=False)
    adj = adjacency(red)
    search = LocalSearch(red.costs, adj, mem)
    choice = repair(red.costs, adj, mem, np.zeros(red.num_nodes, np.int64), 500)
    profile = mem.profile(choice)
    if profile.max() > mem.limit:
        pytest.skip("repair found no plan that fits")
    for j in range(red.num_nodes):
        for b in range(len(red.costs[j])):
            moved = choice.copy()
            moved[j] = b
            assert search.fits_move(profile, j, int(choice[j]), b) == (
                mem.profile(moved).max() <= mem.limit)
    better, prof = search.descend(choice, profile)
    assert (prof == mem.profile(better)).all() and prof.max() <= mem.limit
    assert reduced_cost(red, better) <= reduced_cost(red, choice)
    assert evaluate(p, red.expand(better)).feasible


def test_priced_search_offers_only_plans_that_fit_and_finds_the_optimum_of_a_small_case():
    p, red, mem = _random_reduced(5, 8, tree=False, limit_factor=1.1)
    adj = adjacency(red)
    search = LocalSearch(red.costs, adj, mem)
    offered = []

    def offer(c):
        offered.append(c.copy())
        return len(offered) < 3

    rounds = iter(range(40))
    priced_search(search, np.array([int(np.argmin(c)) for c in red.costs]),
                  rng=np.random.default_rng(0),
                  repair=lambda c: repair(red.costs, adj, mem, c, 500), offer=offer,
                  keep_going=lambda: next(rounds, None) is not None)
    assert offered
    fitting = [c for c in offered if mem.profile(c).max() <= mem.limit]
    assert fitting
    best, _ = _brute(red, mem, fits=True)
    assert min(reduced_cost(red, c) for c in fitting) >= best - 1e-9


def test_large_core_path_is_deterministic_and_feasible(monkeypatch):
    """The large-core path (local search, then LNS) with a tiny threshold: the same answer
    twice, and it fits."""
    from tests.solver.test_solve import _chain_problem
    monkeypatch.setattr(solve_search, "WHOLE_MAX_NODES", 10)
    p = _chain_problem(4, 200)
    a = solve(p, time_limit=1)
    b = solve(p, time_limit=1)
    assert a.feasible and a.choice == b.choice
    assert evaluate(p, a.choice).peak_usage <= p.usage_limit


@pytest.mark.parametrize("seed", [3, 5, 7, 11])
def test_network_priced_search_with_an_exact_minimiser_reaches_the_optimum(seed):
    """The price sawtooth of ``priced`` with exact priced solves (toulbar2's role) finds
    the optimum that fits on small cases whose cheapest plan overflows."""
    from autoshard.solver.priced import network_priced_search

    def exact(costs):   # the cheapest plan for node costs ``costs``, without memory
        return _brute(dataclasses.replace(red, costs=tuple(costs)), mem, fits=False)[1]

    p, red, mem = _random_reduced(seed, 6, tree=False, limit_factor=1.1)
    adj = adjacency(red)
    search = LocalSearch(red.costs, adj, mem)
    assert mem.profile(exact(red.costs)).max() > mem.limit
    offered, rounds = [], iter(range(30))
    network_priced_search(search, minimise=exact,
                          repair=lambda c: repair(red.costs, adj, mem, c, 500),
                          offer=lambda c: offered.append(c.copy()),
                          keep_going=lambda: next(rounds, None) is not None)
    fitting = [c for c in offered if mem.profile(c).max() <= mem.limit]
    best, _ = _brute(red, mem, fits=True)
    assert fitting and min(reduced_cost(red, c) for c in fitting) == pytest.approx(best)


def test_prices_never_make_a_forbidden_strategy_allowed():
    """A forbidden strategy that uses less memory than strategy 0 gets a negative price; the
    priced problem must keep it forbidden."""
    from autoshard.solver.memory import MemoryModel
    from autoshard.solver.priced import network_priced_search
    from autoshard.solver.problem import FORBIDDEN
    costs = [np.array([0.0, FORBIDDEN, 5.0]), np.array([1e17, 2e17])]
    mem = MemoryModel(starts=(np.array([0]), np.array([0])), ends=(np.array([4]), np.array([4])),
                      usage=(np.array([[0], [-90], [-50]]), np.array([[0], [-10]])),
                      baseline=np.full(4, 100, np.int64), limit=60)
    adj = [{1: np.zeros((3, 2))}, {0: np.zeros((2, 3))}]
    search = LocalSearch(costs, adj, mem)
    seen, rounds = [], iter(range(12))

    def minimise(priced):
        seen.append([c.copy() for c in priced])
        return np.array([int(np.argmin(c)) for c in priced])

    offered = []
    network_priced_search(search, minimise=minimise, repair=lambda c: np.array([2, 1]),
                          offer=lambda c: offered.append(c.copy()),
                          keep_going=lambda: next(rounds, None) is not None)
    assert len(seen) > 2 and all(s[0][1] >= FORBIDDEN for s in seen)
    # repaired to (2, 1), then node 1 moves back to its cheaper strategy, which still fits
    assert any((c == [2, 0]).all() for c in offered)
