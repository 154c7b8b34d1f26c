"""Memory inside and around loops, for the prediction: a loop invariant made from constants is
not materialized before the loop (``fusion.fused_values``), a body's temporaries live to their
last reader in the body (``loop_liveness.expanded``)."""

import jax.numpy as jnp
import numpy as np
from jax import lax

from autoshard.passes.fusion import fused_values
from autoshard.passes.prediction.loop_liveness import expanded
from tests.passes.test_problem import MESH, problem_of

N = 64


def _scan_reading(invariant):
    def fn(x):
        m = invariant(x)

        def body(c, _):
            return jnp.tanh(c @ c) + m, None

        return lax.scan(body, x, None, length=3)[0]
    return fn


def _maker_of(graph, shape):
    return next(n for n in graph.nodes if n.op == "broadcast_in_dim"
                and n.outputs[0].shape == shape)


def test_a_constant_loop_invariant_is_not_made_before_the_loop():
    graph, pp = problem_of(_scan_reading(lambda x: jnp.full((N, N), -1e9)), jnp.ones((N, N)))
    mask = _maker_of(graph, (N, N)).outputs[0]
    assert [r.op for r in graph.consumers(mask)] == ["scan"]
    assert mask.id in fused_values(graph)
    slot = pp.value_slot[mask.id][0]
    assert not pp.problem.usages[pp.problem.offsets[slot]:pp.problem.offsets[slot + 1]].any()


def test_an_invariant_computed_from_an_argument_is_made():
    graph, pp = problem_of(_scan_reading(lambda x: jnp.broadcast_to(x.sum(), (N, N))),
                           jnp.ones((N, N)))
    made = _maker_of(graph, (N, N)).outputs[0]
    assert made.id not in fused_values(graph)


def test_a_body_temporary_lives_to_its_last_reader_in_the_body():
    graph, pp = problem_of(_scan_reading(lambda x: x * 2.0), jnp.ones((N, N)))
    ((at, body),) = pp.bodies.items()
    # every body op sits at the loop's one position in the problem
    assert {pp.slots[s].interval for s in body if pp.slots[s].kind == "op"} == {(at, at + 1)}
    problem, buffers, starts, scale = expanded(pp, pp.problem, [(8, at, at + 1)], {})
    assert scale == len(body) + 1
    dot = next(s for s in body if pp.slots[s].kind == "op"
               and pp.slots[s].node.op == "dot_general")
    tanh = next(s for s in body if pp.slots[s].kind == "op" and pp.slots[s].node.op == "tanh")
    k = body.index(dot)
    # the matmul's result dies at the tanh, its one reader, not at the body's end
    assert tuple(problem.intervals[dot]) == (at * scale + k, at * scale + body.index(tanh) + 1)
    assert problem.intervals[dot][1] < (at + 1) * scale - 1
    # the body's result (the next carry) lives to the body's end; outside values are scaled
    assert buffers == [(8, at * scale, (at + 1) * scale)]
    outside = [i for i in range(len(pp.slots)) if i not in body]
    assert np.array_equal(problem.intervals[outside], pp.problem.intervals[outside] * scale)
