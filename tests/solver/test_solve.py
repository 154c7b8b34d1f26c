"""The solver (autoshard/passes/solve*.py) against brute force, the contest's evaluation rule and
itself in another process."""

import gzip
import itertools
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from autoshard.ir.errors import PlanInfeasibleError
from autoshard.solver import search as solve_search
from autoshard.solver.solve import Problem, evaluate, load_iopddl, solve
from autoshard.solver.memory import memory_model
from autoshard.solver.presolve import presolve
from autoshard.solver.relax import relax
from autoshard.solver.search import reduced_cost

# the contest instances live beside the repository (../shared/iopddl), not in it
IOPDDL = pathlib.Path(os.environ.get(
    "AUTOSHARD_IOPDDL_DIR", pathlib.Path(__file__).resolve().parents[3] / "shared" / "iopddl"))
EXAMPLE = IOPDDL / "example.json"
needs_instances = pytest.mark.skipif(
    not (IOPDDL / "asplos-2025-iopddl-B.json.gz").exists(),
    reason=f"IOPDDL instances not found in {IOPDDL}: set AUTOSHARD_IOPDDL_DIR to a folder "
           "holding google/iopddl's example.json and asplos-2025-iopddl-*.json.gz")
INF = 10**18


def brute_force(p: Problem):
    """(optimal cost, its choice, smallest peak) over all choices that respect the groups and
    choose nothing forbidden; the cost is None when no such choice fits the memory limit."""
    k = p.num_strategies
    combos = np.array(list(itertools.product(*[range(int(x)) for x in k])), np.int64)
    for g in p.groups:
        combos = combos[(combos[:, list(g)] == combos[:, [g[0]]]).all(axis=1)]
    chosen = [p.costs[p.offsets[:-1] + combos]]
    for e, (u, v) in enumerate(p.edges):
        chosen.append(p.edge_costs[p.edge_offsets[e] + combos[:, u] * k[v] + combos[:, v]][:, None])
    chosen = np.hstack(chosen)
    allowed = (chosen < 1e18).all(axis=1)
    cost = chosen.sum(axis=1)
    horizon = int(p.intervals[:, 1].max())
    t = np.arange(horizon)
    live = (p.intervals[:, :1] <= t) & (t < p.intervals[:, 1:])  # (n, T): the contest's rule
    peak = (p.usages[p.offsets[:-1] + combos] @ live).max(axis=1)
    fits = allowed & (peak <= p.usage_limit if p.usage_limit is not None else True)
    min_peak = int(peak[allowed].min()) if allowed.any() else None
    if not fits.any():
        return None, None, min_peak
    best = np.flatnonzero(fits)[np.argmin(cost[fits])]
    return float(cost[best]), combos[best], min_peak


def random_problem(rng, n, *, groups=False, forbidden=True, limit="tight", floats=False):
    k = rng.integers(1, 5, size=n)
    if groups and n >= 4:
        k[1] = k[3] = max(k[1], 2)
    costs = [rng.integers(0, 100, size=x).astype(float) for x in k]
    if floats:
        costs = [c + rng.random(len(c)) for c in costs]
    if forbidden:
        for c in costs:
            if len(c) > 1 and rng.random() < 0.3:
                c[rng.integers(len(c))] = INF
    usages = [rng.integers(0, 20, size=x) for x in k]
    starts = rng.integers(0, 8, size=n)
    intervals = [(int(s), int(s + rng.integers(0, 4))) for s in starts]  # some start == end
    edges, mats = [], []
    for u in range(n):
        for v in range(u + 1, n):
            if rng.random() < 0.45:
                m = rng.integers(0, 60, size=(k[u], k[v])).astype(float)
                if forbidden:
                    m[rng.random(m.shape) < 0.15] = INF
                if rng.random() < 0.2:  # a functional edge: v follows u
                    f = rng.integers(0, k[v], size=k[u])
                    m[:] = INF
                    m[np.arange(k[u]), f] = rng.integers(0, 60, size=k[u])
                edges.append((u, v))
                mats.append(m)
    if edges and rng.random() < 0.3:  # a parallel edge
        edges.append(edges[0])
        mats.append(rng.integers(0, 30, size=mats[0].shape).astype(float))
    grp = [(1, 3)] if groups and n >= 4 else []
    p = Problem.from_lists(costs, usages, intervals, edges, mats, None, name="random",
                           groups=grp)
    _, _, lo = brute_force(p)
    if lo is None:
        return None  # every choice is forbidden somewhere
    if limit is None:
        return p
    unlimited_cost, unlimited_choice, _ = brute_force(p)
    hi = evaluate(p, unlimited_choice).peak_usage
    return p.with_usage_limit(int(lo + (hi - lo) * rng.random() * 0.7))


def test_evaluate_follows_the_contest_rule():
    # half-open intervals: [0, 2) and [2, 4) never overlap; [5, 5) is live nowhere
    p = Problem.from_lists([[1, 2], [3], [4]], [[10, 1], [10], [100]], [(0, 2), (2, 4), (5, 5)],
                           [(0, 1)], [[[5], [7]]], usage_limit=10)
    ev = evaluate(p, [0, 0, 0])
    assert (ev.cost, ev.feasible, ev.peak_usage) == (1 + 3 + 4 + 5, True, 10)
    ev = evaluate(p.with_usage_limit(9), [1, 0, 0])
    assert (ev.cost, ev.feasible, ev.peak_usage) == (2 + 3 + 4 + 7, False, 10)
    with pytest.raises(Exception, match="out of range"):
        evaluate(p, [2, 0, 0])


@needs_instances
def test_load_json_and_gz_agree(tmp_path):
    gz = tmp_path / "example.json.gz"
    with open(EXAMPLE, "rb") as src, gzip.open(gz, "wb") as dst:
        shutil.copyfileobj(src, dst)
    a, b = load_iopddl(EXAMPLE), load_iopddl(gz)
    assert a.name == "example" and a.usage_limit == 50 and a.num_nodes == 5
    for f in ("offsets", "costs", "usages", "intervals", "edges", "edge_offsets", "edge_costs"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    raw = json.loads(EXAMPLE.read_text())["problem"]
    np.testing.assert_array_equal(a.edge_matrix(2).ravel(), raw["edges"]["costs"][2])


@needs_instances
def test_example_is_solved_optimally():
    p = load_iopddl(EXAMPLE)
    best, _, _ = brute_force(p)
    sol = solve(p, time_limit=5)
    assert sol.cost == best and sol.feasible and sol.status == "optimal"
    ev = evaluate(p, sol.choice)
    assert ev.cost == sol.cost and ev.peak_usage == sol.peak_usage <= p.usage_limit
    assert sol.lower_bound == pytest.approx(best) and sol.gap == pytest.approx(0)


@pytest.mark.parametrize("case", range(36))
def test_matches_brute_force(case):
    rng = np.random.default_rng(case)
    kind = ["tight", "tight", None][case % 3]
    p = None
    while p is None:
        p = random_problem(rng, int(rng.integers(3, 8)), groups=case % 4 == 1, limit=kind,
                           floats=case % 9 == 4)
    best, _, _ = brute_force(p)
    sol = solve(p, time_limit=10)
    ev = evaluate(p, sol.choice)
    assert ev.feasible and ev.forbidden == 0 and sol.feasible
    assert ev.cost == pytest.approx(sol.cost)
    assert sol.cost == pytest.approx(best), (sol.stats, p.usage_limit)
    assert sol.status == "optimal"
    for g in p.groups:
        assert len({sol.choice[i] for i in g}) == 1


@pytest.mark.parametrize("case", range(12))
def test_presolve_keeps_the_optimum_and_the_memory(case):
    rng = np.random.default_rng(100 + case)
    p = None
    while p is None:
        p = random_problem(rng, int(rng.integers(4, 8)), groups=case % 3 == 0)
    best, _, _ = brute_force(p)
    red = presolve(p)
    mem = memory_model(p, red)
    sizes = [len(c) for c in red.costs]
    found = None
    for choice in itertools.product(*[range(s) for s in sizes]):
        full = red.expand(choice)
        ev = evaluate(p, full)
        assert reduced_cost(red, choice) == pytest.approx(ev.cost)
        prof = mem.profile(choice)
        assert (prof.max() if len(prof) else 0) == ev.peak_usage
        if ev.feasible and ev.forbidden == 0 and (found is None or ev.cost < found):
            found = ev.cost
    assert found == pytest.approx(best)
    assert red.stats["nodes_after"] <= p.num_nodes


def test_infeasible_budget_states_the_smallest_peak():
    rng = np.random.default_rng(7)
    p = random_problem(rng, 6, forbidden=False, limit=None)
    _, _, min_peak = brute_force(p)
    with pytest.raises(PlanInfeasibleError) as err:
        solve(p.with_usage_limit(min_peak - 1), time_limit=2)
    msg = str(err.value)
    assert f"exactly {min_peak:,} bytes" in msg and f"{min_peak - 1:,}" in msg
    sol = solve(p.with_usage_limit(min_peak), time_limit=2)
    assert sol.feasible and sol.peak_usage == min_peak


def _chain_problem(seed: int, n: int) -> Problem:
    """A layered graph with memory pressure, big enough for the search to matter."""
    rng = np.random.default_rng(seed)
    k = rng.integers(2, 6, size=n)
    costs = [rng.integers(0, 1000, size=x) for x in k]
    usages = [rng.integers(1, 100, size=x) for x in k]
    intervals = [(i // 3, i // 3 + int(rng.integers(1, 12))) for i in range(n)]
    edges, mats = [], []
    for v in range(1, n):
        for u in {v - 1, int(rng.integers(0, v))}:
            edges.append((u, v))
            mats.append(rng.integers(0, 500, size=(k[u], k[v])))
    p = Problem.from_lists(costs, usages, intervals, edges, mats, name=f"chain{seed}")
    lo = max(evaluate(p, [int(np.argmin(u)) for u in usages]).peak_usage, 1)
    return p.with_usage_limit(int(lo * 1.3))


_DETERMINISM_SCRIPT = """
import sys
from autoshard.solver import search as solve_search
solve_search.WHOLE_MAX_NODES = int(sys.argv[1])
from tests.solver.test_solve import _chain_problem
from autoshard.solver.solve import solve
print(solve(_chain_problem(3, 150), time_limit=1).choice)
"""


@pytest.mark.parametrize("whole_max", [10, 1500], ids=["lns", "whole"])
def test_deterministic_across_runs_and_processes(monkeypatch, whole_max):
    monkeypatch.setattr(solve_search, "WHOLE_MAX_NODES", whole_max)
    p = _chain_problem(3, 150)
    a = solve(p, time_limit=1)
    b = solve(p, time_limit=1)
    assert a.feasible and a.choice == b.choice
    assert a.stats["engine"] in ({"lns", "greedy+repair", "greedy", "local search"}
                                 if whole_max == 10 else
                                 {"toulbar2", "lp rounding", "cp-sat", "greedy+repair", "greedy"})
    out = subprocess.run([sys.executable, "-c", _DETERMINISM_SCRIPT, str(whole_max)],
                         cwd=pathlib.Path(__file__).resolve().parents[2], capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == str(a.choice)


@needs_instances
def test_real_instance_objective_equals_evaluate():
    p = load_iopddl(IOPDDL / "asplos-2025-iopddl-B.json.gz")
    sol = solve(p, time_limit=1.5)
    ev = evaluate(p, sol.choice)
    assert sol.feasible and ev.feasible and ev.cost == sol.cost
    assert ev.peak_usage == sol.peak_usage <= p.usage_limit
    assert sol.stats["nodes_after"] < sol.stats["nodes_before"] / 2
    assert sol.lower_bound is not None and sol.lower_bound <= sol.cost


@pytest.mark.parametrize("case", range(12))
def test_lp_relaxation_bounds_the_optimum(case):
    """The local-polytope LP with memory rows is a relaxation: its bound never exceeds the
    brute-force optimum, and rounding its marginals gives a complete choice."""
    rng = np.random.default_rng(300 + case)
    p = None
    while p is None:
        p = random_problem(rng, int(rng.integers(3, 8)), groups=case % 3 == 0,
                           limit=["tight", None][case % 2])
    best, _, _ = brute_force(p)
    red = presolve(p)
    mem = memory_model(p, red)
    start = np.zeros(red.num_nodes, np.int64)
    rel = relax(red, mem, start, time_limit=10, deterministic=True)
    if best is None or red.num_nodes == 0:
        return
    assert rel.status == "optimal" and rel.bound <= best + 1e-6
    assert len(rel.marginals) == red.num_nodes
    assert all(v.sum() == pytest.approx(1.0) for v in rel.marginals)


def test_lp_relaxation_is_integral_on_a_chain():
    """On a tree without memory limit the local polytope is tight (Wainwright and Jordan 2008,
    ch. 4): the LP's marginals are integral and its bound is the optimum, here 1 + 0 + 2 = 3
    (node 0 at strategy 1, node 1 at 1, node 2 at 1; every other pair costs more)."""
    p = Problem.from_lists(
        costs=[[5, 1], [0, 0], [9, 2]], usages=[[1, 1], [1, 1], [1, 1]],
        intervals=[(0, 1), (0, 1), (0, 1)], edges=[(0, 1), (1, 2)],
        edge_costs=[[[0, 7], [8, 0]], [[0, 6], [4, 0]]], usage_limit=None)
    best, choice, _ = brute_force(p)
    red = presolve(p, dominance=False)
    rel = relax(red, memory_model(p, red), np.zeros(red.num_nodes, np.int64), time_limit=10,
                deterministic=True)
    assert best == 3
    if red.num_nodes:
        assert rel.integral and rel.bound == pytest.approx(best)
        rounded = red.expand([int(np.argmax(v)) for v in rel.marginals])
        assert evaluate(p, rounded).cost == best
    assert solve(p, time_limit=5).cost == best


def _whole_core_cuts(p):
    """The presolved core of ``p`` and its memory constraints with every node free."""
    from autoshard.solver.memory import part_cuts
    reduced = presolve(p)
    memory = memory_model(p, reduced)
    start = np.zeros(reduced.num_nodes, np.int64)
    return reduced, part_cuts(memory, np.arange(reduced.num_nodes), start, memory.profile(start))


@pytest.mark.parametrize("case", range(8))
def test_toulbar2_solves_a_core_with_its_memory_constraints_exactly(case):
    pytest.importorskip("pytoulbar2")
    from autoshard.solver.toulbar2 import solve_network
    from autoshard.solver.cpsat import Limits
    from autoshard.solver.search import cost_scale
    rng = np.random.default_rng(300 + case)
    p = None
    while p is None:
        p = random_problem(rng, int(rng.integers(4, 8)), floats=case % 4 == 3)
    best, _, _ = brute_force(p)
    assert best is not None  # random_problem's limit lets some plan fit
    reduced, cuts = _whole_core_cuts(p)
    res = solve_network(reduced.costs, reduced.edges, cuts, cost_scale(reduced),
                        Limits(5.0, True, 1, 0))
    assert res.optimal
    ev = evaluate(p, reduced.expand(res.choice))
    assert ev.feasible and ev.cost == pytest.approx(best)
    assert res.objective + reduced.constant == pytest.approx(best)
    # told of a plan at the optimum, it finds that cost again and proves it
    again = solve_network(reduced.costs, reduced.edges, cuts, cost_scale(reduced),
                          Limits(5.0, True, 1, 0), upper=best - reduced.constant)
    assert again.optimal and again.objective + reduced.constant == pytest.approx(best)


def test_toulbar2_gives_the_same_plan_on_every_call_in_one_process():
    """A search stopped by its backtrack limit must not depend on the searches before it
    (toulbar2 leaves its hybrid best-first setting changed: alternate calls differed)."""
    pytest.importorskip("pytoulbar2")
    from autoshard.solver.toulbar2 import solve_network
    from autoshard.solver.cpsat import Limits
    from autoshard.solver.search import cost_scale
    p = _chain_problem(3, 150)
    reduced, cuts = _whole_core_cuts(p)
    runs = [solve_network(reduced.costs, reduced.edges, cuts, cost_scale(reduced),
                          Limits(0.75, True, 1, 0)) for _ in range(3)]
    assert not runs[0].optimal   # stopped by the limit, where the search order matters
    assert all(r.objective == runs[0].objective and (r.choice == runs[0].choice).all()
               for r in runs[1:])


def test_only_a_core_with_few_memory_constraints_states_them_all_at_once():
    from autoshard.solver import toulbar2 as solve_cfn
    from autoshard.solver.memory import Cuts
    few = Cuts([np.array([0, 1])] * 3, [np.array([1, 1])] * 3, np.ones(3, np.int64))
    many = Cuts([np.array([0, 1])] * (solve_cfn.MAX_CUTS + 1),
                [np.array([1, 1])] * (solve_cfn.MAX_CUTS + 1),
                np.ones(solve_cfn.MAX_CUTS + 1, np.int64))
    assert solve_cfn.suits(few) and not solve_cfn.suits(many)


@pytest.mark.parametrize("case", range(6))
def test_memory_constraints_added_lazily_still_give_the_optimum(monkeypatch, case):
    """With every core treated as having too many memory constraints, toulbar2 starts from
    none and adds the violated ones round by round; its optimum must be the true one."""
    pytest.importorskip("pytoulbar2")
    from autoshard.solver import toulbar2 as solve_cfn
    monkeypatch.setattr(solve_cfn, "MAX_CUTS", 0)
    rounds = []
    real = solve_cfn.solve_network
    monkeypatch.setattr(solve_cfn, "solve_network",
                        lambda *a, **k: rounds.append(len(a[2])) or real(*a, **k))
    rng = np.random.default_rng(400 + case)
    p = None
    while p is None or presolve(p).num_nodes < 2:   # a core is left for the search
        p = random_problem(rng, int(rng.integers(5, 8)), floats=case % 3 == 2)
    best, _, _ = brute_force(p)
    sol = solve(p, time_limit=10)
    assert sol.feasible and sol.cost == pytest.approx(best) and sol.status == "optimal"
    assert rounds and rounds[0] == 0   # the first round has no memory constraint
