"""A small convolutional classifier (NHWC): two 3x3 convolutions, average pooling with
reduce_window, a global mean and a dense head."""

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from tests.models.layers import adamw, dense_init, make_train_step

BATCH, SIZE, C_IN, C1, C2, CLASSES = 16, 16, 4, 32, 64, 16


def init(key):
    k = jax.random.split(key, 3)
    return {"conv1": jax.random.normal(k[0], (3, 3, C_IN, C1)) * (9 * C_IN) ** -0.5,
            "bias1": jnp.zeros((C1,)),
            "conv2": jax.random.normal(k[1], (3, 3, C1, C2)) * (9 * C1) ** -0.5,
            "bias2": jnp.zeros((C2,)),
            "head": dense_init(k[2], C2, CLASSES)}


def batch(key):
    kx, ky = jax.random.split(key)
    return {"images": jax.random.normal(kx, (BATCH, SIZE, SIZE, C_IN)),
            "labels": jax.random.randint(ky, (BATCH,), 0, CLASSES)}


def conv(x, w, stride):
    return jax.lax.conv_general_dilated(x, w, (stride, stride), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def forward(params, images):
    h = jax.nn.relu(conv(images, params["conv1"], 1) + params["bias1"])
    h = jax.lax.reduce_window(h, 0.0, jax.lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID") / 4.0
    h = jax.nn.relu(conv(h, params["conv2"], 2) + params["bias2"])
    return h.mean(axis=(1, 2)) @ params["head"]


def loss(params, batch):
    logits = forward(params, batch["images"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()


tx = adamw()
train_step = make_train_step(loss, tx)


def megatron_specs(params, tp):
    """Output channels of conv1 split, input channels of conv2 split (a partial sum)."""
    return {"conv1": P(None, None, None, tp), "bias1": P(tp),
            "conv2": P(None, None, tp, None), "bias2": P(), "head": P()}
