"""Flax linen's partitioning boxes (nn.with_logical_partitioning, nn.with_partitioning) read as
annotations, with the rules of nn.logical_axis_rules or compile(logical_axis_rules=...):
sharded == jax.jit on the linen example, the annotated layouts pinned under "require" and
preferred by the search under "hint", errors naming the parameter and the rule."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import autoshard
from tests.conftest import make_mesh
from tests.examples import load_example

lm = load_example("linen_lm")
TINY = lm.Config(vocab=64, seq=8, width=32, heads=4, layers=2)


def input_specs(step):
    """Argument name -> its planned PartitionSpec (trailing Nones dropped)."""
    plan = step.plan
    return {v.name: s.to_partition_spec(plan.mesh, v.ndim)
            for v, s in zip(step.graph.inputs, plan.input_specs)}


def test_linen_lm_sharded_equals_jit_with_annotations_required():
    """The example's model on (2, 4) with its rules from the nn.logical_axis_rules context:
    each boxed parameter (and optax moment) is laid out as flax resolves its names, and two
    AdamW steps equal jax.jit's. Data-parallel, whose plan follows pins: the point is the
    annotations being read, which the search test below covers for the search."""
    mesh = make_mesh((2, 4))
    optimizer = lm.make_optimizer()
    model, params, opt_state = lm.create(TINY, optimizer)
    train_step = lm.make_train_step(model, optimizer)
    batch = lm.make_batch(TINY, 8)
    with nn.logical_axis_rules(lm.logical_rules(mesh)):
        step = autoshard.compile(train_step, params, opt_state, batch, mesh=mesh,
                                 planner="data-parallel", annotations="require")
    specs = input_specs(step)
    mlp = "['Block_0']['Mlp_0']"
    assert specs[f"params{mlp}['Dense_0']['kernel'].value"] == P(None, "model")   # embed, mlp
    assert specs[f"params{mlp}['Dense_1']['kernel'].value"] == P("model")          # mlp, embed
    assert specs["params['Block_0']['Attention_0']['query']['kernel'].value"] == P(
        None, "model")                                                            # embed, heads, kv
    assert specs["params['embed']['embedding'].value"] == P("model")             # vocab, embed
    assert specs[f"opt_state[0].mu{mlp}['Dense_0']['kernel'].value"] == P(None, "model")
    assert specs["params['positions'].value"] == P()                             # (None, embed)
    boxed = [v.name for v in step.graph.inputs if v.name.endswith(".value")]
    assert all(step.plan.reasons[f"in:{i}"] == "annotation (required)"
               for i, v in enumerate(step.graph.inputs) if v.name in boxed)
    assert len(boxed) == 3 * len(jax.tree.leaves(params))          # params, mu, nu

    got = lm.run(step, params, opt_state, batch)
    want = lm.run(jax.jit(train_step), params, opt_state, batch)
    lm.assert_same_training(got, want, lm.nonzero_gradient(model, params, batch))
    assert isinstance(got[1]["embed"]["embedding"], nn.LogicallyPartitioned)
    assert got[1]["embed"]["embedding"].value.sharding.spec == P("model")


class Mlp(nn.Module):
    """Two boxed kernels: ("embed", "mlp") and ("mlp", "embed")."""

    @nn.compact
    def __call__(self, x):
        kernel = functools.partial(nn.with_logical_partitioning, nn.initializers.lecun_normal())
        h = nn.Dense(64, use_bias=False, kernel_init=kernel(("embed", "mlp")))(x)
        return nn.Dense(16, use_bias=False, kernel_init=kernel(("mlp", "embed")))(nn.relu(h))


def mlp_step():
    model = Mlp()
    params = model.init(jax.random.key(0), jnp.ones((1, 16)))["params"]

    def loss(params, x):
        return jnp.mean(model.apply({"params": params}, x) ** 2)

    return loss, params, jax.random.normal(jax.random.key(1), (32, 16))


MLP_KERNELS = ("params['Dense_0']['kernel'].value", "params['Dense_1']['kernel'].value")


def test_search_reads_linen_annotations_as_hints():
    """The search sees the boxes (the plan's annotation report counts them) and, where the
    annotation costs nothing more, keeps it; without the boxes being read there is no report."""
    mesh = make_mesh((2, 4))
    loss, params, x = mlp_step()
    with nn.logical_axis_rules((("embed", None), ("mlp", "model"))):
        step = autoshard.compile(jax.value_and_grad(loss), params, x, mesh=mesh,
                                 hardware="cpu")
    report = step.plan.annotation_report
    assert report is not None and report.annotated == 2
    assert "annotations (hint)" in step.summary()
    value, grads = step(params, x)
    want_value, want_grads = jax.jit(jax.value_and_grad(loss))(params, x)
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_explicit_logical_axis_rules_win_over_the_context():
    mesh = make_mesh((2, 4))
    loss, params, x = mlp_step()
    with nn.logical_axis_rules((("embed", None), ("mlp", "model"))):
        step = autoshard.compile(loss, params, x, mesh=mesh, planner="data-parallel",
                                 annotations="require",
                                 logical_axis_rules=[("embed", "model"), ("mlp", "data")])
    specs = input_specs(step)
    assert [specs[k] for k in MLP_KERNELS] == [P("model", "data"), P("data", "model")]
    np.testing.assert_allclose(step(params, x), jax.jit(loss)(params, x), rtol=1e-5)


def test_with_partitioning_names_mesh_axes():
    mesh = make_mesh((2, 4))

    class Dense(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(8, use_bias=False, kernel_init=nn.with_partitioning(
                nn.initializers.lecun_normal(), ("model", None)))(x)

    params = Dense().init(jax.random.key(0), jnp.ones((1, 16)))["params"]
    x = jnp.ones((8, 16))
    step = autoshard.compile(lambda p, x: Dense().apply({"params": p}, x).sum(), params, x,
                             mesh=mesh, planner="data-parallel", annotations="require")
    assert input_specs(step)["p['Dense_0']['kernel'].value"] == P("model")


def test_error_rule_to_an_unknown_mesh_axis_names_the_parameter_and_rule():
    mesh = make_mesh((2, 4))
    loss, params, x = mlp_step()
    with pytest.raises(autoshard.ShardingError) as err:
        autoshard.compile(loss, params, x, mesh=mesh, planner="data-parallel",
                          logical_axis_rules=[("mlp", "tensor")])
    text = str(err.value)
    assert "params['Dense_0']['kernel'].value" in text and "'mlp'" in text
    assert "'tensor'" in text and "('mlp', 'model')" in text
    with pytest.raises(autoshard.ArgumentError, match="logical_axis_rules must be a sequence"):
        autoshard.compile(loss, params, x, mesh=mesh, logical_axis_rules=[("mlp",)])


def test_annotations_ignore_reads_no_boxes():
    mesh = make_mesh((2, 4))
    loss, params, x = mlp_step()
    step = autoshard.compile(loss, params, x, mesh=mesh, planner="data-parallel",
                             annotations="ignore", logical_axis_rules=[("mlp", "tensor")])
    assert [input_specs(step)[k] for k in MLP_KERNELS] == [P(), P()]
