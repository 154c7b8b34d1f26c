"""Strategy rules for the layout-preserving families: elementwise ops, broadcasts, reshapes,
transposes, reductions, cumulative ops, iota and RNG.

Partial sums (P) flow through the ops that are linear in the partial operand (sums, negation,
casts between float types, scaling by a whole value, broadcasts, reshapes, transposes and sums
over any dim), so the solver can defer a reduction to where it is cheapest, as Megatron defers
the all-reduce of a row-parallel matmul past the bias add.
"""

from __future__ import annotations

import numpy as np

from autoshard.ir.graph import Literal, Node, Value
from autoshard.ir.mesh import MeshSpec
from autoshard.ir.primitives import ELEMENTWISE
from autoshard.ir.sharding import PARTIAL, B, Partial, ShardingSpec, Split
from autoshard.passes.strategies import registry
from autoshard.passes.strategies.registry import (Strategy, map_spec, register, split_ways, tensor_specs)

# linear in every operand: all-partial operands give a partial result
_LINEAR_ALL = {"add", "sub", "add_any", "neg", "copy", "copy_p", "real", "imag", "conj",
               "reduce_precision", "autoshard_hint", "stop_gradient"}
# linear in one operand (the first for div): partial x whole gives partial
_LINEAR_ONE = {"mul": (0, 1), "div": (0,)}


def _operand_spec(atom, spec: ShardingSpec, shape) -> ShardingSpec | None:
    """What an elementwise operand must be when the output is ``spec``: the same spec for an
    operand of the output's shape; for one that broadcasts along size-1 dims (jax allows that
    within a rank), the spec with those dims whole; replicated for a rank-0 value; nothing for
    a literal."""
    if isinstance(atom, Literal):
        return None
    if tuple(atom.shape) == tuple(shape):
        return spec
    if atom.ndim == len(shape) and atom.ndim:
        return ShardingSpec(tuple(B if isinstance(e, Split) and atom.shape[e.dim] == 1
                                  and shape[e.dim] != 1 else e for e in spec.sbp))
    return ShardingSpec.replicated(spec.mesh_ndim)


def _same_rank(atom, shape) -> bool:
    return isinstance(atom, Value) and atom.ndim == len(shape) and atom.ndim > 0


def _is_float(dtype) -> bool:
    try:
        return np.issubdtype(np.dtype(dtype), np.inexact)
    except TypeError:
        return False


@register(*ELEMENTWISE)
def _elementwise_rule(node: Node, mesh: MeshSpec) -> list[Strategy]:
    shape = node.outputs[0].shape
    if any(isinstance(a, Value) and a.ndim and a.ndim != len(shape) for a in node.inputs):
        return []  # a rank-changing bitcast: replicated
    linear_all = node.op in _LINEAR_ALL or (
        node.op == "convert_element_type" and _is_float(node.outputs[0].dtype)
        and all(_is_float(a.dtype) for a in node.inputs))
    out = []
    carry = registry.CARRY_PARTIAL and (linear_all or node.op in _LINEAR_ONE)
    for spec in tensor_specs(shape, mesh, partial=carry):
        whole = _without_partial(spec)
        ins = [_operand_spec(a, spec, shape) for a in node.inputs]
        if spec.has_partial:
            if linear_all:
                if not all(_same_rank(a, shape) for a in node.inputs):
                    continue
            else:
                variants = []
                for k in _LINEAR_ONE[node.op]:
                    if _same_rank(node.inputs[k], shape):
                        variants.append([_operand_spec(a, spec if i == k else whole, shape)
                                         for i, a in enumerate(node.inputs)])
                for v in variants:
                    out.append(Strategy(tuple(v), (spec,) * len(node.outputs),
                                        split_ways(spec, mesh)))
                continue
        out.append(Strategy(tuple(ins), (spec,) * len(node.outputs), split_ways(spec, mesh)))
    return out


def _without_partial(spec: ShardingSpec) -> ShardingSpec:
    return ShardingSpec(tuple(B if isinstance(e, Partial) else e for e in spec.sbp),
                        spec.split_order)


@register("broadcast_in_dim")
def _broadcast_rule(node: Node, mesh: MeshSpec) -> list[Strategy]:
    (operand, *dyn) = node.inputs
    out_shape = node.outputs[0].shape
    dims = node.params["broadcast_dimensions"]
    in_shape = tuple(operand.shape)
    back = {d: i for i, d in enumerate(dims) if in_shape[i] == out_shape[d]}
    out = []
    for spec in tensor_specs(out_shape, mesh,
                             partial=registry.CARRY_PARTIAL and isinstance(operand, Value)):
        if isinstance(operand, Literal):
            ins = [None]
        else:
            sbp = [Split(back[e.dim]) if isinstance(e, Split) and e.dim in back
                   else (PARTIAL if isinstance(e, Partial) else B) for e in spec.sbp]
            ins = [ShardingSpec(tuple(sbp))]
        ins += [ShardingSpec.replicated(mesh.ndim) for _ in dyn]
        out.append(Strategy(tuple(ins), (spec,), split_ways(spec, mesh)))
    return out


def reshape_dim_map(in_shape, out_shape) -> dict[int, int]:
    """Output dim -> input dim for dims where a split carries over unchanged: the major dims
    of each group of dims whose sizes multiply to the same total (row-major layout)."""
    mapping: dict[int, int] = {}
    i = j = 0
    while i < len(in_shape) and j < len(out_shape):
        if in_shape[i] == 1:
            i += 1
            continue
        if out_shape[j] == 1:
            j += 1
            continue
        start_i, start_j = i, j
        pi, pj = in_shape[i], out_shape[j]
        while pi != pj:
            if pi < pj:
                i += 1
                pi *= in_shape[i]
            else:
                j += 1
                pj *= out_shape[j]
        mapping[start_j] = start_i
        i += 1
        j += 1
    return mapping


def _divisible_map(spec: ShardingSpec, dim_map: dict[int, int], in_shape, mesh) -> bool:
    for d in {e.dim for e in spec.sbp if isinstance(e, Split)}:
        if d not in dim_map or in_shape[dim_map[d]] % mesh.size(*spec.dim_axes(d)):
            return False
    return True


@register("reshape")
def _reshape_rule(node: Node, mesh: MeshSpec) -> list[Strategy]:
    (operand, *dyn) = node.inputs
    in_shape, out_shape = tuple(operand.shape), tuple(node.outputs[0].shape)
    dim_map = reshape_dim_map(in_shape, out_shape)
    out = []
    for spec in tensor_specs(out_shape, mesh, dims=dim_map, partial=registry.CARRY_PARTIAL):
        if not _divisible_map(spec, dim_map, in_shape, mesh):
            continue
        out.append(Strategy((map_spec(spec, dim_map), *[None] * len(dyn)), (spec,),
                            split_ways(spec, mesh)))
    return out


@register("transpose")
def _transpose_rule(node: Node, mesh: MeshSpec) -> list[Strategy]:
    perm = node.params["permutation"]
    shape = node.outputs[0].shape
    return [Strategy((map_spec(spec, dict(enumerate(perm))),), (spec,), split_ways(spec, mesh))
            for spec in tensor_specs(shape, mesh, partial=registry.CARRY_PARTIAL)]


@register("squeeze")
def _squeeze_rule(node: Node, mesh: MeshSpec) -> list[Strategy]:
    removed = set(d % node.inputs[0].ndim for d in node.params["dimensions"])
    kept = [d for d in range(node.inputs[0].ndim) if d not in removed]
    dim_map = dict(enumerate(kept))
    return [Strategy((map_spec(spec, dim_map),), (spec,), split_ways(spec, mesh))
            for spec in tensor_specs(node.outputs[0].shape, mesh, partial=registry.CARRY_PARTIAL)]


@register("stack")
def _stack_rule(node: Node, mesh: MeshSpec) -> list[Strategy]:
    axis = node.params["axis"]
    shape = node.outputs[0].shape
    dim_map = {d: (d if d < axis else d - 1) for d in range(len(shape)) if d != axis}
    return [Strategy(tuple(map_spec(spec, dim_map) for _ in node.inputs), (spec,),
                     split_ways(spec, mesh))
            for spec in tensor_specs(shape, mesh, dims=dim_map, partial=registry.CARRY_PARTIAL)]


@register("unstack")
def _unstack_rule(node: Node, mesh: MeshSpec) -> list[Strategy]:
    axis = node.params["axis"]
    shape = node.outputs[0].shape
    dim_map = {d: (d if d < axis else d + 1) for d in range(len(shape))}
    return [Strategy((map_spec(spec, dim_map),), (spec,) * len(node.outputs),
                     split_ways(spec, mesh))
            for spec in tensor_specs(shape, mesh, partial=registry.CARRY_PARTIAL)]


_SUM_LIKE = {"reduce_sum"}
_COMBINE = {"reduce_max": "all-reduce", "reduce_min": "all-reduce", "reduce_prod": "all-reduce",
            "reduce_and": "all-reduce", "reduce_or": "all-reduce", "reduce_xor": "all-reduce"}


@register("reduce_sum", *_COMBINE, "argmax", "argmin")
def _reduce_rule(node: Node, mesh: MeshSpec) -> list[Strategy]:
    (operand,) = node.inputs
    in_shape = tuple(operand.shape)
    axes = set(node.params["axes"])
    kept = [d for d in range(len(in_shape)) if d not in axes]
    to_out = {d: i for i, d in enumerate(kept)}
    out_value = node.outputs[0]
    out = []
    for spec in tensor_specs(in_shape, mesh,
                             partial=registry.CARRY_PARTIAL and node.op in _SUM_LIKE):
        sbp, comm_axes = [], []
        for axis, e in enumerate(spec.sbp):
            if isinstance(e, Split) and e.dim in axes:
                if node.op in _SUM_LIKE:
                    sbp.append(PARTIAL)
                elif node.op in _COMBINE:
                    sbp.append(B)
                    comm_axes.append(axis)
                else:
                    break  # argmax over a split dim: not supported
            elif isinstance(e, Split):
                sbp.append(Split(to_out[e.dim]))
            else:
                sbp.append(e)
        else:
            out_spec = ShardingSpec(tuple(sbp))
            comm = ()
            if comm_axes:
                nbytes = out_value.nbytes * out_spec.shard_fraction(mesh)
                comm = (("all-reduce", tuple(comm_axes), nbytes),)
            out.append(Strategy((spec,), (out_spec,), split_ways(spec, mesh), comm))
    return out


@register("cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp")
def _cumulative_rule(node: Node, mesh: MeshSpec) -> list[Strategy]:
    shape = node.outputs[0].shape
    dims = [d for d in range(len(shape)) if d != node.params["axis"]]
    partial = registry.CARRY_PARTIAL and node.op == "cumsum"
    return [Strategy((spec,), (spec,), split_ways(spec, mesh))
            for spec in tensor_specs(shape, mesh, dims=dims, partial=partial)]


@register("iota", "random_bits", "full", "empty")
def _generator_rule(node: Node, mesh: MeshSpec) -> list[Strategy]:
    """Values made on device: every layout is free (threefry is partitionable)."""
    rep = ShardingSpec.replicated(mesh.ndim)
    ins = tuple(None if isinstance(a, Literal) else rep for a in node.inputs)
    return [Strategy(ins, (spec,) * len(node.outputs), split_ways(spec, mesh))
            for spec in tensor_specs(node.outputs[0].shape, mesh)]
