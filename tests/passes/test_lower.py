"""Lowering runs any plan: hand plans give the collectives they should (checked in the compiled
HLO), pins on intermediates become constraints, and plans no layout can run are rejected."""

from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import autoshard
from autoshard import B, PARTIAL, S, ShardingError, ShardingSpec
from autoshard.measure.hlo import hlo_stats
from autoshard.ir.plan import Plan
from autoshard.passes.lift import lift
from autoshard.passes.lower import auto_mesh, lower
from autoshard.passes.trace import trace
from tests.conftest import make_mesh
from tests.models import conv, example_args, gpt, llama, mlp, moe, plans, scan_gpt


def compiled_collectives(step, *args):
    return hlo_stats(step.lower(*args).compile().as_text())


@pytest.mark.parametrize("shape", [(8,), (2, 4)], ids=["8", "2x4"])
def test_megatron_mlp_forward_has_one_all_reduce(shape):
    mesh = make_mesh(shape)
    tp = plans.tp_axis(mesh)
    params, x = mlp.init(jax.random.key(0)), mlp.batch(jax.random.key(1))["x"]
    dp = plans.batch_axes(mesh, exclude=(tp,)) or None
    step = autoshard.compile(mlp.forward, params, x, mesh=mesh, planner="data-parallel",
                             in_specs=(mlp.megatron_specs(params, tp), P(dp)), out_specs=P(dp))
    stats = compiled_collectives(step, params, x)
    assert stats.count == {"all-reduce": 1}
    # the one all-reduce sums the row-parallel matmul's (batch/dp, D_OUT) partial output
    dp_size = mesh.shape["data"] if dp else 1
    assert stats.bytes["all-reduce"] == mlp.BATCH // dp_size * mlp.D_OUT * 4
    assert stats.by_group_size == {("all-reduce", mesh.shape[tp]): 1}
    np.testing.assert_allclose(step(params, x), jax.jit(mlp.forward)(params, x),
                               rtol=1e-5, atol=1e-5)


def test_megatron_gpt_forward_has_one_all_reduce_per_row_parallel_matmul():
    mesh = make_mesh((2, 4))
    params, tokens = gpt.init(jax.random.key(0)), gpt.batch(jax.random.key(1))["tokens"]
    step = autoshard.compile(gpt.forward, params, tokens, mesh=mesh, planner="data-parallel",
                             in_specs=(gpt.megatron_specs(params, "model"), P("data")),
                             out_specs=P("data", None, "model"))
    stats = compiled_collectives(step, params, tokens)
    # attention out-projection and MLP down-projection, in each layer; nothing else
    assert stats.count == {"all-reduce": 2 * gpt.LAYERS}
    np.testing.assert_allclose(step(params, tokens), jax.jit(gpt.forward)(params, tokens),
                               rtol=1e-5, atol=1e-5)


def test_megatron_scanned_gpt_counts_loop_iterations():
    mesh = make_mesh((2, 4))
    params, batch, _, key = (example_args(scan_gpt)[i] for i in (0, 2, 1, 3))
    specs = scan_gpt.megatron_specs(params, "model")
    step = autoshard.compile(scan_gpt.forward, params, batch["tokens"], key, mesh=mesh,
                             planner="data-parallel",
                             in_specs=(specs, P("data"), P()), out_specs=P("data", None, "model"))
    stats = compiled_collectives(step, params, batch["tokens"], key)
    assert stats.count == {"all-reduce": 2 * scan_gpt.LAYERS}


def _mlp_graph_and_args():
    args = example_args(mlp)
    traced = trace(mlp.train_step, args)
    return traced, lift(traced), jax.tree.leaves(args)


def test_lowering_pins_intermediates_and_runs_a_hand_built_plan():
    """An FSDP plan written directly as a Plan: parameters split on dim 0 over every device,
    the gathered weights pinned replicated right before each forward matmul."""
    mesh = make_mesh((2, 4))
    traced, graph, flat = _mlp_graph_and_args()
    spec_of = lambda pspec, v: ShardingSpec.from_partition_spec(pspec, mesh_spec, v.ndim)  # noqa
    mesh_spec = autoshard.MeshSpec.from_jax(mesh)
    all_axes = P(("data", "model"))
    in_specs = tuple(spec_of(all_axes if v.ndim and v.shape[0] % 8 == 0 else P(), v)
                     for v in graph.inputs)
    forward_weights = [a for n in graph.nodes if n.op == "dot_general"
                       for a in n.inputs if a in graph.inputs and a.name.startswith("params")]
    assert forward_weights
    pins = {}
    for node in graph.nodes:
        if node.op == "dot_general":
            out = node.outputs[0]
            pins[out.id] = ShardingSpec((S(0), S(0))) if out.shape[0] == mlp.BATCH else \
                ShardingSpec.replicated(2)
    plan = Plan(graph, mesh_spec, in_specs, tuple(ShardingSpec.replicated(2) for _ in
                                                   graph.outputs),
                pins, traced.in_tree, traced.out_tree, "hand FSDP")
    lowered = lower(plan, mesh)
    fn = jax.jit(lowered.fn, in_shardings=lowered.in_shardings,
                 out_shardings=lowered.out_shardings)
    text = fn.lower(*flat).as_text()
    assert text.count("sharding_constraint") >= len(pins)
    got = fn(*flat)
    want = jax.tree.leaves(jax.jit(mlp.train_step)(*example_args(mlp)))
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


def test_partial_pins_are_left_to_the_partitioner_but_boundaries_reject_them():
    mesh = make_mesh((2, 4))
    traced, graph, flat = _mlp_graph_and_args()
    mesh_spec = autoshard.MeshSpec.from_jax(mesh)
    rep = ShardingSpec.replicated(2)
    dot = next(n for n in graph.nodes if n.op == "dot_general")
    partial = ShardingSpec((B, PARTIAL))
    plan = Plan(graph, mesh_spec, (rep,) * len(graph.inputs), (rep,) * len(graph.outputs),
                {dot.outputs[0].id: partial}, traced.in_tree, traced.out_tree, "test")
    lowered = lower(plan, mesh)
    assert "sharding_constraint" not in jax.jit(lowered.fn).lower(*flat).as_text()
    bad = Plan(graph, mesh_spec, (partial,) + (rep,) * (len(graph.inputs) - 1),
               (rep,) * len(graph.outputs), {}, traced.in_tree, traced.out_tree, "test")
    with pytest.raises(ShardingError, match=r"argument params\['b1'\].*partial-sum"):
        lower(bad, mesh)


def stacked_mlp(weights, x):
    return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, weights)[0]


def test_an_argument_stored_split_over_layers_is_moved_before_the_loop():
    # the user stores the stacked weights split over their layers; the loop reads them in the
    # layout its plan chose for one layer's slice, moved there before it
    mesh = make_mesh((2, 4))
    weights, x = jnp.ones((4, 8, 8)) * 0.1, jnp.ones((8, 8))
    step = autoshard.compile(stacked_mlp, weights, x, mesh=mesh, in_specs=(P("model"), None),
                             cache=False)
    scan = next(n for n, _ in step.plan.graph.walk() if n.op == "scan")
    read = step.plan.operand_specs[scan.id][1]
    assert step.plan.input_specs[0].dim_axes(0) == (1,) and not read.dim_axes(0)
    np.testing.assert_allclose(np.asarray(step(weights, x)),
                               np.asarray(jax.jit(stacked_mlp)(weights, x)), rtol=1e-6)


def test_a_loop_reading_its_scanned_axis_split_is_rejected():
    mesh = make_mesh((2, 4))
    weights, x = jnp.ones((4, 8, 8)), jnp.ones((8, 8))
    step = autoshard.compile(stacked_mlp, weights, x, mesh=mesh, cache=False)
    plan = step.plan
    scan = next(n for n, _ in plan.graph.walk() if n.op == "scan")
    split_layers = ShardingSpec((B, S(0)))
    bad = replace(plan, operand_specs={**plan.operand_specs,
                                       scan.id: (plan.operand_specs[scan.id][0], split_layers)})
    with pytest.raises(ShardingError, match=r"weights \(shape \(4, 8, 8\)\) is scanned over by "
                                            r"scan at tests/passes/test_lower.py:\d+.*nothing "
                                            r"pins it there, so this is a defect of autoshard"):
        lower(bad, mesh)
    # the user's own pin is named only where there is one
    pinned = replace(bad, reasons={**bad.reasons, "in:0": "in_specs"})
    with pytest.raises(ShardingError, match=r"pinned there by the user's in_specs: pin another"):
        lower(pinned, mesh)


def test_plan_for_another_mesh_is_rejected():
    traced, graph, _ = _mlp_graph_and_args()
    mesh_spec = autoshard.MeshSpec(("data",), (8,))
    rep = ShardingSpec.replicated(1)
    plan = Plan(graph, mesh_spec, (rep,) * len(graph.inputs), (rep,) * len(graph.outputs), {},
                traced.in_tree, traced.out_tree, "test")
    with pytest.raises(ShardingError, match="made for mesh"):
        lower(plan, make_mesh((2, 4)))


def test_explicit_mesh_lowered_on_auto_view_results_on_user_mesh():
    mesh = make_mesh((2, 4))
    assert all(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)
    amesh = auto_mesh(mesh)
    assert amesh.axis_names == mesh.axis_names and (amesh.devices == mesh.devices).all()
    assert all(t == jax.sharding.AxisType.Auto for t in amesh.axis_types)
    x = jax.device_put(jnp.arange(32.0).reshape(8, 4), NamedSharding(mesh, P("data")))
    step = autoshard.compile(lambda v: v * 2, x, mesh=mesh, in_specs=P("data"),
                             out_specs=P(None, "model"))
    y = step(x)
    assert y.sharding == NamedSharding(mesh, P(None, "model"))
    np.testing.assert_array_equal(y, np.arange(32.0).reshape(8, 4) * 2)


# (x, w, x @ w as planned, its reader's layout, reduce-scatter group size, bytes sent, permutes)
PARTIAL_MATMULS = {
    # partial over "model", scattered on dim 0
    "scatter": ((B, S(1)), (B, S(0)), (B, PARTIAL), (B, S(0)), 4, 64 * 256 * 4, 0),
    # rows already split over "data": "model" splits each piece further (data-major, as wanted)
    "split-then-scatter": ((S(0), S(1)), (B, S(0)), (S(0), PARTIAL), (S(0), S(0)), 4,
                           32 * 256 * 4, 0),
    # rows sliced over "data" first, then scattered over "model": data-major, one scatter
    "slice-then-scatter": ((B, S(1)), (B, S(0)), (B, PARTIAL), (S(0), S(0)), 4, 32 * 256 * 4,
                           0),
    # partial over both axes (FSDP's weight gradients): one reduce-scatter over all eight
    "scatter-over-both": ((S(1), S(1)), (S(0), S(0)), (PARTIAL, PARTIAL), (S(0), S(0)), 8,
                          64 * 256 * 4, 0),
    # rows split over "model", partial over "data": scattering makes model-major pieces, and
    # the reader wants data-major, so they are permuted into place
    "scatter-then-permute": ((S(1), S(0)), (S(0), B), (PARTIAL, S(0)), (S(0), S(0)), 2,
                             16 * 256 * 4, 1),
}


@pytest.mark.parametrize("case", PARTIAL_MATMULS)
def test_a_partial_matmul_is_reduced_as_planned(case):
    """The plan keeps x @ w partial (its contracting dim is split) and its reader needs it
    split on dim 0: the lowering reduce-scatters it (a shard_map), rather than leaving the
    partitioner free to gather the operands instead (the MoE 4x2 all-gathered 32 MiB)."""
    x_sbp, w_sbp, made_sbp, needed_sbp, group, nbytes, permutes = PARTIAL_MATMULS[case]
    mesh = make_mesh((2, 4))
    mesh_spec = autoshard.MeshSpec.from_jax(mesh)

    def fn(x, w):
        return jnp.tanh(x @ w)

    x = jax.random.normal(jax.random.key(0), (64, 128))
    w = jax.random.normal(jax.random.key(1), (128, 256))
    traced = trace(fn, (x, w))
    graph = lift(traced)
    dot, tanh = (next(n for n in graph.nodes if n.op == op) for op in ("dot_general", "tanh"))
    x_spec, w_spec, made, needed = (ShardingSpec(s) for s in (x_sbp, w_sbp, made_sbp,
                                                              needed_sbp))
    plan = Plan(graph, mesh_spec, (x_spec, w_spec), (needed,),
                {dot.outputs[0].id: made, tanh.outputs[0].id: needed},
                traced.in_tree, traced.out_tree, "test",
                operand_specs={dot.id: (x_spec, w_spec), tanh.id: (needed,)})
    lowered = lower(plan, mesh)
    sharded = jax.jit(lowered.fn, in_shardings=lowered.in_shardings,
                      out_shardings=lowered.out_shardings)
    stats = hlo_stats(sharded.lower(x, w).compile().as_text())
    assert stats.count.get("reduce-scatter") == 1 and "all-gather" not in stats.count
    assert stats.by_group_size[("reduce-scatter", group)] == 1
    assert stats.bytes["reduce-scatter"] == nbytes        # the local partial block
    assert stats.count.get("collective-permute", 0) == permutes
    # the cost model prices the same steps
    from autoshard.cost_model.reshard import reshard_steps
    assert [s.kind for s in reshard_steps(made, needed, mesh_spec)] == \
        ["reduce-scatter"] + ["collective-permute"] * permutes
    np.testing.assert_allclose(sharded(x, w)[0], fn(x, w), rtol=1e-4, atol=1e-4)


def test_a_value_made_in_one_layout_and_pinned_in_another_moves_its_result():
    """A value made batch-split by its matmul and pinned replicated (Plan.made_specs: the
    plan's ``moved_state``) is gathered after the matmul, as the plan prices it; pinned at the
    replicated layout alone, the partitioner gathered the matmul's 32x larger operand instead
    (a gradient-accumulation GPT's loop: 248 MiB of all-gathers compiled, 112 predicted)."""
    mesh = make_mesh((8,))
    mesh_spec = autoshard.MeshSpec.from_jax(mesh)

    def f(x, w):
        y = x @ w
        return jnp.tanh(y).sum(0), y * 2

    x = jax.ShapeDtypeStruct((64, 512), jnp.float32)
    w = jax.ShapeDtypeStruct((512, 16), jnp.float32)
    traced = trace(f, (x, w))
    graph = lift(traced)
    dot = next(n for n in graph.nodes if n.op == "dot_general")
    y = dot.outputs[0]
    split, whole = ShardingSpec((S(0),)), ShardingSpec.replicated(1)
    plan = Plan(graph, mesh_spec, (split, whole), (whole, whole), {y.id: whole},
                traced.in_tree, traced.out_tree, "hand", operand_specs={dot.id: (split, whole)},
                made_specs={y.id: split})
    lowered = lower(plan, mesh)
    fn = jax.jit(lowered.fn, in_shardings=lowered.in_shardings,
                 out_shardings=lowered.out_shardings)
    stats = hlo_stats(fn.lower(x, w).compile().as_text())
    assert (stats.count, stats.bytes) == ({"all-gather": 1}, {"all-gather": 64 * 16 * 4})


@pytest.mark.parametrize("model", [mlp, gpt, llama, conv, moe, scan_gpt],
                         ids=lambda m: m.__name__.split(".")[-1])
def test_every_strategy_the_search_can_choose_lowers(model):
    """Plan k sets every choice of the train step's problem to its strategy k (or its last):
    every strategy of every op, argument, port and result is in some plan, and the lowering
    runs them all (a layout it rejects must never be offered). On the scanned GPT each plan is
    also traced and lowered by jax.jit (the shardings inside the loop)."""
    from autoshard.cost_model.hardware import H100
    from autoshard.passes.chosen_plan import plan_from_choice
    from autoshard.passes.pins import collect_pins
    from autoshard.passes.problem import build_problem
    from autoshard.passes.state import updated_arguments

    mesh = make_mesh((2, 4))
    spec = autoshard.MeshSpec.from_jax(mesh)
    traced = trace(model.train_step, jax.eval_shape(lambda: example_args(model)), mesh=mesh)
    graph = lift(traced)
    pins = collect_pins(graph, spec, in_tree=traced.in_tree, out_tree=traced.out_tree)
    pp = build_problem(graph, spec, H100, pins, updated=updated_arguments(graph))
    k = pp.problem.num_strategies
    assert k.max() > 8
    for s in range(int(k.max())):
        plan = plan_from_choice(pp, np.minimum(s, k - 1), graph, spec, in_tree=traced.in_tree,
                                out_tree=traced.out_tree, pins=pins, prediction=None,
                                solver=None)
        lowered = lower(plan, mesh)
        if model is scan_gpt:
            avals = [jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sh)
                     for v, sh in zip(graph.inputs, lowered.in_shardings)]
            jax.jit(lowered.fn, in_shardings=lowered.in_shardings,
                    out_shardings=lowered.out_shardings).lower(*avals)
