"""The start-up latency of combined collectives: one charge per combined op a plan makes.

XLA's combiners merge the independent collectives of one kind over one device group, on one side
of the step (before the forward pass, after the last matmul), into one op that pays its start-up
latency once (problem.py charges each member its bandwidth only). What a plan does pay is one
latency per such op it makes at all, a fixed charge: data parallel's gradient all-reduce pays
it once, a plan that all-gathers parameters, reduce-scatters gradients and all-reduces the loss
pays it three times, which on a latency-bound step (a few microseconds of matmuls against
5-10 us per start-up) decides between them. A fixed charge couples every member, so
the pairwise problem cannot hold it; ``predict`` adds it to the plan it prices, and
``refine_latency`` re-solves with the classes of combined op the plan makes forbidden, all at
once and one at a time, keeping a plan only when it is cheaper with its own fixed charges
counted. The LP can hold it (``lp.FixedCharge``: one variable per class bounding its
members), at several times the simplex's work per iteration; ``search`` solves that LP as
well where the problem is small (``class_entries`` gives its members).

A class is (kind, mesh axes, side); the compiled-program measure (measure/hlo.py) keys
combined collectives the same way. Collectives of one class that depend on each other cannot be
combined: a chain pays one start-up per link (``combined_ops``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from autoshard.cost_model.collectives import collective_latency
from autoshard.cost_model.hardware import Hardware
from autoshard.cost_model.reshard import reshard_steps
from autoshard.ir.mesh import MeshSpec
from autoshard.passes.problem import NS, PlanningProblem, Slot, Transfer
from autoshard.solver.fixed_charge import ChainCharge
from autoshard.solver.lp import FixedCharge
from autoshard.solver.problem import Problem, evaluate

#: Re-solve only when the chosen plan's fixed start-up charges are at least this share of its
#: predicted step (below it, no class is worth a solve).
LATENCY_SHARE = 0.02
#: At most this many re-solves per plan,
MAX_RESOLVES = 12
#: and at most this many strategies summed over them: each is a whole LP solve (about half a
#: second per thousand strategies on one core).
MAX_RESOLVE_WORK = 30_000
#: A re-solve forbids entries by adding this many times the best plan's cost to them.
PENALTY_PLANS = 1.0

ClassKey = tuple[str, tuple[int, ...], str]


def _slot_side(pp: PlanningProblem, slot: Slot) -> str:
    outs = slot.node.outputs if slot.node is not None else ()
    return "head" if outs and all(v.id in pp.head for v in outs) else "tail"


def _transfer_side(pp: PlanningProblem, t: Transfer) -> str:
    return "head" if t.value.id in pp.head else "tail"


def _strategy_classes(slot: Slot, s: int, mesh: MeshSpec, side: str) -> set[ClassKey]:
    return {(kind, tuple(sorted(axes)), side) for kind, axes, nbytes in slot.strategies[s].comm
            if nbytes > 0 and mesh.size(*axes) > 1}


def _step_classes(src, dst, mesh: MeshSpec, side: str, cache: dict) -> set[ClassKey]:
    if dst is None or src == dst:
        return set()
    kinds = cache.get((src, dst))
    if kinds is None:
        kinds = cache[(src, dst)] = frozenset(
            (step.kind, tuple(sorted(step.axes))) for step in reshard_steps(src, dst, mesh)
            if mesh.size(*step.axes) > 1)
    return {(kind, axes, side) for kind, axes in kinds}


def combined_ops(pp: PlanningProblem, choice, mesh: MeshSpec) -> dict[ClassKey, int]:
    """Per class the plan ``choice`` makes, how many combined ops XLA makes of its members.

    XLA's combiners walk the program in order and add each collective to the open op of its
    class unless it depends on a member of that op; then they open a new one. Independent
    collectives (data parallel's gradient all-reduces) become one op; a chain (a per-parameter
    RMS all-reduced after its gradient's all-reduce, as in Adafactor's update clipping) becomes
    one op per link, each paying its start-up latency. The walk below replays that in slot order:
    ``reach[i][k]`` is the newest op of class ``k`` that slot ``i`` depends on."""
    key = ("combined_ops", np.asarray(choice, np.int64).tobytes())
    if key not in pp.memo:
        pp.memo[key] = _combined_ops(pp, choice, mesh)
    return dict(pp.memo[key])


def _combined_ops(pp: PlanningProblem, choice, mesh: MeshSpec) -> dict[ClassKey, int]:
    moves: dict[int, list] = {}
    for t in pp.transfers:
        moves.setdefault(t.consumer, []).append(t)
    inputs: dict[int, set[int]] = {}
    for producer, consumer in pp.links:
        inputs.setdefault(consumer, set()).add(producer)
    opened: dict[ClassKey, int] = {}
    reach: list[dict[ClassKey, int]] = []
    cache: dict = {}

    def join(key: ClassKey, upstream: dict[ClassKey, int]) -> None:
        newest = opened.get(key, 0)
        if newest == 0 or upstream.get(key, 0) >= newest:
            newest = opened[key] = newest + 1
        upstream[key] = newest

    def merge(into: dict[ClassKey, int], other: dict[ClassKey, int]) -> None:
        for key, op in other.items():
            into[key] = max(into.get(key, 0), op)

    for i, slot in enumerate(pp.slots):
        upstream: dict[ClassKey, int] = {}
        for producer in sorted(inputs.get(i, ())):
            if producer < i:
                merge(upstream, reach[producer])
        if slot.source is not None and slot.source < i:
            merge(upstream, reach[slot.source])
        for t in moves.get(i, ()):
            if t.combined and t.producer < i:
                moved = dict(reach[t.producer])
                for key in sorted(_step_classes(pp.source(t, int(choice[t.producer])),
                                                t.required[int(choice[i])], mesh,
                                                _transfer_side(pp, t), cache)):
                    join(key, moved)
                merge(upstream, moved)
        if slot.kind == "op" and slot.combined:
            for key in sorted(_strategy_classes(slot, int(choice[i]), mesh,
                                                _slot_side(pp, slot))):
                join(key, upstream)
        reach.append(upstream)
    # a result's new state moved to where the next step expects its argument (the transfer
    # from a sink back to an earlier input slot): after the result is made
    for t in pp.transfers:
        if t.combined and t.producer > t.consumer:
            moved = dict(reach[t.producer])
            for key in sorted(_step_classes(pp.source(t, int(choice[t.producer])),
                                            t.required[int(choice[t.consumer])], mesh,
                                            _transfer_side(pp, t), cache)):
                join(key, moved)
    return opened


def classes_used(pp: PlanningProblem, choice, mesh: MeshSpec) -> set[ClassKey]:
    """The combined-op classes the plan ``choice`` makes."""
    return set(combined_ops(pp, choice, mesh))


def class_seconds(ops, mesh: MeshSpec, hw: Hardware) -> dict[str, float]:
    """Start-up seconds per collective kind for ``ops``: combined-op classes, each paying once,
    or a mapping from class to its number of combined ops (``combined_ops``)."""
    counts = ops if isinstance(ops, dict) else dict.fromkeys(ops, 1)
    out: dict[str, float] = {}
    for (kind, axes, _), n in counts.items():
        out[kind] = out.get(kind, 0.0) + n * collective_latency(hw, mesh, kind, axes)
    return out


def fixed_seconds(pp: PlanningProblem, choice, mesh: MeshSpec, hw: Hardware) -> float:
    return sum(class_seconds(combined_ops(pp, choice, mesh), mesh, hw).values())


def total_nanoseconds(pp: PlanningProblem, choice, mesh: MeshSpec, hw: Hardware) -> float:
    """The problem's cost of ``choice`` plus its fixed start-up charges (nanoseconds)."""
    return float(evaluate(pp.problem, choice).cost) + fixed_seconds(pp, choice, mesh, hw) * NS


def latency_bound(pp: PlanningProblem, choice, mesh: MeshSpec, hw: Hardware) -> bool:
    """Whether the fixed start-up charges of ``choice`` are at least ``LATENCY_SHARE`` of its
    total: below that, no re-solve for them is worth its time."""
    fixed = fixed_seconds(pp, choice, mesh, hw) * NS
    return fixed >= LATENCY_SHARE * (float(evaluate(pp.problem, choice).cost) + fixed)


@dataclass(frozen=True)
class _Entries:
    """Where one class arises in the problem: flat node-strategy and edge-pair indices."""

    nodes: np.ndarray
    edges: np.ndarray


Site = tuple[str, int]          # ("slot", slot index) or ("transfer", index in pp.transfers)


def class_sites(pp: PlanningProblem, mesh: MeshSpec) -> dict[ClassKey, dict[Site, _Entries]]:
    """Per class and per site (an op slot's own collectives, or one combined transfer), every
    problem entry whose choice makes a collective of that class there."""
    problem = pp.problem
    found: dict[ClassKey, dict[Site, tuple[list[int], list[int]]]] = {}

    def add(key: ClassKey, site: Site, node: int | None = None, edge: int | None = None):
        nodes, edges = found.setdefault(key, {}).setdefault(site, ([], []))
        if node is not None:
            nodes.append(node)
        if edge is not None:
            edges.append(edge)

    for i, slot in enumerate(pp.slots):
        if slot.kind == "op" and slot.combined:
            side = _slot_side(pp, slot)
            for s in range(len(slot.strategies)):
                for key in _strategy_classes(slot, s, mesh, side):
                    add(key, ("slot", i), node=int(problem.offsets[i]) + s)
    edge_index = {(int(u), int(v)): e for e, (u, v) in enumerate(problem.edges)}
    k = problem.num_strategies
    cache: dict = {}
    for n, t in enumerate(pp.transfers):
        if not t.combined:
            continue
        u, c = t.producer, t.consumer
        e = edge_index.get((min(u, c), max(u, c)))
        if e is None:
            continue
        base = int(problem.edge_offsets[e])
        side = _transfer_side(pp, t)
        sources = [pp.source(t, su) for su in range(len(pp.slots[u].strategies))]
        for su, src in enumerate(sources):
            for sc, dst in enumerate(t.required):
                for key in _step_classes(src, dst, mesh, side, cache):
                    add(key, ("transfer", n),
                        edge=int(base + (su * k[c] + sc if u < c else sc * k[u] + su)))
    return {key: {site: _Entries(np.unique(np.array(nodes, np.int64)),
                                 np.unique(np.array(edges, np.int64)))
                  for site, (nodes, edges) in sites.items()}
            for key, sites in found.items()}


def class_entries(pp: PlanningProblem, mesh: MeshSpec) -> dict[ClassKey, _Entries]:
    """Per class, every problem entry whose choice makes a collective of that class."""
    return {key: _Entries(np.unique(np.concatenate([e.nodes for e in sites.values()])),
                          np.unique(np.concatenate([e.edges for e in sites.values()])))
            for key, sites in class_sites(pp, mesh).items()}


def site_order(pp: PlanningProblem) -> Callable[[Site, Site], bool]:
    """``follows(a, b)``: whether a collective at site ``b`` depends on one at site ``a`` (so
    XLA's combiners cannot merge them: ``combined_ops``)."""
    ancestors: list[set[int]] = []
    inputs: dict[int, set[int]] = {}
    for producer, consumer in pp.links:
        if producer < consumer:
            inputs.setdefault(consumer, set()).add(producer)
    for i, slot in enumerate(pp.slots):
        direct = set(inputs.get(i, ()))
        if slot.source is not None and slot.source < i:
            direct.add(slot.source)
        ancestors.append(direct.union(*(ancestors[j] for j in direct)))

    def follows(a: Site, b: Site) -> bool:
        if a[0] == "slot":
            made, strict = a[1], True
        else:
            t = pp.transfers[a[1]]
            if t.producer > t.consumer:     # a result tied back to its argument: nothing after
                return False
            made, strict = t.consumer, False
        if b[0] == "slot":
            return made in ancestors[b[1]] or (not strict and made == b[1])
        at = pp.transfers[b[1]].producer
        return made == at or made in ancestors[at]
    return follows


def fixed_charges(pp: PlanningProblem, mesh: MeshSpec, hw: Hardware
                  ) -> tuple[FixedCharge, ...]:
    """One ``FixedCharge`` per class: its start-up latency (ns), paid once by any member."""
    return tuple(FixedCharge(sum(class_seconds([key], mesh, hw).values()) * NS,
                             entries.nodes, entries.edges)
                 for key, entries in sorted(class_entries(pp, mesh).items()))


def chain_charges(pp: PlanningProblem, mesh: MeshSpec, hw: Hardware) -> tuple[ChainCharge, ...]:
    """One ``ChainCharge`` per class with sites that depend on each other: a second start-up
    where two of them are used (``combined_ops``: a second op)."""
    follows = site_order(pp)
    out = []
    for key, sites in sorted(class_sites(pp, mesh).items()):
        order = sorted(sites)
        pairs = tuple((a, b) for a in range(len(order)) for b in range(len(order))
                      if a != b and follows(order[a], order[b]))
        if pairs:
            out.append(ChainCharge(sum(class_seconds([key], mesh, hw).values()) * NS,
                                   tuple((sites[s].nodes, sites[s].edges) for s in order),
                                   pairs))
    return tuple(out)


def forbid(problem: Problem, entries: list[_Entries], penalty: float) -> Problem:
    """``problem`` with ``penalty`` added to every entry in ``entries``."""
    costs = np.array(problem.costs)
    edge_costs = np.array(problem.edge_costs)
    for entry in entries:
        costs[entry.nodes] += penalty
        edge_costs[entry.edges] += penalty
    return replace(problem, costs=costs, edge_costs=edge_costs)


Solver = Callable[[Problem], "np.ndarray | None"]


def refine_latency(pp: PlanningProblem, choice, mesh: MeshSpec, hw: Hardware, solver: Solver,
                   progress: Callable[[str], None] | None = None
                   ) -> tuple[np.ndarray, tuple[ClassKey, ...]]:
    """A plan no dearer than ``choice`` with fixed start-up charges counted (module docstring),
    and the classes forbidden to find it. Greedy: forbid each class the current plan makes,
    one at a time on top of those already forbidden, and keep the cheapest result while it
    improves; ``solver`` solves a problem (None: no plan fits). Every try is a whole solve, so
    large problems get the all-at-once move only (``MAX_RESOLVE_WORK``)."""
    problem = pp.problem

    def total(c) -> float:
        return total_nanoseconds(pp, c, mesh, hw)

    best = np.asarray(choice, np.int64)
    if not latency_bound(pp, best, mesh, hw):
        return best, ()
    best_total = total(best)
    entries = class_entries(pp, mesh)
    forbidden: tuple[ClassKey, ...] = ()
    # a forbidden entry costs a whole plan more than the best one: never worth taking. Larger
    # penalties make the simplex crawl (badly scaled costs take many more iterations)
    penalty = PENALTY_PLANS * best_total
    resolves = 0
    work = 0
    size = int(problem.num_strategies.sum())        # the work of one re-solve
    while resolves < MAX_RESOLVES:
        used = sorted(key for key in classes_used(pp, best, mesh) - set(forbidden)
                      if key in entries)
        # every class the plan makes at once (a plan of other classes: data parallel's one
        # all-reduce over all axes in place of gathers and scatters over each), then each alone,
        # keeping the cheapest; where the work budget cannot pay for the whole round, the
        # all-at-once move alone, kept if it pays
        everything = [tuple(used)] if len(used) > 1 else []
        alone = [(key,) for key in used]
        # all but one: the plan that keeps a single class (data parallel keeps its gradient
        # all-reduce and drops the gathers and scatters in one move, where each plan between
        # can be dearer, so no one-class move pays)
        but_one = [tuple(k for k in used if k != key) for key in used] if len(used) > 2 else []
        moves = everything + alone + but_one
        if work + size * len(moves) > MAX_RESOLVE_WORK:
            moves = everything + alone
        if work + size * len(moves) > MAX_RESOLVE_WORK:
            moves = everything
            if work + size * len(moves) > MAX_RESOLVE_WORK:
                break
        moves = moves[:MAX_RESOLVES - resolves]
        trials = []
        for move in moves:
            resolves += 1
            work += size
            tried = (*forbidden, *move)
            found = solver(forbid(problem, [entries[k] for k in tried], penalty))
            if progress:
                result = "no plan" if found is None else (
                    f"{total(found) / NS * 1e3:.4f} ms against {best_total / NS * 1e3:.4f}")
                progress(f"start-up latency: re-solved without {_describe_all(move, mesh)}: "
                         f"{result}")
            if found is None or not evaluate(problem, found).feasible:
                continue
            trials.append((total(found), tried, move, np.asarray(found, np.int64)))
        if not trials:
            break
        cost, tried, move, found = min(trials, key=lambda x: x[0])
        if cost >= best_total * (1 - 1e-6):
            break
        if progress:
            progress(f"start-up latency: forbidding {_describe_all(move, mesh)} saves "
                     f"{(best_total - cost) / NS * 1e6:.1f} us")
        best, best_total, forbidden = found, cost, tried
    return best, forbidden


def _describe_all(keys, mesh: MeshSpec) -> str:
    return _describe(keys[0], mesh) if len(keys) == 1 else (
        f"the {len(keys)} combined ops the plan makes")


def _describe(key: ClassKey, mesh: MeshSpec) -> str:
    kind, axes, side = key
    names = ",".join(mesh.axis_names[a] for a in axes)
    where = "before the forward pass" if side == "head" else "after the last matmul"
    return f"combined {kind} over ({names}) {where}"
