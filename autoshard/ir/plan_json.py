"""The versioned JSON form of a plan's decisions, and the fingerprint of the graph it was made for.

A plan is its graph plus decisions (specs by flat position and by value id). The graph is not
stored: the decisions are only meaningful for the graph whose ``graph_fingerprint`` they carry,
and lifting the same function on the same arguments gives the same graph with the same value ids.
So a stored plan is re-attached to a freshly lifted graph (the plan cache, plan agreement across
processes) and checked against it, never trusted blindly. The dump viewer writes a superset of
this record (``autoshard.dump``), so both read the same ``decisions`` section.

Schema (``SCHEMA_VERSION`` is bumped on any incompatible change; readers reject other versions):
  schema, version, autoshard_version, method, mesh {axis_names, axis_sizes}, graph_fingerprint,
  inputs / outputs: [{path, shape, dtype, spec, partition_spec, bytes_per_device, reason}],
  values {value id: spec}, made {value id: spec} (added within version 1: a record without it
  reads as {}), operands {node id: [spec | null, ...]}, reasons {value id: text},
  unplanned [...], prediction {...} | null, solver {...} | null, hardware_profile,
  memory_curve [bytes per step], explanation {node id: {chosen, rejected, collectives,
  num_strategies}} with strategies as [label, operand specs, output specs, compute, collective,
  reshard-in, reshard-out seconds] and collectives as [kind, axes, bytes, count, cause],
  annotations {mode, annotated, annotated_step_seconds, searched_step_seconds,
  annotated_peak_bytes, searched_peak_bytes, differences: [[path, annotated spec, searched
  spec, seconds, kept]]} | null (added within version 1: a record without it reads as null),
  redundant_axes [[axis name, size, chosen step seconds, best step seconds using it | null,
  why none]] (added within version 1: a record without it reads as []).
Specs are SBP strings as ``str(ShardingSpec)`` writes them (``"(S0, B)"``), parsed back with
``ShardingSpec.parse``.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
import re
from typing import Any

import numpy as np

from autoshard.ir.errors import PlanError
from autoshard.ir.graph import Graph, Value, dtype_name
from autoshard.ir.mesh import MeshSpec
from autoshard.ir.plan import (AnnotationDiff, AnnotationReport, CollectiveCause,
                               NodeExplanation, Plan, Prediction, RedundantAxis, SolverStats,
                               StrategyCost)
from autoshard.ir.sharding import ShardingSpec
from autoshard.ir.version import __version__

SCHEMA = "autoshard.plan"
SCHEMA_VERSION = 1


# -- graph fingerprint --------------------------------------------------------------------------

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+|0x[0-9a-fA-F]{6,}")


def _canonical(obj: Any) -> Any:
    """A JSON-able, process-independent form of a primitive parameter (no memory addresses,
    no dict ordering, callables by qualified name)."""
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return repr(obj)
    if isinstance(obj, enum.Enum):
        return f"{type(obj).__name__}.{obj.name}"
    if isinstance(obj, (np.dtype, type)) and not callable(getattr(obj, "__call__", None)):
        return str(obj)
    if isinstance(obj, np.generic):
        return _canonical(obj.item())
    if isinstance(obj, np.ndarray):
        return ["ndarray", str(obj.dtype), list(obj.shape),
                hashlib.sha256(np.ascontiguousarray(obj).tobytes()).hexdigest()[:16]]
    if isinstance(obj, (tuple, list)):
        return [_canonical(x) for x in obj]
    if isinstance(obj, dict) or hasattr(obj, "items") and callable(obj.items):
        return {str(k): _canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (frozenset, set)):
        return sorted(str(_canonical(x)) for x in obj)
    if callable(obj) and hasattr(obj, "__qualname__"):
        return f"{getattr(obj, '__module__', '')}.{obj.__qualname__}"
    return _ADDRESS.sub("", f"{type(obj).__name__}:{obj!r}")


def _graph_record(graph: Graph) -> list:
    """Everything about a graph the plan depends on: structure, shapes, dtypes, primitive
    parameters and names; not the user's source lines (moving code must not cost a re-solve)
    nor constant contents (a plan depends on their shapes only)."""
    def atom(a):
        if isinstance(a, Value):
            return a.id
        return ["lit", _canonical(np.asarray(a.value).tolist()), dtype_name(a.dtype)]

    def value(v: Value):
        return [v.id, list(v.shape), dtype_name(v.dtype), bool(v.weak_type), v.name]

    def body(g: Graph) -> list:
        return [[value(v) for v in g.inputs], [atom(a) for a in g.outputs],
                [value(v) for v in g.constant_values], list(g.output_names),
                [[n.id, n.op, _canonical(dict(n.params)), [atom(a) for a in n.inputs],
                  [value(v) for v in n.outputs], [body(r) for r in n.regions]]
                 for n in g.nodes]]

    return body(graph)


def graph_fingerprint(graph: Graph) -> str:
    """A stable hex digest of ``graph`` (same in every process and every run of the same
    program with the same jax)."""
    text = json.dumps(_graph_record(graph), separators=(",", ":"), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def fingerprint(*parts: Any) -> str:
    """A stable hex digest of JSON-able ``parts`` (canonicalised as primitive params are)."""
    text = json.dumps(_canonical(list(parts)), separators=(",", ":"), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


# -- plan <-> JSON ------------------------------------------------------------------------------

def _jsonable(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict) or hasattr(obj, "items") and callable(obj.items):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return [_jsonable(x) for x in obj]
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def _spec_or_none(text: str | None) -> ShardingSpec | None:
    return None if text is None else ShardingSpec.parse(text)


def _boundary(plan: Plan, values, specs, names, prefix: str) -> list[dict]:
    rows = []
    for i, (v, spec) in enumerate(zip(values, specs)):
        ndim = len(v.shape)
        pspec = spec.to_partition_spec(plan.mesh, ndim, partial="replicate")
        nbytes = plan.bytes_per_device(v, spec) if isinstance(v, Value) else 0
        rows.append({"path": names[i] if i < len(names) else f"{prefix}[{i}]",
                     "shape": list(v.shape), "dtype": dtype_name(v.dtype), "spec": str(spec),
                     "partition_spec": [list(e) if isinstance(e, tuple) else e for e in pspec],
                     "bytes_per_device": nbytes,
                     "reason": plan.reasons.get(f"{prefix}:{i}", "")})
    return rows


def plan_to_json(plan: Plan, *, graph_digest: str | None = None) -> dict:
    """The plan's decisions as a JSON-able dict (see the module docstring for the schema);
    ``graph_digest``: ``graph_fingerprint(plan.graph)`` when the caller has it already (it
    walks the whole graph)."""
    g = plan.graph
    p, s = plan.prediction, plan.solver
    return {
        "schema": SCHEMA, "version": SCHEMA_VERSION, "autoshard_version": __version__,
        "method": plan.method,
        "mesh": {"axis_names": list(plan.mesh.axis_names),
                 "axis_sizes": list(plan.mesh.axis_sizes)},
        "graph_fingerprint": graph_digest or graph_fingerprint(g),
        "inputs": _boundary(plan, g.inputs, plan.input_specs,
                            [v.name or f"in[{i}]" for i, v in enumerate(g.inputs)], "in"),
        "outputs": _boundary(plan, g.outputs, plan.output_specs, list(g.output_names), "out"),
        "values": {str(k): str(v) for k, v in sorted(plan.value_specs.items())},
        "made": {str(k): str(v) for k, v in sorted(plan.made_specs.items())},
        "operands": {str(k): [None if x is None else str(x) for x in v]
                     for k, v in sorted(plan.operand_specs.items())},
        "reasons": {str(k): v for k, v in plan.reasons.items() if isinstance(k, int)},
        "unplanned": list(plan.unplanned),
        "prediction": None if p is None else _jsonable({
            "step_seconds": p.step_seconds, "compute_seconds": p.compute_seconds,
            "collective_seconds": dict(p.collective_seconds),
            "reshard_seconds": p.reshard_seconds,
            "collectives": {k: list(v) for k, v in p.collectives.items()},
            "peak_memory_bytes": p.peak_memory_bytes, "memory_budget": p.memory_budget}),
        "solver": None if s is None else _jsonable({
            "engine": s.engine, "nodes": s.nodes, "edges": s.edges, "strategies": s.strategies,
            "seconds": s.seconds, "objective": s.objective, "bound": s.bound, "gap": s.gap,
            "status": s.status, "details": dict(s.details)}),
        "hardware_profile": plan.hardware,
        "memory_curve": list(plan.memory_curve),
        "explanation": {str(k): _explanation_to_json(e)
                        for k, e in sorted(plan.explanation.items())},
        "annotations": _annotations_to_json(plan.annotation_report),
        "redundant_axes": [_jsonable([r.axis, r.size, r.chosen_step_seconds,
                                      r.best_using_it_step_seconds, r.unavailable])
                           for r in plan.redundant_axes],
    }


def _annotations_to_json(r: AnnotationReport | None) -> dict | None:
    if r is None:
        return None
    return _jsonable({
        "mode": r.mode, "annotated": r.annotated,
        "annotated_step_seconds": r.annotated_step_seconds,
        "searched_step_seconds": r.searched_step_seconds,
        "annotated_peak_bytes": r.annotated_peak_bytes,
        "searched_peak_bytes": r.searched_peak_bytes,
        "differences": [[d.path, str(d.annotated), str(d.searched), d.seconds, d.kept]
                        for d in r.differences]})


def annotations_from_json(d: dict | None) -> AnnotationReport | None:
    """The annotation report of a plan record's ``annotations`` section (None where absent)."""
    if not d:
        return None
    return AnnotationReport(
        d["mode"], int(d["annotated"]),
        tuple(AnnotationDiff(path, ShardingSpec.parse(a), ShardingSpec.parse(b), float(t),
                             bool(kept)) for path, a, b, t, kept in d["differences"]),
        float(d["annotated_step_seconds"]), float(d["searched_step_seconds"]),
        int(d["annotated_peak_bytes"]), int(d["searched_peak_bytes"]))


def redundant_axes_from_json(rows: list | None) -> tuple[RedundantAxis, ...]:
    """The unused mesh axes of a plan record's ``redundant_axes`` section (() where absent)."""
    return tuple(RedundantAxis(str(axis), int(size), float(chosen),
                               None if best is None else float(best), str(why))
                 for axis, size, chosen, best, why in rows or ())


def _number(x: Any) -> Any:
    """``_jsonable`` of a number (numpy scalars as Python ones, non-finite floats as None),
    without its walk: a large plan's explanations hold hundreds of thousands of numbers."""
    if isinstance(x, np.generic):
        x = x.item()
    return None if isinstance(x, float) and not math.isfinite(x) else x


def _strategy_to_json(c: StrategyCost) -> list:
    return [str(c.label), [None if x is None else str(x) for x in c.inputs],
            [str(x) for x in c.outputs], _number(c.compute_seconds),
            _number(c.collective_seconds), _number(c.reshard_in_seconds),
            _number(c.reshard_out_seconds)]


def _strategy_from_json(row: list) -> StrategyCost:
    label, inputs, outputs, *seconds = row
    return StrategyCost(label, tuple(_spec_or_none(x) for x in inputs),
                        tuple(ShardingSpec.parse(x) for x in outputs), *map(float, seconds))


def _explanation_to_json(e: NodeExplanation) -> dict:
    return {"chosen": _strategy_to_json(e.chosen),
            "rejected": [_strategy_to_json(c) for c in e.rejected],
            "collectives": [[str(c.kind), [str(a) for a in c.axes], _number(c.bytes),
                             _number(c.count), str(c.cause)] for c in e.collectives],
            "num_strategies": _number(e.num_strategies)}


def _explanation_from_json(d: dict) -> NodeExplanation:
    return NodeExplanation(_strategy_from_json(d["chosen"]),
                           tuple(_strategy_from_json(r) for r in d["rejected"]),
                           tuple(CollectiveCause(k, tuple(a), float(b), float(n), why)
                                 for k, a, b, n, why in d["collectives"]),
                           int(d["num_strategies"]))


def check_header(doc: Any, where: str) -> None:
    """Raise PlanError unless ``doc`` is a plan record of this schema version."""
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise PlanError(f"{where} is not an autoshard plan (no schema {SCHEMA!r})")
    if doc.get("version") != SCHEMA_VERSION:
        raise PlanError(f"{where} has plan schema version {doc.get('version')!r}; this autoshard "
                        f"reads version {SCHEMA_VERSION}")


def plan_from_json(doc: dict, graph: Graph, *, in_tree: Any, out_tree: Any,
                   where: str = "plan record", graph_digest: str | None = None) -> Plan:
    """Re-attach stored decisions to ``graph`` (``graph_digest``: its fingerprint, if known).
    PlanError when the record is of another schema version or was made for a different
    graph."""
    check_header(doc, where)
    if doc.get("graph_fingerprint") != (graph_digest or graph_fingerprint(graph)):
        raise PlanError(f"{where} was made for a different program (graph fingerprint differs)")
    try:
        mesh = MeshSpec(tuple(doc["mesh"]["axis_names"]), tuple(doc["mesh"]["axis_sizes"]))
        p, s = doc.get("prediction"), doc.get("solver")
        prediction = None if p is None else Prediction(
            p["step_seconds"], p["compute_seconds"], dict(p["collective_seconds"]),
            p["reshard_seconds"], {k: tuple(v) for k, v in p["collectives"].items()},
            int(p["peak_memory_bytes"]), p["memory_budget"])
        solver = None if s is None else SolverStats(
            s["engine"], s["nodes"], s["edges"], s["strategies"], s["seconds"], s["objective"],
            s["bound"], s["gap"], s["status"], dict(s["details"]))
        reasons: dict[str | int, str] = {int(k): v for k, v in doc["reasons"].items()}
        for prefix, rows in (("in", doc["inputs"]), ("out", doc["outputs"])):
            for i, row in enumerate(rows):
                if row.get("reason"):
                    reasons[f"{prefix}:{i}"] = row["reason"]
        return Plan(graph, mesh,
                    tuple(ShardingSpec.parse(r["spec"]) for r in doc["inputs"]),
                    tuple(ShardingSpec.parse(r["spec"]) for r in doc["outputs"]),
                    {int(k): ShardingSpec.parse(v) for k, v in doc["values"].items()},
                    in_tree, out_tree, doc["method"], reasons, tuple(doc["unplanned"]),
                    prediction, solver,
                    {int(k): tuple(_spec_or_none(x) for x in v)
                     for k, v in doc["operands"].items()},
                    {int(k): _explanation_from_json(e)
                     for k, e in doc.get("explanation", {}).items()},
                    tuple(doc.get("memory_curve", ())), doc.get("hardware_profile", ""),
                    annotations_from_json(doc.get("annotations")),
                    {int(k): ShardingSpec.parse(v) for k, v in doc.get("made", {}).items()},
                    redundant_axes_from_json(doc.get("redundant_axes")))
    except PlanError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise PlanError(f"{where} is malformed: {type(err).__name__}: {err}") from None


def plan_decisions(doc: dict) -> dict:
    """What a plan record decides (method, mesh, graph, every spec by path or id), not how long
    it took: two processes that chose the same plan have equal decisions even when their solve
    times differ."""
    decisions = {k: doc[k] for k in ("method", "mesh", "graph_fingerprint", "values",
                                     "operands", "unplanned")}
    decisions["made"] = doc.get("made", {})
    decisions["inputs"] = [[r["path"], r["spec"]] for r in doc["inputs"]]
    decisions["outputs"] = [[r["path"], r["spec"]] for r in doc["outputs"]]
    return decisions


def decisions_digest(doc: dict) -> str:
    """A digest of ``plan_decisions(doc)``."""
    return hashlib.sha256(json.dumps(plan_decisions(doc), sort_keys=True).encode()).hexdigest()
