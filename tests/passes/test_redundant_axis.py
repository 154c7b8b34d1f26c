"""A searched plan that leaves a mesh axis unused says so in its summary, priced against the
best plan that splits the batch over that axis (passes/redundant_axes.py); a plan that uses
every axis says nothing; a cheaper plan that uses the axis replaces the solver's (a miss)."""

import logging
from dataclasses import replace

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

import autoshard
from autoshard.ir.errors import PlanInfeasibleError
from autoshard.ir.plan_json import plan_from_json, plan_to_json
from autoshard.passes import search
from tests.conftest import make_mesh


def sgd_step(params, x):
    def loss(p):
        return jnp.mean((jnp.tanh(x @ p["w1"]) @ p["w2"]) ** 2)
    grads = jax.grad(loss)(params)
    return jax.tree.map(lambda w, g: w - 0.1 * g, params, grads)


def step_args(batch, d):
    w = jax.ShapeDtypeStruct((d, d), jnp.float32)
    return {"w1": w, "w2": w}, jax.ShapeDtypeStruct((batch, d), jnp.float32)


def duration(seconds):
    return f"{seconds * 1e3:.4g} ms" if seconds >= 1e-4 else f"{seconds * 1e6:.4g} us"


def test_a_plan_that_leaves_an_axis_unused_says_so_with_both_predictions(tmp_path):
    """A 16x16 step with batch 8 on H100s: any collective's start-up (microseconds) costs more
    than the compute it saves (nanoseconds), so every device computes the whole step."""
    args = step_args(8, 16)
    step = autoshard.compile(sgd_step, *args, mesh=make_mesh((2, 4)), hardware="h100",
                             cache=False)
    plan = step.plan
    assert plan.in_specs[1] == P()                         # the batch is not split
    assert [(r.axis, r.size) for r in plan.redundant_axes] == [("data", 2), ("model", 4)]
    summary = plan.summary()
    for r in plan.redundant_axes:
        assert r.chosen_step_seconds == plan.prediction.step_seconds
        assert r.best_using_it_step_seconds >= r.chosen_step_seconds
        assert (f"mesh axis {r.axis!r} ({r.size} devices) computes the same thing "
                f"{'twice' if r.size == 2 else '4 times'}: the chosen plan (predicted "
                f"{duration(r.chosen_step_seconds)}) is cheaper than the best plan that splits "
                f"the batch over {r.axis!r} ({duration(r.best_using_it_step_seconds)})"
                ) in summary
    # plan.json carries them
    again = plan_from_json(plan_to_json(plan), plan.graph, in_tree=plan.in_tree,
                           out_tree=plan.out_tree)
    assert again.redundant_axes == plan.redundant_axes
    # and so does ``autoshard summary`` of the dump
    dumped = autoshard.load_plan(autoshard.dump(step, tmp_path)).summary()
    assert [line for line in dumped.splitlines() if "computes the same thing" in line] == [
        r.line() for r in plan.redundant_axes]


def test_a_plan_that_uses_every_axis_says_nothing():
    args = step_args(4096, 256)
    step = autoshard.compile(sgd_step, *args, mesh=make_mesh((2, 4)), hardware="h100",
                             cache=False)
    assert step.plan.redundant_axes == ()
    assert "computes the same thing" not in step.plan.summary()


def _forced(pins):
    return any("uses every mesh axis" in str(why) for why in pins.reasons.values())


def test_a_cheaper_plan_that_uses_the_axis_replaces_the_solvers(monkeypatch, caplog):
    """The re-solve's plan is in the search space: where it is predicted cheaper, the solver
    missed it, and it is taken (here made cheaper by halving its prediction)."""
    solve = search._search_once

    def cheaper_when_forced(*args, **kwargs):
        plan, pp, choice = solve(*args, **kwargs)
        if _forced(args[3]):
            plan = replace(plan, prediction=replace(
                plan.prediction, step_seconds=plan.prediction.step_seconds / 1e6))
        return plan, pp, choice

    monkeypatch.setattr(search, "_search_once", cheaper_when_forced)
    with caplog.at_level(logging.WARNING, logger="autoshard"):
        step = autoshard.compile(sgd_step, *step_args(8, 16), mesh=make_mesh((2, 4)),
                                 hardware="h100", cache=False)
    assert step.plan.in_specs[1] == P("data")              # the forced plan for 'data' won
    assert "a solver miss" in caplog.text and "'data'" in caplog.text
    assert "'data'" not in "".join(r.line() for r in step.plan.redundant_axes)


def test_an_axis_no_plan_can_use_within_the_limits_says_so(monkeypatch):
    solve = search._search_once

    def infeasible_when_forced(*args, **kwargs):
        if _forced(args[3]):
            raise PlanInfeasibleError("no plan fits the budget")
        return solve(*args, **kwargs)

    monkeypatch.setattr(search, "_search_once", infeasible_when_forced)
    step = autoshard.compile(sgd_step, *step_args(8, 16), mesh=make_mesh((2, 4)),
                             hardware="h100", cache=False)
    (data, _) = step.plan.redundant_axes
    assert data.best_using_it_step_seconds is None
    assert ("mesh axis 'data' (2 devices) computes the same thing twice: no plan that uses it "
            "fits") in step.plan.summary()
