"""The GPT of gpt.py with its blocks stacked along a leading layer axis and run by lax.scan,
each block rematerialised (jax.checkpoint) and with dropout drawn from a key argument."""

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from tests.models import gpt
from tests.models.layers import adamw, layer_norm, token_loss

LAYERS, DROPOUT = 3, 0.1
batch = gpt.batch


def init(key):
    params = gpt.init(key, layers=LAYERS)
    blocks = params.pop("blocks")
    params["stacked"] = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
    return params


def forward(params, tokens, key):
    x = params["wte"][tokens] + params["wpe"][: tokens.shape[1]]

    @jax.checkpoint
    def body(x, layer):
        p, k = layer
        y = gpt.block(p, x)
        keep = jax.random.bernoulli(k, 1.0 - DROPOUT, y.shape)
        return jnp.where(keep, y / (1.0 - DROPOUT), 0.0), None

    keys = jax.random.split(key, LAYERS)
    x, _ = jax.lax.scan(body, x, (params["stacked"], keys))
    return layer_norm(params["ln_f"], x) @ params["head"]


def loss(params, batch, key):
    return token_loss(forward(params, batch["tokens"], key), batch["labels"])


tx = adamw()


def train_step(params, opt_state, batch, key):
    value, grads = jax.value_and_grad(loss)(params, batch, key)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value


def megatron_specs(params, tp):
    return {"wte": P(), "wpe": P(), "stacked": gpt.block_megatron_specs(tp, lead=(None,)),
            "ln_f": {"g": P(), "b": P()}, "head": P(None, tp)}
