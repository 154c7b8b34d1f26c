"""A small problem with fixed charges, solved exactly by CP-SAT.

A fixed charge (``lp.FixedCharge``) is paid once where any of its entries (node strategies, edge
pairs) is chosen: the start-up latency of one combined collective (passes/latency.py). The
pairwise solvers cannot hold it and the LP with fixed charges is fractional where two classes
can stand in for each other, so on a small problem the planner solves this model instead
(Alpa's ILP, Zheng et al., OSDI 2022, with one boolean per charge):

* one boolean per (node, strategy), exactly one per node, the nodes of a group alike;
* one boolean per pair of an edge that costs something or carries a charge, each row summing
  to its node's boolean and each column to its neighbour's (the local polytope, exact with
  integral variables);
* one boolean per charge, implied by each of its entries; per chain charge, one boolean per
  site and one for the second op, implied by any two sites of which one follows the other;
* a memory limit as one row per time a node starts (the peak is at one of them).

Deterministic: one worker, a fixed seed, and CP-SAT's deterministic time as the budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from ortools.sat.python import cp_model

from autoshard.solver.lp import FixedCharge
from autoshard.solver.problem import FORBIDDEN, Problem

#: Costs are rounded to this fraction of their unit (nanoseconds: to a thousandth).
RESOLUTION = 1e-3


@dataclass(frozen=True)
class ChainCharge:
    """A second charge of a class, paid where two of its ``sites`` (each flat node-strategy
    and flat edge-pair indices) are used and the second depends on the first (``follows``:
    pairs of site positions): XLA cannot combine them into one op. A chain of three pays it
    once, so the model prices chains at or below their cost."""

    cost: float
    sites: tuple[tuple[np.ndarray, np.ndarray], ...]
    follows: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class ChargedSolution:
    """``choice`` (None: no plan within the memory limit was found), its objective with the
    charges, and whether CP-SAT proved it optimal."""

    choice: np.ndarray | None
    objective: float
    optimal: bool


def model_size(problem: Problem) -> int:
    """Booleans the model takes at most: strategies plus every edge pair."""
    return int(problem.num_strategies.sum()) + int(len(problem.edge_costs))


def solve_fixed_charges(problem: Problem, charges: tuple[FixedCharge, ...], *,
                        chains: tuple[ChainCharge, ...] = (),
                        hint: np.ndarray | None = None, exclude: tuple = (),
                        budget: float = 10.0) -> ChargedSolution:
    """The cheapest choice of ``problem`` with ``charges`` paid, within ``budget``
    deterministic units of CP-SAT (``hint``: a plan to start from; ``exclude``: choices the
    model may not return)."""
    model = cp_model.CpModel()
    off, k = problem.offsets, problem.num_strategies
    x = [[model.NewBoolVar("") for _ in range(int(k[i]))] for i in range(problem.num_nodes)]
    for row in x:
        model.AddExactlyOne(row)
    for group in problem.groups:
        for i in group[1:]:
            for a in range(int(k[i])):
                model.Add(x[i][a] == x[group[0]][a])
    terms: list[tuple[cp_model.IntVar, float]] = []
    for i in range(problem.num_nodes):
        for a in range(int(k[i])):
            cost = float(problem.costs[off[i] + a])
            if cost >= FORBIDDEN:
                model.Add(x[i][a] == 0)
            elif cost:
                terms.append((x[i][a], cost))
    charged_pairs = {int(e) for c in charges for e in c.edges} | {
        int(e) for c in chains for _, edges in c.sites for e in edges}
    pair_vars: dict[int, cp_model.IntVar] = {}
    for e, (u, v) in enumerate(problem.edges):
        u, v = int(u), int(v)
        first, last = int(problem.edge_offsets[e]), int(problem.edge_offsets[e + 1])
        m = problem.edge_costs[first:last].reshape(int(k[u]), int(k[v]))
        flat = range(first, last)
        if not m.any() and not charged_pairs.intersection(flat):
            continue
        rows = [[] for _ in range(int(k[u]))]
        cols = [[] for _ in range(int(k[v]))]
        for a in range(int(k[u])):
            for b in range(int(k[v])):
                if m[a, b] >= FORBIDDEN:
                    continue
                y = model.NewBoolVar("")
                pair_vars[first + a * int(k[v]) + b] = y
                rows[a].append(y)
                cols[b].append(y)
                if m[a, b]:
                    terms.append((y, float(m[a, b])))
        for a in range(int(k[u])):
            model.Add(sum(rows[a]) == x[u][a])
        for b in range(int(k[v])):
            model.Add(sum(cols[b]) == x[v][b])
    flat_x = [v for row in x for v in row]
    for charge in charges:
        paid = model.NewBoolVar("")
        terms.append((paid, float(charge.cost)))
        for f in charge.nodes:
            model.AddImplication(flat_x[int(f)], paid)
        for f in charge.edges:
            if int(f) in pair_vars:
                model.AddImplication(pair_vars[int(f)], paid)
    for chain in chains:
        used = []
        for nodes, edges in chain.sites:
            here = model.NewBoolVar("")
            used.append(here)
            for f in nodes:
                model.AddImplication(flat_x[int(f)], here)
            for f in edges:
                if int(f) in pair_vars:
                    model.AddImplication(pair_vars[int(f)], here)
        second = model.NewBoolVar("")
        terms.append((second, float(chain.cost)))
        for a, b in chain.follows:
            model.AddBoolOr([used[a].Not(), used[b].Not(), second])
    if problem.usage_limit is not None:
        _memory_rows(model, problem, flat_x)
    for other in exclude:
        model.Add(sum(x[i][int(a)] for i, a in enumerate(other)) <= problem.num_nodes - 1)
    model.Minimize(sum(int(round(c / RESOLUTION)) * v for v, c in terms))
    if hint is not None:
        for i, row in enumerate(x):
            for a, v in enumerate(row):
                model.AddHint(v, int(hint[i] == a))
    solver = cp_model.CpSolver()
    solver.parameters.num_workers = 1
    solver.parameters.random_seed = 0
    solver.parameters.max_deterministic_time = budget
    status = solver.Solve(model)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return ChargedSolution(None, float("inf"), False)
    choice = np.array([next(a for a, v in enumerate(row) if solver.BooleanValue(v))
                       for row in x], np.int64)
    return ChargedSolution(choice, solver.ObjectiveValue() * RESOLUTION,
                           status == cp_model.OPTIMAL)


def _memory_rows(model: cp_model.CpModel, problem: Problem, flat_x) -> None:
    """``problem.usage_limit`` at every time a node starts (usage_profile's rule)."""
    iv = problem.intervals
    for t in sorted({max(int(s), 0) for s, e in iv if e > s}):
        live = [i for i, (s, e) in enumerate(iv) if s <= t < e]
        row = [(flat_x[int(problem.offsets[i]) + a], int(problem.usages[problem.offsets[i] + a]))
               for i in live for a in range(int(problem.num_strategies[i]))
               if problem.usages[problem.offsets[i] + a]]
        if row:
            model.Add(sum(c * v for v, c in row) <= int(problem.usage_limit))
