"""Sharded NNX train state saved with orbax and restored straight into the plan's layouts:
training resumes exactly where an uninterrupted run is."""

import jax
import numpy as np
from flax import nnx

import autoshard
from autoshard import checkpoint
from tests.conftest import make_mesh
from tests.test_nnx import GPT_CFG, gpt


def test_round_trip_resumes_training_identically(tmp_path):
    mesh = make_mesh((2, 4))
    cfg, batch = GPT_CFG, gpt.make_batch(GPT_CFG, 8)
    create = lambda: gpt.create(cfg)  # noqa: E731
    with nnx.logical_axis_rules(gpt.logical_rules(mesh)), nnx.use_eager_sharding(False):
        # hardware="cpu": a split plan to restore into (on H100 this small step replicates)
        step = autoshard.compile(gpt.train_step, *nnx.eval_shape(create), batch, mesh=mesh,
                                 annotations="ignore", hardware="cpu")
    model, optimizer = step.init(create, argnums=(0, 1))
    step(model, optimizer, batch)
    checkpoint.save(tmp_path / "ckpt", model, optimizer)
    uninterrupted = [float(step(model, optimizer, batch)) for _ in range(2)]

    restored_model, restored_optimizer = checkpoint.restore(tmp_path / "ckpt", step, create,
                                                            argnums=(0, 1))
    for leaf, sharding in zip(jax.tree.leaves(nnx.state(restored_model)), jax.tree.leaves(
            step.state_shardings(0),
            is_leaf=lambda s: isinstance(s, jax.sharding.NamedSharding))):
        assert leaf.sharding.spec == sharding.spec
    resumed = [float(step(restored_model, restored_optimizer, batch)) for _ in range(2)]
    assert resumed == uninterrupted
    for a, b in zip(jax.tree.leaves(nnx.state((model, optimizer))),
                    jax.tree.leaves(nnx.state((restored_model, restored_optimizer)))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
