"""A plan: how every argument, every output and each pinned intermediate is laid out.

A plan is a separate mapping from value to spec, never attributes written onto nodes, so one
graph can carry several plans (hand plans against the solver's, in tests and benchmarks).
Arguments and outputs are kept as flat tuples by position, not by value id, because one value
can be both an argument and an output (a pass-through) with different layouts at each boundary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

import jax
from autoshard.ir.errors import PlanError
from autoshard.ir.graph import Graph, Value, dtype_name
from autoshard.ir.mesh import MeshSpec
from autoshard.ir.mirrors import mirror_rows
from autoshard.ir.sharding import ShardingSpec

#: ``Plan.reasons`` of a boundary layout nothing pinned: the search chose it.
SOLVER_CHOSEN = "chosen by the solver"


@dataclass(frozen=True)
class Prediction:
    """What the cost model predicts for one step on one device.

    ``collective_seconds`` and ``collectives`` are by kind (all-reduce, all-gather, ...), both
    the collectives ops perform themselves and those resharding between ops inserts;
    ``collectives[kind] = (count, bytes)`` per step, loop trip counts applied.
    """

    step_seconds: float
    compute_seconds: float
    collective_seconds: Mapping[str, float]
    reshard_seconds: float
    collectives: Mapping[str, tuple[float, float]]
    peak_memory_bytes: int
    memory_budget: int | None = None


@dataclass(frozen=True)
class SolverStats:
    """How the plan was found: problem size before and after reduction, time, objective,
    lower bound and relative gap (0 when proven optimal)."""

    engine: str
    nodes: int
    edges: int
    strategies: int
    seconds: float
    objective: float
    bound: float | None = None
    gap: float | None = None
    status: str = ""
    details: Mapping[str, Any] = field(default_factory=dict)

    @property
    def outcome(self) -> str:
        """How the solve ended, as summaries say it (``solver_outcome``)."""
        return solver_outcome(self.status, self.gap, self.details)


def solver_outcome(status: str, gap: float | None, details: Mapping[str, Any]) -> str:
    """"proven optimal", or the status and the gap to the lower bound next to the cheapest seed
    plan's cost (``seeds``: passes/seeds.py). A plan moved for start-up latency
    (``latency_forbidden``: the classes of combined collectives it avoids) is priced above the
    bandwidth-only LP bound on purpose, so its gap says by how much, not how far it is from the
    optimum; a seed that beat the solvers' plan (``seed_taken``) is named with the others'
    costs; a plan within a hair of a lower bound on every plan's total, start-up latency
    included (``bound_met``), says which plan and bound."""
    seeds = details.get("seeds") or {}
    taken = details.get("seed_taken")
    if taken:
        others = ", ".join(f"{name} {_duration(t)}" for name, t in seeds.items() if name != taken)
        return (f"the {taken} seed ({_duration(seeds[taken])}), cheaper than the solvers' plan"
                + (f"; other seeds: {others}" if others else ""))
    met = details.get("bound_met")
    if met:
        return f"optimal with start-up latency counted: {met}"
    moved = details.get("latency_forbidden")
    if moved:
        above = "" if gap is None else (f": {gap:.2%} above the LP bound by bandwidth alone, "
                                        "which counts no start-up latency")
        what = ", ".join(moved[:3]) + (f", {len(moved) - 3} more" if len(moved) > 3 else "")
        return f"moved off the LP optimum for start-up latency ({what}){above}"
    if gap == 0:
        return "proven optimal"
    best = min(seeds.items(), key=lambda item: item[1], default=None)
    seed = "" if best is None else f"; best seed: {best[0]} {_duration(best[1])}"
    return f"{status}, gap {'unknown' if gap is None else f'{gap:.2%}'}{seed}"


@dataclass(frozen=True)
class StrategyCost:
    """One strategy of one op and what it would cost with every other choice of the plan kept:
    ``compute_seconds`` (roofline), ``collective_seconds`` (the op's own collectives),
    ``reshard_in_seconds`` (moving its operands from their producers' chosen layouts to the
    ones this strategy needs) and ``reshard_out_seconds`` (moving its outputs to what its
    readers' chosen strategies need). Seconds per step, loop trip counts applied."""

    label: str
    inputs: tuple[ShardingSpec | None, ...]
    outputs: tuple[ShardingSpec, ...]
    compute_seconds: float
    collective_seconds: float
    reshard_in_seconds: float
    reshard_out_seconds: float

    @property
    def total_seconds(self) -> float:
        return (self.compute_seconds + self.collective_seconds + self.reshard_in_seconds
                + self.reshard_out_seconds)


@dataclass(frozen=True)
class CollectiveCause:
    """A collective the plan makes an op perform: ``kind`` over mesh axes ``axes`` (names),
    ``bytes`` per device per run (the collective_time convention), ``count`` runs per step,
    and why (``"strategy"``: the op's own, or the operand it reshards, ``"operand 0 %12"``)."""

    kind: str
    axes: tuple[str, ...]
    bytes: float
    count: float
    cause: str


@dataclass(frozen=True)
class NodeExplanation:
    """Why an op runs as it does: the chosen strategy and the cheapest rejected ones, each
    priced as if only this op changed (a layer-shared op changes with its group, so a
    rejected strategy's true price can be higher), and the collectives the choice causes."""

    chosen: StrategyCost
    rejected: tuple[StrategyCost, ...]
    collectives: tuple[CollectiveCause, ...]
    num_strategies: int


@dataclass(frozen=True)
class AnnotationDiff:
    """One annotated argument leaf whose searched layout differs from its annotation:
    ``seconds`` is the predicted cost per step of honouring this annotation alone with every
    other choice of the searched plan held fixed (the reshards it adds minus those it saves), a
    local price like the viewer's rejected strategies; ``kept`` says whether the running plan
    uses the annotation (``annotations="require"``) or the searched layout (``"hint"``)."""

    path: str
    annotated: ShardingSpec
    searched: ShardingSpec
    seconds: float
    kept: bool


@dataclass(frozen=True)
class AnnotationReport:
    """Annotated layouts (Flax ``nnx.with_partitioning`` / logical axes) against the searched
    ones. Both plans are solved: with every annotation required, and with annotations as
    preferences the solver may override; ``cost_seconds`` is the difference of their predicted
    step times (what the annotations cost per step; 0 when the search keeps them all)."""

    mode: str
    annotated: int
    differences: tuple[AnnotationDiff, ...]
    annotated_step_seconds: float
    searched_step_seconds: float
    annotated_peak_bytes: int
    searched_peak_bytes: int

    @property
    def cost_seconds(self) -> float:
        return self.annotated_step_seconds - self.searched_step_seconds

    def lines(self, max_rows: int = 40) -> list[str]:
        kept = "kept (required)" if self.mode == "require" else (
            "kept (hint: the search saves too little)" if any(d.kept for d in self.differences)
            else "overridden (hint)")
        lines = [f"annotations ({self.mode}): {len(self.differences)} of {self.annotated} "
                 f"annotated arguments differ from the searched plan; predicted step "
                 f"{self.annotated_step_seconds * 1e3:.4g} ms as annotated vs "
                 f"{self.searched_step_seconds * 1e3:.4g} ms searched "
                 f"({self.cost_seconds * 1e3:+.4g} ms), peak memory "
                 f"{_mib(self.annotated_peak_bytes)} vs {_mib(self.searched_peak_bytes)}"]
        # an optimizer moment differs as its parameter does: one row for both
        mirrored = mirror_rows([(d.path, (d.annotated, d.searched)) for d in self.differences])
        own = [d for i, d in enumerate(self.differences) if i not in mirrored]
        width = min(max((len(d.path) for d in own), default=0), 48)
        for d in own[:max_rows]:
            lines.append(f"  {d.path:<{width}}  annotated {str(d.annotated):<14} searched "
                         f"{str(d.searched):<14} alone {d.seconds * 1e3:+.4g} ms  {kept}")
        if len(own) > max_rows:
            lines.append(f"  ... {len(own) - max_rows} more")
        if mirrored:
            lines.append(f"  ... {len(mirrored)} more mirror their parameter's difference")
        return lines


@dataclass(frozen=True)
class RedundantAxis:
    """A mesh axis (``axis``, of ``size`` devices) along which the plan splits no op's work, so
    its devices compute the same thing: the plan's predicted step (``chosen_step_seconds``)
    against the best plan the search finds with the batch split over that axis
    (``best_using_it_step_seconds``; None with the reason in ``unavailable``: none fits, or
    no batch argument divides over it). passes/redundant_axes.py solves for it."""

    axis: str
    size: int
    chosen_step_seconds: float
    best_using_it_step_seconds: float | None = None
    unavailable: str = ""

    def line(self) -> str:
        times = {2: "twice", 3: "three times"}.get(self.size, f"{self.size} times")
        head = (f"mesh axis {self.axis!r} ({self.size} devices) computes the same thing "
                f"{times}: ")
        chosen = _duration(self.chosen_step_seconds)
        best = self.best_using_it_step_seconds
        if best is None:
            return head + f"{self.unavailable or 'no plan that uses it fits'} (the chosen " \
                          f"plan is predicted {chosen})"
        verdict = "is cheaper than" if best > self.chosen_step_seconds else "costs as much as"
        return head + (f"the chosen plan (predicted {chosen}) {verdict} the best plan that "
                       f"splits the batch over {self.axis!r} ({_duration(best)})")


@dataclass(frozen=True)
class PlanCandidate:
    """One plan ``planner="measured"`` weighed: its method, its executable's step time
    measured as the plan-quality benchmark measures (matmul FLOPs and collectives read from
    the compiled HLO, priced on the hardware profile), its compiled peak bytes per device, and
    the cost model's prediction (None for a rule)."""

    method: str
    measured_seconds: float
    peak_bytes: int
    predicted_seconds: float | None = None
    chosen: bool = False

    def line(self) -> str:
        predicted = ("" if self.predicted_seconds is None
                     else f", predicted {self.predicted_seconds * 1e3:.3f} ms")
        return (f"{'*' if self.chosen else ' '} {self.method}: measured "
                f"{self.measured_seconds * 1e3:.3f} ms, peak {self.peak_bytes / 2**20:.1f} "
                f"MiB{predicted}")


@dataclass(frozen=True, eq=False)
class Plan:
    """Specs for the graph's inputs and outputs (flat, in pytree-leaf order) and for the
    intermediate values the plan pins (by value id, nested region bodies included).

    ``reasons`` says, per input position ``"in:i"``, output position ``"out:i"`` or value id,
    why the spec was chosen (a hint and its source line, the user's in_specs, a rule).
    ``operand_specs`` gives, per node id, the layout each operand must have when the node runs
    (None: as it comes): the solver's strategies fix them, and pinning them is what makes the
    partitioner reshard where the plan does rather than where it would.
    ``explanation`` (search plans) says per op node id why its strategy won (the viewer shows
    it); ``memory_curve[t]`` is the predicted bytes per device live at top-level step t (step
    t >= 1 runs ``graph.nodes[t - 1]``), and ``hardware`` names the cost model's profile.
    ``annotation_report`` (steps with Flax sharding annotations) compares the annotated layouts
    with the searched ones.
    ``made_specs`` gives, per value id, the layout its op makes it in where the plan then
    pins it in another (``value_specs``): the lowering constrains it to both in turn, or the
    partitioner reaches the pinned layout by moving the op's operands, not its result.
    ``redundant_axes`` (search plans) lists the mesh axes along which the plan splits no
    op's work, each priced against the best plan that uses it (``RedundantAxis``).
    """

    graph: Graph
    mesh: MeshSpec
    input_specs: tuple[ShardingSpec, ...]
    output_specs: tuple[ShardingSpec, ...]
    value_specs: Mapping[int, ShardingSpec]
    in_tree: Any
    out_tree: Any
    method: str
    reasons: Mapping[str | int, str] = field(default_factory=dict)
    unplanned: tuple[str, ...] = ()
    prediction: Prediction | None = None
    solver: SolverStats | None = None
    operand_specs: Mapping[int, tuple[ShardingSpec | None, ...]] = field(default_factory=dict)
    explanation: Mapping[int, NodeExplanation] = field(default_factory=dict)
    memory_curve: tuple[int, ...] = ()
    hardware: str = ""
    annotation_report: AnnotationReport | None = None
    made_specs: Mapping[int, ShardingSpec] = field(default_factory=dict)
    redundant_axes: tuple[RedundantAxis, ...] = ()

    def __post_init__(self):
        if len(self.input_specs) != len(self.graph.inputs):
            raise PlanError(f"plan has {len(self.input_specs)} input specs for "
                            f"{len(self.graph.inputs)} graph inputs")
        if len(self.output_specs) != len(self.graph.outputs):
            raise PlanError(f"plan has {len(self.output_specs)} output specs for "
                            f"{len(self.graph.outputs)} graph outputs")
        known = {v.id for v in self.graph.all_values()}
        unknown = sorted(set(self.value_specs) - known)
        if unknown:
            raise PlanError(f"plan pins value ids {unknown[:5]} that are not in the graph")
        object.__setattr__(self, "value_specs", MappingProxyType(dict(self.value_specs)))
        object.__setattr__(self, "operand_specs", MappingProxyType(dict(self.operand_specs)))
        object.__setattr__(self, "made_specs", MappingProxyType(dict(self.made_specs)))
        object.__setattr__(self, "reasons", MappingProxyType(dict(self.reasons)))
        object.__setattr__(self, "explanation", MappingProxyType(dict(self.explanation)))
        object.__setattr__(self, "memory_curve", tuple(int(x) for x in self.memory_curve))

    # -- pytree views, shaped like the function's arguments and results --------------------------

    @property
    def in_specs(self) -> Any:
        """PartitionSpecs shaped like the (non-static) arguments."""
        return jax.tree_util.tree_unflatten(self.in_tree, [
            s.to_partition_spec(self.mesh, v.ndim) for s, v in zip(self.input_specs,
                                                                   self.graph.inputs)])

    @property
    def out_specs(self) -> Any:
        """PartitionSpecs shaped like the function's result."""
        return jax.tree_util.tree_unflatten(self.out_tree, [
            s.to_partition_spec(self.mesh, len(a.shape)) for s, a in zip(self.output_specs,
                                                                        self.graph.outputs)])

    def node_specs(self) -> dict[int, tuple[ShardingSpec | None, ...]]:
        """Per node id, the specs of its outputs (None where the plan leaves a value free)."""
        table = {}
        for node, _ in self.graph.walk():
            specs = tuple(self.value_specs.get(v.id) for v in node.outputs)
            if any(s is not None for s in specs):
                table[node.id] = specs
        return table

    def bytes_per_device(self, value: Value, spec: ShardingSpec) -> int:
        return int(value.nbytes * spec.shard_fraction(self.mesh))

    # -- text -----------------------------------------------------------------------------------

    def summary(self, *, max_rows: int = 40) -> str:
        g = self.graph
        ops = g.op_counts()
        top = ", ".join(f"{n} {op}" for op, n in sorted(ops.items(), key=lambda kv: -kv[1])[:6])
        lines = [
            f"autoshard plan ({self.method}) on mesh {self.mesh}, {self.mesh.num_devices} devices",
            f"graph: {g.num_nodes()} nodes ({top})",
        ]
        lines += self._prediction_lines()
        lines += [r.line() for r in self.redundant_axes]
        total_in = sum(self.bytes_per_device(v, s) for v, s in zip(g.inputs, self.input_specs))
        lines.append(f"arguments: {len(g.inputs)} arrays, {_mib(total_in)} per device")
        lines += self._table(
            [(v.name or f"%{v.id}", v, s, self.reasons.get(f"in:{i}", ""))
             for i, (v, s) in enumerate(zip(g.inputs, self.input_specs))], max_rows)
        lines.append(f"results: {len(g.outputs)} arrays")
        lines += self._table(
            [(g.output_names[i] if g.output_names else f"out[{i}]", a, s,
              self.reasons.get(f"out:{i}", ""))
             for i, (a, s) in enumerate(zip(g.outputs, self.output_specs))], max_rows)
        if self.value_specs and self.solver is None:
            values = g.value_index()
            lines.append(f"pinned intermediates: {len(self.value_specs)}")
            rows = []
            for vid, spec in sorted(self.value_specs.items()):
                node = g.node_of(vid)
                label = f"%{vid} {node.op} {node.source}" if node else f"%{vid}"
                rows.append((label, values[vid], spec, self.reasons.get(vid, "")))
            lines += self._table(rows, max_rows)
        if self.annotation_report is not None:
            lines += self.annotation_report.lines(max_rows)
        if self.unplanned:
            lines.append(f"unplanned (replicated, no rule): {', '.join(self.unplanned)}")
        return "\n".join(lines)

    def _prediction_lines(self) -> list[str]:
        lines = []
        p = self.prediction
        if p is not None:
            comm = ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in sorted(p.collective_seconds.items())
                             if v > 0) or "none"
            budget = f" (budget {_mib(p.memory_budget)})" if p.memory_budget else ""
            lines.append(f"predicted step: {p.step_seconds * 1e3:.3f} ms = compute "
                         f"{p.compute_seconds * 1e3:.3f} ms + collectives: {comm}")
            lines.append(f"predicted peak memory: {_mib(p.peak_memory_bytes)} per device{budget}")
        s = self.solver
        if s is not None:
            lines.append(f"solver: {s.engine}, {s.nodes} nodes / {s.edges} edges / {s.strategies}"
                         f" strategies, {s.seconds:.2f} s, {s.outcome}")
        return lines

    def _table(self, rows, max_rows: int) -> list[str]:
        """One line per row; past ``max_rows``, sharded rows are kept and the replicated rest
        folded into a count, so the interesting layouts are never the ones cut off."""
        if len(rows) > max_rows:
            sharded = [r for r in rows if not r[2].is_replicated][:max_rows]
            folded = [r for r in rows if r not in sharded]
        else:
            sharded, folded = rows, []
        out = []
        width = min(max((len(r[0]) for r in sharded), default=0), 48)
        for label, value, spec, reason in sharded:
            pspec = ("partial " if spec.has_partial else "") + str(
                spec.to_partition_spec(self.mesh, len(value.shape), partial="replicate"))
            nbytes = self.bytes_per_device(value, spec) if isinstance(value, Value) else 0
            shape = f"{dtype_name(value.dtype)}{list(value.shape)}"
            out.append(f"  {label:<{width}}  {shape:<18} {str(spec):<14} {pspec:<24} "
                       f"{_mib(nbytes):>10}/dev  {reason}".rstrip())
        if folded:
            nbytes = sum(self.bytes_per_device(v, s) for _, v, s, _ in folded
                         if isinstance(v, Value))
            kind = "replicated" if all(r[2].is_replicated for r in folded) else "more"
            out.append(f"  ... {len(folded)} {kind} ({_mib(nbytes)}/dev): "
                       f"{', '.join(r[0] for r in folded[:3])}{', ...' if len(folded) > 3 else ''}")
        return out


def _duration(seconds: float) -> str:
    """Milliseconds, or microseconds below 0.1 ms (a tiny step's 3.6e-06 ms reads as 0.0036 us)."""
    return f"{seconds * 1e3:.4g} ms" if seconds >= 1e-4 else f"{seconds * 1e6:.4g} us"


def _mib(nbytes: int) -> str:
    if nbytes >= 2**30:
        return f"{nbytes / 2**30:.2f} GiB"
    if nbytes >= 2**20:
        return f"{nbytes / 2**20:.2f} MiB"
    return f"{nbytes / 2**10:.1f} KiB"
