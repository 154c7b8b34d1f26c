"""The built-in rules: data parallelism, and fully-sharded data parallelism (FSDP / ZeRO-3).

Data parallelism splits the leading (batch) dim of the batch arguments over the largest group
of mesh axes that divides it, replicates every other argument, and lets XLA's partitioner
propagate the rest. That is always correct and often what a user would write first; it is not a
search, and the plan says so in its ``method``. The fully-sharded rule also splits every other
argument (parameters, optimizer state) over the batch's axes on its largest dim they divide
(``state_spec``). Pins (``in_specs``, ``out_specs``, hints) always win over the rule.

Batch arguments are the ones named by ``batch_argnums``; without it, the last positional
argument whose leaves all share a leading dim is the batch (the ``step(params, opt_state, batch)``
convention; a trailing RNG key or scalar is skipped), and no argument is split otherwise. A batch
dim no mesh axis divides is replicated, and the plan and the log say so.

A result that is the new value of an argument (``passes/state.py``) keeps that argument's
layout, so state pinned by ``in_specs`` stays where it was pinned, step after step.
"""

from __future__ import annotations

import itertools
import logging

from autoshard.ir.graph import Graph
from autoshard.ir.mesh import MeshSpec
from autoshard.ir.plan import Plan
from autoshard.ir.sharding import B, ShardingSpec, Split, fsdp_dim
from autoshard.passes.pins import Pins
from autoshard.passes.state import updated_arguments

METHOD = "data-parallel rule"
FULLY_SHARDED_METHOD = "fully-sharded data-parallel rule"
log = logging.getLogger("autoshard")


def batch_axes(size: int, mesh: MeshSpec) -> tuple[int, ...]:
    """The mesh axes whose product is the largest divisor of ``size`` (earlier axes on ties)."""
    best: tuple[int, ...] = ()
    for r in range(mesh.ndim, 0, -1):
        for axes in itertools.combinations(range(mesh.ndim), r):
            ways = mesh.size(*axes)
            if size % ways == 0 and ways > mesh.size(*best):
                best = axes
    return best


def batch_spec(size: int, mesh: MeshSpec) -> ShardingSpec:
    axes = batch_axes(size, mesh)
    return ShardingSpec(tuple(Split(0) if i in axes else B for i in range(mesh.ndim)))


def state_spec(shape: tuple[int, ...], axes: tuple[int, ...], mesh: MeshSpec) -> ShardingSpec:
    """ZeRO-3 / FSDP's layout of a parameter or optimizer-state leaf: its largest dim that the
    batch axes divide, split over them (earlier dims on ties); replicated when none divides."""
    dim = fsdp_dim(shape, mesh.size(*axes) if axes else 1)
    if dim is None:
        return ShardingSpec.replicated(mesh.ndim)
    return ShardingSpec(tuple(Split(dim) if i in axes else B for i in range(mesh.ndim)))


def data_parallel_plan(graph: Graph, mesh: MeshSpec, pins: Pins, *, in_tree, out_tree,
                       batch_inputs: tuple[int, ...], fully_sharded: bool = False) -> Plan:
    """Plan: batch inputs split on dim 0, the rest replicated (``fully_sharded``: split by
    ``state_spec`` over the batch's axes, as FSDP / ZeRO-3 keeps parameters and optimizer
    state); results follow the argument they update, or are split like the batch when
    per-example (leading dim = batch size, and no other argument has that leading dim)."""
    replicated = ShardingSpec.replicated(mesh.ndim)
    batch_sizes = {graph.inputs[i].shape[0] for i in batch_inputs if graph.inputs[i].ndim}
    batch_size = batch_sizes.pop() if len(batch_sizes) == 1 else None
    if batch_size is not None and not batch_axes(batch_size, mesh):
        log.warning("autoshard: batch size %d is not divisible by any mesh axis of %s; the batch "
                    "is replicated (no data parallelism)", batch_size, mesh)
    reasons = dict(pins.reasons)
    in_specs = []
    for i, value in enumerate(graph.inputs):
        if i in pins.inputs:
            in_specs.append(pins.inputs[i])
        elif i in batch_inputs and value.ndim and value.shape[0] == batch_size:
            spec = batch_spec(value.shape[0], mesh)
            in_specs.append(spec)
            reasons[f"in:{i}"] = ("batch argument: split dim 0" if not spec.is_replicated else
                                  f"batch argument: no mesh axis divides {batch_size}")
        elif fully_sharded and batch_size is not None and value.ndim:
            spec = state_spec(value.shape, batch_axes(batch_size, mesh), mesh)
            in_specs.append(spec)
            reasons[f"in:{i}"] = ("state: split like FSDP" if not spec.is_replicated else
                                  "state: no dim divides over the batch axes")
        else:
            in_specs.append(replicated)
            reasons[f"in:{i}"] = "replicated"
    updated = updated_arguments(graph)
    other_leading = {v.shape[0] for i, v in enumerate(graph.inputs)
                     if i not in batch_inputs and v.ndim}
    out_specs = []
    for i, atom in enumerate(graph.outputs):
        source = updated.get(i)
        if i in pins.outputs:
            out_specs.append(pins.outputs[i])
        elif source is not None and not in_specs[source].is_replicated:
            out_specs.append(in_specs[source])
            reasons[f"out:{i}"] = f"as argument {graph.inputs[source].name}"
        elif (batch_size is not None and len(atom.shape) and atom.shape[0] == batch_size
              and batch_size not in other_leading):
            out_specs.append(batch_spec(batch_size, mesh))
            reasons[f"out:{i}"] = "per-example result: split dim 0"
        else:
            out_specs.append(replicated)
            reasons[f"out:{i}"] = "replicated"
    return Plan(graph, mesh, tuple(in_specs), tuple(out_specs), dict(pins.values), in_tree,
                out_tree, FULLY_SHARDED_METHOD if fully_sharded else METHOD, reasons)
