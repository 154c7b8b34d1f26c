"""Choose a plan by search: build the strategy problem, solve it, read the plan off the choice.

This is Alpa's intra-operator pass (Zheng et al., OSDI 2022): every op picks a strategy, edges
charge resharding, memory is bounded at every point of the schedule. The local-polytope LP is
solved first, a proven optimum where its solution is integral; where a binding memory budget
makes it fractional, its memory duals price a plan and the combinatorial search checks it. The
LP prices collectives by bandwidth alone, so the plan is then refined for the start-up latency
each combined collective pays once (latency.py; the LP with fixed charges where the problem is
small), checked against seed plans (seeds.py: replicated, data parallel, fully sharded), and,
on a small problem, solved exactly with the start-up charges in the model
(solver/fixed_charge.py). The plan is read off the choice by chosen_plan.py and priced by
prediction/predict.py; a plan that leaves a mesh axis unused is priced against the best one
that uses it (redundant_axes.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from autoshard.cost_model.hardware import Hardware
from autoshard.ir.errors import PlanInfeasibleError
from autoshard.ir.graph import Graph
from autoshard.ir.mesh import MeshSpec
from autoshard.ir.plan import Plan, SolverStats
from autoshard.passes.chosen_plan import plan_from_choice
from autoshard.passes.fusion import made_from_nothing
from autoshard.passes.latency import (PENALTY_PLANS, chain_charges, class_entries,
                                      fixed_charges, forbid, latency_bound, refine_latency,
                                      total_nanoseconds)
from autoshard.passes.pins import Pins
from autoshard.passes.prediction.explain import local_costs
from autoshard.passes.prediction.predict import predict
from autoshard.passes.problem import NS, PlanningProblem, build_problem
from autoshard.passes.redundant_axes import with_redundant_axes
from autoshard.passes.seeds import seed_choices
from autoshard.solver.fixed_charge import model_size, solve_fixed_charges
from autoshard.solver.lp import (MIN_ITERATIONS, LPResult, solve_lagrangian,
                                 solve_local_polytope)
from autoshard.solver.problem import Problem, evaluate
from autoshard.solver.solve import solve

LP_ENGINE = "lp (highs)"
#: A priced plan further than this above the LP bound is checked against the search.
PRICED_GAP = 0.10
#: Without a budget, a replicated-state plan this close to the search's is taken: the two price
#: a gradient all-reduce and its reduce-scatter + all-gather alike, but the latter are two ops
#: and a gathered copy of the state, a difference the prediction does not see.
REPLICATED_STATE_TIE = 0.01
#: A start-up-latency re-solve stops at this multiple of the first LP's simplex iterations.
RESOLVE_ITERATIONS = 1.5
#: The LP with fixed charges is solved for problems up to this many strategies: its extra rows
#: slow every simplex iteration, and a transformer's problem (~14k strategies) runs into the
#: iteration cap or the time limit, fractional, where the small models' (a few thousand) solve
#: in seconds.
FIXED_CHARGE_MAX_STRATEGIES = 10_000
#: Problems of at most this many booleans (strategies and edge pairs) are solved exactly with
#: their start-up charges (solver/fixed_charge.py) after the heuristics, each solve within
#: ``EXACT_BUDGET`` units of CP-SAT's deterministic time (about a second each): the model grows
#: with every edge pair, so past a few dozen ops a solve costs more than the charges it saves.
EXACT_MAX_BOOLEANS = 5_000
EXACT_BUDGET = 2.0
#: A plan whose total with start-up charges is within this share of a lower bound on every
#: plan's total (the LP optimum by bandwidth alone, or the LP with fixed charges) is taken at
#: once: the latency refinement, the replicated-state re-solve and the exact solve below can
#: find no plan cheaper by more (on the small test models they took most of a plan's seconds).
BOUND_MET = 5e-4
#: At most this many exact solves per plan (each after the last made a chain of one class).
EXACT_ROUNDS = 8


def search_plan(graph: Graph, mesh: MeshSpec, hw: Hardware, pins: Pins, *, in_tree, out_tree,
                donated: set[int], updated: dict[int, int], memory_budget: int | None,
                time_limit: float, progress: Callable[[str], None] | None = None,
                batch_inputs: tuple[int, ...] | None = None) -> Plan:
    """Plan ``graph``: the local-polytope LP first (solver/lp.py); when its optimum is integral it
    is a proven optimal plan; when a memory limit makes it fractional, the LP priced by its
    memory duals (``solve_lagrangian``), and the combinatorial search (solve.py) as well when
    that plan is more than ``PRICED_GAP`` above the LP bound or none fits, keeping the cheaper.
    The LP optimum is the lower bound the gap is reported against.

    With ``batch_inputs`` (flat positions of the batch arguments), a plan that leaves a mesh
    axis unused is priced against the best plan that splits the batch over it, solved the
    same way (redundant_axes.py); a plan that uses every axis is returned as solved."""
    def solve_with(these_pins: Pins):
        return _search_once(graph, mesh, hw, these_pins, in_tree=in_tree, out_tree=out_tree,
                            donated=donated, updated=updated, memory_budget=memory_budget,
                            time_limit=time_limit, progress=progress,
                            batch_inputs=tuple(batch_inputs or ()))

    found = solve_with(pins)
    if batch_inputs is None:
        return found[0]
    return with_redundant_axes(found, graph, mesh, pins, tuple(batch_inputs), solve_with,
                               progress)


def _search_once(graph: Graph, mesh: MeshSpec, hw: Hardware, pins: Pins, *, in_tree, out_tree,
                 donated: set[int], updated: dict[int, int], memory_budget: int | None,
                 time_limit: float, progress: Callable[[str], None] | None = None,
                 batch_inputs: tuple[int, ...] = ()):
    """(plan, planning problem, choice) of ``search_plan``'s solve under ``pins``: the
    solvers' plan, or a seed plan (seeds.py) where one is cheaper in the same currency."""
    pp = build_problem(graph, mesh, hw, pins, donated=donated, updated=updated,
                       usage_limit=memory_budget)
    problem = pp.problem
    if progress:
        progress(f"{problem.num_nodes} choices, {int(problem.num_strategies.sum())} strategies, "
                 f"{problem.num_edges} edges; solving the LP relaxation")
    start = time.perf_counter()
    choice, stats = solve_plan_problem(problem, time_limit, progress)
    refined_by_lp = stats.engine == LP_ENGINE
    # a variant of the LP is the same LP with some costs raised or rows added: one that takes
    # many times the first solve's iterations is degenerate and given up (at the full cap such
    # a variant can run for minutes for no plan) (a plan of the search, whose stats hold no LP
    # iterations, gets the floor)
    caps = _Caps.of(stats.details)

    def resolve(variant: Problem):
        # the LP alone: re-solving where it is fractional (a binding budget) takes the
        # memory-priced LPs and the combinatorial search, minutes on a large model
        # (solved as the first LP was: without the memory rows where it was, kept if it fits)
        budget_free = stats.details.get("budget_free", False)
        lp = solve_local_polytope(replace(variant, usage_limit=None) if budget_free else variant,
                                  time_limit=time_limit, max_iterations=caps.resolve)
        fits = lp.integral and (not budget_free or evaluate(variant, lp.choice).feasible)
        return lp.choice if fits else None

    # the seeds are priced once, for the bound check and for the check against the plan found
    seeds = priced_seeds(pp, graph, mesh, hw, batch_inputs, set(updated.values()))
    # the LP with fixed charges, where _bound_met solved it, is not solved again below
    met, fixed_lp = _bound_met(pp, mesh, hw, choice, stats, seeds, time_limit, caps,
                               progress) if refined_by_lp else (None, None)
    if met is not None:
        choice, stats = met
    else:
        refined, forbidden = (refine_latency(pp, choice, mesh, hw, resolve, progress)
                              if refined_by_lp else (choice, ()))
        # on every path: a plan of the memory-priced LPs or the search is priced by bandwidth as
        # much as the first LP's, and a latency-bound step under a budget gains as much from the
        # fixed charges
        refined, forbidden = _fixed_charge_plan(pp, mesh, hw, (refined, forbidden), time_limit,
                                                caps.charged, progress, solved=fixed_lp)
        if refined_by_lp and memory_budget is None:
            refined, forbidden = _replicated_state_seed(pp, graph, updated, mesh, hw, resolve,
                                                        (refined, forbidden), progress)
        if forbidden:
            cost = evaluate(problem, refined).cost
            bound = stats.bound
            choice = refined
            stats = replace(stats, seconds=time.perf_counter() - start, objective=cost / NS,
                            status="feasible", gap=None if bound is None or not cost else
                            max(0.0, (cost - bound * NS) / cost),
                            details=dict(stats.details, latency_forbidden=[
                                key if isinstance(key, str) else " ".join(map(str, key))
                                for key in forbidden]))
    choice = least_held_free_layouts(pp, choice)
    choice, stats = _against_seeds(pp, mesh, hw, choice, stats, seeds, progress)
    if met is None:
        choice, stats = _exact_when_small(pp, mesh, hw, choice, stats, progress)
    prediction = predict(pp, choice, mesh, hw, memory_budget)
    if memory_budget is not None:
        # the peak the budget constraint saw (below the predicted peak, which adds the buffers
        # resharding makes and the allocator's holes): a caller that finds the compiled program
        # over budget scales this one down, or the same plan fits the next budget again
        stats = replace(stats, details=dict(
            stats.details, constrained_peak=int(evaluate(problem, choice).peak_usage)))
    plan = plan_from_choice(pp, choice, graph, mesh, in_tree=in_tree, out_tree=out_tree,
                            pins=pins, prediction=prediction, solver=stats, hw=hw)
    return plan, pp, choice


@dataclass(frozen=True)
class _Caps:
    """Simplex iteration caps of the LP variants a solve runs: ``resolve`` for those that are
    eliminated as the first LP was (no memory rows, no charges), ``charged`` for the LP with
    fixed charges, solved whole."""

    resolve: int
    charged: int

    @classmethod
    def of(cls, details: dict) -> _Caps:
        """From the first LP's ``lp_iterations`` and ``lp_whole_iterations`` (where it was
        solved): ``RESOLVE_ITERATIONS`` times each, at least ``MIN_ITERATIONS``; the LP with
        fixed charges is solved whole, so its cap scales with the whole LP's iterations."""
        def cap(iterations) -> int:
            return int(max(MIN_ITERATIONS, RESOLVE_ITERATIONS * iterations)) if iterations \
                else MIN_ITERATIONS
        resolve = cap(details.get("lp_iterations"))
        whole = details.get("lp_whole_iterations")
        return cls(resolve, cap(whole) if whole else resolve)


def _bound_met(pp: PlanningProblem, mesh: MeshSpec, hw: Hardware, choice, stats: SolverStats,
               seeds: dict[str, tuple[np.ndarray, float]], time_limit: float,
               caps: _Caps, progress):
    """((choice, stats) or None, the LP with fixed charges where it was solved): a plan whose
    total with start-up charges is within ``BOUND_MET`` of a lower bound on every plan's
    total, where one is; tried only where the LP's plan is latency bound (elsewhere nothing
    is refined). In order of cost: the LP's own plan and the seed plans (``priced_seeds``)
    against the LP optimum (every plan's total is its bandwidth cost plus nonnegative charges,
    so the LP that prices bandwidth alone bounds it); then against the bounds of
    ``_latency_bounds``, with those LPs' plans."""
    problem = pp.problem
    if stats.bound is None or stats.status != "optimal" or not latency_bound(pp, choice, mesh,
                                                                            hw):
        return None, None       # where the LP's plan is not latency bound, nothing is refined
    fixed_lp = None
    candidates = {"LP": np.asarray(choice, np.int64)}
    totals = {"LP": total_nanoseconds(pp, choice, mesh, hw)}
    for name, (seed, total) in seeds.items():
        candidates[f"{name} seed"], totals[f"{name} seed"] = seed, total
    name = min(totals, key=lambda k: (totals[k], k != "LP"))
    bound = stats.bound * NS
    if totals[name] > bound * (1 + BOUND_MET):
        more, fixed_lp = _latency_bounds(pp, mesh, hw, totals[name], bound, time_limit, caps)
        for other, (other_choice, other_bound) in more.items():
            bound = max(bound, other_bound)
            if other_choice is not None:
                candidates[other] = other_choice
                totals[other] = total_nanoseconds(pp, other_choice, mesh, hw)
        name = min(totals, key=lambda k: (totals[k], k != "LP"))
    total = totals[name]
    if total > bound * (1 + BOUND_MET):
        if progress:
            progress(f"start-up latency: the best plan so far ({name}, "
                     f"{total / NS * 1e3:.4f} ms) against the bound {bound / NS * 1e3:.4f} ms; "
                     "refining")
        return None, fixed_lp
    if progress:
        progress(f"start-up latency: the plan of the {name} ({total / NS * 1e3:.4f} ms) is "
                 f"within {BOUND_MET:.2%} of the bound {bound / NS * 1e3:.4f} ms; taken")
    cost = float(evaluate(problem, candidates[name]).cost)
    gap = max(0.0, (total - bound) / total) if total else 0.0
    return (candidates[name], replace(
        stats, objective=cost / NS, status="optimal", gap=gap,
        details=dict(stats.details, bound_met=f"the plan of the {name}, "
                                              f"{gap:.2%} above the bound"))), fixed_lp


def _latency_bounds(pp: PlanningProblem, mesh: MeshSpec, hw: Hardware, best_total: float,
                    lp_bound: float, time_limit: float, caps: _Caps):
    """({name: (plan or None, lower bound on every plan's total)}, the LP with fixed charges'
    result where solved) of two LPs that count start-up latency: on a small problem
    (``FIXED_CHARGE_MAX_STRATEGIES``) the LP with fixed charges, its plan where integral; on
    any, the LP with every entry that makes a combined collective forbidden, whose optimum
    bounds the plans that make none, while a plan that makes one pays at least the LP bound
    plus the cheapest start-up charge (on a latency-bound step the replicated plan meets that
    bound where the first LP's is far below it)."""
    problem = pp.problem
    charges = fixed_charges(pp, mesh, hw)
    out, lp = {}, None
    if not charges:
        return out, lp
    if int(problem.num_strategies.sum()) <= FIXED_CHARGE_MAX_STRATEGIES:
        lp = _fixed_charge_lp(pp, charges, time_limit, caps.charged)
        if lp.status == "optimal":
            fits = lp.integral and evaluate(problem, lp.choice).feasible
            out["LP with fixed charges"] = (
                np.asarray(lp.choice, np.int64) if fits else None, lp.objective)
    with_one = lp_bound + min(c.cost for c in charges)
    if best_total > with_one * (1 + BOUND_MET):
        return out, lp          # no bound this LP gives can be met: not worth its solve
    quiet = solve_local_polytope(
        forbid(problem, list(class_entries(pp, mesh).values()), PENALTY_PLANS * best_total),
        time_limit=time_limit, max_iterations=caps.resolve * _budget_iterations(problem))
    if quiet.status == "optimal":
        fits = quiet.integral and evaluate(problem, quiet.choice).feasible
        out["LP without combined collectives"] = (
            np.asarray(quiet.choice, np.int64) if fits else None,
            min(quiet.objective, with_one))
    return out, lp


def priced_seeds(pp: PlanningProblem, graph: Graph, mesh: MeshSpec, hw: Hardware,
                 batch_inputs: tuple[int, ...], state_inputs: set[int]
                 ) -> dict[str, tuple[np.ndarray, float]]:
    """Each seed plan (seeds.py) that fits, with its total (``total_nanoseconds``)."""
    out = {}
    for name, seed in seed_choices(pp, graph, mesh, batch_inputs, state_inputs).items():
        if evaluate(pp.problem, seed).feasible:
            out[name] = (np.asarray(seed, np.int64), total_nanoseconds(pp, seed, mesh, hw))
    return out


def _against_seeds(pp: PlanningProblem, mesh: MeshSpec, hw: Hardware, choice,
                   stats: SolverStats, seeds: dict[str, tuple[np.ndarray, float]], progress):
    """(choice, stats): the plan found, or the cheapest of ``seeds`` (``priced_seeds``) where
    it costs less with start-up charges counted; ``stats.details["seeds"]`` holds every fitting
    seed's cost (seconds) for the summary, and ``"seed_taken"`` the seed that replaced the
    plan."""
    problem = pp.problem
    own = total_nanoseconds(pp, choice, mesh, hw)
    totals = {name: total for name, (_, total) in seeds.items()}
    taken = None
    for name, (seed, total) in seeds.items():
        if total < own * (1 - 1e-9) and (taken is None or total < totals[taken[0]]):
            taken = (name, seed)
    details = dict(stats.details, seeds={name: t / NS for name, t in totals.items()})
    if taken is None:
        return choice, replace(stats, details=details)
    name, seed = taken
    if progress:
        progress(f"the {name} seed: {totals[name] / NS * 1e3:.4f} ms against the solver's "
                 f"{own / NS * 1e3:.4f}; taken")
    cost = float(evaluate(problem, seed).cost)
    bound = stats.bound
    return np.asarray(seed, np.int64), replace(
        stats, objective=cost / NS, status="feasible",
        gap=None if bound is None or not cost else max(0.0, (cost - bound * NS) / cost),
        details=dict(details, seed_taken=name))


def _exact_when_small(pp: PlanningProblem, mesh: MeshSpec, hw: Hardware, choice,
                      stats: SolverStats, progress):
    """(choice, stats): on a problem of at most ``EXACT_MAX_BOOLEANS``, the optimum with every
    class's start-up charge in the model (solver/fixed_charge.py), where it is cheaper than
    ``choice`` by ``total_nanoseconds``; the heuristics above (latency refinement, the LP with
    fixed charges rounded, seeds) can each stop above it. The model charges a class once where
    a chain of its collectives pays once per link, so a plan it finds with a chain is priced in
    full and excluded, and the next solved, until the model's optimum is priced exactly or
    costs no less than the best plan (``EXACT_ROUNDS``). ``details["exact"]`` says whether
    that proved the plan optimal."""
    problem = pp.problem
    if model_size(problem) > EXACT_MAX_BOOLEANS:
        return choice, stats
    own = total_nanoseconds(pp, choice, mesh, hw)
    # a plan that keeps the state replicated is kept within REPLICATED_STATE_TIE of a cheaper
    # one (_replicated_state_seed says why)
    margin = REPLICATED_STATE_TIE if "replicated state" in (
        stats.details.get("latency_forbidden") or ()) else 1e-9
    charges, chains = fixed_charges(pp, mesh, hw), chain_charges(pp, mesh, hw)
    # the model rounds each cost to RESOLUTION: its objective may miss a total by that much
    # per term, far less than one start-up charge
    slack = 1e-4
    found, total, excluded, proven = None, own * (1 - margin), [], False
    for _ in range(EXACT_ROUNDS):
        solution = solve_fixed_charges(problem, charges, chains=chains,
                                       hint=choice if found is None else found,
                                       exclude=tuple(excluded), budget=EXACT_BUDGET)
        if solution.choice is None or not solution.optimal:
            break
        if solution.objective >= total * (1 - slack):
            proven = True               # no plan the model prices below the best one
            break
        priced = total_nanoseconds(pp, solution.choice, mesh, hw)
        if priced < total and evaluate(problem, solution.choice).feasible:
            found, total = solution.choice, priced
        if priced <= solution.objective * (1 + slack):
            proven = True               # the model priced it in full
            break
        # a chain of three or more collectives of one class (one op per link,
        # latency.combined_ops), which the model charges twice: the next plan, without it
        excluded.append(solution.choice)
    details = dict(stats.details, exact="optimal" if proven else "stopped")
    if found is None:
        return choice, replace(stats, details=details)
    if progress:
        progress(f"start-up latency: the exact model with fixed charges: "
                 f"{total / NS * 1e3:.4f} ms against {own / NS * 1e3:.4f}; taken")
    cost = float(evaluate(problem, found).cost)
    bound = stats.bound
    details.pop("seed_taken", None)
    return np.asarray(found, np.int64), replace(
        stats, objective=cost / NS, status="feasible",
        gap=None if bound is None or not cost else max(0.0, (cost - bound * NS) / cost),
        details=dict(details, latency_forbidden=["exact fixed start-up charges"]))


def least_held_free_layouts(pp: PlanningProblem, choice) -> np.ndarray:
    """``choice`` with each value made from nothing (``fusion.made_from_nothing``) in the
    layout that holds least among those its readers' layouts make equally cheap. Its layouts
    cost no time, so the solvers pick among them arbitrarily: a loss gradient's broadcast of
    zeros left replicated, which its scatter reads split, counts whole in the predicted peak
    where XLA holds a slice. A pass after the solve, not a tie-break in the costs: tiny ties on
    every broadcast make the LP degenerate (HiGHS reported a budgeted one unbounded)."""
    problem = pp.problem
    choice = np.array(choice, np.int64)
    local = local_costs(problem, choice)
    for i, slot in enumerate(pp.slots):
        if slot.kind != "op" or not made_from_nothing(slot.node):
            continue
        costs = local[problem.offsets[i]:problem.offsets[i + 1]]
        tied = np.flatnonzero(costs <= costs[choice[i]] + 1e-9 * max(1.0, abs(costs[choice[i]])))
        choice[i] = int(tied[np.argmin(slot.usages[tied])])
    return choice


def _fixed_charge_plan(pp: PlanningProblem, mesh: MeshSpec, hw: Hardware, found,
                       time_limit: float, max_iterations: int, progress,
                       solved: LPResult | None = None):
    """``found`` (choice, forbidden classes), or the optimum of the LP in which each class of
    combined op pays its start-up latency once (``FixedCharge``; rounded where fractional)
    where that fits and is cheaper with the fixed charges counted. ``refine_latency`` only
    forbids classes the plan makes, one move at a time, so it cannot reach a plan of other
    classes that is cheaper only once their latency is counted (on a latency-bound step it can
    stop at three combined ops over the whole mesh, dearer than Megatron's plan, where this LP
    finds one cheaper than both). Solved only where the start-up charges are at least
    ``LATENCY_SHARE`` of the step, and for small problems (``FIXED_CHARGE_MAX_STRATEGIES``)."""
    choice, forbidden = found
    problem = pp.problem
    if not latency_bound(pp, choice, mesh, hw) or \
            int(problem.num_strategies.sum()) > FIXED_CHARGE_MAX_STRATEGIES:
        return found
    lp = solved if solved is not None else _fixed_charge_lp(pp, fixed_charges(pp, mesh, hw),
                                                            time_limit, max_iterations)
    fits = lp.status == "optimal" and evaluate(problem, lp.choice).feasible
    base = total_nanoseconds(pp, choice, mesh, hw)
    # its argmax rounding where fractional: a plan like any other, priced the same way
    total = total_nanoseconds(pp, lp.choice, mesh, hw) if fits else float("inf")
    cheaper = total < base * (1 - 1e-6)
    if progress:
        progress(f"start-up latency: the LP with fixed charges: {lp.status}" + (
            f", {'integral' if lp.integral else 'rounded'} {total / NS * 1e3:.4f} ms against "
            f"{base / NS * 1e3:.4f}" if fits else ", no plan") + ("; taken" if cheaper else ""))
    if not cheaper:
        return found
    return np.asarray(lp.choice, np.int64), forbidden or ("fixed start-up charges",)


def _budget_iterations(problem: Problem) -> int:
    """The multiple of a re-solve's iteration cap a budgeted problem's latency LPs get: under
    a budget the greedy walk has no replicated-state seed to fall back on."""
    return 1 if problem.usage_limit is None else 4


def _fixed_charge_lp(pp: PlanningProblem, charges, time_limit: float,
                     max_iterations: int) -> LPResult:
    """The LP with each class's start-up charge in its objective (its rows make each simplex
    iteration several times slower than the plain LP's)."""
    return solve_local_polytope(pp.problem, time_limit=time_limit, charges=charges,
                                max_iterations=max_iterations * _budget_iterations(pp.problem))


def _replicated_state_seed(pp: PlanningProblem, graph: Graph, updated: dict[int, int],
                           mesh: MeshSpec, hw: Hardware, resolve, found, progress):
    """``found`` (choice, forbidden classes), or the plan that keeps the state (the arguments
    the step updates) replicated, refined for start-up latency, where that is cheaper with the
    fixed charges counted, or within ``REPLICATED_STATE_TIE`` of it.

    The LP prices collectives by bandwidth and leaves the latency of each combined op to
    ``refine_latency``, a greedy walk that can stop in a mix of gathers, scatters and
    reductions where data parallel's single all-reduce is cheaper, predicted and measured
    alike. Solved only where the latency refinement ran (start-up charges at least
    ``LATENCY_SHARE`` of the step) and without a memory budget (replicated state is the plan a
    budget rules out)."""
    choice, forbidden = found
    if not latency_bound(pp, choice, mesh, hw):
        return found
    problem = pp.problem
    base = total_nanoseconds(pp, choice, mesh, hw)
    costs = np.array(problem.costs)
    penalty = PENALTY_PLANS * base
    pinned = 0
    for i in sorted(set(updated.values())):
        slot_index = pp.value_slot.get(graph.inputs[i].id, (None,))[0]
        if slot_index is None:
            continue
        whole = [st.outputs[0].is_replicated for st in pp.slots[slot_index].strategies]
        if any(whole) and not all(whole):
            first = int(problem.offsets[slot_index])
            costs[first:first + len(whole)] += np.where(whole, 0.0, penalty)
            pinned += 1
    if not pinned:
        return found
    seeded = resolve(replace(problem, costs=costs))
    if seeded is None or not evaluate(problem, seeded).feasible:
        return found
    seeded, seeded_forbidden = refine_latency(pp, seeded, mesh, hw, resolve, progress)
    seeded_total = total_nanoseconds(pp, seeded, mesh, hw)
    cheaper = seeded_total < base * (1 + REPLICATED_STATE_TIE)
    if progress:
        progress(f"replicated state: {seeded_total / NS * 1e3:.4f} ms against "
                 f"{base / NS * 1e3:.4f}; " + ("planning the state replicated" if cheaper
                                               else "kept the search's plan"))
    if not cheaper:
        return found
    # named even where its refinement forbade classes: _exact_when_small keeps such a plan
    # within REPLICATED_STATE_TIE, whichever classes it avoids
    return np.asarray(seeded, np.int64), (*seeded_forbidden, "replicated state")


def solve_plan_problem(problem: Problem, time_limit: float,
                       progress: Callable[[str], None] | None = None):
    """(choice, SolverStats) of ``problem`` by ``search_plan``'s solver sequence."""
    start = time.perf_counter()
    lp, budget_free = None, False
    if problem.usage_limit is not None:
        # the optimum without the budget, where it fits, is the optimum with it, and the LP
        # without memory rows is many times faster (seconds, where with them a large model's
        # LP can reach the time limit without a bound)
        free = solve_local_polytope(replace(problem, usage_limit=None), time_limit=time_limit)
        fits = free.integral and evaluate(problem, free.choice).feasible
        if progress:
            progress(f"LP relaxation without the memory budget: {free.status} in "
                     f"{free.seconds:.1f}s, " + ("integral and within the budget" if fits else
                                                 "not a plan within the budget"))
        if fits:
            lp, budget_free = free, True
    if lp is None:
        lp = solve_local_polytope(problem, time_limit=time_limit)
        if progress:
            progress(f"LP relaxation: {lp.status} in {lp.seconds:.1f}s "
                     f"({lp.iterations:,} simplex iterations), "
                     f"{'integral' if lp.integral else 'fractional'}, bound "
                     f"{lp.objective / NS * 1e3:.3f} ms")
    if lp.integral:
        choice = lp.choice
        cost = evaluate(problem, choice).cost
        stats = SolverStats(LP_ENGINE, problem.num_nodes, problem.num_edges,
                            int(problem.num_strategies.sum()), time.perf_counter() - start,
                            cost / NS, lp.objective / NS, 0.0, "optimal",
                            {"lp_variables": lp.variables, "lp_iterations": lp.iterations,
                             "lp_whole_iterations": lp.whole_iterations,
                             "groups": len(problem.groups),
                             "budget_free": budget_free})
    else:
        priced = solve_lagrangian(problem, lp, time_limit=time_limit, progress=progress) \
            if lp.status == "optimal" and problem.usage_limit is not None else None
        stats = None
        if priced is not None:
            choice, solves = priced
            cost = evaluate(problem, choice).cost
            stats = SolverStats("lp + memory prices (highs)", problem.num_nodes,
                                problem.num_edges, int(problem.num_strategies.sum()),
                                time.perf_counter() - start, cost / NS, lp.objective / NS,
                                max(0.0, (cost - lp.objective) / cost) if cost else 0.0,
                                "feasible", {"lp_variables": lp.variables,
                                             "lp_iterations": lp.iterations,
                                             "groups": len(problem.groups),
                                             "priced_lp_solves": solves})
        if stats is None or (stats.gap or 0.0) > PRICED_GAP:
            # uniformly scaled prices jump between very lean and over-budget plans on some
            # problems (a budgeted GPT's priced plan can cost several times the LP bound, where
            # the search finds one far cheaper): search as well and keep the cheaper plan
            if progress:
                progress("searching" if stats is None else
                         f"searching (the priced plan is {stats.gap:.0%} above the LP bound)")
            try:
                # twice the per-solve limit: CP-SAT needs it on these problems (its plan keeps
                # improving past the per-solve limit)
                # CP-SAT only: toulbar2 with every memory row stated found no better plan on
                # the plan-quality rows and its preprocessing of a core with many memory rows
                # takes tens of seconds; it has not been tried with the lazy memory rows
                solution = solve(problem, time_limit=2 * time_limit if stats else time_limit,
                                 deterministic=True, progress=progress, toulbar2=False)
            except PlanInfeasibleError:
                if stats is None:
                    raise
                solution = None            # the priced plan fits; the search found none
            if solution is not None and (stats is None or solution.cost < stats.objective * NS):
                choice = np.asarray(solution.choice, np.int64)
                bound = solution.lower_bound
                if lp.status == "optimal":
                    bound = max(bound or 0.0, lp.objective)
                gap = None if bound is None or solution.cost == 0 else max(
                    0.0, (solution.cost - bound) / solution.cost)
                stats = SolverStats(
                    str(solution.stats.get("engine", "search")), problem.num_nodes,
                    problem.num_edges, int(problem.num_strategies.sum()),
                    time.perf_counter() - start, solution.cost / NS,
                    None if bound is None else bound / NS, gap, solution.status,
                    dict(solution.stats, lp_seconds=lp.seconds, lp_status=lp.status,
                         time_limit_reached=solution.status != "optimal"))
    return np.asarray(choice, np.int64), stats
