"""Strategy rules for indexing: gather and scatter (embeddings and their gradients), slices,
dynamic slices and updates, pads, concatenation, reversal, sorting, top-k and windowed
reductions (pooling).

Embedding lookups (a gather of rows) can split the batch of indices, the embedding dim, or the
vocabulary: a device holding a range of rows answers for the indices in its range and zeros
elsewhere, a partial sum (the vocab-parallel embedding of Megatron-LM). Scatter-add, the
embedding gradient, mirrors it: split updates give partial tables; a split table takes only the
updates in its range.
"""

from __future__ import annotations

from autoshard.ir.graph import Literal, Node, Value
from autoshard.ir.mesh import MeshSpec
from autoshard.ir.sharding import PARTIAL, SBP, B, ShardingSpec, Split
from autoshard.passes.strategies import registry
from autoshard.passes.strategies.registry import (Strategy, axis_assignments, register, split_ways,
                                       tensor_specs)


def _role_strategies(mesh: MeshSpec, roles: list[tuple[str, int, tuple[int | None | str, ...]]],
                     arity: int) -> list[Strategy]:
    """Each role: (label, size it splits, per-tensor entry) for tensors (operands..., output):
    an int dim to split, None for broadcast, "P" for partial."""
    strategies = []
    for pick in axis_assignments(mesh, [None, *range(len(roles))]):
        tensors: list[list[SBP]] = [[] for _ in range(arity)]
        ways: dict[int, int] = {}
        for axis, r in enumerate(pick):
            entries = (None,) * arity if r is None else roles[r][2]
            if r is not None:
                ways[r] = ways.get(r, 1) * mesh.axis_sizes[axis]
            for t, e in enumerate(entries):
                tensors[t].append(B if e is None else PARTIAL if e == "P" else Split(e))
        if any(roles[r][1] % w for r, w in ways.items()):
            continue
        specs = [ShardingSpec(tuple(t)) for t in tensors]
        divisor = 1
        for axis, r in enumerate(pick):
            if r is not None:
                divisor *= mesh.axis_sizes[axis]
        strategies.append(Strategy(tuple(specs[:-1]), (specs[-1],), divisor))
    return strategies


@register("gather")
def _gather_rule(node: Node, mesh: MeshSpec) -> list[Strategy]:
    operand, indices = node.inputs
    out = node.outputs[0]
    dn = node.params["dimension_numbers"]
    slice_sizes = node.params["slice_sizes"]
    offset_dims = tuple(dn.offset_dims)
    collapsed = set(dn.collapsed_slice_dims) | set(getattr(dn, "operand_batching_dims", ()))
    batch_out = [d for d in range(out.ndim) if d not in offset_dims]
    index_batch = [d for d in range(indices.ndim - 1)]
    roles = []
    operand_batching = tuple(getattr(dn, "operand_batching_dims", ()))
    indices_batching = tuple(getattr(dn, "start_indices_batching_dims", ()))
    for o, i in zip(batch_out, index_batch):
        op_dim = operand_batching[indices_batching.index(i)] if i in indices_batching else None
        roles.append((f"idx{i}", indices.shape[i], (op_dim, i, o)))
    slice_dims = [d for d in range(operand.ndim) if d not in collapsed]
    for o, d in zip(offset_dims, slice_dims):
        if slice_sizes[d] == operand.shape[d]:
            roles.append((f"dim{d}", operand.shape[d], (d, None, o)))
    for d in dn.collapsed_slice_dims:
        if d in dn.start_index_map and slice_sizes[d] == 1:
            roles.append((f"rows{d}", operand.shape[d], (d, None, "P")))
    return _role_strategies(mesh, [r for r in roles if r[1] > 1], 3)


@register("scatter-add", "scatter_add", "scatter", "scatter-mul", "scatter_mul", "scatter-min",
          "scatter_min", "scatter-max", "scatter_max")
def _scatter_rule(node: Node, mesh: MeshSpec) -> list[Strategy]:
    operand, indices, updates = node.inputs[:3]
    dn = node.params["dimension_numbers"]
    window = tuple(dn.update_window_dims)
    inserted = set(dn.inserted_window_dims) | set(getattr(dn, "operand_batching_dims", ()))
    scatter_dims = [d for d in range(updates.ndim) if d not in window]
    index_batch = [d for d in range(indices.ndim - 1)]
    adds = node.op in ("scatter-add", "scatter_add")
    operand_batching = tuple(getattr(dn, "operand_batching_dims", ()))
    indices_batching = tuple(getattr(dn, "scatter_indices_batching_dims", ()))
    roles = []
    for u, i in zip(scatter_dims, index_batch):
        if i in indices_batching:
            # a batching dim (the gradient of take_along_axis): update batch i lands in operand
            # batch i only, so all four split alike with nothing to reduce
            d = operand_batching[indices_batching.index(i)]
            roles.append((f"batch{d}", operand.shape[d], (d, i, u, d)))
        elif adds:
            roles.append((f"upd{u}", updates.shape[u], ("P", i, u, "P")))
    operand_window = [d for d in range(operand.ndim) if d not in inserted]
    for u, d in zip(window, operand_window):
        if updates.shape[u] == operand.shape[d]:
            roles.append((f"dim{d}", operand.shape[d], (d, None, u, d)))
    for d in dn.scatter_dims_to_operand_dims:
        if d in dn.inserted_window_dims:
            roles.append((f"rows{d}", operand.shape[d], (d, None, None, d)))
    return _role_strategies(mesh, [r for r in roles if r[1] > 1], 4)


def _full_dims_rule(node: Node, mesh: MeshSpec, dims: list[int], *, partial: bool = False
                    ) -> list[Strategy]:
    """Ops that keep ``dims`` intact: operands of the output's shape follow the output spec,
    rank-0 operands (indices, pad values) are read whole."""
    shape = node.outputs[0].shape
    rep = ShardingSpec.replicated(mesh.ndim)
    out = []
    for spec in tensor_specs(shape, mesh, dims=dims, partial=partial):
        ins = []
        for atom in node.inputs:
            if isinstance(atom, Literal):
                ins.append(None)
            elif atom.ndim == len(shape) and atom.ndim:
                ins.append(spec)
            else:
                ins.append(rep)
        out.append(Strategy(tuple(ins), (spec,) * len(node.outputs), split_ways(spec, mesh)))
    return out


@register("slice")
def _slice_rule(node: Node, mesh: MeshSpec) -> list[Strategy]:
    operand = node.inputs[0]
    strides = node.params["strides"] or (1,) * operand.ndim
    dims = [d for d in range(operand.ndim)
            if node.params["start_indices"][d] == 0 and strides[d] == 1
            and node.params["limit_indices"][d] == operand.shape[d]]
    return _full_dims_rule(node, mesh, dims, partial=registry.CARRY_PARTIAL)


@register("dynamic_slice")
def _dynamic_slice_rule(node: Node, mesh: MeshSpec) -> list[Strategy]:
    operand = node.inputs[0]
    dims = [d for d in range(operand.ndim) if node.params["slice_sizes"][d] == operand.shape[d]]
    return _full_dims_rule(node, mesh, dims)


@register("dynamic_update_slice")
def _dynamic_update_slice_rule(node: Node, mesh: MeshSpec) -> list[Strategy]:
    operand, update = node.inputs[:2]
    dims = [d for d in range(operand.ndim) if update.shape[d] == operand.shape[d]]
    return _full_dims_rule(node, mesh, dims)


@register("pad")
def _pad_rule(node: Node, mesh: MeshSpec) -> list[Strategy]:
    config = node.params["padding_config"]
    dims = [d for d, (lo, hi, interior) in enumerate(config) if lo == hi == interior == 0]
    return _full_dims_rule(node, mesh, dims)


@register("concatenate")
def _concatenate_rule(node: Node, mesh: MeshSpec) -> list[Strategy]:
    axis = node.params["dimension"]
    shape = node.outputs[0].shape
    out = []
    for spec in tensor_specs(shape, mesh, dims=[d for d in range(len(shape)) if d != axis],
                             partial=registry.CARRY_PARTIAL and all(
                                 isinstance(a, Value) for a in node.inputs)):
        out.append(Strategy(tuple(spec for _ in node.inputs), (spec,), split_ways(spec, mesh)))
    return out


@register("rev")
def _rev_rule(node: Node, mesh: MeshSpec) -> list[Strategy]:
    shape = node.outputs[0].shape
    dims = [d for d in range(len(shape)) if d not in node.params["dimensions"]]
    return _full_dims_rule(node, mesh, dims, partial=registry.CARRY_PARTIAL)


@register("split")
def _split_rule(node: Node, mesh: MeshSpec) -> list[Strategy]:
    axis = node.params["axis"]
    operand = node.inputs[0]
    out = []
    for spec in tensor_specs(operand.shape, mesh,
                             dims=[d for d in range(operand.ndim) if d != axis],
                             partial=registry.CARRY_PARTIAL):
        out.append(Strategy((spec,), (spec,) * len(node.outputs), split_ways(spec, mesh)))
    return out


@register("sort")
def _sort_rule(node: Node, mesh: MeshSpec) -> list[Strategy]:
    shape = node.outputs[0].shape
    dims = [d for d in range(len(shape)) if d != node.params["dimension"]]
    return _full_dims_rule(node, mesh, dims)


@register("top_k")
def _top_k_rule(node: Node, mesh: MeshSpec) -> list[Strategy]:
    operand = node.inputs[0]
    dims = list(range(operand.ndim - 1))
    out = []
    for spec in tensor_specs(operand.shape, mesh, dims=dims):
        out.append(Strategy((spec,), (spec,) * len(node.outputs), split_ways(spec, mesh)))
    return out


@register("reduce_window_sum", "reduce_window_max", "reduce_window_min", "reduce_window",
          "select_and_scatter_add", "select_and_gather_add")
def _window_rule(node: Node, mesh: MeshSpec) -> list[Strategy]:
    """Pooling: dims with a window of 1, stride 1 and no padding (batch, channels) split."""
    p = node.params
    window = p.get("window_dimensions", ())
    strides = p.get("window_strides", (1,) * len(window))
    padding = p.get("padding", ((0, 0),) * len(window))
    dims = [d for d in range(len(window))
            if window[d] == 1 and strides[d] == 1 and tuple(padding[d]) == (0, 0)]
    if node.outputs[0].ndim != len(window):
        return []
    return _full_dims_rule(node, mesh, dims)

