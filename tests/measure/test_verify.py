"""autoshard.verify: a rule's plan shows what XLA compiled with the predicted column empty, and
a searched plan's collective counts are of combined ops on both sides (XLA's combiners merge
independent collectives, not chains)."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

import autoshard
from autoshard import MeshSpec
from autoshard.cost_model.collectives import collective_latency
from autoshard.cost_model.hardware import get_hardware
from tests.conftest import make_mesh


def sgd_step(params, x):
    def loss(params):
        h = jnp.tanh(x @ params["w1"])
        return jnp.mean((h @ params["w2"]) ** 2)

    grads = jax.grad(loss)(params)
    return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)


def test_verify_a_rule_plan_shows_the_compiled_program_without_predictions():
    params = {"w1": jnp.ones((16, 32)) * 0.1, "w2": jnp.ones((32, 8)) * 0.1}
    x = jnp.ones((16, 16))
    step = autoshard.compile(sgd_step, params, x, mesh=make_mesh((2, 4)),
                             planner="data-parallel")
    assert step.plan.prediction is None
    report = autoshard.verify(step, params, x)
    assert not report.predicted
    assert all(c.predicted is None and c.ratio is None for c in report.rows)
    # data parallel: the gradients are all-reduced, whole; the program holds both weights
    gradient_bytes = (16 * 32 + 32 * 8) * 4
    (reduced,) = [c for c in report.collective_bytes if c.name == "all-reduce bytes"]
    assert reduced.compiled == gradient_bytes
    assert report.peak_memory.compiled >= 2 * gradient_bytes
    lines = report.summary().splitlines()
    row = next(line for line in lines if line.startswith("all-reduce bytes"))
    assert row.split() == ["all-reduce", "bytes", f"{gradient_bytes:,}", "-"]
    assert "no predictions" in lines[-1]


def chained_step(params, x):
    """SGD whose update of each parameter is scaled by the RMS of the one before: with the
    gradients split (pinned), each RMS is a scalar all-reduce that waits for the previous
    one."""
    def loss(params):
        h = jnp.tanh(x @ params["w0"])
        for name in ("w1", "w2", "w3"):
            h = jnp.tanh(h @ params[name])
        return jnp.mean(h ** 2)

    grads = jax.grad(loss)(params)
    scale, new = 1.0, {}
    for name in sorted(grads):
        g = autoshard.hint(grads[name], P(("data", "model"))) * scale
        scale = 1.0 / (1.0 + jnp.sqrt(jnp.mean(g ** 2)))
        new[name] = params[name] - 0.1 * scale * g
    return new


def test_a_chain_of_reductions_is_predicted_as_the_ops_xla_cannot_combine():
    # the gradients pinned split over every device: each scale's RMS is an all-reduce that
    # depends on the one before, so XLA's combiner makes one op per link (it merges only
    # independent collectives); the prediction counts and prices the same ops
    # 1 MiB gradients: gathering each to take its RMS locally costs more than the chain
    params = {f"w{i}": jnp.full((512, 512), 0.002) for i in range(4)}
    x = jnp.ones((16, 512))
    split = {name: P(("data", "model")) for name in params}
    step = autoshard.compile(chained_step, params, x, mesh=make_mesh((2, 4)), cache=False,
                             in_specs=(split, P()), out_specs=split)
    report = autoshard.verify(step, params, x)
    (count,) = [c for c in report.collective_counts if c.name == "all-reduce count"]
    assert count.compiled >= 4 and count.predicted == count.compiled, report.summary()
    assert count.ratio == 1.0
    latency = collective_latency(get_hardware("h100"), MeshSpec(("data", "model"), (2, 4)),
                                 "all-reduce", (0, 1))
    assert step.plan.prediction.collective_seconds["all-reduce"] >= count.compiled * latency
    np.testing.assert_allclose(np.asarray(step(params, x)["w3"]),
                               np.asarray(jax.jit(chained_step)(params, x)["w3"]), rtol=1e-5)
