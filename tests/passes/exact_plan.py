"""The optimum of a planning problem by exhaustive search, as a reference for the planner.

The planner's currency is ``latency.total_nanoseconds``: the problem's node and edge costs plus
the start-up latency of each combined collective op the plan makes (one per class of op, more
where collectives of a class depend on each other: ``latency.combined_ops``). The start-up
charges couple every node that can make a class, so no pairwise solver sees them; the
references here use neither the planner's solvers nor its LP:

* ``enumerate_optimum`` prices every combination of strategies (numpy, in chunks) with a lower
  bound (node and edge costs plus one start-up per class the combination makes), then prices
  the combinations exactly with ``total_nanoseconds`` in order of that bound until the bound
  passes the best exact total: obviously exact, for up to a few hundred thousand combinations;
* ``branch_and_bound_optimum`` branches on the classes (each either paid or forbidden) and
  solves each branch's pairwise problem exactly by variable elimination (min-sum), for graphs
  enumeration cannot reach (a train step, a 2-D mesh). It ignores memory limits; the tests
  check it against enumeration where both run.

Both respect the problem's groups (nodes that must choose alike): the planner searches the
same space, and both return the optimum priced by ``total_nanoseconds`` itself.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from autoshard.cost_model.hardware import Hardware
from autoshard.ir.mesh import MeshSpec
from autoshard.passes.latency import class_entries, class_seconds, classes_used, total_nanoseconds
from autoshard.passes.problem import NS, PlanningProblem
from autoshard.solver.problem import Problem

#: Combinations priced per numpy chunk (memory: a few int64 arrays of chunk x nodes).
CHUNK = 1 << 15
#: The most combinations enumeration prices exactly before it gives up (their bound ties).
MAX_EXACT = 5_000
#: The largest joint table variable elimination may build before it gives up.
MAX_TABLE = 1 << 21


class TooLarge(Exception):
    """The problem is beyond this reference's reach (the test draws another graph)."""


def choice_variables(problem: Problem) -> tuple[np.ndarray, list[int]]:
    """(representative of each node, the representatives with more than one strategy): a
    group's nodes all take their representative's (first member's) strategy."""
    rep = np.arange(problem.num_nodes)
    for group in problem.groups:
        rep[list(group)] = group[0]
    k = problem.num_strategies
    return rep, [int(i) for i in np.unique(rep) if k[i] > 1]


def combinations(problem: Problem) -> int:
    """How many choices enumeration prices (strategy counts multiplied over the free nodes)."""
    _, free = choice_variables(problem)
    return int(np.prod([int(problem.num_strategies[i]) for i in free], dtype=object))


def start_up(key, mesh: MeshSpec, hw: Hardware) -> float:
    """One start-up of a combined op of class ``key``, in nanoseconds."""
    return sum(class_seconds([key], mesh, hw).values()) * NS


@dataclass(frozen=True)
class Optimum:
    """The reference's best plan: its total (``total_nanoseconds``), choice and classes."""

    total: float
    choice: np.ndarray
    classes: frozenset


def _optimum(pp: PlanningProblem, choice, mesh: MeshSpec, hw: Hardware) -> Optimum:
    choice = np.asarray(choice, np.int64)
    return Optimum(total_nanoseconds(pp, choice, mesh, hw), choice,
                   frozenset(classes_used(pp, choice, mesh)))


# -- enumeration ---------------------------------------------------------------------------------

def enumerate_optimum(pp: PlanningProblem, mesh: MeshSpec, hw: Hardware,
                      max_combinations: int) -> Optimum:
    """The cheapest choice that fits the memory limit over every combination of strategies
    (``TooLarge`` past ``max_combinations``): every combination's bound, then exact totals in
    order of the bound until the bound reaches the best total found."""
    problem = pp.problem
    rep, free = choice_variables(problem)
    count = combinations(problem)
    if count > max_combinations:
        raise TooLarge(f"{count} combinations")
    radix = [int(problem.num_strategies[i]) for i in free]
    position = {r: j for j, r in enumerate(free)}
    columns = np.array([position.get(int(r), -1) for r in rep])   # node -> its digit, -1: fixed

    def choices(index: np.ndarray) -> np.ndarray:
        digits = np.stack(np.unravel_index(index, radix), axis=1) if radix else \
            np.zeros((len(index), 0), np.int64)
        return np.where(columns >= 0, digits[:, np.maximum(columns, 0)], 0)

    masks = _class_masks(pp, mesh, hw)
    live = _live_matrix(problem)
    bound = np.concatenate([_bounds(problem, masks, live, choices(np.arange(
        start, min(count, start + CHUNK)))) for start in range(0, count, CHUNK)])
    best: Optimum | None = None
    for priced, j in enumerate(np.argsort(bound, kind="stable")):
        if not np.isfinite(bound[j]) or best is not None and \
                bound[j] >= best.total * (1 - 1e-12):
            break
        if priced == MAX_EXACT:
            raise TooLarge(f"over {MAX_EXACT} combinations within the bound")
        found = _optimum(pp, choices(np.array([j]))[0], mesh, hw)
        assert found.total >= bound[j] * (1 - 1e-9), (
            f"a combination's bound {bound[j]} ns exceeds its total {found.total} ns")
        if best is None or found.total < best.total:
            best = found
    if best is None:
        raise TooLarge("no combination fits the memory limit")
    return best


def _class_masks(pp: PlanningProblem, mesh: MeshSpec, hw: Hardware) -> list:
    """Per class: (flat node-strategy mask, flat edge-entry mask, one start-up in ns)."""
    problem = pp.problem
    masks = []
    for key, entries in sorted(class_entries(pp, mesh).items()):
        nodes = np.zeros(len(problem.costs), bool)
        edges = np.zeros(len(problem.edge_costs), bool)
        nodes[entries.nodes] = True
        edges[entries.edges] = True
        masks.append((nodes, edges, start_up(key, mesh, hw)))
    return masks


def _bounds(problem: Problem, masks: list, live: np.ndarray, choice: np.ndarray) -> np.ndarray:
    """Each row's node and edge costs plus one start-up per class it makes (inf: over the
    memory limit): at most its ``total_nanoseconds``."""
    node_flat = problem.offsets[:-1] + choice
    edge_flat = _edge_entries(problem, choice)
    cost = problem.costs[node_flat].sum(axis=1) + problem.edge_costs[edge_flat].sum(axis=1)
    for nodes, edges, charge in masks:
        cost = cost + (nodes[node_flat].any(axis=1) | edges[edge_flat].any(axis=1)) * charge
    if problem.usage_limit is not None:
        usage = problem.usages[node_flat] @ live
        cost = np.where(usage.max(axis=1, initial=0) <= problem.usage_limit, cost, np.inf)
    return cost


def _edge_entries(problem: Problem, choice: np.ndarray) -> np.ndarray:
    """Flat edge-cost index of every edge under every row of ``choice``."""
    if not problem.num_edges:
        return np.zeros((len(choice), 0), np.int64)
    u, v = problem.edges[:, 0], problem.edges[:, 1]
    k = problem.num_strategies
    return problem.edge_offsets[:-1] + choice[:, u] * k[v] + choice[:, v]


def _live_matrix(problem: Problem) -> np.ndarray:
    """(nodes, times) 0/1: node i holds its usage at time t (``usage_profile``'s rule)."""
    iv = problem.intervals
    horizon = int(iv[:, 1].max()) if len(iv) else 0
    t = np.arange(horizon)
    return ((iv[:, :1] <= t) & (t < iv[:, 1:])).astype(np.int64)


# -- branch and bound over classes, variable elimination per branch -----------------------------

def branch_and_bound_optimum(pp: PlanningProblem, mesh: MeshSpec, hw: Hardware) -> Optimum:
    """The cheapest choice without a memory limit. A branch pays some classes and forbids
    others; its bound is the pairwise optimum with the forbidden classes' entries priced out,
    plus one start-up per paid class. Where that optimum makes an undecided class, branch on
    it (paid, or forbidden); where it makes none, the bound is its total and the branch is
    solved, unless it pays a class more than once (a chain of dependent collectives: the
    branch may hold a cheaper plan the bound cannot find, ``TooLarge``)."""
    problem = pp.problem
    if problem.usage_limit is not None:
        raise TooLarge("variable elimination ignores the memory limit")
    entries = class_entries(pp, mesh)
    charges = {key: start_up(key, mesh, hw) for key in entries}
    best: Optimum | None = None
    branches = [(frozenset(), frozenset())]                        # (paid, forbidden)
    while branches:
        paid, forbidden = branches.pop()
        pairwise, choice = min_sum(_priced_out(problem, [entries[key] for key in forbidden]))
        if choice is None:
            continue                                               # every choice forbidden
        bound = pairwise + sum(charges[key] for key in paid)
        if best is not None and bound >= best.total * (1 - 1e-12):
            continue
        found = _optimum(pp, choice, mesh, hw)
        if best is None or found.total < best.total:
            best = found
        assert found.classes <= set(entries), (
            f"classes {sorted(found.classes - set(entries))} arise in the plan but not in "
            f"class_entries: it no longer follows latency.combined_ops")
        undecided = sorted(found.classes - paid, key=lambda key: (-charges[key], key))
        if undecided:
            key = undecided[0]
            branches.append((paid, forbidden | {key}))
            branches.append((paid | {key}, forbidden))
        elif found.total > bound * (1 + 1e-9) and bound < best.total * (1 - 1e-12):
            raise TooLarge("a chain of combined ops of one class")
    assert best is not None, "no choice at all"
    return best


def _priced_out(problem: Problem, entries) -> Problem:
    costs = np.array(problem.costs)
    edge_costs = np.array(problem.edge_costs)
    for entry in entries:
        costs[entry.nodes] = np.inf
        edge_costs[entry.edges] = np.inf
    return replace(problem, costs=costs, edge_costs=edge_costs)


def min_sum(problem: Problem) -> tuple[float, np.ndarray | None]:
    """(least Σ node and edge costs, its choice) by variable elimination, eliminating the
    variable whose joint table is smallest first; None where every choice costs infinity.
    Exact (``TooLarge`` where a joint table outgrows ``MAX_TABLE``)."""
    rep, _ = choice_variables(problem)
    k = problem.num_strategies
    factors = [((int(r),), np.zeros(int(k[r]))) for r in np.unique(rep)]
    for i in range(problem.num_nodes):
        factors.append(((int(rep[i]),), problem.node_costs(i).astype(float)))
    for e, (u, v) in enumerate(problem.edges):
        a, b, matrix = int(rep[u]), int(rep[v]), problem.edge_matrix(e)
        factors.append(((a,), np.diagonal(matrix).copy()) if a == b else ((a, b), matrix))
    eliminated = []
    remaining = {int(r) for r in np.unique(rep)}
    while remaining:
        v = min(remaining, key=lambda w: (_joint_size(factors, w, k), w))
        scope, joint = _joint(factors, v, k)
        factors = [f for f in factors if v not in f[0]]
        axis = scope.index(v)
        factors.append((scope[:axis] + scope[axis + 1:], joint.min(axis=axis)))
        eliminated.append((v, scope, joint))
        remaining.discard(v)
    value = float(sum(float(table) for _, table in factors))
    if not np.isfinite(value):
        return value, None
    x: dict[int, int] = {}
    for v, scope, joint in reversed(eliminated):
        at = tuple(slice(None) if w == v else x[w] for w in scope)
        x[v] = int(np.argmin(joint[at]))
    return value, np.array([x[int(r)] for r in rep], np.int64)


def _joint_size(factors, v: int, k: np.ndarray) -> int:
    scope = {w for s, _ in factors if v in s for w in s}
    return int(np.prod([int(k[w]) for w in scope], dtype=object))


def _joint(factors, v: int, k: np.ndarray) -> tuple[tuple[int, ...], np.ndarray]:
    """The sum of the factors that hold ``v``, as one table over the union of their scopes."""
    mine = [f for f in factors if v in f[0]]
    scope = tuple(sorted({w for s, _ in mine for w in s}))
    if _joint_size(factors, v, k) > MAX_TABLE:
        raise TooLarge(f"a joint table over {len(scope)} variables")
    joint = np.zeros([int(k[w]) for w in scope])
    for s, table in mine:
        order = sorted(range(len(s)), key=lambda j: scope.index(s[j]))
        shape = [int(k[w]) if w in s else 1 for w in scope]
        joint = joint + np.transpose(table, order).reshape(shape)
    return scope, joint
