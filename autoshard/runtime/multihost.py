"""Every process of a ``jax.distributed`` run must execute the same plan; this checks they do.

Choice: every process solves on its own and the plans are compared by digest, rather than
process 0 solving and broadcasting its plan. The solve is deterministic (same graph, options and
versions give the same plan; tests/solver/test_solve.py checks it in a second process), so the
check normally costs one small key-value exchange. Solving everywhere needs no wait for one
process's solve, no large broadcast, works the same with the plan cache (each process reads its
own), and turns the real hazards — processes tracing different programs (other shapes, static
arguments or versions), a stale cache on one host, a solver that hit a wall-clock limit on one
host only — into an error that names the differing values, instead of a hang or silently wrong
collectives.

The exchange goes through the coordination service's key-value store that
``jax.distributed.initialize`` starts, not through a device collective: a collective would hang
forever when one process never reaches it (it failed to plan, or crashed), whereas a key-value
read takes a timeout (``AUTOSHARD_AGREEMENT_TIMEOUT``, seconds, default 900). A process that
fails to plan publishes its error before raising, so the others fail at once naming it.

Rounds are numbered per process in call order: every process runs the same program, so the n-th
plan of one process is the n-th plan of every other. A process that plans something the others
do not (a new signature on one host only) is reported as a mismatch of function names.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import zlib
from typing import Any

import jax
import numpy as np
from jax._src import distributed  # the coordination service's client has no public handle
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from autoshard.ir.errors import ArgumentError, PlanAgreementError
from autoshard.ir.graph import Graph
from autoshard.ir.plan_json import decisions_digest, plan_decisions

DEFAULT_TIMEOUT_SECONDS = 900.0
_rounds = itertools.count()  # the only process-global state: the position in the call order
_MAX_LISTED = 8


def is_multiprocess() -> bool:
    return jax.process_count() > 1


def agreement_timeout() -> float:
    text = os.environ.get("AUTOSHARD_AGREEMENT_TIMEOUT", "")
    try:
        return float(text) if text.strip() else DEFAULT_TIMEOUT_SECONDS
    except ValueError:
        raise PlanAgreementError(f"AUTOSHARD_AGREEMENT_TIMEOUT must be a number of seconds, got "
                                 f"{text!r}") from None


def _client():
    client = distributed.global_state.client
    if client is None:
        raise PlanAgreementError("jax reports several processes but jax.distributed is not "
                                 "initialized; call jax.distributed.initialize() first")
    return client


def _publish(round_id: int, payload: dict) -> None:
    _client().key_value_set(f"autoshard/plan/{round_id}/{jax.process_index()}",
                            json.dumps(payload, sort_keys=True))


def report_failure(function: str, error: BaseException) -> None:
    """Tell the other processes that this one failed to plan ``function`` (then re-raise)."""
    if not is_multiprocess():
        return
    round_id = next(_rounds)
    try:
        _publish(round_id, {"function": function, "ok": False,
                            "error": f"{type(error).__name__}: {error}"[:4000]})
    except Exception:  # the original error matters more than a failed report
        pass


def agree(function: str, doc: dict, graph: Graph) -> str:
    """Check that every process chose the plan ``doc`` (a ``plan_to_json`` record) for
    ``function``; returns the plan digest. Single-process runs return at once."""
    digest = decisions_digest(doc)
    if not is_multiprocess():
        return digest
    round_id = next(_rounds)
    me, count = jax.process_index(), jax.process_count()
    decisions = plan_decisions(doc)
    packed = base64.b64encode(zlib.compress(json.dumps(decisions).encode())).decode()
    _publish(round_id, {"function": function, "ok": True, "digest": digest, "plan": packed})
    timeout = agreement_timeout()
    client = _client()
    for peer in range(count):
        if peer == me:
            continue
        try:
            text = client.blocking_key_value_get(f"autoshard/plan/{round_id}/{peer}",
                                                 int(timeout * 1000))
        except Exception as err:  # jax raises JaxRuntimeError(DEADLINE_EXCEEDED) on timeout
            raise PlanAgreementError(
                f"autoshard.compile({function}): process {peer} of {count} did not report its "
                f"plan within {timeout:.0f}s (it may have crashed, be stuck before "
                f"autoshard.compile, or still be solving); this is process {me}. Set "
                f"AUTOSHARD_AGREEMENT_TIMEOUT to wait longer. ({type(err).__name__}: "
                f"{str(err)[:200]})") from None
        theirs = json.loads(text)
        if not theirs.get("ok"):
            raise PlanAgreementError(
                f"autoshard.compile({function}): process {peer} failed to plan "
                f"{theirs.get('function')}: {theirs.get('error')}; stopping process {me} too")
        if theirs.get("function") != function:
            raise PlanAgreementError(
                f"autoshard.compile: process {me} planned {function} but process {peer} "
                f"planned {theirs.get('function')} at the same point; every process must "
                "compile the same functions with the same argument shapes in the same order")
        if theirs["digest"] != digest:
            other = json.loads(zlib.decompress(base64.b64decode(theirs["plan"])))
            raise PlanAgreementError(
                f"autoshard.compile({function}): process {me} and process {peer} chose different "
                f"plans:\n{_difference(decisions, other, graph, me, peer)}\nCheck that "
                "every process runs the same code, jax and autoshard versions, and options "
                "(hardware, memory_budget, in_specs); clear AUTOSHARD_CACHE_DIR if a cached plan "
                "is stale.")
    return digest


def _difference(mine: dict, theirs: dict, graph: Graph, me: int, peer: int) -> str:
    if mine["graph_fingerprint"] != theirs["graph_fingerprint"]:
        return ("  they traced different programs (graph fingerprints differ): other argument "
                "shapes, static arguments, code or jax version")
    lines = []
    if mine["method"] != theirs["method"]:
        lines.append(f"  planner: {mine['method']} on process {me}, {theirs['method']} on "
                     f"process {peer}")
    for kind in ("inputs", "outputs"):
        for (path, a), (_, b) in zip(mine[kind], theirs[kind]):
            if a != b:
                lines.append(f"  {kind[:-1]} {path}: {a} on process {me}, {b} on process {peer}")
    for vid in sorted(set(mine["values"]) | set(theirs["values"]), key=int):
        a, b = mine["values"].get(vid), theirs["values"].get(vid)
        if a != b:
            node = graph.node_of(int(vid))
            where = node.describe() if node is not None else "value"
            lines.append(f"  %{vid} ({where}): {a} on process {me}, {b} on process {peer}")
    for nid in sorted(set(mine["operands"]) | set(theirs["operands"]), key=int):
        if mine["operands"].get(nid) != theirs["operands"].get(nid):
            lines.append(f"  operands of node {nid}: {mine['operands'].get(nid)} on process "
                         f"{me}, {theirs['operands'].get(nid)} on process {peer}")
    more = len(lines) - _MAX_LISTED
    return "\n".join(lines[:_MAX_LISTED] + ([f"  ... and {more} more"] if more > 0 else []))


def shard_process_local(local: Any, target: NamedSharding,
                        global_shape: tuple[int, ...], what: str) -> jax.Array:
    """A global array of ``global_shape`` laid out as ``target``, built from this process's rows.

    The global array is the concatenation, along dim 0 and in process-index order, of every
    process's ``local`` rows. Devices whose slice lies in this process's rows are filled directly;
    when the target lays rows out otherwise (the batch replicated across processes, or split on
    another dim), the rows are first placed one block per process and then resharded, which
    costs one collective.
    """
    count, me = jax.process_count(), jax.process_index()
    local = np.asarray(local)
    if not global_shape or global_shape[0] % count:
        raise ArgumentError(f"{what}: a process-local batch needs a leading dim divisible "
                            f"by the {count} processes, global shape {global_shape}")
    rows = global_shape[0] // count
    if local.shape != (rows, *global_shape[1:]):
        raise ArgumentError(
            f"{what}: this process's batch has shape {local.shape}; the plan's global shape "
            f"{tuple(global_shape)} over {count} processes needs {(rows, *global_shape[1:])}")
    first = me * rows

    def rows_of(index):
        start = index[0].start or 0
        stop = global_shape[0] if index[0].stop is None else index[0].stop
        return start, stop

    def data(index):
        start, stop = rows_of(index)
        return local[(slice(start - first, stop - first),) + tuple(index[1:])]

    indices = target.addressable_devices_indices_map(tuple(global_shape)).values()
    if all(first <= rows_of(i)[0] and rows_of(i)[1] <= first + rows for i in indices):
        return jax.make_array_from_callback(tuple(global_shape), target, data)
    # mesh order within each process, processes in index order (never device ids)
    devices = sorted(target.mesh.devices.flat, key=lambda d: d.process_index)
    per_process = len(devices) // count
    staging = NamedSharding(Mesh(np.array(devices).reshape(count, per_process),
                                 ("autoshard_process", "autoshard_local")),
                            PartitionSpec("autoshard_process"))
    staged = jax.make_array_from_callback(tuple(global_shape), staging, data)
    return jax.jit(lambda x: x, out_shardings=target)(staged)
