"""Sharding annotations (nnx.with_partitioning) as hints, requirements or ignored: a bad
annotation is overridden under "hint", kept under "require", reported in both with its cost,
and annotations that do not fit the mesh are errors naming the parameter."""

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import autoshard
from autoshard.ir.plan_json import plan_from_json, plan_to_json
from tests.conftest import make_mesh

BAD = "model['l1']['kernel'].value"


class MLP(nnx.Module):
    """A contracting dim annotated over "model": every forward pays an all-reduce of the
    activations, which replicating or splitting the output dim avoids."""

    def __init__(self, rngs, annotation=("model", None)):
        w = nnx.with_partitioning(nnx.initializers.lecun_normal(), annotation)
        self.l1 = nnx.Linear(128, 128, kernel_init=w, rngs=rngs)
        self.l2 = nnx.Linear(128, 16, rngs=rngs)

    def __call__(self, x):
        return self.l2(jax.nn.relu(self.l1(x)))


def step_fn(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(lambda m: ((m(x) - y) ** 2).mean())(model)
    optimizer.update(model, grads)
    return loss


def compile_mlp(mode, annotation=("model", None), shape=(2, 4)):
    with nnx.use_eager_sharding(False):
        model = MLP(nnx.Rngs(0), annotation)
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    x, y = jnp.ones((64, 128)), jnp.zeros((64, 16))
    step = autoshard.compile(step_fn, model, optimizer, x, y, mesh=make_mesh(shape),
                             annotations=mode)
    return step, (model, optimizer, x, y)


def spec_of(plan, name):
    (spec,) = [s for v, s in zip(plan.graph.inputs, plan.input_specs) if v.name == name]
    spec = tuple(spec.to_partition_spec(plan.mesh, 2))
    return P(*spec, *(None,) * (2 - len(spec)))


def test_bad_annotation_overridden_under_hint_kept_under_require_reported_in_both():
    hint, args = compile_mlp("hint")
    require, _ = compile_mlp("require")
    ignore, _ = compile_mlp("ignore")
    assert spec_of(hint.plan, BAD) != P("model", None)          # overridden
    assert spec_of(require.plan, BAD) == P("model", None)       # kept
    assert ignore.plan.annotation_report is None
    for step, kept in ((hint, False), (require, True)):
        report = step.plan.annotation_report
        rows = {d.path: d for d in report.differences}
        assert BAD in rows and rows[BAD].kept is kept
        assert rows[BAD].seconds > 0 and report.cost_seconds > 0
        assert "annotations (" in step.plan.summary() and BAD in step.plan.summary()
    # the two reports describe the same pair of plans
    assert hint.plan.annotation_report.cost_seconds == pytest.approx(
        require.plan.annotation_report.cost_seconds, rel=1e-6)
    assert require.plan.prediction.step_seconds > hint.plan.prediction.step_seconds
    # the required layout is what runs, and stays put after a step
    model, optimizer, x, y = args
    require(*args)
    assert tuple(model.l1.kernel.get_value().sharding.spec)[:1] == ("model",)
    # the report survives the plan record (plan cache, autoshard.dump)
    again = plan_from_json(plan_to_json(hint.plan), hint.plan.graph, in_tree=hint.plan.in_tree,
                           out_tree=hint.plan.out_tree)
    assert again.annotation_report == hint.plan.annotation_report


def test_hint_keeps_annotations_when_the_search_saves_too_little(monkeypatch):
    """With the margin raised above the bad annotation's cost, "hint" runs the annotated plan
    and the report marks the difference as kept."""
    monkeypatch.setattr(autoshard.planner, "HINT_MARGIN", 100.0)
    step, _ = compile_mlp("hint")
    assert spec_of(step.plan, BAD) == P("model", None)
    report = step.plan.annotation_report
    rows = {d.path: d for d in report.differences}
    assert report.mode == "hint" and rows[BAD].kept and report.cost_seconds > 0
    assert "kept (hint: the search saves too little)" in step.plan.summary()


def test_hint_is_never_predicted_slower_than_require():
    step, _ = compile_mlp("hint", annotation=(None, "model"))
    report = step.plan.annotation_report
    assert report.cost_seconds >= 0
    assert report.searched_step_seconds == pytest.approx(step.plan.prediction.step_seconds)


def test_logical_names_resolve_through_rules_and_errors_name_the_parameter():
    with nnx.logical_axis_rules([("embed", None), ("mlp", "model")]):
        step, _ = compile_mlp("require", annotation=("embed", "mlp"))
    assert spec_of(step.plan, BAD) == P(None, "model")
    with pytest.raises(autoshard.ShardingError, match=r"model\['l1'\]\['kernel'\].*'mlp'.*"
                       "logical_axis_rules"):
        compile_mlp("hint", annotation=("embed", "mlp"))
    # a rule mapping to an axis the mesh lacks: the fix is that rule (rules do not chain)
    with nnx.logical_axis_rules([("embed", None), ("mlp", "tensor")]):
        with pytest.raises(autoshard.ShardingError, match=r"logical axis 'mlp', which your "
                           r"rules map to 'tensor'.*change that rule"):
            compile_mlp("hint", annotation=("embed", "mlp"))
    with pytest.raises(autoshard.ShardingError, match=r"m\['l1'\]\['kernel'\].*does not "
                       "divide"):
        _nondividing()
    with pytest.raises(autoshard.ArgumentError, match="annotations must be one of"):
        compile_mlp("prefer")


def _nondividing():
    with nnx.use_eager_sharding(False):
        model = MLP(nnx.Rngs(0), (None, "model"))
    model.l1.kernel.set_value(jnp.ones((128, 6)))      # 6 columns over 4 devices
    model.l2 = nnx.Linear(6, 16, rngs=nnx.Rngs(1))
    autoshard.compile(lambda m, x: m(x).sum(), model, jnp.ones((8, 128)), mesh=make_mesh((2, 4)))
