"""Pipelined train steps equal unpipelined ones (loss, new parameters, new optimizer state).

The optimizer is AdamW with eps=1e-4: at the first step AdamW's update is about
lr * g / (|g| + eps), so with the default eps=1e-8 a gradient of 1e-9 that microbatching's
summation order turns into -1e-9 flips an update by 2 * lr; with eps=1e-4 the update moves by at
most lr / eps times the gradient difference, and tolerances can stay at 1e-5.
"""

import json
from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import autoshard
from autoshard.cost_model.hardware import Link, get_hardware
from autoshard.measure.hlo import hlo_stats
from autoshard.passes.lift import lift_jaxpr
from autoshard.passes.pipeline.auto_candidates import auto_pipeline_candidates
from autoshard.passes.pipeline.stages import slice_loss
from autoshard.measure.verify import compiled_roofline
from tests.models import gpt

TOL = dict(rtol=1e-5, atol=1e-5)
tx = optax.adamw(1e-3, eps=1e-4, weight_decay=0.01)


def train_step(params, opt_state, batch):
    loss, grads = autoshard.value_and_grad(gpt.loss)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def example(layers):
    params = gpt.init(jax.random.key(0), layers=layers)
    return params, tx.init(params), gpt.batch(jax.random.key(1))


@pytest.fixture(scope="module")
def eight_layers():
    args = example(8)
    return args, jax.jit(train_step)(*args)


def assert_same(got, want):
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path),
                                   **TOL)


@pytest.mark.parametrize("shape,names,pipeline", [
    ((4, 2), ("stage", "data"), autoshard.Pipeline(4, 4, "gpipe")),
    ((4, 2), ("stage", "data"), autoshard.Pipeline(4, 4, "1f1b")),
    ((4, 2), ("stage", "data"), autoshard.Pipeline(4, 4, "interleaved", virtual_stages=2)),
    ((2, 2, 2), ("stage", "data", "model"), autoshard.Pipeline(2, 8, "1f1b")),
    ((2, 2, 2), ("stage", "data", "model"), autoshard.Pipeline(2, 2, "interleaved",
                                                               virtual_stages=2,
                                                               intra_stage="data")),
], ids=["4x2-gpipe", "4x2-1f1b", "4x2-interleaved", "2x2x2-1f1b", "2x2x2-interleaved"])
def test_pipelined_step_equals_unpipelined(eight_layers, shape, names, pipeline):
    args, want = eight_layers
    mesh = jax.make_mesh(shape, names)
    step = autoshard.compile(train_step, *args, mesh=mesh, pipeline=pipeline)
    assert isinstance(step, autoshard.PipelinedFunction) and isinstance(step, autoshard.Step)
    assert_same(step(*args), want)
    plan = step.pipeline_plan
    assert step.plan is plan and step.summary() == plan.summary()
    assert len(plan.stages) == pipeline.stages and plan.microbatches == pipeline.microbatches
    assert 0 < plan.bubble_fraction < 1


def test_uneven_layers_per_stage(tmp_path):
    """Six layers (and the embedding and head) on four stages: the slices are uneven."""
    args = example(6)
    want = jax.jit(train_step)(*args)
    step = autoshard.compile(train_step, *args, mesh=jax.make_mesh((4, 2), ("stage", "data")),
                             pipeline=autoshard.Pipeline(4, 2, "1f1b"))
    assert_same(step(*args), want)
    text = step.lower(*args).compile().as_text()
    # activations and cotangents move between neighbouring stages by collective-permute
    assert text.count("collective-permute-start") + text.count(" collective-permute(") >= 2
    # the simulated schedule as Chrome trace events: one complete event per op, one track each
    step.save_trace(tmp_path / "trace.json")
    events = json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
    ops = [e for e in events if e["ph"] == "X"]
    assert len(ops) == 2 * 4 * 2 and {e["tid"] for e in ops} == {0, 1, 2, 3}
    assert all(e["dur"] > 0 for e in ops)
    with pytest.raises(autoshard.ArgumentError, match="save_trace"):
        autoshard.dump(step, tmp_path / "dump")


def test_slices_are_balanced_and_cut_at_the_residual_stream():
    params, _, batch = example(8)
    leaves, tree = jax.tree.flatten(params)
    micro = jax.tree.map(lambda x: jax.ShapeDtypeStruct((2, *x.shape[1:]), x.dtype), batch)

    def flat_loss(p, b):
        return gpt.loss(jax.tree.unflatten(tree, p), b)

    graph = lift_jaxpr(jax.make_jaxpr(flat_loss)(leaves, micro))
    sliced = slice_loss(graph, len(leaves), 4, get_hardware("h100"))
    times = sliced.forward_seconds
    assert max(times) / min(times) < 1.25
    residual = 2 * gpt.SEQ * gpt.D * 4  # microbatch x seq x width, float32
    assert all(residual <= b <= 1.1 * residual for b in sliced.crossing_bytes)
    with pytest.raises(autoshard.PlanError, match="fewer than the"):
        slice_loss(graph, len(leaves), 400, get_hardware("h100"))


def test_pipeline_errors_name_what_to_do():
    args = example(2)
    with pytest.raises(autoshard.ArgumentError, match="needs an axis named 'stage'"):
        autoshard.compile(train_step, *args, mesh=jax.make_mesh((4, 2), ("data", "model")),
                          pipeline=autoshard.Pipeline(4, 2))

    def plain_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(gpt.loss)(params, batch)
        return params, opt_state, loss

    with pytest.raises(autoshard.PlanError, match="never called autoshard.value_and_grad"):
        autoshard.compile(plain_step, *args, mesh=jax.make_mesh((4, 2), ("stage", "data")),
                          pipeline=autoshard.Pipeline(4, 2))
    with pytest.raises(autoshard.ArgumentError, match="has size 4, the pipeline asks for 2 "
                       r"stages; ask for Pipeline\(4, ...\)"):
        autoshard.compile(train_step, *args, mesh=jax.make_mesh((4, 2), ("stage", "data")),
                          pipeline=autoshard.Pipeline(2, 2))
    with pytest.raises(autoshard.ArgumentError, match=r"value_and_grad\(loss\) under .*"
                       "microbatches=3 must divide the batch of 8; pick a divisor"):
        autoshard.compile(train_step, *args, mesh=jax.make_mesh((4, 2), ("stage", "data")),
                          pipeline=autoshard.Pipeline(4, 3))
    with pytest.raises(autoshard.ArgumentError, match=r"microbatches \(2\) to be a multiple of "
                       "the 4 stages"):
        autoshard.compile(train_step, *args, mesh=jax.make_mesh((4, 2), ("stage", "data")),
                          pipeline=autoshard.Pipeline(4, 2, "interleaved", virtual_stages=2))
    with pytest.raises(autoshard.ArgumentError, match="needs schedule='interleaved'"):
        autoshard.Pipeline(4, 4, "1f1b", virtual_stages=2)


def test_value_and_grad_outside_a_pipeline_is_jax():
    params, _, batch = example(2)
    got = autoshard.value_and_grad(gpt.loss)(params, batch)
    want = jax.value_and_grad(gpt.loss)(params, batch)
    assert_same(got, want)
    assert_same(autoshard.grad(gpt.loss)(params, batch), want[1])


# the searched candidate under the 1.5 MB budget may stop at the solver's time limit (warned):
# what is tested is which measured candidate is kept
@pytest.mark.filterwarnings("ignore::autoshard.SolverTimeLimitWarning")
@pytest.mark.parametrize("hardware,budget,flat_method", [
    ("h100", None, "cost-model search"),
    ("h100", 1_500_000, "cost-model search")])
def test_auto_keeps_the_candidate_whose_executable_measures_fastest(hardware, budget,
                                                                    flat_method):
    # This small step is latency bound: its matmuls take well under a microsecond and every
    # collective op starts up in ~5 us on H100. The search, which prices those start-ups, keeps
    # every value on every device (no collective: ~0.2 us, ~3.3 MB compiled), ahead of data
    # parallel's one combined all-reduce (~12 us) and the pipeline's permutes (~51 us). A 1.5 MB
    # budget rules out that plan, data parallel (~2.0 MB) and the pipeline (~1.8 MB), leaving
    # the budgeted search (~1.4 MB, ~16 us) ahead of the fully-sharded rule (~0.9 MB, ~22 us).
    # The times weighed are the candidates' executables, measured as the plan-quality
    # benchmark measures them.
    args = example(2)
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    step = autoshard.compile(train_step, *args, mesh=mesh, pipeline="auto", cache=False,
                             hardware=hardware, memory_budget=budget, solver_time_limit=5)
    decision = step.auto_decision
    assert not decision.pipelined and isinstance(step, autoshard.ShardedFunction)
    assert len(decision.schedules) == 3      # 1f1b, gpipe, interleaved x2, each measured
    methods = [method for method, *_ in decision.flat_candidates]
    assert methods == ["cost-model search", "data-parallel rule",
                       "fully-sharded data-parallel rule"]
    assert step.plan.method == decision.flat_method == flat_method
    fitting = [t for _, t, peak in decision.flat_candidates if budget is None or peak <= budget]
    assert decision.flat_measured == min(fitting)
    compiled = step.lower(*args).compile()
    assert decision.flat_measured == pytest.approx(
        compiled_roofline(compiled, get_hardware(hardware), mesh).step_seconds)
    if budget is None:
        assert decision.flat_measured < decision.pipelined_measured
    else:
        assert decision.pipelined_peak_bytes > budget >= decision.flat_peak_bytes
        assert not decision.pipelined_fits and "exceeds the budget" in decision.summary()
    assert_same(step(*args), jax.jit(train_step)(*args))


def test_auto_pipelines_when_the_pipeline_measures_fastest(monkeypatch):
    # the flat executables measured 1000x slower than they are: the pipeline must win, and the
    # step returned is the pipeline the decision measured (the searched flat plan of this tiny
    # model replicates everything: 0.2 us of redundant compute, no collective)
    import autoshard.candidates as candidates

    real = candidates.compiled_roofline

    def slower(compiled, hw, mesh):
        r = real(compiled, hw, mesh)
        return replace(r, compute_seconds=1000 * r.compute_seconds,
                       collective_seconds={k: 1000 * v for k, v in r.collective_seconds.items()})

    monkeypatch.setattr(candidates, "compiled_roofline", slower)
    # on one axis of 8 devices: all three schedules over 8 stages, then 2 stages x 4 and
    # 4 stages x 2 with the best predicted schedule, compiled only where predicted faster
    # than every 8-stage pipeline
    args = example(2)
    step = autoshard.compile(train_step, *args, mesh=jax.make_mesh((8,), ("data",)),
                             pipeline="auto", cache=False)
    decision = step.auto_decision
    assert decision.pipelined and isinstance(step, autoshard.PipelinedFunction)
    assert step.pipeline == decision.pipeline
    own = [t for n, _, _, _, t, _ in decision.schedules if n == 8]
    assert len(own) == 3
    others = [(n, t) for n, _, _, _, t, _ in decision.schedules if n != 8]
    assert all(t < min(own) for _, t in others)
    assert all(t >= min(own) for *_, t in decision.unmeasured)
    assert sorted([n for n, _ in others] + [n for n, *_ in decision.unmeasured]) == [2, 4]
    assert step.mesh.axis_names == (("stage",) if step.pipeline.stages == 8
                                    else ("stage", "inner"))
    assert step.mesh.shape["stage"] == decision.pipeline.stages
    assert decision.pipelined_measured == min(m for *_, m in decision.schedules)
    assert step.roofline(*args).step_seconds == pytest.approx(decision.pipelined_measured)
    assert_same(step(*args), jax.jit(train_step)(*args))


def test_a_long_skip_connection_is_still_cut_evenly():
    # the first layer's output is added back at the end: every cut between later layers
    # carries two arrays, only the cut right after the first layer carries one; the cutter
    # widens its slack until the chunks balance
    def loss(ws, x):
        first = jnp.tanh(x @ ws[0])
        h = first
        for w in ws[1:]:
            h = h + jnp.tanh(h @ w)
        return jnp.mean((h + first) ** 2)

    ws = [jnp.ones((32, 32)) / 32 for _ in range(8)]
    graph = lift_jaxpr(jax.make_jaxpr(loss)(ws, jnp.ones((16, 32))))
    sliced = slice_loss(graph, len(ws), 2, get_hardware("h100"))
    times = sliced.forward_seconds
    assert max(times) / min(times) < 1.3
    assert sliced.crossing_bytes == (2 * 16 * 32 * 4,)     # both arrays cross the cut


def test_a_bfloat16_loss_pipelines():
    def loss(w, x):
        h = jnp.tanh(x.astype(jnp.bfloat16) @ w["a"])
        return jnp.mean((h @ w["b"]) ** 2)

    def step(w, x):
        value, g = autoshard.value_and_grad(loss)(w, x)
        return jax.tree.map(lambda p, q: p - 0.1 * q, w, g), value

    w = {"a": jnp.ones((8, 16), jnp.bfloat16) / 8, "b": jnp.ones((16, 4), jnp.bfloat16) / 16}
    x = jax.random.normal(jax.random.key(0), (16, 8))
    piped = autoshard.compile(step, w, x, mesh=jax.make_mesh((2, 4), ("stage", "data")),
                              pipeline=autoshard.Pipeline(2, 2, "1f1b"))
    got, want = piped(w, x), jax.jit(step)(w, x)
    assert got[1].dtype == jnp.bfloat16
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.float32(a), np.float32(b), rtol=1e-2, atol=1e-2)


def _wide_mlp():
    """Residual MLP blocks whose weights (128x512) dwarf a 16-row batch: on links without
    latency, Megatron's column/row split (one activation all-reduce per block) moves far fewer
    bytes than data parallel's gradient all-reduce."""
    keys = jax.random.split(jax.random.key(0), 9)
    params = {"blocks": [{"w1": jax.random.normal(keys[2 * i], (128, 512)) * 0.05,
                          "w2": jax.random.normal(keys[2 * i + 1], (512, 128)) * 0.05}
                         for i in range(4)],
              "out": jax.random.normal(keys[8], (128, 8)) * 0.05}

    def loss(p, batch):
        x, y = batch
        for b in p["blocks"]:
            x = x + jax.nn.gelu(x @ b["w1"]) @ b["w2"]
        return jnp.mean((x @ p["out"] - y) ** 2)

    def step(p, opt_state, batch):
        value, grads = autoshard.value_and_grad(loss)(p, batch)
        updates, opt_state = tx.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, value

    batch = (jax.random.normal(jax.random.key(1), (16, 128)),
             jax.random.normal(jax.random.key(2), (16, 8)))
    return step, (params, tx.init(params), batch)


def _no_latency_h100():
    h100 = get_hardware("h100")
    return replace(h100, name="h100, links without latency",
                   intra_node=Link(h100.intra_node.bandwidth, 0.0),
                   inter_node=Link(h100.inter_node.bandwidth, 0.0))


@pytest.mark.parametrize("pipeline", [
    autoshard.Pipeline(2, 2, "1f1b", data_axes=("data",)),
    autoshard.Pipeline(2, 2, "interleaved", virtual_stages=2, data_axes=("data",))],
    ids=["1f1b", "interleaved"])
def test_tensor_parallel_inside_the_stages_equals_unpipelined(pipeline):
    step, args = _wide_mlp()
    mesh = jax.make_mesh((2, 2, 2), ("stage", "data", "model"))
    piped = autoshard.compile(step, *args, mesh=mesh, pipeline=pipeline,
                              hardware=_no_latency_h100())
    intra = piped._traced[-1].intra
    assert intra.data_axes == ("data",) and intra.model_axes == ("model",)
    # the ILP's layout is Megatron's: w1 split by columns, w2 by rows, the head replicated
    assert intra.param_specs == (P(None, "model"), P("model"),) * 4 + (P(),)
    assert "8 of 9 parameters laid out over ('model',)" in piped.pipeline_plan.summary()
    assert_same(piped(*args), jax.jit(step)(*args))
    # the activation all-reduces run over the model axis inside the tick loop's branches
    text = piped.lower(*args).compile().as_text()
    model_groups = {(0, 1), (2, 3), (4, 5), (6, 7)}
    inside = [c for c, times in hlo_stats(text).collectives if c.kind == "all-reduce"
              and times > 1 and set(c.groups) == model_groups]
    assert inside


def test_the_ilp_chooses_the_data_axes_of_a_stage():
    # without data_axes the ILP decides: on H100's links (latency per collective) this small
    # step is cheapest data parallel over both other axes, so the packed runtime runs it
    step, args = _wide_mlp()
    mesh = jax.make_mesh((2, 2, 2), ("stage", "data", "model"))
    piped = autoshard.compile(step, *args, mesh=mesh,
                              pipeline=autoshard.Pipeline(2, 2, "gpipe"), hardware="h100")
    intra = piped._traced[-1].intra
    assert not intra.tensor_parallel and intra.data_axes == ("data", "model")
    assert_same(piped(*args), jax.jit(step)(*args))
    with pytest.raises(autoshard.ArgumentError, match="not axes of the mesh"):
        autoshard.compile(step, *args, mesh=mesh,
                          pipeline=autoshard.Pipeline(2, 2, "gpipe", data_axes=("batch",)))
    with pytest.raises(autoshard.ArgumentError, match="needs intra_stage='plan'"):
        autoshard.Pipeline(2, 2, data_axes=("data",), intra_stage="data")
    with pytest.raises(autoshard.ArgumentError, match="includes the stage axis"):
        autoshard.Pipeline(2, 2, data_axes=("stage",))


def test_a_scanned_layer_stack_is_cut_between_its_layers():
    # the blocks stacked on a leading axis and run by lax.scan (inside jax.checkpoint): the
    # slicer sees the unrolled layers, so four chunks take one layer each
    def loss(params, batch):
        x = params["wte"][batch["tokens"]] + params["wpe"][: batch["tokens"].shape[1]]

        @jax.checkpoint
        def body(x, p):
            return gpt.block(p, x), None

        x, _ = jax.lax.scan(body, x, params["stacked"])
        logits = gpt.layer_norm(params["ln_f"], x) @ params["head"]
        return gpt.token_loss(logits, batch["labels"])

    def step(params, opt_state, batch):
        value, grads = autoshard.value_and_grad(loss)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    params = gpt.init(jax.random.key(0), layers=4)
    blocks = params.pop("blocks")
    params["stacked"] = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
    args = (params, tx.init(params), gpt.batch(jax.random.key(1)))
    piped = autoshard.compile(step, *args, mesh=jax.make_mesh((2, 4), ("stage", "data")),
                              pipeline=autoshard.Pipeline(2, 2, "interleaved",
                                                          virtual_stages=2))
    times = piped.slicing.forward_seconds
    assert len(times) == 4 and max(times) / min(times) < 1.3
    # the stacked parameters are split into their layers: every chunk holds its own layer,
    # so the chunks' parameters add up to the model's once (four whole stacks before)
    assert sum(piped.slicing.parameter_bytes) == sum(x.nbytes for x in jax.tree.leaves(params))
    assert_same(piped(*args), jax.jit(step)(*args))


def test_stored_residuals_skip_the_recomputed_forward():
    # the default keeps each chunk's vjp residuals, recompute=True runs the forward again in
    # the backward: both equal jax.jit, and the compiled tick loop does a quarter fewer matmul
    # FLOPs without the recomputation (forward 1 + backward 2, against 1 + 1 + 2)
    args = example(2)
    want = jax.jit(train_step)(*args)
    mesh = jax.make_mesh((2, 4), ("stage", "data"))
    flops, stashed = {}, {}
    for recompute in (False, True):
        step = autoshard.compile(train_step, *args, mesh=mesh, pipeline=autoshard.Pipeline(
            2, 2, "1f1b", recompute=recompute))
        assert_same(step(*args), want)
        stats = hlo_stats(step.lower(*args).compile().as_text())
        flops[recompute] = sum(stats.matmul_flops.values())
        stashed[recompute] = step.pipeline_plan.stages[0].activation_bytes
    assert 0.72 < flops[False] / flops[True] < 0.8
    # the plan reports the stashes the runtime allocates: activations and cotangents, one slot
    # per microbatch each, of what crosses the cut packed in float32 (a microbatch of 4 over 4
    # data devices: the (1, SEQ, D) residual stream and two (1, SEQ, 1) layer-norm
    # statistics), plus the residual slots when the forward's residuals are kept
    assert stashed[True] == 2 * 2 * (16 * 64 + 2 * 16) * 4
    assert stashed[False] > stashed[True]


def test_parameters_and_optimizer_state_stay_split_like_zero():
    # between steps a data-parallel pipeline keeps every parameter and optimizer-state leaf
    # split over the non-stage axes on its largest dividing dim (the optimizer update runs on
    # a quarter per device here); microbatches of 2 split over "data" only, so "model" holds
    # copies and each device keeps its own piece of their gradient. Two steps in a row, the
    # first step's results fed back as they come out, equal jax.jit's.
    args = example(2)
    mesh = jax.make_mesh((2, 2, 2), ("stage", "data", "model"))
    step = autoshard.compile(train_step, *args, mesh=mesh,
                             pipeline=autoshard.Pipeline(2, 4, "gpipe", intra_stage="data"))
    got, want = step(*args), jax.jit(train_step)(*args)
    assert_same(got, want)
    batch = args[2]
    assert_same(step(got[0], got[1], batch), jax.jit(train_step)(want[0], want[1], batch))
    # the plan names the data axes the microbatches ran on, not every non-stage axis
    assert "data parallel over ('data',)" in step.pipeline_plan.summary()
    wte = got[0]["wte"]                                  # (VOCAB, D): vocab is the larger dim
    assert wte.sharding.spec == P(("data", "model"))
    assert got[1][0].mu["wte"].sharding.spec == P(("data", "model"))
    state = sum(x.nbytes for x in jax.tree.leaves(args[:2]))
    compiled = step.lower(*args).compile()
    assert compiled.memory_analysis().argument_size_in_bytes < state / 4 + 64 * 1024
    # nothing is gathered whole: the all-gathers are the entry's (a stage's own parameters,
    # half of them) and the pieces' across stages (a quarter), under the parameters' bytes
    # (a third of the state) that gathering whole gradients in a stage alone would move
    stats = hlo_stats(compiled.as_text())
    assert stats.bytes["all-gather"] < state / 3


def test_auto_weighs_every_stage_count_on_the_same_devices():
    # the mesh's own first axis first (all three schedules), then every other factoring of
    # its 8 devices into stages x the rest, in the same device order (consecutive stages on
    # consecutive devices, so a stage never straddles a node it did not straddle before)
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    groups = auto_pipeline_candidates(mesh)
    assert [(m.axis_names, tuple(m.devices.shape), [p.schedule for p in pipes])
            for m, pipes in groups] == [
        (("stage", "model"), (2, 4), ["1f1b", "gpipe", "interleaved"]),
        (("stage", "inner"), (4, 2), ["1f1b"]),
        (("stage",), (8,), ["1f1b"])]
    for m, _ in groups:
        assert [d.id for d in m.devices.flat] == [d.id for d in mesh.devices.flat]
    # a mesh that names its stage axis is pipelined over that axis only
    named = jax.make_mesh((2, 4), ("stage", "data"))
    assert [tuple(m.devices.shape) for m, _ in
            auto_pipeline_candidates(named)] == [(2, 4)]


def test_auto_decision_keeps_what_fits_and_says_when_nothing_does():
    # a pipeline that fits beats a faster flat plan that does not; sizes print in a unit
    # that shows them; when nothing fits, compile raises instead of keeping the fastest
    from autoshard.candidates import auto_infeasible

    def decision(budget):
        return autoshard.AutoDecision(
            autoshard.Pipeline(2, 4, "1f1b"), 2e-3, 1e-3, 2e-3, 1e-3,
            pipelined_peak_bytes=400_000, flat_peak_bytes=900_000, memory_budget=budget)

    assert decision(None).pipelined is False            # the flat plan measures faster
    assert decision(500_000).pipelined is True           # only the pipeline fits
    assert "exceeds the budget 292.97 KiB" in decision(300_000).summary()
    err = auto_infeasible("step", 300_000, [("1-stage gpipe pipeline", 400_000),
                                            ("data-parallel rule", 900_000)])
    assert isinstance(err, autoshard.PlanInfeasibleError)
    assert "memory_budget=300,000" in str(err) and "gpipe pipeline, needs 400,000" in str(err)
