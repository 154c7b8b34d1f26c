"""Flax NNX steps through autoshard.compile: sharded == nnx.jit on the NNX examples, modules
updated in place with the plan's layout in their metadata, the functional nnx.split form, and
initialisation straight into the plan."""

import importlib.util
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import autoshard
from tests.conftest import make_mesh

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def load_example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module       # dataclasses look their module up while defining
    spec.loader.exec_module(module)
    return module


gpt = load_example("nnx_gpt")
vit = load_example("nnx_vit")
GPT_CFG = gpt.Config(vocab=64, seq=16, d_model=64, heads=4, layers=2)
VIT_CFG = vit.Config(image=16, patch=4, channels=3, d_model=64, heads=4, layers=2, classes=10)


def close(a, b):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


def run_both(example, cfg, batch, mesh, steps=2):
    """(sharded losses, model, reference losses, reference model). The learning rate is small:
    Adam moves a parameter whose gradient is ~0 by +-lr on the sign of rounding noise, so at the
    examples' rates a 1e-4 comparison would test rounding, not the plan."""
    with nnx.logical_axis_rules(example.logical_rules(mesh)), nnx.use_eager_sharding(False):
        model, optimizer = example.create(cfg, learning_rate=1e-5)
        ref_model, ref_optimizer = example.create(cfg, learning_rate=1e-5)
        # hardware="cpu", the devices this runs on (on H100 these small steps are latency
        # bound and their best plans replicate nearly everything, which would test little)
        step = autoshard.compile(example.train_step, model, optimizer, batch, mesh=mesh,
                                 hardware="cpu")
    reference = nnx.jit(example.train_step)
    got = [step(model, optimizer, batch) for _ in range(steps)]
    want = [reference(ref_model, ref_optimizer, batch) for _ in range(steps)]
    return step, got, model, want, ref_model


# the (8,) mesh for GPT only: the ViT adds patch embedding and pooling, not mesh handling
@pytest.mark.parametrize("name,shape", [("gpt", (2, 4)), ("gpt", (8,)), ("vit", (2, 4))],
                         ids=["gpt-2x4", "gpt-8", "vit-2x4"])
def test_nnx_examples_sharded_equal_unsharded(name, shape):
    example, cfg = (gpt, GPT_CFG) if name == "gpt" else (vit, VIT_CFG)
    mesh = make_mesh(shape)
    step, got, model, want, ref_model = run_both(example, cfg, example.make_batch(cfg, 8), mesh)
    for a, b in zip(got, want):
        close(a, b)
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(ref_model))):
        close(a, b)
    # the module holds the plan's layout, and says so in its metadata
    plan_specs = {v.name: s for v, s in zip(step.plan.graph.inputs, step.plan.input_specs)}
    assert len(step.sharded._cache) == 1            # metadata updates do not re-plan
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Variable) and var.get_value().ndim:
            spec = var.get_value().sharding.spec
            assert tuple(var.get_metadata()["out_sharding"])[: len(spec)] == tuple(spec), path
    assert any("model[" in name for name in plan_specs)


def _mlp_step(model, optimizer, x, y):
    def loss_fn(model):
        return ((model(x) - y) ** 2).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(16, 64, rngs=rngs)
        self.l2 = nnx.Linear(64, 16, rngs=rngs)

    def __call__(self, x):
        return self.l2(jax.nn.relu(self.l1(x)))


def test_functional_split_form_and_returned_modules():
    mesh = make_mesh((2, 4))
    x, y = jnp.ones((16, 16)), jnp.zeros((16, 16))
    graphdef, state = nnx.split(MLP(nnx.Rngs(0)))

    def functional(graphdef, state, x, y):
        model = nnx.merge(graphdef, state)
        loss, grads = nnx.value_and_grad(lambda m: ((m(x) - y) ** 2).mean())(model)
        new = jax.tree.map(lambda p, g: p - 0.1 * g, nnx.state(model), grads)
        return new, loss

    step = autoshard.compile(functional, graphdef, state, x, y, mesh=mesh)
    new, loss = step(graphdef, state, x, y)
    ref_new, ref_loss = jax.jit(functional, static_argnums=0)(graphdef, state, x, y)
    close(loss, ref_loss)
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(ref_new)):
        close(a, b)
    assert new["l1"]["kernel"].get_metadata()["out_sharding"] is not None
    again, _ = step(graphdef, new, x, y)                 # new states go back in, no re-plan
    assert len(step.sharded._cache) == 1 and isinstance(again, nnx.State)

    model = MLP(nnx.Rngs(0))

    def returns_model(model, x):
        model.l1.bias[...] = model.l1.bias[...] + 1.0
        return model, MLP(nnx.Rngs(1))

    step = autoshard.compile(returns_model, model, x, mesh=mesh)
    same, fresh = step(model, x)
    assert same is model and isinstance(fresh, MLP) and fresh is not model
    close(model.l1.bias.get_value(), np.ones(64) + 0.0)


def test_init_into_the_plan_never_holds_a_whole_parameter():
    mesh = make_mesh((2, 4))
    cfg = GPT_CFG
    batch = gpt.make_batch(cfg, 8)
    with nnx.logical_axis_rules(gpt.logical_rules(mesh)), nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: gpt.create(cfg))
        # the fully-sharded rule: a plan that splits every parameter it can (the search's plan
        # of this small, latency-bound step replicates its state, which would test little)
        step = autoshard.compile(gpt.train_step, *abstract, batch, mesh=mesh,
                                 planner="fully-sharded", annotations="ignore")
    model, optimizer = step.init(lambda: gpt.create(cfg), argnums=(0, 1))
    plan = step.plan
    planned = dict(zip((v.name for v in plan.graph.inputs), plan.input_specs))
    state = nnx.state((model, optimizer))
    split = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        sharding = leaf.sharding
        # every shard is exactly the plan's shard: nothing bigger lives on any device
        for shard in leaf.addressable_shards:
            assert shard.data.shape == sharding.shard_shape(leaf.shape)
        split += not sharding.is_fully_replicated
    assert split > len(planned) // 2
    specs = step.state_shardings(0)
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(
            specs, is_leaf=lambda s: isinstance(s, jax.sharding.NamedSharding))):
        assert a.sharding.spec == b.spec
    # and the initialised state trains like a replica built on one device
    with nnx.use_eager_sharding(False):
        ref_model, ref_opt = gpt.create(cfg)
    close(step(model, optimizer, batch), nnx.jit(gpt.train_step)(ref_model, ref_opt, batch))


def test_first_call_after_init_takes_the_plan_without_planning_again(monkeypatch):
    """``step.init`` rebuilds the optimizer, whose new optax transformation compares by
    identity: a new signature for nnx.jit's rule, but the same graph, so the call traces again
    and takes the plan made at compile instead of planning again (issue 30, item 1)."""
    import autoshard.planner as planner

    plans = []
    rule = planner.data_parallel_plan
    monkeypatch.setattr(planner, "data_parallel_plan",
                        lambda *a, **k: plans.append(1) or rule(*a, **k))
    mesh = make_mesh((2, 4))
    x, y = jnp.ones((16, 16)), jnp.zeros((16, 16))

    def create():
        model = MLP(nnx.Rngs(0))
        return model, nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)

    step = autoshard.compile(_mlp_step, *nnx.eval_shape(create), x, y, mesh=mesh,
                             planner="data-parallel")
    model, optimizer = step.init(create, argnums=(0, 1))
    loss = step(model, optimizer, x, y)
    assert len(plans) == 1
    sources = [entry.sharded.plan_source for entry in step._entries.values()]
    assert sources[0] == "rule" and set(sources[1:]) <= {"reused"}
    digests = {entry.sharded.plan_digest for entry in step._entries.values()}
    assert len(digests) == 1
    ref_model, ref_optimizer = create()
    close(loss, nnx.jit(_mlp_step)(ref_model, ref_optimizer, x, y))
