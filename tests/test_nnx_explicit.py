"""The NNX language model of examples/nnx_explicit.py, written in explicit sharding mode
(``out_sharding=`` on its einsums and its embedding gather, under ``jax.set_mesh``), through
autoshard.compile: two AdamW steps equal nnx.jit's under the same mesh, and every einsum's
``out_sharding`` is a pin of the plan."""

import jax
from flax import nnx
from jax.sharding import PartitionSpec as P

import autoshard
from tests.conftest import make_mesh
from tests.examples import load_example

lm = load_example("nnx_explicit")
TINY = lm.Config(vocab=64, seq=8, width=32, heads=4, layers=2)


def test_nnx_explicit_lm_equals_nnx_jit_under_set_mesh():
    """Data-parallel: the point is the explicit-mode model tracing and its layouts being
    pinned, not the search."""
    mesh = make_mesh((2, 4))
    with jax.set_mesh(mesh):
        batch = lm.make_batch(TINY, 8, mesh)
        model, optimizer = lm.create(TINY)
        step = autoshard.compile(lm.train_step, model, optimizer, batch, mesh=mesh,
                                 planner="data-parallel")
        losses = lm.run(step, model, optimizer, batch)
        ref_model, ref_optimizer = lm.create(TINY)
        mask = lm.nonzero_gradient(ref_model, batch)
        want = lm.run(nnx.jit(lm.train_step), ref_model, ref_optimizer, batch)
    lm.assert_same_training((losses, model), (want, ref_model), mask)

    pinned = {n.params["spec"] for n in step.plan.graph.nodes if n.op == "autoshard_hint"}
    assert {P("data", None, "model", None), P("data", "model", None, None),
            P("data", None, "model"), P("data", None, None)} <= pinned
