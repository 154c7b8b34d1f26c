"""autoshard.compile behaves like jax.jit: call, lower, plan pytrees, signatures, static and
donated arguments, ShapeDtypeStruct planning; and each documented error names the user's
object and says what to do."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import autoshard
from tests.conftest import make_mesh
from tests.models import example_args, gpt, mlp


@pytest.fixture(scope="module")
def mesh():
    return make_mesh((2, 4))


@pytest.fixture(scope="module")
def mlp_step(mesh):
    return autoshard.compile(mlp.train_step, *example_args(mlp), mesh=mesh,
                             planner="data-parallel")


def test_call_matches_jit_and_plan_is_shaped_like_arguments(mlp_step):
    args = example_args(mlp)
    got = mlp_step(*args)
    want = jax.jit(mlp.train_step)(*args)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), got, want)
    plan = mlp_step.plan
    assert jax.tree.structure(plan.in_specs, is_leaf=lambda x: isinstance(x, P)) == \
        jax.tree.structure(args)
    assert jax.tree.structure(plan.out_specs, is_leaf=lambda x: isinstance(x, P)) == \
        jax.tree.structure(want)
    # the default rule: the batch (last argument) split over all 8 devices, the rest replicated
    assert plan.in_specs[2]["x"] == P(("data", "model"))
    assert plan.in_specs[0]["w1"] == P()
    assert got[2].sharding.is_fully_replicated
    summary = plan.summary()
    for text in ["data-parallel rule", "(data=2, model=4)", "params['w1']", "batch['x']",
                 "P(('data', 'model'),)", "out[2]"]:
        assert text in summary, text


def test_compiled_steps_are_steps(mlp_step, mesh):
    """What compile returns satisfies ``autoshard.Step``, its ``summary()`` the plan's (the
    pipelined step: tests/test_pipelined_function.py)."""
    assert isinstance(mlp_step, autoshard.Step) and not isinstance(object(), autoshard.Step)
    assert mlp_step.summary() == mlp_step.plan.summary()

    def nnx_step(model, x):
        return model(x).sum()

    step = autoshard.compile(nnx_step, nnx.Linear(8, 8, rngs=nnx.Rngs(0)), jnp.ones((8, 8)),
                             mesh=mesh, planner="data-parallel")
    assert isinstance(step, autoshard.NnxFunction) and isinstance(step, autoshard.Step)
    assert step.summary() == step.plan.summary()


def test_lower_compile_is_the_executable_a_call_runs(mlp_step):
    args = example_args(mlp)
    lowered = mlp_step.lower(*args)
    assert isinstance(lowered, jax.stages.Lowered)
    compiled = lowered.compile()
    jitted = mlp_step._cache[mlp_step._example_key].jitted
    placed = mlp_step._place(mlp_step._cache[mlp_step._example_key], args)
    assert jitted.lower(*placed).compile().as_text() == compiled.as_text()
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b),
                 compiled(*args), mlp_step(*args))


def test_plans_from_shape_dtype_structs_then_runs_on_arrays(mesh):
    args = example_args(mlp)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), args)
    step = autoshard.compile(mlp.train_step, *abstract, mesh=mesh)
    assert step.lower(*abstract).compile().memory_analysis() is not None
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                 step(*args), jax.jit(mlp.train_step)(*args))


def test_new_argument_shapes_plan_again(mesh):
    step = autoshard.compile(lambda x: (x * 2).sum(0), jnp.ones((8, 4)), mesh=mesh)
    assert step(jnp.ones((16, 4))).shape == (4,)
    assert len(step._cache) == 2
    assert step.plan.graph.inputs[0].shape == (8, 4)  # .plan is the example signature's


def test_static_and_donated_arguments(mesh):
    def scale(x, double, y):
        return x * (2.0 if double else 3.0) + y

    x, y = jnp.ones((8, 4)), jnp.ones((8, 4))
    step = autoshard.compile(scale, x, True, y, mesh=mesh, static_argnums=1, donate_argnums=0,
                             in_specs=(P("data"), P("data")), out_specs=P("data"))
    placed = jax.device_put(x, NamedSharding(mesh, P("data")))
    np.testing.assert_array_equal(step(placed, True, y), 3.0)
    assert placed.is_deleted()
    np.testing.assert_array_equal(step(jnp.ones((8, 4)), False, y), 4.0)
    with pytest.raises(autoshard.ArgumentError, match="both donated and static"):
        autoshard.compile(scale, x, True, y, mesh=mesh, static_argnums=1, donate_argnums=1)


def test_committed_arrays_on_another_layout_are_moved(mesh):
    x = jax.device_put(jnp.arange(64.0).reshape(8, 8), NamedSharding(mesh, P(None, "model")))
    step = autoshard.compile(lambda v: v + 1, x, mesh=mesh, in_specs=P("data"))
    np.testing.assert_array_equal(step(x), np.arange(64.0).reshape(8, 8) + 1)


def test_prefix_in_specs_and_free_leaves(mesh):
    args = example_args(mlp)
    step = autoshard.compile(mlp.train_step, *args, mesh=mesh, planner="data-parallel",
                             in_specs=({"w1": P(None, "model"), "b1": None, "w2": P("model"),
                                        "b2": P()}, None, P("data")))
    specs = step.plan.in_specs
    assert specs[0]["w1"] == P(None, "model") and specs[0]["w2"] == P("model")
    assert specs[2] == {"x": P("data"), "y": P("data")}
    assert step.plan.reasons["in:0"] == "replicated"  # b1 free: the rule chose
    assert step.plan.reasons["in:2"] == "in_specs"


def test_hint_pins_a_tensor_and_is_identity_outside_autoshard(mesh):
    def fn(x, w):
        h = autoshard.hint(x @ w, P("data", "model"))
        return jnp.tanh(h).sum()

    x, w = jnp.ones((8, 16)), jnp.ones((16, 8)) * 0.1
    step = autoshard.compile(fn, x, w, mesh=mesh, planner="data-parallel")
    (pin,) = step.plan.value_specs.values()
    assert pin.format(step.plan.mesh) == "data:S0 model:S1"
    ((node_id, (spec,)),) = step.plan.node_specs().items()
    assert spec == pin and step.graph.nodes[[n.id for n in step.graph.nodes].index(node_id)].op \
        == "autoshard_hint"
    assert "sharding_constraint" in step.lower(x, w).as_text()
    np.testing.assert_allclose(step(x, w), jax.jit(fn)(x, w), rtol=1e-6)
    # outside autoshard: identity under jit, grad and vmap
    np.testing.assert_allclose(jax.grad(fn)(x, w), jax.grad(lambda a, b: jnp.tanh(a @ b).sum())(
        x, w), rtol=1e-6)
    assert jax.vmap(lambda v: autoshard.hint(v, P("data")))(jnp.ones((3, 8))).shape == (3, 8)


def test_runs_under_set_mesh_with_callbacks_and_closed_over_sharded_arrays(mesh):
    """Everything inside the program is Auto, whatever the caller's context or the closed-over
    arrays' meshes (jax.make_mesh gives Explicit axes)."""
    table = jax.device_put(jnp.arange(16.0), NamedSharding(mesh, P("model")))

    def fn(w, x):
        h = jnp.tanh(x @ w) + table
        return jax.pure_callback(np.negative, jax.ShapeDtypeStruct(h.shape, h.dtype), h)

    w, x = jnp.ones((16, 16)) * 0.1, jnp.ones((8, 16))
    want = jax.jit(fn)(w, x)
    step = autoshard.compile(fn, w, x, mesh=mesh)
    np.testing.assert_allclose(step(w, x), want, rtol=1e-6)
    with jax.set_mesh(mesh):
        np.testing.assert_allclose(step(w, x), want, rtol=1e-6)
    assert step(w, x).sharding.mesh == mesh  # results come back on the user's own mesh


def test_composes_with_grad_and_jit(mesh):
    fn = lambda w, x: jnp.tanh(x @ w).sum()  # noqa: E731
    w, x = jnp.full((16, 16), 0.01), jnp.ones((8, 16))
    step = autoshard.compile(fn, w, x, mesh=mesh, batch_argnums=1)
    np.testing.assert_allclose(jax.grad(step)(w, x), jax.grad(fn)(w, x), rtol=1e-5)
    np.testing.assert_allclose(jax.jit(lambda a, b: step(a, b) * 2)(w, x), 2 * fn(w, x),
                               rtol=1e-5)


def test_rule_skips_a_trailing_key_and_results_follow_pinned_arguments(mesh):
    def step(params, batch, key):
        noise = jax.random.normal(key, batch.shape) * 0.0
        grads = jax.grad(lambda p: jnp.mean((batch + noise) @ p["w"]))(params)
        return {"w": params["w"] - grads["w"]}, jnp.mean(batch)

    params, batch = {"w": jnp.ones((16, 8))}, jnp.ones((8, 16))
    plan = autoshard.compile(step, params, batch, jax.random.key(0), mesh=mesh,
                             planner="data-parallel",
                             in_specs=({"w": P(None, "model")}, None, None)).plan
    assert plan.in_specs[1] == P(("data", "model"))         # the batch, not the key
    assert plan.in_specs[2] == P()
    assert plan.out_specs[0]["w"] == P(None, "model")       # new params stay tensor parallel
    assert plan.reasons["out:0"] == "as argument params['w']"


def test_rule_reports_an_indivisible_batch(mesh, caplog):
    with caplog.at_level("WARNING", logger="autoshard"):
        plan = autoshard.compile(lambda x: x.sum(), jnp.ones((3, 4)), mesh=mesh,
                                 planner="data-parallel").plan
    assert plan.in_specs[0] == P()
    assert plan.reasons["in:0"] == "batch argument: no mesh axis divides 3"
    assert "batch size 3 is not divisible by any mesh axis" in caplog.text


# -- errors --------------------------------------------------------------------------------------

def test_error_hint_names_missing_axis_and_source_line(mesh):
    def fn(x):
        return autoshard.hint(x * 2, P("expert"))

    with pytest.raises(autoshard.ShardingError) as err:
        autoshard.compile(fn, jnp.ones((8, 4)), mesh=mesh)
    text = str(err.value)
    assert re.search(r"autoshard.hint at tests/test_api.py:\d+ \(.*fn\)", text), text
    assert "mesh axis 'expert' does not exist; this mesh has axes 'data', 'model'" in text


def test_error_axis_does_not_divide_pinned_dim(mesh):
    def total(params):
        return params["w"].sum()

    with pytest.raises(autoshard.ShardingError) as err:
        autoshard.compile(total, {"w": jnp.ones((6, 8))}, mesh=mesh, in_specs=({"w": P("model")},))
    assert ("argument params['w'] has shape (6, 8): mesh axis 'model' (size 4) does not divide "
            "dim 0 (size 6)") in str(err.value)

    def fn(x):
        return autoshard.hint(x, P(None, "model")) * 2

    with pytest.raises(autoshard.ShardingError, match=r"hint at tests/test_api.py:\d+.*dim 1 "
                                                      r"\(size 6\)"):
        autoshard.compile(fn, jnp.ones((8, 6)), mesh=mesh)


def test_error_unsupported_primitive_names_it_and_the_line(mesh):
    auto = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)

    def fn(x):
        inner = jax.shard_map(lambda v: v * 2, mesh=auto, in_specs=P("data"),
                              out_specs=P("data"))
        return inner(x)

    with pytest.raises(autoshard.UnsupportedPrimitiveError) as err:
        autoshard.compile(fn, jnp.ones((8, 4)), mesh=mesh)
    text = str(err.value)
    assert "'shard_map'" in text and re.search(r"tests/test_api.py:\d+", text), text
    assert "autoshard.hint" in text

    def on_users_mesh(x):  # explicit mesh: shard_map checks shardings while tracing
        return jax.shard_map(jnp.tanh, mesh=mesh, in_specs=P("data"), out_specs=P("data"))(x)

    with pytest.raises(autoshard.UnsupportedPrimitiveError,
                       match=r"jax.shard_map at tests/test_api.py:\d+ \(on_users_mesh\)"):
        autoshard.compile(on_users_mesh, jnp.ones((8, 4)), mesh=mesh)

    def with_pmap(x):
        return jax.pmap(lambda v: v * 2)(x)

    with pytest.raises(autoshard.UnsupportedPrimitiveError,
                       match=r"'shard_map' at tests/test_api.py:\d+ \(.*with_pmap\).*jax.pmap"):
        autoshard.compile(with_pmap, jnp.ones((8, 4)), mesh=mesh)


def test_tracing_errors_note_explicit_sharding_only_when_about_sharding(mesh):
    def unknown_axis(x):     # explicit mode traces (the reshard is a pin), but "tensor" is no axis
        return jax.sharding.reshard(x, P("tensor")) * 2

    with pytest.raises(Exception) as err:
        autoshard.compile(unknown_axis, jnp.ones((8, 4)), mesh=mesh)
    notes = "".join(getattr(err.value, "__notes__", []))
    assert "autoshard: raised while tracing" in notes and "unknown_axis" in notes, notes
    assert "explicit sharding mode" in notes and "autoshard.hint" in notes

    def shape_bug(x):        # the user's own error: no note about shardings
        return x @ x

    with pytest.raises(TypeError, match="dot_general requires contracting dimensions") as err:
        autoshard.compile(shape_bug, jnp.ones((8, 4)), mesh=mesh)
    assert "autoshard:" not in "".join(getattr(err.value, "__notes__", []))


def test_error_planner_options(mesh):
    with pytest.raises(autoshard.ArgumentError, match="pipeline must be None, 'auto' or an"):
        autoshard.compile(lambda x: x, jnp.ones(8), mesh=mesh, pipeline="1f1b")
    with pytest.raises(autoshard.ArgumentError, match="memory_budget needs planner='search'"):
        autoshard.compile(lambda x: x, jnp.ones(8), mesh=mesh, memory_budget=2**30,
                          planner="data-parallel")
    with pytest.raises(autoshard.ArgumentError, match="planner must be one of"):
        autoshard.compile(lambda x: x, jnp.ones(8), mesh=mesh, planner="alpa")
    with pytest.raises(autoshard.ArgumentError, match="unknown hardware 'v100'"):
        autoshard.compile(lambda x: x, jnp.ones(8), mesh=mesh, hardware="v100")


def test_error_wrong_argument_count_and_bad_mesh(mesh):
    step = autoshard.compile(lambda x: x + 1, jnp.ones(8), mesh=mesh)
    with pytest.raises(autoshard.ArgumentError, match="compiled for 1 positional arguments, "
                                                      "got 2"):
        step(jnp.ones(8), jnp.ones(8))
    with pytest.raises(autoshard.ArgumentError, match="mesh must be a jax.sharding.Mesh"):
        autoshard.compile(lambda x: x, jnp.ones(8), mesh=(2, 4))


def test_error_bad_in_specs_structure(mesh):
    with pytest.raises(autoshard.ArgumentError, match="in_specs must be a pytree prefix"):
        autoshard.compile(lambda p: p["a"], {"a": jnp.ones(8)}, mesh=mesh,
                          in_specs=({"b": P()},))


def test_solver_time_limit_warns_with_the_gap():
    """A solve cut short by solver_time_limit still returns a plan, and says so."""
    params = gpt.init(jax.random.key(0))
    args = (params, gpt.tx.init(params), gpt.batch(jax.random.key(1)))
    with pytest.warns(autoshard.SolverTimeLimitWarning,
                      match=r"solver_time_limit=0.001s before proving its plan optimal"):
        step = autoshard.compile(gpt.train_step, *args, mesh=make_mesh((2, 4)),
                                 solver_time_limit=0.001)
    assert step.plan.solver.status == "feasible"
    assert step.plan.solver.details["time_limit_reached"]


@pytest.mark.filterwarnings("ignore::autoshard.SolverTimeLimitWarning")
def test_an_over_budget_program_is_planned_again_below_the_solvers_own_peak(mesh, monkeypatch):
    """When the compiled program exceeds the budget, the search runs again with the budget
    scaled down by the overshoot; when it returns the same plan, the budget is scaled from the
    peak the solver's constraint saw for that plan: below it, so the same plan cannot fit
    again (scaled from the last budget alone, one plan fitted four budgets in a row)."""
    from autoshard import planner
    plans, peaks = [], []
    search = planner.search_plan

    def recording_search(*args, **kwargs):
        plans.append((kwargs["memory_budget"], search(*args, **kwargs)))
        return plans[-1][1]

    def compiled_peak(compiled):   # the first two programs 10% over the budget, then within it
        peaks.append(budget * 11 // 10 if len(peaks) < 2 else peak_memory(compiled))
        return peaks[-1]

    peak_memory = planner.peak_memory
    monkeypatch.setattr(planner, "search_plan", recording_search)
    monkeypatch.setattr(planner, "peak_memory", compiled_peak)
    budget = 2**30
    # the third target is far below any plan's peak: the search proves its optimum there in
    # minutes of CP-SAT, which solver_time_limit cuts short; what is tested is the targets
    step = autoshard.compile(mlp.train_step, *example_args(mlp), mesh=mesh,
                             memory_budget=budget, cache=False, solver_time_limit=5)
    targets = [t for t, _ in plans]
    assert len(plans) == 3 and targets[0] == budget
    assert step.plan.prediction.memory_budget == budget  # the user's, not the scaled target
    # a different plan may fit a slightly lower budget: the first retry scales the budget
    assert targets[1] == int(budget * (budget / peaks[0] * 0.97))
    # the same plan came back (the MLP's optimum fits both): scaled from its own peak
    assert plans[1][1].value_specs == plans[0][1].value_specs
    constrained = plans[1][1].solver.details["constrained_peak"]
    assert 0 < constrained < targets[1]
    assert targets[2] == int(constrained * (budget / peaks[1] * 0.97))
