"""Initializers: a function that makes parameters from a PRNG key lays its results out to hold
least per device when nothing else decides (never replicated for free), and ``step.init``
builds a step's arguments directly in the layouts its plan chose."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import autoshard
from autoshard import ArgumentError
from tests.conftest import make_mesh
from tests.models import example_args, mlp


def init(key):
    k1, k2 = jax.random.split(key)
    return {"w1": jax.random.normal(k1, (256, 128)) * 0.02,
            "w2": jax.random.normal(k2, (128, 64)) * 0.02, "b": jnp.zeros((64,))}


def test_an_initializer_returns_its_parameters_split_not_replicated():
    # no budget and no consumer: every layout of the results costs the same time, and the tie
    # goes to the one that holds least per device, not a replicated copy (4x the bytes on
    # every device)
    mesh = make_mesh((2, 4))
    step = autoshard.compile(init, jax.random.key(0), mesh=mesh, cache=False)
    out = step(jax.random.key(0))
    want = jax.jit(init)(jax.random.key(0))
    for name in want:
        assert out[name].sharding.shard_shape(out[name].shape) != out[name].shape, name
        per_device = out[name].addressable_shards[0].data.size
        assert per_device * mesh.size == out[name].size, (name, out[name].sharding.spec)
        np.testing.assert_array_equal(np.asarray(out[name]), np.asarray(want[name]))


def test_out_specs_lay_an_initializers_results_out_as_the_consumer_wants():
    mesh = make_mesh((2, 4))
    specs = {"w1": P(None, "model"), "w2": P("model", None), "b": P()}
    step = autoshard.compile(init, jax.random.key(0), mesh=mesh, cache=False, out_specs=specs)
    out = step(jax.random.key(0))
    for name, spec in specs.items():
        assert out[name].sharding.is_equivalent_to(NamedSharding(mesh, spec), out[name].ndim)


def test_step_init_builds_the_arguments_in_the_planned_layouts():
    mesh = make_mesh((2, 4))
    args = example_args(mlp)
    # FSDP-like pins so that the planned layouts are not all replicated
    split = {"w1": P(None, ("data", "model")), "b1": P(("data", "model")),
             "w2": P(("data", "model"), None), "b2": P()}
    step = autoshard.compile(mlp.train_step, *args, mesh=mesh, cache=False,
                             in_specs=(split, None, None))

    def create():
        params = mlp.init(jax.random.key(0))
        return params, mlp.tx.init(params)

    params, opt_state = step.init(create, (0, 1))
    want_params, want_opt = jax.jit(create)()
    for made, layout, want in ((params, step.argument_shardings(0), want_params),
                               (opt_state, step.argument_shardings(1), want_opt)):
        for a, s, w in zip(jax.tree.leaves(made), jax.tree.leaves(layout), jax.tree.leaves(want)):
            assert a.sharding.is_equivalent_to(s, a.ndim)
            np.testing.assert_array_equal(np.asarray(a), np.asarray(w))
    assert params["w1"].sharding.spec == P(None, ("data", "model"))
    # the step takes them where they are
    new_params, _, _ = step(params, opt_state, args[2])
    np.testing.assert_allclose(np.asarray(new_params["w1"]),
                               np.asarray(jax.jit(mlp.train_step)(want_params, want_opt,
                                                                  args[2])[0]["w1"]),
                               rtol=1e-5, atol=1e-6)


def test_step_init_names_a_mismatch():
    mesh = make_mesh((2, 4))
    args = example_args(mlp)
    step = autoshard.compile(mlp.train_step, *args, mesh=mesh, planner="data-parallel")
    with pytest.raises(ArgumentError, match=r"argument 0 with arrays of shapes"):
        step.init(lambda: {"w1": jnp.zeros((3, 3))}, 0)
    with pytest.raises(ArgumentError, match=r"one pytree per argument"):
        step.init(lambda: mlp.init(jax.random.key(0)), (0, 1))
