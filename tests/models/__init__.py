"""Small models the tests shard: each module exposes init(key), batch(key), loss, forward,
train_step (AdamW) and megatron_specs(params, tp) for the hand-written Megatron plan."""

import jax


def example_args(model, seed=0):
    """(params, opt_state, batch[, key]) for ``model.train_step``."""
    kp, kb, kd = jax.random.split(jax.random.key(seed), 3)
    params = model.init(kp)
    args = (params, model.tx.init(params), model.batch(kb))
    if model.__name__.endswith("scan_gpt"):
        args += (kd,)
    return args
