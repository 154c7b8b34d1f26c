"""Equinox modules passed to autoshard.compile directly, under eqx.filter_jit's rule: arrays are
traced, every other leaf (an activation function, a bool field) is static, part of the call
signature; Python scalars outside modules are traced as under jax.jit."""

import pathlib

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import autoshard
from tests.conftest import make_mesh
from tests.examples import load_example

lm = load_example("equinox_lm")
TINY = lm.Config(vocab=64, seq=8, width=32, heads=2, layers=2)


def test_equinox_lm_sharded_equals_filter_jit():
    """The example's model and step on (2, 4), data-parallel (the point here is the arguments,
    not the search): two AdamW steps equal eqx.filter_jit's, the returned model keeps the
    user's static leaves, and feeding it back does not plan again."""
    mesh = make_mesh((2, 4))
    optimizer = lm.make_optimizer()
    train_step = lm.make_train_step(optimizer)
    model, opt_state = lm.create(TINY, optimizer)
    batch = lm.make_batch(TINY, 8)
    step = autoshard.compile(train_step, model, opt_state, batch, mesh=mesh,
                             planner="data-parallel")
    arrays = jax.tree.leaves((eqx.filter(model, eqx.is_array), opt_state, batch))
    assert len(step.graph.inputs) == len(arrays)     # the static leaves are not inputs
    assert step.graph.inputs[0].name == "model.embedding.weight"

    got = lm.run(step, model, opt_state, batch)
    want = lm.run(eqx.filter_jit(train_step), model, opt_state, batch)
    lm.assert_same_training(got, want, lm.nonzero_gradient(model, batch))
    trained = got[1]
    assert trained.blocks[0].mlp.activation is model.blocks[0].mlp.activation
    assert trained.blocks[0].causal is True
    assert trained.blocks[0].attention.dropout.inference is False
    assert len(step._cache) == 1


class Scaled(eqx.Module):
    weight: jax.Array
    negate: bool          # a plain bool field: static under filter_jit's rule
    power: int            # a Python int in a module: static too

    def __call__(self, x):
        y = (x @ self.weight) ** self.power
        return -y if self.negate else y


def test_static_fields_of_a_module_are_its_signature():
    mesh = make_mesh((2, 4))
    x = jnp.arange(32.0).reshape(8, 4) / 32
    module = Scaled(jnp.ones((4, 4)), negate=False, power=2)
    step = autoshard.compile(lambda m, x: m(x), module, x, mesh=mesh, planner="data-parallel")
    assert [v.name for v in step.graph.inputs] == ["m.weight", "x"]
    for negate, power in [(False, 2), (True, 2), (True, 3)]:
        changed = Scaled(module.weight, negate=negate, power=power)
        np.testing.assert_allclose(step(changed, x), eqx.filter_jit(lambda m, x: m(x))(changed, x),
                                   rtol=1e-6)
    assert len(step._cache) == 3                    # each static value is its own signature


def test_python_scalars_outside_modules_stay_traced():
    """jax.jit's rule where there is no module: a scalar argument or dict entry is an input of
    the plan, and a new value does not plan again; a string in a dict is static."""
    mesh = make_mesh((2, 4))

    def scale(x, factor, options):
        y = x * factor * options["bias"]
        return y if options["mode"] == "plain" else -y

    x = jnp.ones((8, 4))
    step = autoshard.compile(scale, x, 2.0, {"bias": 3.0, "mode": "plain"}, mesh=mesh,
                             planner="data-parallel")
    assert [v.name for v in step.graph.inputs] == ["x", "factor", "options['bias']"]
    np.testing.assert_allclose(step(x, 5.0, {"bias": 0.5, "mode": "plain"}), 2.5 * x)
    assert len(step._cache) == 1
    np.testing.assert_allclose(step(x, 5.0, {"bias": 0.5, "mode": "negated"}), -2.5 * x)
    assert len(step._cache) == 2
    placed = step.shard_batch({"bias": 0.5, "mode": "plain"}, argnum=2)
    assert placed["mode"] == "plain" and isinstance(placed["bias"], jax.Array)


def test_error_unhashable_static_leaf_names_its_path():
    mesh = make_mesh((2, 4))

    class Unhashable:
        __hash__ = None

    with pytest.raises(autoshard.ArgumentError) as err:
        autoshard.compile(lambda x, extra: x.sum(), jnp.ones(8), {"cfg": Unhashable()},
                          mesh=mesh, planner="data-parallel")
    text = str(err.value)
    assert "extra['cfg']" in text and "not hashable" in text and "static" in text


def test_autoshard_never_imports_equinox():
    """Equinox is a dev dependency only: passes/arguments.py finds eqx.Module in sys.modules."""
    package = pathlib.Path(autoshard.__file__).parent
    importing = [str(p.relative_to(package)) for p in package.rglob("*.py")
                 if "import equinox" in p.read_text() or "from equinox" in p.read_text()]
    assert importing == []
