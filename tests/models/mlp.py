"""A 2-layer MLP regression model (the Megatron textbook case: column- then row-parallel)."""

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from tests.models.layers import adamw, dense_init, make_train_step

D_IN, D_HIDDEN, D_OUT, BATCH = 32, 128, 32, 16


def init(key):
    k1, k2 = jax.random.split(key)
    return {"w1": dense_init(k1, D_IN, D_HIDDEN), "b1": jnp.zeros((D_HIDDEN,)),
            "w2": dense_init(k2, D_HIDDEN, D_OUT), "b2": jnp.zeros((D_OUT,))}


def batch(key):
    kx, ky = jax.random.split(key)
    return {"x": jax.random.normal(kx, (BATCH, D_IN)), "y": jax.random.normal(ky, (BATCH, D_OUT))}


def forward(params, x):
    h = jax.nn.gelu(x @ params["w1"] + params["b1"])
    return h @ params["w2"] + params["b2"]


def loss(params, batch):
    return jnp.mean((forward(params, batch["x"]) - batch["y"]) ** 2)


tx = adamw()
train_step = make_train_step(loss, tx)


def megatron_specs(params, tp):
    return {"w1": P(None, tp), "b1": P(tp), "w2": P(tp, None), "b2": P()}
