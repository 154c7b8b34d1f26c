"""Unrolling scanned layer stacks and splitting stacked parameters into layers
(passes/pipeline/unroll.py): the rewritten jaxpr computes the same function."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core

from autoshard.passes.pipeline.unroll import split_layer_params


def _loss(params, x):
    def body(h, w):
        return jnp.tanh(h @ w["w"] + w["b"]), None

    h, _ = jax.lax.scan(body, x, params["stack"])
    return jnp.sum(h @ params["head"])


def _args():
    keys = jax.random.split(jax.random.key(0), 4)
    params = {"stack": {"w": jax.random.normal(keys[0], (3, 8, 8)),
                        "b": jax.random.normal(keys[1], (3, 8))},
              "head": jax.random.normal(keys[2], (8, 2))}
    return params, jax.random.normal(keys[3], (4, 8))


def _evaluate(closed, args):
    return core.jaxpr_as_fun(closed)(*args)[0]


def test_stacked_parameters_read_only_by_a_layer_scan_are_split_into_layers():
    params, x = _args()
    leaves = jax.tree.leaves(params)          # head, then the stack's b and w
    traced = jax.make_jaxpr(lambda p, x: _loss(jax.tree.unflatten(
        jax.tree.structure(params), p), x))(leaves, x)
    closed, expansion = split_layer_params(traced, range(3))
    assert expansion == ((0, None), (1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2))
    assert not any(e.primitive.name == "scan" for e in closed.jaxpr.eqns)
    layered = [leaves[k] if layer is None else leaves[k][layer] for k, layer in expansion]
    np.testing.assert_allclose(_evaluate(closed, [*layered, x]), _loss(params, x), rtol=1e-6)


def test_a_stacked_parameter_also_read_outside_the_scan_stays_whole():
    params, x = _args()

    def loss(p, x):
        return _loss(p, x) + jnp.sum(p["stack"]["b"])   # the whole stack, read directly

    leaves = jax.tree.leaves(params)
    traced = jax.make_jaxpr(lambda p, x: loss(jax.tree.unflatten(
        jax.tree.structure(params), p), x))(leaves, x)
    closed, expansion = split_layer_params(traced, range(3))
    assert expansion == ((0, None), (1, None), (2, 0), (2, 1), (2, 2))
    layered = [leaves[k] if layer is None else leaves[k][layer] for k, layer in expansion]
    np.testing.assert_allclose(_evaluate(closed, [*layered, x]), loss(params, x), rtol=1e-6)
