"""Strategy rules for contractions: ``dot_general`` and ``conv_general_dilated``.

dot_general: every assignment of each mesh axis to one role — a batch dim, a free dim of the
left or right operand, a contracting dim, or nothing (the axis replicates the work). Splitting
a contracting dim leaves each device a partial sum (P), which the solver reduces wherever it is
cheapest (Megatron's row-parallel layer is the contracting split; its column-parallel layer the
right-free split; data parallelism the left-free split of the batch).

conv: the same roles for batch (lhs batch dim), output features (rhs out-feature dim) and
input features (a contraction, P); a grouped convolution (``feature_group_count`` > 1, depthwise
included) splits whole groups, and its weight gradient (``batch_group_count`` > 1) whole batch
groups, as XLA's partitioner does (each device convolves its groups, no sum); spatial dims are
not split (that needs halo exchange).
"""

from __future__ import annotations

from autoshard.ir.graph import Node
from autoshard.ir.mesh import MeshSpec
from autoshard.ir.sharding import PARTIAL, SBP, B, ShardingSpec, Split
from autoshard.passes.strategies.registry import Strategy, axis_assignments, register


def _contraction_strategies(mesh: MeshSpec, roles: list[tuple[str, int, int | None, int | None,
                                                              int | None]],
                            shapes: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]
                            ) -> list[Strategy]:
    """``roles``: (label, size, lhs dim, rhs dim, out dim) per splittable role; an out dim of
    None marks a contraction (partial output)."""
    out_strategies = []
    for pick in axis_assignments(mesh, [None, *range(len(roles))]):
        lhs: list[SBP] = []
        rhs: list[SBP] = []
        res: list[SBP] = []
        ways: dict[int, int] = {}
        divisor = 1
        for axis, r in enumerate(pick):
            if r is None:
                lhs.append(B)
                rhs.append(B)
                res.append(B)
                continue
            _, size, ld, rd, od = roles[r]
            ways[r] = ways.get(r, 1) * mesh.axis_sizes[axis]
            divisor *= mesh.axis_sizes[axis]
            lhs.append(Split(ld) if ld is not None else B)
            rhs.append(Split(rd) if rd is not None else B)
            res.append(Split(od) if od is not None else PARTIAL)
        if any(roles[r][1] % w for r, w in ways.items()):
            continue
        label = ",".join(roles[r][0] if r is not None else "-" for r in pick)
        out_strategies.append(Strategy((ShardingSpec(tuple(lhs)), ShardingSpec(tuple(rhs))),
                                       (ShardingSpec(tuple(res)),), divisor, (), label))
    return out_strategies


@register("dot_general")
def _dot_general_rule(node: Node, mesh: MeshSpec) -> list[Strategy]:
    lhs, rhs = node.inputs[:2]
    (lc, rc), (lb, rb) = node.params["dimension_numbers"]
    lf = [d for d in range(lhs.ndim) if d not in lc and d not in lb]
    rf = [d for d in range(rhs.ndim) if d not in rc and d not in rb]
    roles = []
    for k, (l, r) in enumerate(zip(lb, rb)):
        roles.append((f"b{k}", lhs.shape[l], l, r, k))
    for k, l in enumerate(lf):
        roles.append((f"m{k}", lhs.shape[l], l, None, len(lb) + k))
    for k, r in enumerate(rf):
        roles.append((f"n{k}", rhs.shape[r], None, r, len(lb) + len(lf) + k))
    for k, (l, r) in enumerate(zip(lc, rc)):
        roles.append((f"k{k}", lhs.shape[l], l, r, None))
    roles = [r for r in roles if r[1] > 1]
    return _contraction_strategies(mesh, roles, (lhs.shape, rhs.shape, node.outputs[0].shape))


@register("conv_general_dilated")
def _conv_rule(node: Node, mesh: MeshSpec) -> list[Strategy]:
    lhs, rhs = node.inputs[:2]
    dn = node.params["dimension_numbers"]
    lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
    feature_groups = node.params.get("feature_group_count", 1)
    batch_groups = node.params.get("batch_group_count", 1)
    roles = []
    if batch_groups == 1:
        roles.append(("batch", lhs.shape[lhs_spec[0]], lhs_spec[0], None, out_spec[0]))
    else:
        # the weight gradient of a grouped convolution: lhs "batch" holds the groups' input
        # features, each group making its block of output features; a split over whole groups
        roles.append(("batch_group", batch_groups, lhs_spec[0], rhs_spec[0], out_spec[1]))
    if feature_groups == 1:
        if batch_groups == 1:
            roles.append(("out_ch", rhs.shape[rhs_spec[0]], None, rhs_spec[0], out_spec[1]))
        roles.append(("in_ch", lhs.shape[lhs_spec[1]], lhs_spec[1], rhs_spec[1], None))
    else:
        # grouped (depthwise: one input feature a group): a split over whole groups splits
        # the input features, the kernel's output features and the output's alike, no sum
        roles.append(("group", feature_groups, lhs_spec[1], rhs_spec[0], out_spec[1]))
    roles = [r for r in roles if r[1] > 1]
    strategies = _contraction_strategies(mesh, roles,
                                         (lhs.shape, rhs.shape, node.outputs[0].shape))
    # a kernel split over both its output and its input features is one XLA's convolution
    # partitioner does not run as planned: it all-gathers the output features (a weight
    # gradient gathered across nodes, several times the collective time predicted)
    return [s for s in strategies
            if not (s.inputs[1].dim_axes(rhs_spec[0]) and s.inputs[1].dim_axes(rhs_spec[1]))]
