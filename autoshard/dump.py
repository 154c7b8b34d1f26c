"""``autoshard.dump``: write a plan where people can look at it; ``autoshard.load_plan`` reads it.

A dump directory holds ``plan.json``, a self-contained ``index.html`` (the viewer, with the plan
inlined: it opens from disk with no server and makes no request) and, for pipelined plans,
``plan.trace.json`` (Chrome trace events, opens in Perfetto).

``plan.json`` is the decisions record of ``autoshard.ir.plan_json`` (schema ``autoshard.plan``,
its ``version``) plus the sections below, versioned together by ``dump_version``
(``DUMP_VERSION``; readers reject other versions). Costs are seconds per step on one device;
bytes are per device.

  hardware      {name, matmul_flops, hbm_bandwidth, memory_bytes, ...} | {name} | null
  nodes         [{id, op, scope, source, layer, parent, inputs: [[value id | null, type]],
                  outputs: [[value id, type]], strategy, in_specs, out_specs,
                  cost: [compute, collectives, reshard_in, reshard_out],
                  rejected: [{strategy, in_specs, out_specs, cost}],
                  collectives: [{kind, axes, bytes, count, cause}], strategies}]
                every node, nested loop bodies included (``parent`` = the loop node's id), in
                program order; ``layer`` groups a node with the parameters it works on (see
                ``layer_labels``); cost fields are null when the plan was not made by the search.
  memory        {curve: [bytes at step t], steps: [node id run at step t >= 1], peak, budget}
  verification  {rows: [{name, predicted, compiled, ratio}]} | null (``autoshard.verify``
                result; predicted is null for a rule's plan, ratio null where it says nothing)
  pipeline      {stages: [{name, devices}], timeline: [{stage, name, start, end}]} | null
"""

from __future__ import annotations

import json
import pathlib
import re
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping

from autoshard.cost_model.hardware import PROFILES
from autoshard.ir.errors import ArgumentError, PlanError
from autoshard.ir.graph import Graph, Value, dtype_name
from autoshard.ir.mesh import MeshSpec
from autoshard.ir.mirrors import mirror_rows
from autoshard.ir.plan import Plan, StrategyCost, solver_outcome
from autoshard.ir.plan_json import (annotations_from_json, check_header, plan_to_json,
                                   redundant_axes_from_json)
from autoshard.ir.sharding import ShardingSpec
from autoshard.measure.verify import COUNTS_NOTE, comparison_lines
from autoshard.viewer import render_page

DUMP_VERSION = 1
PLAN_FILE, PAGE_FILE, TRACE_FILE = "plan.json", "index.html", "plan.trace.json"


# -- writing ------------------------------------------------------------------------------------

def dump(plan: Any, directory: str | pathlib.Path, *, verification: Any = None) -> pathlib.Path:
    """Write ``plan`` (a ``Plan``, or an ``autoshard.compile`` result whose ``.plan`` to use)
    to ``directory`` as plan.json + index.html (+ plan.trace.json when pipelined); include
    ``verification`` (an ``autoshard.verify`` result) to show predicted vs compiled. Returns
    the directory."""
    if not isinstance(plan, Plan):
        if hasattr(plan, "pipeline_plan"):
            raise ArgumentError(
                "autoshard.dump: pipelined steps have no operator-level plan to dump yet; "
                "print step.pipeline_plan.summary() and write the schedule with "
                "step.save_trace(path) (Chrome trace events, for Perfetto)")
        plan = getattr(plan, "plan", None)
        if not isinstance(plan, Plan):
            raise ArgumentError("autoshard.dump needs a Plan or an autoshard.compile result, got "
                                f"{type(plan).__name__}")
    out = pathlib.Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    doc = dump_record(plan, verification)
    text = json.dumps(doc, separators=(",", ":"), allow_nan=False)
    (out / PLAN_FILE).write_text(text)
    (out / PAGE_FILE).write_text(render_page(text))
    trace = out / TRACE_FILE
    if doc["pipeline"] and doc["pipeline"].get("timeline"):
        trace.write_text(json.dumps(trace_events(doc["pipeline"])))
    elif trace.exists():
        trace.unlink()
    return out


def dump_record(plan: Plan, verification: Any = None) -> dict:
    """The plan.json document (module docstring)."""
    doc = plan_to_json(plan)
    # the cache's compact explanation and curve are shown through "nodes" and "memory" here
    doc.pop("explanation", None)
    doc.pop("memory_curve", None)
    doc["dump_version"] = DUMP_VERSION
    doc["hardware"] = _hardware(plan.hardware)
    doc["nodes"] = _nodes(plan)
    doc["memory"] = _memory(plan)
    doc["verification"] = None if verification is None else {"rows": [
        {"name": c.name, "predicted": c.predicted, "compiled": c.compiled, "ratio": c.ratio}
        for c in verification.rows]}
    doc["pipeline"] = getattr(plan, "pipeline", None)
    return doc


def _hardware(name: str) -> dict | None:
    if not name:
        return None
    hw = PROFILES.get(name)
    if hw is None:
        return {"name": name}
    return {"name": hw.name, "matmul_flops": dict(hw.flops), "vector_flops": hw.vector_flops,
            "hbm_bandwidth": hw.hbm_bandwidth, "memory_bytes": hw.memory_bytes,
            "intra_node_bandwidth": hw.intra_node.bandwidth,
            "inter_node_bandwidth": hw.inter_node.bandwidth,
            "devices_per_node": hw.devices_per_node}


def _type(atom) -> str:
    return f"{dtype_name(atom.dtype)}[{','.join(map(str, atom.shape))}]"


def _seconds(x: float) -> float:
    return float(f"{x:.4g}")


def _costs(c: StrategyCost) -> list[float]:
    return [_seconds(c.compute_seconds), _seconds(c.collective_seconds),
            _seconds(c.reshard_in_seconds), _seconds(c.reshard_out_seconds)]


def _specs(specs) -> list:
    return [None if s is None else str(s) for s in specs]


def _nodes(plan: Plan) -> list[dict]:
    g = plan.graph
    layers = layer_labels(g)
    parents = {r_node.id: node.id for node, _ in g.walk() for region in node.regions
               for r_node, _ in region.walk()}
    rows = []
    for node, _ in g.walk():
        why = plan.explanation.get(node.id)
        operands = plan.operand_specs.get(node.id)
        row = {"id": node.id, "op": node.op, "scope": node.name_stack, "source": node.source,
               "layer": layers.get(node.id, ""), "parent": parents.get(node.id),
               "inputs": [[a.id if isinstance(a, Value) else None, _type(a)]
                          for a in node.inputs],
               "outputs": [[v.id, _type(v)] for v in node.outputs],
               "in_specs": None if operands is None else _specs(operands),
               "out_specs": _specs(plan.value_specs.get(v.id) for v in node.outputs),
               "strategy": None, "cost": None, "rejected": [], "collectives": [],
               "strategies": None}
        if why is not None:
            row.update(strategy=why.chosen.label, cost=_costs(why.chosen),
                       strategies=why.num_strategies,
                       rejected=[{"strategy": r.label, "in_specs": _specs(r.inputs),
                                  "out_specs": _specs(r.outputs), "cost": _costs(r)}
                                 for r in why.rejected],
                       collectives=[{"kind": c.kind, "axes": list(c.axes), "bytes": c.bytes,
                                     "count": c.count, "cause": c.cause}
                                    for c in why.collectives])
        rows.append(row)
    return rows


def _memory(plan: Plan) -> dict:
    p = plan.prediction
    curve = list(plan.memory_curve)
    return {"curve": curve, "steps": [n.id for n in plan.graph.nodes],
            # the curve is live bytes; the peak is what XLA allocates for them (holes included)
            "peak": p.peak_memory_bytes if p else (max(curve) if curve else None),
            "live_peak": max(curve) if curve else None,
            "budget": p.memory_budget if p else None}


_LAYER = re.compile(r"(?:\['([^'\]]+)'\]|\.(\w+))\[(\d+)\]")
_NUMBERED = re.compile(r"\['(\w*?)_?(\d+)'\]")
_KEY = re.compile(r"\['([^'\]]+)'\]")
_ATTRIBUTE = re.compile(r"\.(\w+)")
_LAYER_LABEL = re.compile(r"\[\d+\]$|_\d+$")


def argument_label(path: str) -> str:
    """The part of the model an argument belongs to, from its pytree path: the last indexed
    container (``params['blocks'][3]['wq']`` -> ``blocks[3]``, ``['layers_3']`` ->
    ``layers_3``), else its first key (``params['head']`` -> ``head``), else ``""``."""
    found = list(_LAYER.finditer(path))
    if found:
        m = found[-1]
        return f"{m.group(1) or m.group(2)}[{m.group(3)}]"
    numbered = list(_NUMBERED.finditer(path))
    if numbered:
        m = numbered[-1]
        return f"{m.group(1)}_{m.group(2)}"
    key = _KEY.search(path) or _ATTRIBUTE.search(path)
    return key.group(1) if key else ""


def layer_labels(graph: Graph) -> dict[int, str]:
    """Node id -> the layer it belongs to, for grouping in the viewer. A top-level node that
    reads an argument directly is labelled by the argument's path (``argument_label``; of
    several, a numbered layer's, else the largest argument's); every other node by the nearest
    such node in program order (an unrolled layer's forward and backward ops are each
    contiguous); a loop body's nodes by their loop's label."""
    labels = {v.id: argument_label(v.name) for v in graph.inputs}
    anchors: list[str | None] = []
    for node in graph.nodes:
        direct = [a for a in node.inputs if isinstance(a, Value) and labels.get(a.id)]
        # a layer's parameter over a batch it reads, then the largest argument (the weights)
        best = max(direct, key=lambda a: (bool(_LAYER_LABEL.search(labels[a.id])), a.nbytes),
                   default=None)
        anchors.append(None if best is None else labels[best.id])
    n = len(anchors)
    before: list[tuple[int, str] | None] = [None] * n
    after: list[tuple[int, str] | None] = [None] * n
    last = None
    for i in range(n):
        last = (i, anchors[i]) if anchors[i] else last
        before[i] = last
    last = None
    for i in reversed(range(n)):
        last = (i, anchors[i]) if anchors[i] else last
        after[i] = last
    out = {}
    for i, node in enumerate(graph.nodes):
        b, a = before[i], after[i]
        near = b if a is None or (b is not None and i - b[0] <= a[0] - i) else a
        label = near[1] if near else ""
        out[node.id] = label
        for region in node.regions:
            for inner, _ in region.walk():
                out[inner.id] = label
    return out


def trace_events(pipeline: Mapping) -> dict:
    """A pipeline timeline as Chrome trace events (one track per stage; times in seconds)."""
    events = [{"name": e.get("name", ""), "ph": "X", "pid": 0, "tid": e["stage"],
               "ts": e["start"] * 1e6, "dur": (e["end"] - e["start"]) * 1e6}
              for e in pipeline.get("timeline", ())]
    names = [{"name": "thread_name", "ph": "M", "pid": 0, "tid": i, "args": {"name": s["name"]}}
             for i, s in enumerate(pipeline.get("stages", ()))]
    return {"traceEvents": names + events, "displayTimeUnit": "ms"}


# -- reading ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ArgumentRow:
    """One argument or result of a dumped plan."""

    path: str
    shape: tuple[int, ...]
    dtype: str
    spec: ShardingSpec
    partition_spec: tuple
    bytes_per_device: int
    reason: str


@dataclass(frozen=True)
class NodeRow:
    """One op of a dumped plan: its strategy and costs (seconds; None for rule-made plans)."""

    id: int
    op: str
    scope: str
    source: str
    layer: str
    strategy: str | None
    cost: tuple[float, float, float, float] | None
    rejected: tuple[Mapping, ...]
    collectives: tuple[Mapping, ...]

    @property
    def total_seconds(self) -> float:
        return sum(self.cost) if self.cost else 0.0


@dataclass(frozen=True)
class PlanDump:
    """A plan read back from a dump directory (``load_plan``): read-only, without its graph,
    so it can be summarised and compared but not lowered. ``record`` is the plan.json
    document."""

    directory: pathlib.Path
    record: Mapping[str, Any]
    mesh: MeshSpec
    method: str
    inputs: tuple[ArgumentRow, ...]
    outputs: tuple[ArgumentRow, ...]
    nodes: tuple[NodeRow, ...]

    @property
    def prediction(self) -> Mapping | None:
        return self.record.get("prediction")

    @property
    def solver(self) -> Mapping | None:
        return self.record.get("solver")

    @property
    def memory(self) -> Mapping:
        return self.record.get("memory") or {}

    @property
    def hardware(self) -> Mapping | None:
        return self.record.get("hardware")

    @property
    def verification(self) -> Mapping | None:
        return self.record.get("verification")

    @property
    def pipeline(self) -> Mapping | None:
        return self.record.get("pipeline")

    def summary(self, *, max_rows: int = 40) -> str:
        """The text form, in the spirit of ``Plan.summary``: mesh, prediction, solver, the
        sharded arguments and results, and the costliest ops."""
        ops: dict[str, int] = {}
        for n in self.nodes:
            ops[n.op] = ops.get(n.op, 0) + 1
        top = ", ".join(f"{c} {op}" for op, c in sorted(ops.items(), key=lambda kv: -kv[1])[:6])
        hw = self.hardware["name"] if self.hardware else "none"
        lines = [f"autoshard plan ({self.method}) on mesh {self.mesh}, "
                 f"{self.mesh.num_devices} devices, hardware {hw}",
                 f"graph: {len(self.nodes)} nodes ({top})"]
        p = self.prediction
        if p:
            comm = ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in
                             sorted(p["collective_seconds"].items()) if v) or "none"
            lines.append(f"predicted step: {p['step_seconds'] * 1e3:.3f} ms = compute "
                         f"{p['compute_seconds'] * 1e3:.3f} ms + collectives: {comm}")
            budget = f" (budget {_mib(p['memory_budget'])})" if p.get("memory_budget") else ""
            lines.append(f"predicted peak memory: {_mib(p['peak_memory_bytes'])} per device"
                         f"{budget}")
        s = self.solver
        if s:
            outcome = solver_outcome(s["status"], s["gap"], s.get("details") or {})
            lines.append(f"solver: {s['engine']}, {s['nodes']} nodes / {s['edges']} edges / "
                         f"{s['strategies']} strategies, {s['seconds']:.2f} s, {outcome}")
        lines += [r.line() for r in redundant_axes_from_json(self.record.get("redundant_axes"))]
        parameters: list[ArgumentRow] = []
        for title, rows in (("arguments", self.inputs), ("results", self.outputs)):
            total = sum(r.bytes_per_device for r in rows)
            lines.append(f"{title}: {len(rows)} arrays, {_mib(total)} per device")
            own, mirrors = split_mirrors(rows, parameters)
            parameters += own
            lines += _rows(tuple(own), max_rows)
            if mirrors:
                lines.append(f"  ... {len(mirrors)} more mirror their parameter's layout "
                             f"({mirrors[0].path}, ...)")
        report = annotations_from_json(self.record.get("annotations"))
        if report is not None:
            lines += report.lines(max_rows)
        costly = sorted((n for n in self.nodes if n.cost), key=lambda n: -n.total_seconds)
        if costly:
            lines.append("costliest ops (compute + collectives + resharding):")
            for n in costly[:min(10, max_rows)]:
                lines.append(f"  {n.total_seconds * 1e3:9.4f} ms  {n.op:<18} {n.strategy:<28} "
                             f"{n.layer:<12} {n.source}".rstrip())
        v = self.verification
        if v:
            lines.append("predicted vs compiled:")
            lines += ["  " + line for line in comparison_lines(
                [(r["name"], r["predicted"], r["compiled"], _ratio(r)) for r in v["rows"]])]
            if any(r["name"].endswith(" count") for r in v["rows"]):
                lines.append("  " + COUNTS_NOTE)
        return "\n".join(lines)


def _ratio(row: Mapping) -> float | None:
    """A verification row's ratio; dumps written before rows held one: predicted / compiled,
    for bytes only (compiled counts are after XLA's combiners)."""
    if "ratio" in row:
        return row["ratio"]
    if row["predicted"] is None or not row["compiled"] or row["name"].endswith(" count"):
        return None
    return row["predicted"] / row["compiled"]


def split_mirrors(rows: tuple[ArgumentRow, ...], parameters: list[ArgumentRow] = ()
                  ) -> tuple[list[ArgumentRow], list[ArgumentRow]]:
    """(rows with a layout of their own, rows that mirror a parameter's layout: of ``rows`` or
    ``parameters``, ir/mirrors.py), in order."""
    mirrored = mirror_rows([(r.path, (r.shape, r.spec)) for r in rows],
                           [(p.path, (p.shape, p.spec)) for p in parameters])
    return ([r for i, r in enumerate(rows) if i not in mirrored],
            [r for i, r in enumerate(rows) if i in mirrored])


def _rows(rows: tuple[ArgumentRow, ...], max_rows: int) -> list[str]:
    shown = [r for r in rows if not r.spec.is_replicated][:max_rows] if len(rows) > max_rows \
        else list(rows)
    width = min(max((len(r.path) for r in shown), default=0), 48)
    out = [f"  {r.path:<{width}}  {r.dtype}{list(r.shape)!s:<14} {str(r.spec):<14} "
           f"{_pspec(r.partition_spec):<24} {_mib(r.bytes_per_device):>10}/dev" for r in shown]
    if len(shown) < len(rows):
        out.append(f"  ... {len(rows) - len(shown)} more (replicated)")
    return out


def _pspec(entries) -> str:
    return "P(" + ", ".join("None" if e is None else repr(e) if isinstance(e, str) else
                            repr(tuple(e)) for e in entries) + ")"


def _mib(nbytes) -> str:
    nbytes = nbytes or 0
    if nbytes >= 2**30:
        return f"{nbytes / 2**30:.2f} GiB"
    if nbytes >= 2**20:
        return f"{nbytes / 2**20:.2f} MiB"
    return f"{nbytes / 2**10:.1f} KiB"


def load_plan(directory: str | pathlib.Path) -> PlanDump:
    """Read a directory written by ``autoshard.dump``. PlanError when plan.json is missing,
    not JSON, or of another schema or dump version."""
    path = pathlib.Path(directory) / PLAN_FILE
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise PlanError(f"{path} does not exist; write it with autoshard.dump(plan, "
                        f"{str(directory)!r})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PlanError(f"{path} is not readable JSON ({err}); dump the plan again") from None
    check_header(doc, str(path))
    if doc.get("dump_version") != DUMP_VERSION:
        raise PlanError(f"{path} has dump version {doc.get('dump_version')!r}; this autoshard "
                        f"reads version {DUMP_VERSION}: dump the plan again with it")
    try:
        mesh = MeshSpec(tuple(doc["mesh"]["axis_names"]), tuple(doc["mesh"]["axis_sizes"]))

        def arg(r: dict) -> ArgumentRow:
            return ArgumentRow(r["path"], tuple(r["shape"]), r["dtype"],
                               ShardingSpec.parse(r["spec"]),
                               tuple(tuple(e) if isinstance(e, list) else e
                                     for e in r["partition_spec"]),
                               int(r["bytes_per_device"]), r.get("reason", ""))

        nodes = tuple(NodeRow(n["id"], n["op"], n["scope"], n["source"], n["layer"],
                              n["strategy"], None if n["cost"] is None else tuple(n["cost"]),
                              tuple(MappingProxyType(r) for r in n["rejected"]),
                              tuple(MappingProxyType(c) for c in n["collectives"]))
                      for n in doc["nodes"])
        return PlanDump(pathlib.Path(directory), MappingProxyType(doc), mesh, doc["method"],
                        tuple(arg(r) for r in doc["inputs"]),
                        tuple(arg(r) for r in doc["outputs"]), nodes)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise PlanError(f"{path} is malformed ({type(err).__name__}: {err}); dump the plan "
                        "again") from None


# -- comparing ------------------------------------------------------------------------------------

def diff_plans(a: PlanDump, b: PlanDump, *, max_lines: int = 200) -> list[str]:
    """What differs between two dumped plans, one line each: method, mesh, argument and
    result specs by path, predicted costs and, for plans of the same program, each op's
    strategy and cost. Empty when they agree."""
    lines = []
    for name, x, y in (("method", a.method, b.method), ("mesh", str(a.mesh), str(b.mesh)),
                       ("program", a.record.get("graph_fingerprint", "")[:12],
                        b.record.get("graph_fingerprint", "")[:12])):
        if x != y:
            lines.append(f"{name}: {x} -> {y}")
    for title, xs, ys in (("argument", a.inputs, b.inputs), ("result", a.outputs, b.outputs)):
        left, right = {r.path: r for r in xs}, {r.path: r for r in ys}
        for path in [p for p in left if p in right]:
            r, s = left[path], right[path]
            if r.spec != s.spec:
                lines.append(f"{title} {path}: {r.spec} -> {s.spec} ({_mib(r.bytes_per_device)}"
                             f" -> {_mib(s.bytes_per_device)} per device)")
        lines += [f"{title} {p}: only in A" for p in left if p not in right]
        lines += [f"{title} {p}: only in B" for p in right if p not in left]
    lines += _prediction_diff(a.prediction or {}, b.prediction or {})
    if a.record.get("graph_fingerprint") == b.record.get("graph_fingerprint"):
        right_nodes = {n.id: n for n in b.nodes}
        for n in a.nodes:
            m = right_nodes.get(n.id)
            if m is not None and n.strategy != m.strategy and (n.strategy or m.strategy):
                lines.append(f"node {n.id} {n.op} ({n.source}): {n.strategy} "
                             f"({n.total_seconds * 1e3:.4f} ms) -> {m.strategy} "
                             f"({m.total_seconds * 1e3:.4f} ms)")
    if len(lines) > max_lines:
        lines = lines[:max_lines] + [f"... {len(lines) - max_lines} more differences"]
    return lines


def _prediction_diff(p: Mapping, q: Mapping) -> list[str]:
    lines = []
    for key, unit in (("step_seconds", "ms"), ("compute_seconds", "ms"),
                      ("reshard_seconds", "ms"), ("peak_memory_bytes", "MiB")):
        x, y = p.get(key), q.get(key)
        if x != y:
            scale = 1e3 if unit == "ms" else 2.0**-20
            fx = "-" if x is None else f"{x * scale:.4f} {unit}"
            fy = "-" if y is None else f"{y * scale:.4f} {unit}"
            lines.append(f"predicted {key.removesuffix('_seconds').removesuffix('_bytes')}: "
                         f"{fx} -> {fy}")
    kinds = sorted(set(p.get("collective_seconds", {})) | set(q.get("collective_seconds", {})))
    for k in kinds:
        x, y = p.get("collective_seconds", {}).get(k, 0.0), q.get("collective_seconds", {}).get(
            k, 0.0)
        if x != y:
            lines.append(f"predicted {k}: {x * 1e3:.4f} ms -> {y * 1e3:.4f} ms")
    return lines
