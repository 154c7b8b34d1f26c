"""Liveness beyond producer-to-last-reader: recomputed fused values keep their operands, ops
write over dying operands, temporaries sit in the results' buffers before those are written
(autoshard/passes/prediction/liveness.py)."""

import jax.numpy as jnp
import numpy as np

from autoshard import B, S, ShardingSpec
from autoshard.passes.prediction.liveness import packed_profile
from autoshard.passes.prediction.predict import gathered_buffers
from autoshard.solver.problem import Problem, usage_profile
from tests.passes.test_problem import MESH, problem_of


def op_slot(graph, pp, op, k=0):
    nodes = [n for n in graph.nodes if n.op == op]
    return pp.slots[pp.value_slot[nodes[k].outputs[0].id][0]]


def position(graph, op, k=0):
    return [i for i, n in enumerate(graph.nodes, start=1) if n.op == op][k]


def test_a_value_recomputed_in_a_later_kernel_keeps_what_it_is_computed_from():
    # tanh(a) is fused into the final multiply (XLA recomputes it there), so the matmul a it
    # reads stays live until that multiply, not only until the tanh
    def fn(x):
        a = x @ x
        m = jnp.tanh(a)
        b = (x @ x) @ x
        return m * b

    graph, pp = problem_of(fn, jnp.ones((64, 64)))
    first = op_slot(graph, pp, "dot_general", 0)
    assert first.interval == (1, position(graph, "mul") + 1)


def test_an_elementwise_op_writes_over_the_operand_that_dies_there():
    def fn(x):
        h = x @ x
        y = h + 1.0
        return y @ x

    graph, pp = problem_of(fn, jnp.ones((64, 64)))
    h = op_slot(graph, pp, "dot_general", 0)
    add = position(graph, "add")
    assert h.interval == (1, add)                     # not live beside the sum it becomes
    assert op_slot(graph, pp, "add").interval[0] == add


def test_a_scatter_into_zeros_is_one_buffer():
    def fn(x, i):
        return jnp.zeros((64, 64)).at[i].add(x @ x) @ x

    graph, pp = problem_of(fn, jnp.ones((64, 64)), jnp.arange(64))
    zeros = op_slot(graph, pp, "broadcast_in_dim")
    assert zeros.interval[1] == position(graph, "scatter-add")


def test_temporaries_sit_in_results_not_yet_written():
    # an argument (10 bytes), results of 4 bytes made at positions 4 and 5, a 3-byte temporary
    # at [1, 3) that fits in a result's buffer, a 6-byte one at [2, 4) that fits in none
    problem = Problem.from_lists(
        costs=[[0]] * 5, usages=[[10], [4], [4], [3], [6]],
        intervals=[(0, 6), (0, 6), (0, 6), (1, 3), (2, 4)])
    choice = np.zeros(5, np.int64)
    assert usage_profile(problem, choice).tolist() == [18, 21, 27, 24, 18, 18]
    # at 2: the argument, both results' buffers holding the small temporary, the large one
    assert packed_profile(problem, choice, {1: 4, 2: 5}).tolist() == [18, 18, 24, 24, 18, 18]
    # results made early leave no room: the temporary is counted beside them
    assert packed_profile(problem, choice, {1: 0, 2: 0}).tolist() == [18, 21, 27, 24, 18, 18]


def test_an_operand_gathered_for_its_reader_holds_a_buffer_of_the_gathered_size():
    def fn(x, w):
        return jnp.tanh(x @ w)

    graph, pp = problem_of(fn, jnp.ones((64, 128)), jnp.ones((128, 256)))
    dot = next(i for i, s in enumerate(pp.slots)
               if s.kind == "op" and s.node.op == "dot_general")
    x_slot, w_slot = (pp.value_slot[v.id][0] for v in graph.inputs)
    choice = np.zeros(len(pp.slots), np.int64)
    # the matmul splits rows over "data" and needs w whole; w arrives split over "model"
    row_split = ShardingSpec((S(0), B))
    k = next(k for k, s in enumerate(pp.slots[dot].strategies)
             if s.inputs[0] == row_split and s.inputs[1].is_replicated)
    choice[dot] = k
    choice[x_slot] = next(i for i, s in enumerate(pp.slots[x_slot].strategies)
                          if s.outputs[0] == row_split)
    choice[w_slot] = next(i for i, s in enumerate(pp.slots[w_slot].strategies)
                          if s.outputs[0] == ShardingSpec((B, S(0))))
    tanh = next(i for i, s in enumerate(pp.slots) if s.kind == "op" and s.node.op == "tanh")
    choice[tanh] = next(i for i, s in enumerate(pp.slots[tanh].strategies)
                        if s.inputs[0] == row_split)
    at = pp.slots[dot].interval[0]
    assert gathered_buffers(pp, choice, MESH) == [(128 * 256 * 4, at, at + 1)]
    choice[w_slot] = next(i for i, s in enumerate(pp.slots[w_slot].strategies)
                          if s.outputs[0].is_replicated)
    assert gathered_buffers(pp, choice, MESH) == []     # nothing gathered, no buffer


def test_a_value_read_later_as_a_slice_is_sliced_when_it_is_made():
    # h is made replicated and read so by the next matmul; the last matmul reads it row-split
    # (a local slice, no collective). XLA slices it right away, so the replicated buffer dies
    # at the first reader and only the half-size slice lives to the last one.
    from autoshard.passes.prediction.predict import sliced_reads

    def fn(x, w):
        h = x @ w
        a = (h @ w) @ w
        return a @ w + h @ w

    graph, pp = problem_of(fn, jnp.ones((64, 128)), jnp.ones((128, 128)))
    dots = [i for i, s in enumerate(pp.slots) if s.kind == "op" and s.node.op == "dot_general"]
    make, first, last = dots[0], dots[1], dots[4]
    assert [pp.slots[d].node.inputs[0].id for d in (first, last)] == \
        [pp.slots[make].node.outputs[0].id] * 2
    choice = np.zeros(len(pp.slots), np.int64)

    def pick(slot, lhs):
        return next(k for k, s in enumerate(pp.slots[slot].strategies)
                    if s.inputs[0] == lhs and s.inputs[1].is_replicated)

    replicated, row_split = ShardingSpec((B, B)), ShardingSpec((S(0), B))
    choice[make], choice[first] = pick(make, replicated), pick(first, replicated)
    choice[last] = pick(last, row_split)
    start, end = pp.slots[make].interval
    assert end == pp.slots[last].interval[0] + 1
    ends, slices = sliced_reads(pp, choice, MESH)
    assert ends == {make: pp.slots[first].interval[0] + 1}
    assert slices == [(64 * 128 * 4 // 2, start, end)]
    choice[last] = pick(last, replicated)               # read whole: held whole, as before
    assert sliced_reads(pp, choice, MESH) == ({}, [])
