"""Build the strategy selection problem of a graph: one problem node per choice the plan makes,
one edge per operand costing ``reshard_time`` (nanoseconds of one device) from the producer's
layout to the one the consumer's strategy needs, memory over a liveness schedule.

Problem nodes ("slots"):
* an argument or constant: one strategy per layout it may arrive in (cost 0);
* an op: its rule's strategies, costing roofline compute plus internal collectives;
* a loop: its body's ops are slots too, their costs multiplied by the trip count; the body's
  inputs are *ports* whose layouts tie the body to the operands (a stacked operand's per-step
  slice is the stacked layout without its leading dim, which is never split), the carry
  flows back from the body's result into its port once per iteration, and each loop result is a
  port of its own (a stacked result lives, stacked, after the loop);
* a partial sum read more than once (a gradient read by the optimizer and a global norm): a
  *fanout* with the layouts it may be reduced to, read by every reader, so the reduction is
  charged once, as XLA performs it once (an edge per reader would charge it per reader);
* a value computed from the state alone (a parameter) read more than once: a *fanout* with the
  layouts it may be moved to before its readers, so a parameter FSDP gathers for the forward
  and the backward pass is gathered once, as XLA's partitioner does (it reshards an instruction
  once per target layout); keeping the producer's layout leaves every reader its own reshard;
* a result: a *sink* with the layouts it may leave in; a result that is an argument's new value
  (new parameters, optimizer state) is tied back to that argument by the cost of moving it to
  where the next step expects it, so state keeps its layout step after step.

Liveness: the top-level nodes are numbered in program order; a value lives from its producer to
its last reader (later where a fused reader recomputes from it, earlier where its last reader
writes over it: liveness.py), arguments and results for the whole program (XLA's argument +
result + temp accounting), a loop body's temporaries at the loop's position. A donated
argument's updated result reuses its buffer and adds nothing; a value XLA fuses away holds no
memory, and collectives XLA combines are charged bandwidth only (fusion.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from autoshard.cost_model.collectives import collective_time
from autoshard.cost_model.compute import compute_time, node_flops, strategy_bytes
from autoshard.cost_model.hardware import Hardware
from autoshard.cost_model.reshard import reshard_affine
from autoshard.ir.graph import Graph, Literal, Node, Value
from autoshard.ir.mesh import MeshSpec
from autoshard.ir.sharding import B, ShardingSpec, Split
from autoshard.passes.fusion import fused_values, head_values, tail_values
from autoshard.passes.prediction.liveness import in_place_values, recomputed_liveness
from autoshard.passes.pins import Pins
from autoshard.solver.problem import Problem
from autoshard.passes.strategies.registry import Strategy, strategies_for, tensor_specs

NS = 1e9
_ALIAS_OPS = {"optimization_barrier"}


@dataclass
class Slot:
    """One problem node: what it stands for and the strategies it chooses among."""

    kind: str                      # "input", "constant", "op", "port", "sink"
    label: str
    strategies: list[Strategy]
    node: Node | None = None
    value: Value | None = None
    costs: np.ndarray | None = None
    usages: np.ndarray | None = None
    interval: tuple[int, int] = (0, 0)
    times: float = 1.0             # runs per step (loop bodies: the trip count)
    combined: bool = False         # its collectives are combined with others (no latency)
    source: int | None = None      # a fanout's producer slot and output
    source_output: int = 0
    shared: bool = False           # a fanout of a value that is not a partial sum
    signature: object = None       # an op's ``_signature`` without pins (layer_groups)


@dataclass
class PlanningProblem:
    """The problem plus what it takes to read a plan off a solution."""

    problem: Problem
    slots: list[Slot]
    value_slot: dict[int, tuple[int, int]]
    sink_slots: list[int | None]
    unplanned: list[str] = field(default_factory=list)
    transfers: list[Transfer] = field(default_factory=list)
    #: the combined values moved before the forward pass (``head_values``); the other combined
    #: values move after the last matmul. XLA combines each side's collectives apart.
    head: frozenset = frozenset()
    #: result slot -> the position it is made at (the problem counts it from 0)
    result_starts: dict[int, int] = field(default_factory=dict)
    #: a top-level loop's position -> the slots of its bodies (nested ones too), in program
    #: order: they all hold memory at that position (loop_liveness.py)
    bodies: dict[int, tuple[int, ...]] = field(default_factory=dict)
    #: every operand edge as (producer slot, consumer slot), those that never move data too:
    #: what depends on what, for the combiners' model (latency.combined_ops)
    links: tuple[tuple[int, int], ...] = ()
    #: what the search works out of this problem more than once, by name (and choice): the
    #: combined ops of a plan it prices again (latency.combined_ops), seeds.follow's tables
    memo: dict = field(default_factory=dict, repr=False, compare=False)

    def source(self, t: Transfer, s: int) -> ShardingSpec:
        """The layout ``t``'s value leaves its producer in when the producer takes strategy
        ``s`` (mapped by the transfer's transform: a loop's stacked operand, per step)."""
        spec = self.slots[t.producer].strategies[s].outputs[t.output]
        return spec if t.transform is None else t.transform(spec)


def reader_map(pp: "PlanningProblem") -> dict[int, list[int]]:
    """Slot -> the slots its transfers go to."""
    readers: dict[int, list[int]] = {}
    for t in pp.transfers:
        readers.setdefault(t.producer, []).append(t.consumer)
    return readers


def readers_through_fanouts(pp: "PlanningProblem", slot: int,
                            readers: dict[int, list[int]]) -> list[int]:
    """The slots reading ``slot``'s values (``readers``: ``reader_map``), through the fanouts
    that pass them on."""
    out = []
    for r in readers.get(slot, ()):
        if pp.slots[r].kind == "fanout":
            out.extend(readers_through_fanouts(pp, r, readers))
        else:
            out.append(r)
    return out


@dataclass(frozen=True)
class Transfer:
    """One operand edge before merging: ``value`` moves from output ``output`` of slot
    ``producer`` (mapped by ``transform``) to what strategy s of slot ``consumer`` needs,
    ``required[s]``, ``times`` times per step. Kept to explain and predict a plan."""

    producer: int
    output: int
    consumer: int
    required: tuple
    value: Value
    times: float
    transform: object = None
    combined: bool = False


class _Builder:
    def __init__(self, graph: Graph, mesh: MeshSpec, hw: Hardware, pins: Pins,
                 donated: set[int], updated: dict[int, int]):
        self.graph, self.mesh, self.hw, self.pins = graph, mesh, hw, pins
        self.donated, self.updated = donated, updated
        self.slots: list[Slot] = []
        self.value_slot: dict[int, tuple[int, int]] = {}
        self.edges: dict[tuple[int, int], np.ndarray] = {}
        self.transfers: list[Transfer] = []
        self.links: list[tuple[int, int]] = []
        self._result_ids: dict[int, frozenset[int]] = {}
        self.unplanned: list[str] = []
        self._pair_cache: dict = {}
        self._op_cache: dict = {}
        self.end = len(graph.nodes) + 2
        self.head = head_values(graph, set(updated.values()))
        self.combined = self.head | tail_values(graph)
        self.fused = fused_values(graph)
        self.result_starts: dict[int, int] = {}
        self.bodies: dict[int, list[int]] = {}
        self._body_depth = 0
        #: value id -> the (slot, output) its readers read it from, where that is a shared
        #: fanout rather than the slot that makes it (``value_slot``)
        self.reads: dict[int, tuple[int, int]] = {}

    def read_from(self, value: Value) -> tuple[int, int]:
        return self.reads.get(value.id) or self.value_slot[value.id]

    # -- slots ----------------------------------------------------------------------------------

    def add_slot(self, slot: Slot) -> int:
        self.slots.append(slot)
        return len(self.slots) - 1

    def value_specs(self, value: Value, *, pinned: ShardingSpec | None = None,
                    no_leading_split: bool = False) -> list[ShardingSpec]:
        if pinned is not None:
            return [pinned]
        dims = range(1, value.ndim) if no_leading_split else None
        return tensor_specs(value.shape, self.mesh, dims=dims)

    def usage(self, values, specs) -> int:
        return int(sum(v.nbytes * s.shard_fraction(self.mesh) for v, s in zip(values, specs)))

    def leaf_slot(self, kind: str, value: Value, specs: list[ShardingSpec], interval,
                  *, counts_memory: bool = True, holds_less: bool | None = None,
                  preferred: ShardingSpec | None = None) -> int:
        """A slot choosing among ``specs`` at no time cost. Ties in time go to the layout that
        holds less (1% of writing the held bytes once; ``holds_less``, by default where the slot
        counts memory), and, for an argument the user annotated (``preferred``,
        ``annotations="hint"``), to the annotation: every other layout pays 1% of writing the
        whole value once. That is at least the largest memory tie-breaker
        difference, so ties and near-ties keep the annotation while any saving of real time
        larger than it overrides it (the plan's annotation report lists what was overridden)."""
        if preferred is not None and preferred not in specs:
            specs = [*specs, preferred]
        strategies = [Strategy((), (s,)) for s in specs]
        held = np.array([self.usage([value], [s]) for s in specs], np.int64)
        usages = held if counts_memory else np.zeros_like(held)
        tie_break = counts_memory if holds_less is None else holds_less
        costs = (held if tie_break else usages) / self.hw.memory_rate * NS * 0.01
        if preferred is not None:
            penalty = preference_penalty(value, self.hw) * NS
            costs = costs + np.array([0.0 if s == preferred else penalty for s in specs])
        index = self.add_slot(Slot(kind, value.name or f"%{value.id}", strategies, None, value,
                                   costs, usages, interval))
        self.value_slot[value.id] = (index, 0)
        return index

    # -- edges ----------------------------------------------------------------------------------

    def connect(self, producer: tuple[int, int], consumer: int, required: list, value: Value,
                times: float = 1.0, transform=None) -> None:
        """Edge from ``producer`` (slot, output) to ``consumer`` whose strategy s needs the value
        in ``required[s]`` (None: no need); ``transform`` maps the producer's spec first."""
        u, k = producer
        if u == consumer:
            return
        self.links.append((u, consumer))
        src = [s.outputs[k] for s in self.slots[u].strategies]
        if transform is not None:
            src = [transform(s) for s in src]
        combined = value.id in self.combined
        matrix = self.reshard_matrix(tuple(src), tuple(required), value.nbytes,
                                     latency=not combined) * times
        if not matrix.any():
            return
        self.transfers.append(Transfer(u, k, consumer, tuple(required), value, times, transform,
                                       combined))
        key = (u, consumer) if u < consumer else (consumer, u)
        if u > consumer:
            matrix = matrix.T
        self.edges[key] = self.edges[key] + matrix if key in self.edges else matrix

    def reshard_matrix(self, src: tuple, dst: tuple, nbytes: int, latency: bool = True
                       ) -> np.ndarray:
        """Nanoseconds to move a value of ``nbytes`` from each layout in ``src`` to each in
        ``dst``; the (latency, slope) tables are shared by every edge with the same layouts."""
        pair = self._pair_cache.get((src, dst))
        if pair is None:
            table = np.array([[reshard_affine(self.hw, self.mesh, a, b) if a is not None and
                               b is not None else (0.0, 0.0) for b in dst] for a in src])
            pair = (table[..., 0], table[..., 1])
            self._pair_cache[(src, dst)] = pair
        fixed, slope = pair
        return ((fixed if latency else 0.0) + slope * nbytes) * NS

    # -- graph walk -----------------------------------------------------------------------------

    def build(self) -> None:
        g = self.graph
        last_use = self.last_uses(g)
        last_use = recomputed_liveness(g, last_use, self.fused)
        in_place = in_place_values(g, last_use)
        outputs = {a.id for a in g.outputs if isinstance(a, Value)}
        for i, value in enumerate(g.inputs):
            pinned = self.pins.inputs.get(i)
            self.leaf_slot("input", value, self.value_specs(value, pinned=pinned), (0, self.end),
                           preferred=None if pinned is not None else self.pins.preferred.get(i))
            self.shared_fanout(value, g)
        for value in g.constant_values:
            self.leaf_slot("constant", value, self.value_specs(value), (0, self.end))
        for position, node in enumerate(g.nodes, start=1):
            ends = [self.end if v.id in outputs else
                    last_use.get(v.id, position) + (v.id not in in_place) for v in node.outputs]
            # a step's results have buffers of their own for the whole step (memory_analysis
            # counts them apart from the temporaries): the problem counts them from the start,
            # an upper bound, and ``result_starts`` keeps where each is made for the
            # prediction (liveness.packed_profile: XLA keeps temporaries in them until then)
            is_result = node.outputs and all(v.id in outputs for v in node.outputs) \
                and node.op not in ("scan", "while", *_ALIAS_OPS)
            if is_result:
                self.result_starts[len(self.slots)] = position
            self.node(node, (0 if is_result else position, max(ends)), 1.0, g)
        self.sinks()

    @staticmethod
    def last_uses(graph: Graph) -> dict[int, int]:
        last = {}
        for position, node in enumerate(graph.nodes, start=1):
            for atom in node.inputs:
                if isinstance(atom, Value):
                    last[atom.id] = position
        return last

    def node(self, node: Node, interval: tuple[int, int], times: float, graph: Graph) -> None:
        if node.op in _ALIAS_OPS:
            for a, v in zip(node.inputs, node.outputs):
                if isinstance(a, Value):
                    self.value_slot[v.id] = self.value_slot[a.id]
            return
        if node.op in ("scan", "while"):
            self.loop(node, interval, times)
            return
        pinned = self.pins.values.get(node.outputs[0].id) if node.outputs else None
        operands = [a for a in node.inputs if isinstance(a, Value)]
        combined = times == 1.0 and bool(node.outputs) and (
            all(v.id in self.combined for v in node.outputs)
            or bool(operands) and all(a.id in self.combined for a in operands))
        signature = _signature(node, None)
        strategies, costs, usages, planned = self.op_table(
            node, pinned, combined, signature if pinned is None else _signature(node, pinned))
        if node.op == "cond" or not planned:
            self.unplanned.append(node.describe())
        if node.outputs and all(v.id in self.fused for v in node.outputs):
            usages = np.zeros_like(usages)
        costs = costs * times
        index = self.add_slot(Slot("op", node.describe(), strategies, node, None, costs, usages,
                                   interval, times, combined, signature=signature))
        for k, v in enumerate(node.outputs):
            self.value_slot[v.id] = (index, k)
        for i, atom in enumerate(node.inputs):
            if isinstance(atom, Value):
                required = [s.inputs[i] if i < len(s.inputs) else None for s in strategies]
                self.connect(self.read_from(atom), index, required, atom, times)
        self.fanouts(node, index, strategies, times, graph)
        for v in node.outputs:
            self.shared_fanout(v, graph)

    def fanouts(self, node: Node, index: int, strategies: list[Strategy], times: float,
                graph: Graph) -> None:
        """A fanout slot for each partial-sum output read more than once (module docstring)."""
        results = self.result_ids(graph)
        for k, v in enumerate(node.outputs):
            readers = len(graph.consumers(v)) + (v.id in results)
            if readers > 1 and any(s.outputs[k].has_partial for s in strategies):
                specs = self.value_specs(v)
                fanout = self.leaf_slot("fanout", v, specs, (0, 0), counts_memory=False)
                self.slots[fanout].source, self.slots[fanout].source_output = index, k
                self.connect((index, k), fanout, specs, v, times)

    def result_ids(self, graph: Graph) -> frozenset[int]:
        """Ids of ``graph``'s result values (the top level's or a loop body's), made once."""
        ids = self._result_ids.get(id(graph))
        if ids is None:
            ids = frozenset(a.id for a in graph.outputs if isinstance(a, Value))
            self._result_ids[id(graph)] = ids
        return ids

    def shared_fanout(self, value: Value, graph: Graph) -> None:
        """A fanout for a state value (``head_values``) read by more than one op (module
        docstring): its readers read it from there; ``value_slot`` keeps its maker."""
        if value.id not in self.head or \
                self.slots[self.value_slot[value.id][0]].kind == "fanout" or \
                len({node.id for node in graph.consumers(value)}) < 2:
            return
        made_by = self.value_slot[value.id]
        specs = [s for s in self.value_specs(value) if not s.has_partial]
        # the hold-less tie-break without the memory: ties between free slices of a replicated
        # value made the LP degenerate
        fanout = self.leaf_slot("fanout", value, specs, (0, 0), counts_memory=False,
                                holds_less=True)
        self.value_slot[value.id] = made_by
        slot = self.slots[fanout]
        slot.source, slot.source_output, slot.shared = made_by[0], made_by[1], True
        self.reads[value.id] = (fanout, 0)
        self.connect(made_by, fanout, specs, value)

    def op_table(self, node: Node, pinned: ShardingSpec | None, combined: bool,
                 signature):
        """(strategies, nanoseconds per run, bytes, planned) of an op; identical ops (the same
        primitive, params and operand shapes: every layer of a transformer) share one table
        (``signature``: ``_signature(node, pinned)``)."""
        key = None if signature is None else (signature, combined)
        cached = self._op_cache.get(key) if key is not None else None
        if cached is not None:
            return cached
        strategies, planned = strategies_for(node, self.mesh)
        if pinned is not None:
            strategies = [s for s in strategies if s.outputs[0] == pinned] or [
                Strategy(tuple(None if isinstance(a, Literal) else pinned for a in node.inputs),
                         (pinned,), 1, (), "pinned")]
        flops = node_flops(node)
        costs, usages = [], []
        for s in strategies:
            frac_in = [None if spec is None else spec.shard_fraction(self.mesh)
                       for spec in s.inputs]
            frac_out = [spec.shard_fraction(self.mesh) for spec in s.outputs]
            t = compute_time(self.hw, node, flops / max(s.divisor, 1),
                             strategy_bytes(node, frac_in, frac_out))
            t += sum(collective_time(self.hw, self.mesh, kind, nbytes, axes,
                                     latency=not combined)
                     for kind, axes, nbytes in s.comm)
            costs.append(t * NS)
            usages.append(self.usage(node.outputs, s.outputs))
        table = (strategies, np.array(costs), np.array(usages, np.int64), planned)
        if key is not None:
            self._op_cache[key] = table
        return table

    def loop(self, node: Node, interval: tuple[int, int], times: float) -> None:
        p = node.params
        if node.op == "scan":
            (body,) = node.regions
            length = float(p["length"])
            nconst, ncarry = p["num_consts"], p["num_carry"]
            roles = ["const"] * nconst + ["carry"] * ncarry + ["x"] * (
                len(node.inputs) - nconst - ncarry)
            graphs = [(body, roles, list(range(len(node.inputs))))]
            carry_out = list(range(ncarry))
            results_from = body
        else:
            cond, body = node.regions
            length = 1.0
            nc, nb = p["cond_nconsts"], p["body_nconsts"]
            ncarry = len(node.inputs) - nc - nb
            graphs = [(cond, ["const"] * nc + ["carry"] * ncarry,
                       list(range(nc)) + list(range(nc + nb, len(node.inputs)))),
                      (body, ["const"] * nb + ["carry"] * ncarry,
                       list(range(nc, len(node.inputs))))]
            carry_out = list(range(ncarry))
            results_from = body
        inner = (interval[0], interval[0] + 1)
        for region, roles, operand_index in graphs:
            ports = []
            for value, role, j in zip(region.inputs, roles, operand_index):
                port = self.leaf_slot("port", value, self.value_specs(value), (0, 0),
                                      counts_memory=False)
                ports.append((port, role))
                atom = node.inputs[j]
                if isinstance(atom, Value):
                    specs = [s.outputs[0] for s in self.slots[port].strategies]
                    required = [stacked(s) for s in specs] if role == "x" else specs
                    self.connect(self.read_from(atom), port, required, atom, 1.0)
            self.region_body(region, inner, times * length)
            if region is results_from:
                for k, (port, role) in enumerate(ports):
                    if role == "carry":
                        out_k = carry_out[k - roles.index("carry")]
                        atom = region.outputs[out_k]
                        if isinstance(atom, Value):
                            specs = [s.outputs[0] for s in self.slots[port].strategies]
                            self.connect(self.value_slot[atom.id], port, specs, atom,
                                         times * length)
        for k, out in enumerate(node.outputs):
            atom = results_from.outputs[k]
            scanned = node.op == "scan" and k >= p["num_carry"]
            port = self.leaf_slot("port", out, self.value_specs(out, no_leading_split=scanned),
                                  interval)
            if isinstance(atom, Value):
                specs = [s.outputs[0] for s in self.slots[port].strategies]
                required = [unstacked(s) for s in specs] if scanned else specs
                self.connect(self.value_slot[atom.id], port, required, atom,
                             times * (length if scanned else 1.0))

    def region_body(self, region: Graph, interval: tuple[int, int], times: float) -> None:
        self.fused |= fused_values(region)
        first = len(self.slots)
        self._body_depth += 1
        for value in region.constant_values:
            self.leaf_slot("constant", value, self.value_specs(value), interval)
        for node in region.nodes:
            self.node(node, interval, times, region)
        self._body_depth -= 1
        if not self._body_depth:
            self.bodies.setdefault(interval[0], []).extend(range(first, len(self.slots)))

    def sinks(self) -> list[int | None]:
        g = self.graph
        self.sink_slots: list[int | None] = []
        for o, atom in enumerate(g.outputs):
            if not isinstance(atom, Value):
                self.sink_slots.append(None)
                continue
            name = g.output_names[o] if g.output_names else f"out[{o}]"
            specs = self.value_specs(atom, pinned=self.pins.outputs.get(o))
            source = self.updated.get(o)
            # a result that is no argument's new value (an initializer's parameters) is held
            # by the caller: among layouts its computation makes equally cheap, the one that
            # holds least per device (1% of writing what is held, as arguments' tie-break),
            # never a replicated copy for free; an argument's new value follows the argument
            costs = np.zeros(len(specs)) if source is not None or len(specs) == 1 else np.array(
                [self.usage([atom], [s]) for s in specs]) / self.hw.memory_rate * NS * 0.01
            sink = self.add_slot(Slot("sink", name, [Strategy((s,), (s,)) for s in specs], None,
                                      atom, costs, np.zeros(len(specs), np.int64), (0, 0)))
            self.sink_slots.append(sink)
            self.connect(self.value_slot[atom.id], sink, specs, atom)
            if source is not None:
                arg = g.inputs[source]
                arg_slot = self.value_slot[arg.id][0]
                arg_specs = [s.outputs[0] for s in self.slots[arg_slot].strategies]
                self.connect((sink, 0), arg_slot, arg_specs, arg)
        return self.sink_slots

    # -- assembly ---------------------------------------------------------------------------------

    def problem(self, name: str, usage_limit: int | None) -> Problem:
        edges = sorted(self.edges)
        return Problem.from_lists(
            [s.costs for s in self.slots], [s.usages for s in self.slots],
            [s.interval for s in self.slots], edges, [self.edges[e] for e in edges],
            usage_limit, name=name)


def preference_penalty(value: Value, hw: Hardware) -> float:
    """Seconds a layout other than an annotated argument's annotation pays (``leaf_slot``)."""
    return value.nbytes / hw.memory_rate * 0.01


def _signature(node: Node, pinned: ShardingSpec | None):
    """A hashable key of everything an op's strategy table depends on, or None."""
    try:
        params = tuple(sorted((k, v) for k, v in node.params.items()))
        hash(params)
    except TypeError:
        return None
    ins = tuple((a.shape, str(a.dtype)) if isinstance(a, Value) else ("lit", a.shape)
                for a in node.inputs)
    outs = tuple((v.shape, str(v.dtype)) for v in node.outputs)
    return node.op, params, ins, outs, pinned


def stacked(spec: ShardingSpec) -> ShardingSpec:
    """The stacked array's layout whose per-step slice has layout ``spec`` (leading dim whole)."""
    return ShardingSpec(tuple(Split(e.dim + 1) if isinstance(e, Split) else e for e in spec.sbp))


def unstacked(spec: ShardingSpec) -> ShardingSpec:
    return ShardingSpec(tuple(Split(e.dim - 1) if isinstance(e, Split) and e.dim > 0 else
                              (B if isinstance(e, Split) else e) for e in spec.sbp))


def build_problem(graph: Graph, mesh: MeshSpec, hw: Hardware, pins: Pins, *,
                  donated: set[int] = frozenset(), updated: dict[int, int] | None = None,
                  usage_limit: int | None = None, name: str = "plan",
                  share_layers: bool = True) -> PlanningProblem:
    """The strategy problem of ``graph`` (see the module docstring). With ``share_layers``,
    the corresponding ops of identical layers must choose alike (``layer_groups``).

    Alpa also ties elementwise "followers" to their operand's layout; measured on the test GPT
    that costs 67% in predicted step time (ties follow an arbitrary operand), while the LP
    solves the untied problem exactly, so autoshard does not tie them."""
    builder = _Builder(graph, mesh, hw, pins, set(donated), dict(updated or {}))
    builder.build()
    _discount_donations(builder)
    groups = layer_groups(builder.slots, {**builder.value_slot, **builder.reads}) \
        if share_layers else ()
    problem = builder.problem(name, usage_limit)
    if groups:
        problem = Problem(problem.name, problem.offsets, problem.costs, problem.usages,
                          problem.intervals, problem.edges, problem.edge_offsets,
                          problem.edge_costs, problem.usage_limit, groups)
    return PlanningProblem(problem, builder.slots, builder.value_slot, builder.sink_slots,
                           builder.unplanned, builder.transfers,
                           frozenset(builder.head), builder.result_starts,
                           {p: tuple(body) for p, body in builder.bodies.items()},
                           tuple(builder.links))


_LAYER_INDEX = re.compile(r"\[\d+\]")


def layer_groups(slots: list[Slot], value_slot: dict[int, tuple[int, int]], depth: int = 6
                 ) -> tuple[tuple[int, ...], ...]:
    """Slots that play the same part in identical layers, to share one strategy (Alpa plans
    repeated layers once; a 24-layer model is then a 1-layer problem plus its boundaries).

    Two slots correspond when their local structure up to ``depth`` steps away, towards
    producers and consumers, is the same: the same op, params, shapes and name scope (not
    source lines: jax reuses cached traces of inner functions, so a line can depend on what ran
    before), linked to corresponding slots, with arguments matched by path with list indices
    wildcarded (``params['blocks'][*]['wq']``) and pins. Ops that only look alike (q, k and v
    projections, the optimizer updates of equally shaped parameters) differ in the arguments
    they read or feed; the first layer differs from the others by what feeds it.
    """
    keys: list = []
    for slot in slots:
        if slot.kind in ("input", "sink"):
            v = slot.value
            keys.append((slot.kind, _LAYER_INDEX.sub("[*]", slot.label), v.shape, str(v.dtype),
                         len(slot.strategies) if len(slot.strategies) == 1 else None))
        elif slot.kind == "op":
            node = slot.node
            keys.append(("op", slot.signature, node.name_stack, len(slot.strategies)))
        elif slot.kind == "fanout":
            keys.append(("fanout", slot.value.shape, str(slot.value.dtype)))
        else:
            keys.append(None)
    operands: list[list[int]] = [[] for _ in slots]
    for index, slot in enumerate(slots):
        if slot.kind == "op":
            operands[index] = [value_slot[a.id][0] for a in slot.node.inputs
                               if isinstance(a, Value) and a.id in value_slot]
        elif slot.kind == "sink":
            operands[index] = [value_slot[slot.value.id][0]]
        elif slot.kind == "fanout":
            operands[index] = [slot.source]
    consumers: list[list[int]] = [[] for _ in slots]
    for index, ops in enumerate(operands):
        for j in ops:
            consumers[j].append(index)
    # structural ids by interning (not hash(), which Python salts per process: every process
    # must find the same groups, in the same order, to find the same plan)
    table: dict = {}

    def intern(key) -> int:
        return table.setdefault(key, len(table))

    ids = [None if k is None else intern(k) for k in keys]
    for _ in range(depth):
        ids = [None if keys[i] is None else
               intern((ids[i], tuple(ids[j] for j in operands[i]),
                       tuple(sorted(ids[j] for j in consumers[i] if ids[j] is not None))))
               for i in range(len(slots))]
    members: dict[tuple, list[int]] = {}
    for index, h in enumerate(ids):
        if h is not None and len(slots[index].strategies) > 1:
            members.setdefault((h, len(slots[index].strategies)), []).append(index)
    return tuple(tuple(m) for m in members.values() if len(m) > 1)


def _discount_donations(builder: _Builder) -> None:
    """A donated argument's updated result reuses the argument's buffer: its producer's memory
    is not counted again from the moment it is produced."""
    g = builder.graph
    for o, i in builder.updated.items():
        atom = g.outputs[o]
        if i in builder.donated and isinstance(atom, Value):
            slot = builder.slots[builder.value_slot[atom.id][0]]
            if slot.kind == "fanout":
                slot = builder.slots[slot.source]
            if slot.kind == "op" and len(slot.node.outputs) == 1:
                slot.usages = np.zeros_like(slot.usages)
