"""Seed plans the searched plan must not lose to: replicated, data parallel, fully sharded.

Each seed fixes the arguments' layouts as its rule would (everything whole; the batch split over
every mesh axis; the batch split and the state split over every axis on one dim) and lets every
other choice follow greedily, in program order, the cheapest strategy given the choices already
made (XLA auto-sharding's "follow" strategies, and the plans a practitioner writes first). A seed
is a whole plan priced in the search's own currency (``latency.total_nanoseconds``), so a solver
stopped short, or a latency refinement stuck in a mix of collectives, can be checked against it:
the planner keeps whichever is cheaper and the summary shows the seeds' costs.
"""

from __future__ import annotations

import numpy as np

from autoshard.ir.graph import Graph
from autoshard.ir.mesh import MeshSpec
from autoshard.ir.sharding import ShardingSpec, Split
from autoshard.passes.problem import PlanningProblem
from autoshard.solver.problem import FORBIDDEN

SEEDS = ("replicated", "data parallel", "fully sharded")


def follow(pp: PlanningProblem, fixed: dict[int, int]) -> np.ndarray:
    """A choice with ``fixed`` (slot -> strategy) and every other slot, in order, at a strategy
    that reads each operand in the layout its producer already chose it in, the cheapest such
    (node cost plus the edges to slots chosen before); where none does, the cheapest. Taking
    operands as they are is what keeps a rule's plan a rule's plan: a slice of a whole value is
    free, so the cheapest strategy alone would split the work and gather it again later."""
    problem = pp.problem
    neighbours, moves, spec_id = _follow_context(pp)
    choice = np.full(problem.num_nodes, -1, np.int64)
    for i, s in fixed.items():
        choice[i] = s
    for i in range(problem.num_nodes):
        if choice[i] >= 0:
            continue
        cost = np.array(problem.costs[problem.offsets[i]:problem.offsets[i + 1]], np.float64)
        for j, m in neighbours.get(i, ()):
            if choice[j] >= 0:
                cost = cost + m[:, choice[j]]
        moved = np.zeros(len(cost), bool)
        for t, required in moves.get(i, ()):
            if choice[t.producer] >= 0:
                made = pp.slots[t.producer].strategies[int(choice[t.producer])].outputs[t.output]
                src = spec_id(made) if t.transform is None else spec_id(t.transform(made),
                                                                         held=False)
                moved |= (required >= 0) & (required != src)
        choice[i] = int(np.lexsort((cost, moved, cost >= FORBIDDEN))[0])
    return choice


def _follow_context(pp: PlanningProblem):
    """What ``follow`` needs of ``pp`` whatever is fixed, made once per problem: each slot's
    edge matrices to its neighbours, its incoming transfers with the layouts they require as
    ids (-1: none), and the function giving a layout its id (equal layouts, equal ids; a
    layout ``pp`` holds is looked up by object, as hashing a layout costs more)."""
    if "follow" in pp.memo:
        return pp.memo["follow"]
    problem = pp.problem
    k = problem.num_strategies
    neighbours: dict[int, list[tuple[int, np.ndarray]]] = {}
    for e, (u, v) in enumerate(problem.edges):
        u, v = int(u), int(v)
        m = problem.edge_costs[problem.edge_offsets[e]:problem.edge_offsets[e + 1]].reshape(
            k[u], k[v])
        neighbours.setdefault(u, []).append((v, m))
        neighbours.setdefault(v, []).append((u, m.T))
    ids: dict[ShardingSpec, int] = {}
    by_object: dict[int, int] = {}      # id() of a spec object pp holds -> its id

    def spec_id(spec: ShardingSpec, held: bool = True) -> int:
        if not held:                    # a new object: its id() may be reused once it is gone
            return ids.setdefault(spec, len(ids))
        found = by_object.get(id(spec))
        if found is None:
            found = by_object[id(spec)] = ids.setdefault(spec, len(ids))
        return found

    moves: dict[int, list] = {}
    for t in pp.transfers:
        required = np.array([-1 if r is None else spec_id(r) for r in t.required], np.int64)
        moves.setdefault(t.consumer, []).append((t, required))
    pp.memo["follow"] = neighbours, moves, spec_id
    return pp.memo["follow"]


def _index(strategies, want) -> int | None:
    """The first strategy whose (single) output satisfies ``want``."""
    return next((s for s, st in enumerate(strategies) if want(st.outputs[0])), None)


def _split_over_all(mesh: MeshSpec, dim: int | None):
    """A test of a spec: whole (``dim`` None), or ``dim`` split over every mesh axis."""
    everything = set(range(len(mesh.axis_names)))

    def want(spec: ShardingSpec) -> bool:
        split = {a for a, sbp in enumerate(spec.sbp) if isinstance(sbp, Split)}
        if dim is None:
            return spec.is_replicated
        return split == everything and set(spec.dim_axes(dim)) == everything
    return want


def seed_choices(pp: PlanningProblem, graph: Graph, mesh: MeshSpec,
                 batch_inputs: tuple[int, ...], state_inputs: set[int]) -> dict[str, np.ndarray]:
    """Per seed of ``SEEDS`` its choice, where its rule's argument layouts are in the problem
    (a pinned argument keeps its pin; a batch that no split divides has no data-parallel
    seed)."""
    slots = {}
    for i, value in enumerate(graph.inputs):
        entry = pp.value_slot.get(value.id)
        if entry is not None and pp.slots[entry[0]].kind == "input":
            slots[i] = entry[0]
    replicated = _split_over_all(mesh, None)
    out: dict[str, np.ndarray] = {}
    for seed in SEEDS:
        fixed: dict[int, int] = {}
        ok = True
        for i, slot_index in slots.items():
            strategies = pp.slots[slot_index].strategies
            if len(strategies) == 1:
                continue
            value = graph.inputs[i]
            want = replicated
            if seed != "replicated" and i in batch_inputs and value.ndim:
                want = _split_over_all(mesh, 0)
            elif seed == "fully sharded" and i in state_inputs and value.ndim:
                dims = sorted(range(value.ndim), key=lambda d: -value.shape[d])
                found = next((s for d in dims
                              if (s := _index(strategies, _split_over_all(mesh, d))) is not None),
                             None)
                if found is not None:
                    fixed[slot_index] = found
                continue
            s = _index(strategies, want)
            if s is None and want is not replicated:
                ok = False              # no split over every axis divides the batch
                break
            if s is not None:
                fixed[slot_index] = s
        if ok:
            out[seed] = follow(pp, fixed)
    return out
