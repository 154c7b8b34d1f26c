"""The strategy problem of small graphs: node and edge costs equal hand-derived numbers,
memory follows liveness, loops tie their bodies to their operands, identical layers share."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import autoshard
from autoshard import PARTIAL, B, MeshSpec, S, ShardingSpec
from autoshard.cost_model.compute import compute_time
from autoshard.cost_model.hardware import H100
from autoshard.cost_model.reshard import reshard_time
from autoshard.passes.lift import lift
from autoshard.passes.pins import collect_pins
from autoshard.passes.problem import NS, build_problem
from autoshard.passes.state import updated_arguments
from autoshard.passes.trace import trace
from tests.models import example_args, gpt

MESH = MeshSpec(("data", "model"), (2, 4))


def spec(*sbp):
    return ShardingSpec(tuple(sbp))


def problem_of(fn, *args, **kwargs):
    traced = trace(fn, args)
    graph = lift(traced)
    pins = collect_pins(graph, MESH, in_tree=traced.in_tree, out_tree=traced.out_tree)
    return graph, build_problem(graph, MESH, H100, pins, updated=updated_arguments(graph),
                                **kwargs)


def test_matmul_costs_are_roofline_and_reshard():
    x, w = jnp.ones((256, 512)), jnp.ones((512, 1024))
    graph, pp = problem_of(lambda x, w: x @ w, x, w)
    (dot_slot,) = [i for i, s in enumerate(pp.slots) if s.kind == "op"]
    slot = pp.slots[dot_slot]
    node = slot.node
    flops = 2 * 256 * 512 * 1024
    for k, s in enumerate(slot.strategies):
        nbytes = sum(4 * n * f.shard_fraction(MESH) for n, f in
                     zip((256 * 512, 512 * 1024), s.inputs)) + 4 * 256 * 1024 * \
            s.outputs[0].shard_fraction(MESH)
        want = compute_time(H100, node, flops / s.divisor, nbytes) * NS
        assert slot.costs[k] == pytest.approx(want)
    cheapest = slot.strategies[int(np.argmin(slot.costs))]
    assert cheapest.divisor == 8 and not cheapest.outputs[0].is_replicated
    # the edge from argument w to the dot: moving w from each layout to each required one
    w_slot = pp.value_slot[graph.inputs[1].id][0]
    e = [i for i, (u, v) in enumerate(pp.problem.edges) if {u, v} == {w_slot, dot_slot}][0]
    matrix = pp.problem.edge_matrix(e)
    for a, src in enumerate(pp.slots[w_slot].strategies):
        for b, dst in enumerate(slot.strategies):
            want = reshard_time(H100, MESH, src.outputs[0], dst.inputs[1], 512 * 1024 * 4) * NS
            assert matrix[a, b] == pytest.approx(want, rel=1e-6, abs=1e-6)


def test_memory_usage_and_liveness():
    def fn(x):
        y = jnp.exp(x)          # dies at the next op (a matmul: it is materialized)
        z = y @ x
        return z.sum()

    graph, pp = problem_of(fn, jnp.ones((64, 64)))
    slots = {s.node.op: s for s in pp.slots if s.kind == "op"}
    exp = slots["exp"]
    replicated = [k for k, s in enumerate(exp.strategies) if s.outputs[0].is_replicated][0]
    split = [k for k, s in enumerate(exp.strategies) if s.outputs[0] == spec(S(0), S(1))][0]
    assert exp.usages[replicated] == 64 * 64 * 4 and exp.usages[split] == 64 * 64 * 4 // 8
    assert exp.interval == (1, 3)            # produced at 1, last read at 2
    arg_slot = pp.slots[pp.value_slot[graph.inputs[0].id][0]]
    assert arg_slot.interval[0] == 0 and arg_slot.interval[1] > 3  # arguments live throughout


def test_results_hold_memory_from_the_start():
    # the runtime allocates a step's results before it runs (memory_analysis counts them
    # beside the temporaries), so a result produced last is live from step 0, like an argument
    def fn(x):
        h = jnp.tanh(x @ x)
        return h @ x, x.sum()

    graph, pp = problem_of(fn, jnp.ones((64, 64)))
    last = pp.slots[pp.value_slot[graph.outputs[0].id][0]]
    first_dot = next(s for s in pp.slots if s.kind == "op" and s.node.op == "dot_general")
    assert last.node.op == "dot_general" and last is not first_dot
    assert last.interval == (0, pp.slots[pp.value_slot[graph.inputs[0].id][0]].interval[1])
    assert first_dot.interval[0] == 1                 # an intermediate: from when it is made


def test_scan_body_ports_and_stacked_operands():
    def stacked(ws, x):
        return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, ws)[0]

    graph, pp = problem_of(stacked, jnp.ones((4, 32, 32)), jnp.ones((8, 32)))
    ports = [s for s in pp.slots if s.kind == "port"]
    assert len(ports) == 3  # carry in, per-step weight slice, carry out
    body_ops = [s for s in pp.slots if s.kind == "op"]
    assert {s.node.op for s in body_ops} == {"dot_general", "tanh"}
    assert all(s.times == 4.0 for s in body_ops)   # trip count applied
    ws_slot = pp.value_slot[graph.inputs[0].id][0]
    assert all(not s.outputs[0].dim_axes(0) or True for s in pp.slots[ws_slot].strategies)
    slice_port = [i for i, s in enumerate(pp.slots) if s.kind == "port" and
                  s.value.shape == (32, 32)][0]
    e = [i for i, (u, v) in enumerate(pp.problem.edges) if {u, v} == {ws_slot, slice_port}][0]
    matrix = pp.problem.edge_matrix(e)
    src = [s.outputs[0] for s in pp.slots[ws_slot].strategies]
    dst = [s.outputs[0] for s in pp.slots[slice_port].strategies]
    # a stacked weight split on its layer axis must be gathered for every slice layout
    a = src.index(spec(S(0), B))
    b = dst.index(spec(B, B))
    assert matrix[a, b] > 0
    # the slice split on its rows is the stacked array split on dim 1: free
    assert matrix[src.index(spec(S(1), B)), dst.index(spec(S(0), B))] == 0


def test_updated_state_is_tied_to_its_argument():
    def step(params, x):
        return {"w": params["w"] - 0.1 * x.T @ (x @ params["w"])}

    graph, pp = problem_of(step, {"w": jnp.ones((32, 16))}, jnp.ones((8, 32)))
    (sink,) = [i for i, s in enumerate(pp.slots) if s.kind == "sink"]
    arg = pp.value_slot[graph.inputs[0].id][0]
    assert any({u, v} == {sink, arg} for u, v in pp.problem.edges)


def test_identical_layers_share_and_distinct_projections_do_not():
    params = gpt.init(jax.random.key(0), layers=6)
    args = (params, gpt.tx.init(params), gpt.batch(jax.random.key(1)))
    graph, pp = problem_of(gpt.train_step, *args)
    groups = pp.problem.groups
    assert groups
    label = {i: s.label for i, s in enumerate(pp.slots)}
    by_slot = {i: g for g in groups for i in g}
    q = [i for i, s in enumerate(pp.slots) if s.kind == "input" and s.label.startswith(
        "params['blocks']") and s.label.endswith("['wq']")]
    k = [i for i, s in enumerate(pp.slots) if s.kind == "input" and s.label.startswith(
        "params['blocks']") and s.label.endswith("['wk']")]
    # the middle layers share; the first and last differ by what feeds and reads them
    assert len(q) == 6 and by_slot[q[2]] == by_slot[q[3]] and q[2] in by_slot[q[2]]
    assert by_slot[q[2]] != by_slot.get(k[2])
    assert all(len({len(pp.slots[i].strategies) for i in g}) == 1 for g in groups)
    ungrouped = problem_of(gpt.train_step, *args, share_layers=False)[1]
    assert not ungrouped.problem.groups and label


def test_combined_values_are_state_only_or_past_the_last_matmul():
    """Values computed from the parameters alone (gathered before the forward pass) and values
    no matmul reads after them (gradients on their way to the optimizer) have collectives XLA
    combines; activations between matmuls do not."""
    def step(params, x):
        w = params["w"].astype(jnp.float32) * 2.0          # from state alone
        h = jnp.tanh(x @ w)                                 # between matmuls
        grad = h.T @ x                                      # the last matmul's result
        return {"w": params["w"] - 0.1 * grad.T}

    graph, pp = problem_of(step, {"w": jnp.ones((32, 16))}, jnp.ones((8, 32)))
    by_op = {}
    for node in graph.nodes:
        by_op.setdefault(node.op, []).append(node)
    from autoshard.passes.fusion import combined_values
    combined = combined_values(graph, set(updated_arguments(graph).values()))
    assert graph.inputs[0].id in combined and graph.inputs[1].id not in combined
    assert by_op["mul"][0].outputs[0].id in combined
    assert by_op["tanh"][0].outputs[0].id not in combined
    assert by_op["dot_general"][0].outputs[0].id not in combined
    assert by_op["dot_general"][1].outputs[0].id in combined
    assert by_op["sub"][0].outputs[0].id in combined
    # the planning problem flags exactly these values' transfers
    assert {t.value.id for t in pp.transfers if t.combined} <= combined
    assert {t.value.id for t in pp.transfers if not t.combined}.isdisjoint(combined)
    assert any(t.combined for t in pp.transfers)


def test_fused_and_dead_values_hold_no_memory():
    """An elementwise value read only by elementwise ops is computed inside its readers' kernel
    and a value nothing reads is removed: neither holds memory; a matmul's operand does."""
    def f(x, w):
        _ = jnp.cos(x)                       # dead
        h = jnp.tanh(x) * 2.0                # tanh's result is fused into the multiply
        return h @ w

    graph, pp = problem_of(f, jnp.ones((64, 32)), jnp.ones((32, 16)))
    from autoshard.passes.fusion import fused_values
    fused = fused_values(graph)
    by_op = {n.op: n for n in graph.nodes}
    assert by_op["cos"].outputs[0].id in fused and by_op["tanh"].outputs[0].id in fused
    assert by_op["mul"].outputs[0].id not in fused
    for op, held in (("cos", False), ("tanh", False), ("mul", True)):
        slot = pp.slots[pp.value_slot[by_op[op].outputs[0].id][0]]
        assert bool(slot.usages.any()) is held, op


def test_an_expensive_value_read_twice_is_held_and_a_cheap_one_is_not():
    """XLA does not recompute a transcendental in each of its readers' kernels (the GPT's GELU
    tanh, read by the forward product and the backward derivative), so it holds memory; a
    cheap elementwise value read twice is recomputed in both and does not."""
    def f(x, w):
        t = jnp.tanh(x)
        m = jnp.abs(x)
        return (t * 2.0 + t * t + m * 2.0 + m * m) @ w

    graph, pp = problem_of(f, jnp.ones((64, 32)), jnp.ones((32, 16)))
    from autoshard.passes.fusion import fused_values
    fused = fused_values(graph)
    tanh = next(n for n in graph.nodes if n.op == "tanh").outputs[0]
    cheap = next(n for n in graph.nodes if n.op == "abs").outputs[0]
    assert tanh.id not in fused and cheap.id in fused
    assert pp.slots[pp.value_slot[tanh.id][0]].usages.any()


def test_a_broadcast_of_a_scalar_is_planned_in_the_layout_that_holds_least():
    """A broadcast costs no time in any layout and XLA makes it where its reader needs it, so
    after the solve it takes, of the layouts its reader makes equally cheap, the one that holds
    least (passes/search.py: least_held_free_layouts; the GPT's loss gradient starts as a 64 MiB
    broadcast of zeros its scatter reads split; left replicated, the predicted peak counted it
    whole). Here the matmul reads it split over all 8 devices (a large batch)."""
    from autoshard.passes.prediction.explain import local_costs
    from autoshard.passes.search import least_held_free_layouts, solve_plan_problem

    def f(s, w):
        return jnp.broadcast_to(s, (4096, 32)) @ w

    graph, pp = problem_of(f, jnp.ones(()), jnp.ones((32, 16)))
    node = next(n for n in graph.nodes if n.op == "broadcast_in_dim")
    index = pp.value_slot[node.outputs[0].id][0]
    slot = pp.slots[index]
    choice, _ = solve_plan_problem(pp.problem, time_limit=30)
    replicated = next(k for k, st in enumerate(slot.strategies) if st.outputs[0].is_replicated)
    choice[index] = replicated
    settled = least_held_free_layouts(pp, choice)
    assert slot.usages[settled[index]] == slot.usages[replicated] // 8
    before, after = local_costs(pp.problem, choice), local_costs(pp.problem, settled)
    first = pp.problem.offsets[index]
    assert after[first + settled[index]] <= before[first + replicated] + 1e-9


def test_a_partial_sum_read_twice_is_reduced_once():
    """x.T @ y over a split batch is a partial sum; read by two ops that need it replicated, it
    is all-reduced once (as XLA does), not once per reader: one fanout slot carries the
    reduction for both readers (passes/problem.py)."""
    mesh = jax.make_mesh((8,), ("data",))

    def f(x, y):
        g = x.T @ y
        return g * 2.0, jnp.sin(g)

    x = jax.ShapeDtypeStruct((64, 32), jnp.float32)
    y = jax.ShapeDtypeStruct((64, 32), jnp.float32)
    step = autoshard.compile(f, x, y, mesh=mesh, hardware="h100",
                             in_specs=(P("data"), P("data")), out_specs=(P(), P()))
    count, nbytes = step.plan.prediction.collectives["all-reduce"]
    assert (count, nbytes) == (1, 32 * 32 * 4)
    report = autoshard.verify(step, x, y)
    assert [(c.name, c.predicted, c.compiled) for c in report.collective_bytes] == [
        ("all-reduce bytes", 32 * 32 * 4, 32 * 32 * 4)]


def test_a_partial_sum_read_in_two_layouts_is_reduced_once_where_the_plan_says():
    """Two readers need the partial sum replicated, a third split: the plan all-reduces it once
    (the split reader slices it), and the lowering constrains the reduced value to that layout;
    left to the readers' operand layouts, XLA reduce-scattered it and all-gathered the result
    instead, a program the plan did not price."""
    mesh = jax.make_mesh((8,), ("data",))

    def f(x, y):
        g = x.T @ y
        return g * 2.0, jnp.sin(g), g + 1.0

    x = jax.ShapeDtypeStruct((64, 32), jnp.float32)
    y = jax.ShapeDtypeStruct((64, 32), jnp.float32)
    step = autoshard.compile(f, x, y, mesh=mesh, hardware="h100",
                             in_specs=(P("data"), P("data")), out_specs=(P(), P(), P("data")))
    assert step.plan.prediction.collectives == {"all-reduce": (1, 32 * 32 * 4)}
    report = autoshard.verify(step, x, y)
    assert [(c.name, c.predicted, c.compiled) for c in report.collective_bytes] == [
        ("all-reduce bytes", 32 * 32 * 4, 32 * 32 * 4)]
