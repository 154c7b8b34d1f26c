"""autoshard.verify: a rule's plan shows what XLA compiled with the predicted column empty, and
collective counts (compiled after XLA's combiners) carry no ratio that would read as a
misprediction."""

import jax
import jax.numpy as jnp

import autoshard
from autoshard.measure.verify import Comparison, Verification
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


def test_counts_combined_by_xla_show_no_ratio_and_bytes_do():
    counts = (Comparison("all-reduce count", 27, 1, combined=True),)
    nbytes = (Comparison("all-reduce bytes", 400_388, 400_388),)
    report = Verification(counts, nbytes, Comparison("collective bytes", 400_388, 400_388),
                          Comparison("peak memory bytes", 2_561_428, 2_568_996), "")
    text = report.summary()
    assert counts[0].ratio is None and "27.00" not in text
    assert next(line for line in text.splitlines()
                if line.startswith("all-reduce count")).split()[-1] == "-"
    assert next(line for line in text.splitlines()
                if line.startswith("all-reduce bytes")).split()[-1] == "1.00"
    assert "after XLA's combiners" in text
