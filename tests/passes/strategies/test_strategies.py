"""Strategy rules on 1-3 op graphs: the legal layouts of each primitive family, including the
ones hand plans rely on (Megatron column/row splits, data parallel, vocab-parallel embedding)."""

import jax
import jax.numpy as jnp
import pytest

from autoshard import PARTIAL, B, MeshSpec, S, ShardingSpec
from autoshard.passes.lift import lift
from autoshard.passes.strategies import registry as strategy
from autoshard.passes.strategies.registry import strategies_for, strategy_rules
from autoshard.passes.strategies.layout import reshape_dim_map
from autoshard.passes.trace import trace

MESH = MeshSpec(("data", "model"), (2, 4))


def spec(*sbp):
    return ShardingSpec(tuple(sbp))


def only_node(fn, *args, op=None):
    graph = lift(trace(fn, args))
    nodes = [n for n, _ in graph.walk() if op is None or n.op == op]
    return nodes[0]


def layouts(node):
    strategies, planned = strategies_for(node, MESH)
    assert planned
    return {(s.inputs, s.outputs) for s in strategies}, strategies


def test_dot_general_covers_megatron_and_data_parallel():
    node = only_node(lambda x, w: x @ w, jnp.ones((16, 32)), jnp.ones((32, 64)))
    found, strategies = layouts(node)
    # data parallel: rows over data, weights replicated
    assert ((spec(S(0), B), spec(B, B)), (spec(S(0), B),)) in found
    # column parallel over model (+ DP over data)
    assert ((spec(S(0), B), spec(B, S(1))), (spec(S(0), S(1)),)) in found
    # row parallel over model: contracting split, partial output
    assert ((spec(S(0), S(1)), spec(B, S(0))), (spec(S(0), PARTIAL),)) in found
    # 2-D split of one dim over both axes (32 rows would not divide 8 for m=... 16 does)
    assert ((spec(S(0), S(0)), spec(B, B)), (spec(S(0), S(0)),)) in found
    # every mesh axis picks one of m, n, k or nothing: 4 x 4 assignments, all divisible here
    assert len(strategies) == 16
    work = {s.outputs: s.divisor for s in strategies}
    assert work[(spec(S(0), S(1)),)] == 8 and work[(spec(B, B),)] == 1


def test_dot_general_batch_dims_and_divisibility():
    node = only_node(lambda q, k: jnp.einsum("bqd,bkd->bqk", q, k), jnp.ones((2, 6, 8)),
                     jnp.ones((2, 6, 8)))
    _, strategies = layouts(node)
    outs = {s.outputs[0] for s in strategies}
    assert spec(S(0), B) in outs          # batch over data (2 divides 2)
    assert spec(B, S(0)) not in outs      # batch 2 is not divisible by model (4)
    assert all(s.outputs[0].validate((2, 6, 6), MESH) is None for s in strategies)


def test_partial_sums_stay_with_their_producers_by_default():
    add = only_node(lambda a, b: a + b, jnp.ones((8, 8)), jnp.ones((8, 8)))
    assert not any(s.outputs[0].has_partial for s in layouts(add)[1])
    dot = only_node(lambda x, w: x @ w, jnp.ones((8, 16)), jnp.ones((16, 8)))
    assert any(s.outputs[0].has_partial for s in layouts(dot)[1])


def test_elementwise_partial_only_where_linear(monkeypatch):
    monkeypatch.setattr(strategy, "CARRY_PARTIAL", True)
    add = only_node(lambda a, b: a + b, jnp.ones((8, 8)), jnp.ones((8, 8)))
    _, strategies = layouts(add)
    assert any(s.outputs[0] == spec(PARTIAL, B) and s.inputs == (spec(PARTIAL, B),) * 2
               for s in strategies)
    plus_one = only_node(lambda a: a + 1.0, jnp.ones((8, 8)))
    assert not any(s.outputs[0].has_partial for s in layouts(plus_one)[1])
    scale = only_node(lambda a, b: a * b, jnp.ones((8, 8)), jnp.ones((8, 8)))
    found, _ = layouts(scale)
    assert ((spec(PARTIAL, S(1)), spec(B, S(1))), (spec(PARTIAL, S(1)),)) in found
    assert ((spec(PARTIAL, B), spec(PARTIAL, B)), (spec(PARTIAL, B),)) not in found
    exp = only_node(jnp.exp, jnp.ones((8, 8)))
    assert not any(s.outputs[0].has_partial for s in layouts(exp)[1])
    bias = only_node(lambda a, b: a + b, jnp.ones((8, 8)), jnp.ones((1, 8)))
    found, _ = layouts(bias)
    assert ((spec(S(0), S(1)), spec(B, S(1))), (spec(S(0), S(1)),)) in found   # size-1 dim


@pytest.mark.parametrize("src, dst, mapping", [
    ((8, 4), (32,), {0: 0}),
    ((2, 3, 4), (6, 4), {0: 0, 1: 2}),
    ((4, 16, 8, 8), (4, 16, 64), {0: 0, 1: 1, 2: 2}),
    ((4, 16, 64), (4, 16, 8, 8), {0: 0, 1: 1, 2: 2}),
    ((1, 8), (8,), {0: 1}),
])
def test_reshape_dim_map(src, dst, mapping):
    assert reshape_dim_map(src, dst) == mapping


def test_reshape_split_heads():
    node = only_node(lambda x: x.reshape(4, 16, 8, 8), jnp.ones((4, 16, 64)))
    found, _ = layouts(node)
    assert ((spec(S(0), S(2)),), (spec(S(0), S(2)),)) in found       # heads over model
    assert not any(s[1][0].dim_axes(3) for s in found)                # head_dim never split


def test_reductions_sum_partial_max_reduces():
    total = only_node(lambda x: x.sum(1), jnp.ones((8, 16)), op="reduce_sum")
    found, _ = layouts(total)
    assert ((spec(S(0), S(1)),), (spec(S(0), PARTIAL),)) in found
    peak = only_node(lambda x: x.max(1), jnp.ones((8, 16)), op="reduce_max")
    _, strategies = layouts(peak)
    split = [s for s in strategies if s.inputs[0] == spec(S(0), S(1))]
    assert split and split[0].outputs[0] == spec(S(0), B) and split[0].comm[0][0] == "all-reduce"
    arg = only_node(lambda x: jnp.argmax(x, 1), jnp.ones((8, 16)), op="argmax")
    assert not any(s[0][0].dim_axes(1) for s in layouts(arg)[0])


def test_embedding_gather_and_its_gradient():
    gather = only_node(lambda t, i: t[i], jnp.ones((128, 16)), jnp.ones((8, 4), jnp.int32),
                       op="gather")
    found, _ = layouts(gather)
    outs = {(ins[0], outs[0]) for ins, outs in found}
    assert (spec(B, B), spec(S(0), B)) in outs                 # batch of indices
    assert (spec(B, S(1)), spec(B, S(2))) in outs              # embedding dim
    assert (spec(S(0), B), spec(PARTIAL, B)) in outs           # vocab-parallel rows
    grad = only_node(lambda t, i: jax.grad(lambda t: t[i].sum())(t), jnp.ones((128, 16)),
                     jnp.ones((8, 4), jnp.int32), op="scatter-add")
    found, _ = layouts(grad)
    assert any(outs[0] == spec(PARTIAL, B) for _, outs in found)    # split updates
    assert any(outs[0] == spec(S(0), B) and ins[2] == spec(B, B) for ins, outs in found)


def test_take_along_axis_gradient_splits_its_batch():
    """The loss gradient of a language model (the transpose of take_along_axis, a scatter-add
    with batching dims) splits its batch like every other op of the step; with only the
    replicated strategy its 64 MiB table sat whole on every device of the plan-quality GPT."""
    grad = only_node(lambda x, i: jax.grad(
        lambda x: jnp.take_along_axis(x, i[..., None], axis=-1).sum())(x),
        jnp.ones((8, 16, 32)), jnp.ones((8, 16), jnp.int32), op="scatter-add")
    found, _ = layouts(grad)
    split = {(ins[0], ins[2], outs[0]) for ins, outs in found
             if outs[0] == spec(S(0), S(1))}
    assert split == {(spec(S(0), S(1)), spec(S(0), S(1)), spec(S(0), S(1)))}


def test_conv_batch_and_channels():
    node = only_node(lambda x, w: jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")),
        jnp.ones((8, 6, 6, 4)), jnp.ones((3, 3, 4, 8)))
    found, _ = layouts(node)
    assert ((spec(S(0), B), spec(B, B)), (spec(S(0), B),)) in found
    assert ((spec(S(0), B), spec(B, S(3))), (spec(S(0), S(3)),)) in found       # out channels
    assert ((spec(S(0), S(3)), spec(B, S(2))), (spec(S(0), PARTIAL),)) in found  # in channels
    assert not any(ins[0].dim_axes(1) or ins[0].dim_axes(2) for ins, _ in found)  # no halo


def depthwise_conv(x, w, groups):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", feature_group_count=groups,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("channels,multiplier,groups", [(8, 1, 8), (8, 2, 8), (16, 2, 4)])
def test_grouped_conv_splits_whole_groups(channels, multiplier, groups):
    # depthwise (one input feature a group, output features = multiplier x groups) and grouped:
    # the groups split over an axis split the input features, the kernel's output features
    # and the output's, with no partial sum; the batch split stays
    x = jnp.ones((8, 6, 6, channels))
    w = jnp.ones((3, 3, channels // groups, multiplier * groups))
    found, _ = layouts(only_node(lambda x, w: depthwise_conv(x, w, groups), x, w))
    assert ((spec(S(0), S(3)), spec(B, S(3))), (spec(S(0), S(3)),)) in found
    assert ((spec(S(3), S(0)), spec(S(3), B)), (spec(S(3), S(0)),)) in found
    assert ((spec(S(0), B), spec(B, B)), (spec(S(0), B),)) in found
    # no split inside a group and no sum over a group's input features
    assert not any(ins[1].dim_axes(2) for ins, _ in found)
    assert not any(PARTIAL in out[0].sbp for _, out in found)


def test_grouped_conv_weight_gradient_splits_batch_groups():
    # jax.grad of a depthwise conv's kernel is a conv with batch_group_count = groups: its lhs
    # "batch" dim holds the input features, each group making its block of kernel outputs
    x = jnp.ones((8, 6, 6, 8))
    w = jnp.ones((3, 3, 1, 16))
    node = [n for n, _ in lift(trace(lambda x, w: jax.grad(
        lambda w: depthwise_conv(x, w, 8).sum())(w), (x, w))).walk()
            if n.op == "conv_general_dilated" and n.params["batch_group_count"] > 1][0]
    found, _ = layouts(node)
    dn = node.params["dimension_numbers"]
    lhs_groups, rhs_out, out_features = dn.lhs_spec[0], dn.rhs_spec[0], dn.out_spec[1]
    by_group = [(ins, outs) for ins, outs in found
                if ins[0].dim_axes(lhs_groups) and ins[1].dim_axes(rhs_out)
                and outs[0].dim_axes(out_features)]
    assert by_group and not any(PARTIAL in outs[0].sbp for _, outs in by_group)
    # data parallel's weight gradient: the true batch is the contraction, a partial sum
    assert any(ins[0].dim_axes(dn.lhs_spec[1]) and PARTIAL in outs[0].sbp for ins, outs in found)


def test_unknown_primitive_is_replicated_and_unplanned():
    node = only_node(lambda x: jnp.linalg.qr(x)[0], jnp.ones((8, 8)))
    strategies, planned = strategies_for(node, MESH)
    assert node.op not in strategy_rules and not planned
    assert [s.outputs for s in strategies] == [tuple(ShardingSpec.replicated(2)
                                                     for _ in node.outputs)]
