"""The prediction's schedule and result buffers: each update chain runs as soon as its gradient
is made, except after a combined all-reduce (autoshard/passes/prediction/early_updates.py); a
result returned in another layout than its op makes holds a buffer of the returned size
(``prediction.predict.result_layouts``)."""

import jax
import jax.numpy as jnp
import numpy as np

from autoshard.ir.sharding import Partial
from autoshard.passes.prediction.early_updates import early_updates
from autoshard.passes.prediction.predict import result_layouts
from tests.passes.test_problem import MESH, problem_of

N = 64


def sgd_step(w1, w2, x):
    def loss(w1, w2):
        return jnp.sum(jnp.tanh(x @ w1) @ w2)

    g1, g2 = jax.grad(loss, argnums=(0, 1))(w1, w2)
    return w1 - 0.1 * g1, w2 - 0.1 * g2


def _problem():
    graph, pp = problem_of(sgd_step, jnp.ones((N, N)), jnp.ones((N, N)), jnp.ones((32, N)))
    # the backward makes g2 (w2's gradient) before g1; the jaxpr updates w1, then w2:
    # w - mul(0.1, g) for each
    results = sorted(pp.result_starts, key=pp.result_starts.get)
    maker = {v.id: node for node in graph.nodes for v in node.outputs}
    gradients = [pp.value_slot[maker[pp.slots[r].node.inputs[1].id].inputs[1].id][0]
                 for r in results]
    return graph, pp, results, gradients


def _positions(pp):
    return sorted(pp.result_starts.get(i, s.interval[0])
                  for i, s in enumerate(pp.slots) if s.kind == "op")


def _replicated(pp):
    return np.asarray([next(k for k, s in enumerate(slot.strategies)
                            if all(o is None or o.is_replicated for o in s.outputs)
                            and all(i is None or i.is_replicated for i in s.inputs))
                       for slot in pp.slots], np.int64)


def test_an_update_runs_right_after_its_gradient_is_made():
    graph, pp, (w1_new, w2_new), (g1, g2) = _problem()
    assert pp.slots[g2].interval[0] < pp.slots[g1].interval[0]
    assert pp.result_starts[w2_new] > pp.result_starts[w1_new]     # the jaxpr's order
    moved = early_updates(pp, _replicated(pp), MESH)
    made = moved.slots[g2].interval[0]
    # w2's multiply and subtract follow g2 at once: w2 is written there, and g2 dies at the
    # subtract (XLA fuses the multiply into it), not after the rest of the backward pass
    assert moved.result_starts[w2_new] == made + 2
    assert pp.slots[g2].interval[1] == pp.result_starts[w2_new] + 1
    assert moved.slots[g2].interval == (made, made + 3)
    assert moved.result_starts[w2_new] < moved.slots[g1].interval[0]
    # the step's length and everything else's order are kept
    assert moved.result_starts[w1_new] == len(graph.nodes)
    assert _positions(moved) == _positions(pp) == list(range(1, len(graph.nodes) + 1))


def test_updates_wait_for_a_combined_all_reduce_of_the_gradients():
    graph, pp, (w1_new, w2_new), (g1, g2) = _problem()
    choice = _replicated(pp)
    # each gradient's matmul leaves it a partial sum that its transpose needs whole: two
    # all-reduces, which XLA combines into one after the later of them
    for gradient in (g1, g2):
        (t,) = [t for t in pp.transfers if t.consumer == gradient]
        slot = pp.slots[t.producer]
        choice[t.producer] = next(k for k, s in enumerate(slot.strategies)
                                  if any(isinstance(e, Partial) for e in s.outputs[0].sbp))
        assert t.combined
    moved = early_updates(pp, choice, MESH)
    last_matmul = pp.slots[[t.producer for t in pp.transfers if t.consumer == g1][0]]
    assert moved.result_starts[w2_new] > moved.slots[
        pp.slots.index(last_matmul)].interval[0]


def test_a_result_returned_replicated_but_made_split_holds_a_replicated_buffer():
    graph, pp, (w1_new, w2_new), _ = _problem()
    choice = _replicated(pp)
    assert result_layouts(pp, choice, MESH) == ({}, [])
    choice[w2_new] = next(k for k, s in enumerate(pp.slots[w2_new].strategies)
                          if not s.outputs[0].is_replicated
                          and not any(isinstance(e, Partial) for e in s.outputs[0].sbp))
    fraction = pp.slots[w2_new].strategies[choice[w2_new]].outputs[0].shard_fraction(MESH)
    at = pp.result_starts[w2_new]
    held, made = result_layouts(pp, choice, MESH)
    assert held == {w2_new: N * N * 4}
    assert made == [(int(N * N * 4 * fraction), at, at + 1)]


def test_a_chain_op_that_reads_only_arguments_runs_just_before_its_reader():
    # weight decay's 0.01 * w needs nothing but w: it moves with its reader, right after the
    # gradient, not to the start of the step (where it would hold w's gathered copy long)
    def step(w, x):
        g = jax.grad(lambda w: jnp.sum(jnp.tanh(x @ w) @ w))(w)
        return w - 0.1 * (g + 0.01 * w)

    graph, pp = problem_of(step, jnp.ones((N, N)), jnp.ones((32, N)))
    (result,) = pp.result_starts
    moved = early_updates(pp, _replicated(pp), MESH)
    decay = next(i for i, s in enumerate(pp.slots) if s.kind == "op" and s.node.op == "mul"
                 and any(getattr(a, "id", None) == graph.inputs[0].id for a in s.node.inputs))
    # decay, the add, the multiply by the rate, the subtract: one after the other
    assert moved.slots[decay].interval[0] == moved.result_starts[result] - 3
    assert moved.slots[decay].interval[0] > 1
