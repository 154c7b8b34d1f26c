"""Steps written in JAX's explicit sharding mode (``out_sharding=`` on einsums,
``jax.sharding.reshard``) and steps compiled inside ``jax.set_mesh``: they compile in any
context (no mesh, an Auto mesh, ``jax.set_mesh`` of the Explicit mesh), their layouts are read
as pins, and the sharded step computes what ``jax.jit`` / ``nnx.jit`` compute under
``jax.set_mesh``."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import autoshard
from autoshard.ir.sharding import as_sharding_spec
from tests.conftest import make_mesh

# float32 on CPU, a different partitioning of the same sums: rounding only
TOL = dict(rtol=1e-5, atol=1e-6)


def close(a, b, **tol):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), **(tol or TOL))


def explicit_loss(params, x):
    """A two-layer MLP as explicit mode writes it: activations split over "data", the hidden
    dim over "model", gathered back with a reshard."""
    h = jnp.einsum("bd,df->bf", x, params["w1"], out_sharding=P("data", "model"))
    h = jax.sharding.reshard(jax.nn.relu(h + params["b1"]), P("data", None))
    y = jnp.einsum("bf,fd->bd", h, params["w2"], out_sharding=P("data", None))
    return ((y + jnp.zeros((x.shape[0], 1))) ** 2).mean()


def explicit_step(params, x):
    loss, grads = jax.value_and_grad(explicit_loss)(params, x)
    return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads), loss


def mlp_params():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    return ({"w1": jax.random.normal(k1, (16, 32)) * 0.2, "b1": jnp.zeros(32),
             "w2": jax.random.normal(k2, (32, 16)) * 0.2}, jax.random.normal(k3, (8, 16)))


def jit_under_set_mesh(fn, mesh, args, batch_argnum):
    """``jax.jit(fn)`` as explicit mode runs it: inside ``jax.set_mesh``, the batch split over
    "data", everything else replicated."""
    with jax.set_mesh(mesh):
        placed = [jax.device_put(a, NamedSharding(mesh, P("data") if i == batch_argnum else P()))
                  for i, a in enumerate(args)]
        return jax.jit(fn)(*placed)


CONTEXTS = ("no-mesh", "auto-mesh", "set-mesh")


def compile_context(name, mesh):
    """(the mesh given to compile, the context compile and the call run in)."""
    if name == "no-mesh":
        return mesh, contextlib.nullcontext()
    if name == "auto-mesh":
        auto = jax.make_mesh(mesh.axis_sizes, mesh.axis_names,
                             axis_types=(AxisType.Auto,) * len(mesh.axis_names))
        return auto, jax.set_mesh(auto)
    return mesh, jax.set_mesh(mesh)


@pytest.mark.parametrize("context", CONTEXTS)
def test_explicit_mode_step_compiles_anywhere_and_equals_jit(context):
    mesh = make_mesh((2, 4))
    params, x = mlp_params()
    want = jit_under_set_mesh(explicit_step, mesh, (params, x), batch_argnum=1)
    compile_mesh, scope = compile_context(context, mesh)
    with scope:
        step = autoshard.compile(explicit_step, params, x, mesh=compile_mesh,
                                 planner="data-parallel")
        got = step(params, x)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        close(a, b)
    # the einsums' out_sharding and the reshard are pins of the plan (their gradients too)
    plan = step.plan
    hints = [n for n in plan.graph.nodes if n.op == "autoshard_hint"]
    assert {n.params["spec"] for n in hints} == {P("data", "model"), P("data", None)}
    for node in hints:
        (value,) = node.outputs
        assert plan.value_specs[value.id] == as_sharding_spec(
            node.params["spec"], plan.mesh, value.ndim, what=node.source), node.source


class ExplicitMLP(nnx.Module):
    """An NNX model written in explicit mode: its einsums say how activations are laid out."""

    def __init__(self, rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal()
        self.w1 = nnx.Param(init(rngs.params(), (16, 64)))
        self.b1 = nnx.Param(jnp.zeros(64))
        self.w2 = nnx.Param(init(rngs.params(), (64, 16)))

    def __call__(self, x):
        h = jnp.einsum("bd,df->bf", x, self.w1[...], out_sharding=P("data", "model"))
        h = jax.nn.gelu(h + self.b1[...])
        return jnp.einsum("bf,fd->bd", h, self.w2[...], out_sharding=P("data", None))


def nnx_train_step(model, optimizer, x, y):
    def loss_fn(model):
        return ((model(x) - y) ** 2).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


def test_nnx_model_in_explicit_mode_two_adamw_steps_equal_nnx_jit():
    mesh = make_mesh((2, 4))
    x = jax.random.normal(jax.random.key(1), (8, 16))
    y = jax.random.normal(jax.random.key(2), (8, 16))

    def create():
        model = ExplicitMLP(nnx.Rngs(0))
        return model, nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)

    model, optimizer = create()
    step = autoshard.compile(nnx_train_step, model, optimizer, x, y, mesh=mesh,
                             planner="data-parallel")
    got = [step(model, optimizer, x, y) for _ in range(2)]
    ref_model, ref_optimizer = create()
    with jax.set_mesh(mesh):
        xs, ys = (jax.device_put(a, NamedSharding(mesh, P("data"))) for a in (x, y))
        reference = nnx.jit(nnx_train_step)
        want = [reference(ref_model, ref_optimizer, xs, ys) for _ in range(2)]
    for a, b in zip(got, want):
        close(a, b)
    # every gradient here is nonzero, so Adam's steps compare within rounding
    for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)),
                    jax.tree.leaves(nnx.state(ref_model, nnx.Param))):
        close(a, b, rtol=1e-4, atol=1e-5)


def test_step_compiled_and_called_inside_set_mesh_equals_jit():
    """Tracing inside ``jax.set_mesh`` of an Explicit mesh: ``jnp.zeros`` and ``jnp.arange``
    read the context mesh, which must not reach the traced program (issue 30, item 2)."""
    mesh = make_mesh((2, 4))

    def step(params, x):
        def loss(params):
            h = jnp.tanh(x @ params["w1"]) + jnp.zeros((x.shape[0], 1))
            return ((h @ params["w2"]) * jnp.arange(16.0)).mean()

        loss_value, grads = jax.value_and_grad(loss)(params)
        return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads), loss_value

    params, x = mlp_params()
    params = {"w1": params["w1"], "w2": params["w2"]}
    want = jax.jit(step)(params, x)
    with jax.set_mesh(mesh):
        compiled = autoshard.compile(step, params, x, mesh=mesh, planner="data-parallel")
        got = compiled(params, x)
        again = compiled(*got[:1], x)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        close(a, b)
    close(again[1], jax.jit(step)(want[0], x)[1])
