"""The planning progress display (autoshard/progress.py): shown once a plan takes over
``DELAY`` seconds, as plain lines off a terminal and one rewritten line on one, and silenced by
``progress=False`` or ``AUTOSHARD_PROGRESS=0``."""

import io

import jax.numpy as jnp
import pytest

import autoshard
import autoshard.progress as progress
from tests.conftest import make_mesh


def step(w, x):
    return jnp.tanh(x @ w).sum()


ARGS = (jnp.ones((32, 16)), jnp.ones((16, 32)))


@pytest.fixture
def no_delay(monkeypatch):
    monkeypatch.setattr(progress, "DELAY", 0.0)


def test_a_plan_shows_its_phases_as_plain_lines_off_a_terminal(no_delay, capsys):
    autoshard.compile(step, *ARGS, mesh=make_mesh((8,)), cache=False, progress=True)
    lines = capsys.readouterr().err.splitlines()
    shown = [line for line in lines if line.startswith("autoshard: planning step [")]
    phases = [line.split("] ", 1)[1].split(":")[0] for line in shown]
    assert phases[:3] == ["lifting", "pins", "solving"] and "lowering" in phases
    assert any("strategies" in line for line in shown)          # the solver's own messages
    assert lines[-1].startswith("autoshard: planned step in ")
    assert "\r" not in "".join(lines)


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_progress_is_silenced(no_delay, capsys, monkeypatch, how):
    if how == "environment":
        monkeypatch.setenv("AUTOSHARD_PROGRESS", "0")
    autoshard.compile(step, *ARGS, mesh=make_mesh((8,)), cache=False,
                      progress=False if how == "argument" else None)
    assert "autoshard:" not in capsys.readouterr().err


def test_a_quick_plan_shows_nothing(capsys):
    # the default delay (a second) outlasts planning this one-op step
    stream = io.StringIO()
    with progress.planning("tiny", True, stream) as display:
        display.phase("solving", "3 nodes")
    assert stream.getvalue() == ""


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_on_a_terminal_one_line_is_rewritten_and_cleared(no_delay):
    stream = Terminal()
    with progress.planning("train_step", True, stream) as display:
        display.phase("solving", "1349 nodes")
        progress.report("LP relaxation: optimal")
    text = stream.getvalue()
    assert text.count("\r\033[K") >= 3 and text.count("\n") == 1
    assert "[  0.0s] solving: LP relaxation: optimal" in text
    assert text.endswith("autoshard: planned train_step in 0.0s\n")


def test_a_failed_plan_says_where_it_stopped(no_delay):
    stream = io.StringIO()
    with pytest.raises(ValueError):
        with progress.planning("train_step", True, stream) as display:
            display.phase("solving")
            raise ValueError("no plan")
    assert stream.getvalue().splitlines()[-1].startswith(
        "autoshard: planning train_step stopped after ")


def test_a_pipeline_shows_its_intra_stage_plan(no_delay, capsys):
    """A pipelined step plans inside jax's trace of the step (gradients.py): its display
    names the pipeline and shows the intra-stage search's own messages."""
    import jax
    import optax

    from tests.models import gpt

    tx = optax.sgd(1e-2)

    def train_step(params, opt_state, batch):
        loss, grads = autoshard.value_and_grad(gpt.loss)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    params = jax.eval_shape(lambda: gpt.init(jax.random.key(0), layers=2))
    batch = jax.eval_shape(lambda: gpt.batch(jax.random.key(1)))
    autoshard.compile(train_step, params, jax.eval_shape(tx.init, params), batch,
                      mesh=jax.make_mesh((2, 2, 2), ("stage", "data", "model")),
                      pipeline=autoshard.Pipeline(2, 2, "1f1b"), progress=True)
    lines = capsys.readouterr().err.splitlines()
    name = "train_step (2 stages, 1f1b)"   # qualified: a local function here
    shown = [line for line in lines if line.startswith("autoshard: planning ")
             and f"{name} [" in line]
    phases = [line.split("] ", 1)[1].split(":")[0] for line in shown]
    assert "intra-stage plan" in phases and "pipelining" in phases
    assert any("strategies" in line for line in shown)          # the search's own messages
    assert lines[-1].startswith("autoshard: planned ") and f"{name} in " in lines[-1]
