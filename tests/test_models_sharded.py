"""Sharded == unsharded for every test model, mesh and plan (the built-in rule and the hand
plans a JAX user writes: data parallel, FSDP/ZeRO-3, Megatron TP+DP), all through
``autoshard.compile``.

Tolerance: float32, one AdamW step after a forward/backward pass; sharded reductions sum in a
different order, so results agree to rtol=atol=1e-4 (observed differences are ~1e-6).
"""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import autoshard
from tests.conftest import MESH_SHAPES, make_mesh
from tests.models import conv, example_args, gpt, llama, mlp, moe, plans, scan_gpt

MODELS = [mlp, gpt, llama, conv, moe, scan_gpt]
TOL = dict(rtol=1e-4, atol=1e-4)
_reference_cache = {}


def reference(model):
    if model not in _reference_cache:
        args = example_args(model)
        _reference_cache[model] = jax.tree.map(np.asarray, jax.jit(model.train_step)(*args))
    return _reference_cache[model]


def assert_tree_close(actual, expected):
    a_leaves, a_tree = jax.tree_util.tree_flatten(actual)
    e_leaves, e_tree = jax.tree_util.tree_flatten(expected)
    assert a_tree == e_tree
    for a, e in zip(a_leaves, e_leaves):
        np.testing.assert_allclose(np.asarray(a), e, **TOL)


def hand_plan(name, mesh, model, args):
    params, opt_state, batch = args[:3]
    if name == "dp":
        specs = plans.data_parallel(mesh, params, opt_state, batch)
    elif name == "fsdp":
        specs = plans.fsdp(mesh, params, opt_state, batch)
    else:
        specs = plans.megatron(mesh, model, params, opt_state, batch)
    return specs + (P(),) * (len(args) - 3)


@pytest.mark.parametrize("shape", MESH_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__.split(".")[-1])
def test_builtin_plan_matches_unsharded(model, shape):
    mesh = make_mesh(shape)
    args = example_args(model)
    step = autoshard.compile(model.train_step, *args, mesh=mesh, batch_argnums=2,
                             planner="data-parallel")
    assert step.plan.method == "data-parallel rule"
    assert_tree_close(step(*args), reference(model))


@pytest.mark.parametrize("plan", ["dp", "fsdp", "megatron"])
@pytest.mark.parametrize("shape", [(8,), (2, 4)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__.split(".")[-1])
def test_hand_plans_match_unsharded(model, shape, plan):
    mesh = make_mesh(shape)
    args = example_args(model)
    in_specs = hand_plan(plan, mesh, model, args)
    out_specs = (in_specs[0], in_specs[1], P())
    step = autoshard.compile(model.train_step, *args, mesh=mesh, in_specs=in_specs,
                             planner="data-parallel",
                             out_specs=out_specs)
    result = step(*args)
    assert_tree_close(result, reference(model))
    # the result layout is the plan's: parameters come back as the hand plan laid them out
    param_specs = in_specs[0]
    if isinstance(param_specs, P):
        param_specs = jax.tree.map(lambda _: param_specs, args[0])
    for leaf, spec in zip(jax.tree.leaves(result[0]),
                          jax.tree.leaves(param_specs, is_leaf=lambda x: isinstance(x, P))):
        assert leaf.sharding.is_equivalent_to(NamedSharding(mesh, spec), leaf.ndim)


def test_depthwise_convs_split_whole_groups_and_match_unsharded():
    # the depthwise kernels pinned split over their channels (output features): their weight
    # gradients (convolutions with batch_group_count = channels) make them split, on whole
    # groups, with no partial sum and no gather; the forward convolutions take the split or
    # gather the 4.5 KiB kernels, by cost
    from tests.models import depthwise
    args = example_args(depthwise)
    mesh = jax.make_mesh((4,), ("data",), devices=jax.devices()[:4])
    kernel = P(None, None, None, "data")
    params_specs = {"dw1": kernel, "dw2": kernel, "pw1": P(), "pw2": P(), "head": P()}
    step = autoshard.compile(depthwise.train_step, *args, mesh=mesh, cache=False,
                             in_specs=(params_specs, None, None))
    grouped = {n.id: n for n, _ in step.plan.graph.walk() if n.op == "conv_general_dilated"
               and (n.params["feature_group_count"] > 1 or n.params["batch_group_count"] > 1)}
    labels = {i: step.plan.explanation[i].chosen.label for i in grouped}
    weight_gradients = [i for i, n in grouped.items() if n.params["batch_group_count"] > 1]
    assert len(weight_gradients) == 2, labels
    assert all(labels[i].startswith("batch_group") for i in weight_gradients), labels
    assert_tree_close(step(*args), jax.tree.map(np.asarray, jax.jit(depthwise.train_step)(*args)))
