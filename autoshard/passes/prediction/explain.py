"""Why a plan chose what it did: per op, the chosen strategy and the cheapest rejected ones,
each priced with every other choice held fixed and split into compute, the op's own
collectives and resharding in / out, and the collectives the choice causes. The viewer and
``autoshard.dump`` show it; ``local_costs`` (the objective's share of each strategy under a
fixed choice elsewhere) also settles ties after the solve and prices annotations.
"""

from __future__ import annotations

import numpy as np

from autoshard.cost_model.collectives import collective_time
from autoshard.cost_model.hardware import Hardware
from autoshard.cost_model.reshard import reshard_affine, reshard_steps
from autoshard.ir.mesh import MeshSpec
from autoshard.ir.plan import CollectiveCause, NodeExplanation, StrategyCost
from autoshard.passes.problem import NS, PlanningProblem, Slot, Transfer
from autoshard.solver.problem import FORBIDDEN, Problem

#: Rejected strategies an op's explanation keeps, cheapest first.
REJECTED_KEPT = 3


def local_costs(problem: Problem, choice) -> np.ndarray:
    """Per flat strategy entry: its node cost plus each incident edge's cost against the
    neighbour's chosen strategy, i.e. what the objective's share of that node would be if it
    alone switched (row ``choice[v]`` / column ``choice[u]`` of every edge matrix, gathered
    without a Python loop)."""
    choice = np.asarray(choice, np.int64)
    k, offsets = problem.num_strategies, problem.offsets
    local = np.array(problem.costs, np.float64)
    if problem.num_edges:
        u, v = problem.edges[:, 0], problem.edges[:, 1]
        start = problem.edge_offsets[:-1]
        e, s = _ragged(k[u])       # entry (s, choice[v]) of edge e, for u's strategies s
        np.add.at(local, offsets[u[e]] + s,
                  problem.edge_costs[start[e] + s * k[v[e]] + choice[v[e]]])
        e, s = _ragged(k[v])       # entry (choice[u], s), for v's strategies s
        np.add.at(local, offsets[v[e]] + s,
                  problem.edge_costs[start[e] + choice[u[e]] * k[v[e]] + s])
    return local


def _ragged(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row, position within row) for every entry of rows of the given lengths."""
    rows = np.repeat(np.arange(len(lengths)), lengths)
    return rows, np.arange(len(rows)) - np.repeat(np.cumsum(lengths) - lengths, lengths)


def explain(pp: PlanningProblem, choice, mesh: MeshSpec, hw: Hardware,
            keep: int = REJECTED_KEPT) -> dict[int, NodeExplanation]:
    """Per op node id: the chosen strategy and the ``keep`` cheapest rejected ones, each split
    into compute, own collectives and resharding in / out with every other choice fixed, and
    the collectives the choice causes. Linear in slots + edges; about 1% of planning time."""
    problem = pp.problem
    local = local_costs(problem, choice)
    into: dict[int, list[Transfer]] = {}
    for t in pp.transfers:
        into.setdefault(t.consumer, []).append(t)

    prices = _Prices(mesh, hw)
    table = {}
    for i, slot in enumerate(pp.slots):
        if slot.kind != "op":
            continue
        first = int(problem.offsets[i])
        here = local[first:first + len(slot.strategies)]
        c = int(choice[i])
        incoming = [(t, pp.source(t, choice[t.producer])) for t in into.get(i, ())]
        rejected = [int(s) for s in np.argsort(here, kind="stable")[:keep + 1]
                    if s != c and here[s] < FORBIDDEN][:keep]
        priced = [prices.price(slot, s, float(problem.costs[first + s]), float(here[s]),
                               incoming) for s in (c, *rejected)]
        table[slot.node.id] = NodeExplanation(priced[0], tuple(priced[1:]),
                                              _causes(slot, c, incoming, mesh),
                                              len(slot.strategies))
    return table


class _Prices:
    """Prices strategies for ``explain``; memoizes per layout pair and per strategy, as the
    layers of a model repeat the same few (the cost model's own caches hash the hardware
    profile on every call)."""

    def __init__(self, mesh: MeshSpec, hw: Hardware):
        self.mesh, self.hw = mesh, hw
        self.affine: dict = {}
        self.own: dict = {}

    def price(self, slot: Slot, s: int, node_ns: float, local_ns: float, incoming
              ) -> StrategyCost:
        strategy = slot.strategies[s]
        key = (id(strategy), slot.combined)      # strategies live as long as the problem
        own = self.own.get(key)
        if own is None:
            own = self.own[key] = (strategy.describe(self.mesh), sum(
                collective_time(self.hw, self.mesh, kind, nbytes, axes,
                                latency=not slot.combined)
                for kind, axes, nbytes in strategy.comm))
        label, comm = own[0], own[1] * slot.times
        reshard_in = 0.0
        for t, src in incoming:
            dst = t.required[s]
            if dst is not None and src != dst:
                pair = self.affine.get((src, dst))
                if pair is None:
                    pair = self.affine[(src, dst)] = reshard_affine(self.hw, self.mesh, src, dst)
                fixed, slope = pair
                reshard_in += ((0.0 if t.combined else fixed) + slope * t.value.nbytes) * t.times
        node = node_ns / NS
        return StrategyCost(label, strategy.inputs, strategy.outputs, max(node - comm, 0.0), comm,
                            reshard_in, max(local_ns / NS - node - reshard_in, 0.0))


def _causes(slot: Slot, c: int, incoming, mesh: MeshSpec) -> tuple[CollectiveCause, ...]:
    names = mesh.axis_names
    strategy = slot.strategies[c]
    found = [CollectiveCause(kind, tuple(names[a] for a in axes), nbytes, slot.times,
                             "strategy") for kind, axes, nbytes in strategy.comm]
    for t, src in incoming:
        dst = t.required[c]
        if dst is None:
            continue
        label = f"reshards operand %{t.value.id}{' ' + t.value.name if t.value.name else ''}"
        found += [CollectiveCause(step.kind, tuple(names[a] for a in step.axes),
                                  step.factor * t.value.nbytes, t.times, label)
                  for step in reshard_steps(src, dst, mesh)]
    return tuple(found)
