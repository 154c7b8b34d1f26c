"""A depthwise-separable convolution net (NHWC, MobileNet's block): a 3x3 depthwise conv
(``feature_group_count`` = channels), a 1x1 pointwise conv, twice, then a global mean and a
dense head. Its grouped convolutions, and their weight gradients (``batch_group_count`` =
channels), are what the group splits of the convolution rule are for."""

import jax

from tests.models.layers import adamw, dense_init, make_train_step, token_loss

BATCH, SIZE, CHANNELS, CLASSES = 8, 8, 128, 16


def init(key):
    k = jax.random.split(key, 5)
    return {"dw1": jax.random.normal(k[0], (3, 3, 1, CHANNELS)) / 3.0,
            "pw1": jax.random.normal(k[1], (1, 1, CHANNELS, CHANNELS)) * CHANNELS ** -0.5,
            "dw2": jax.random.normal(k[2], (3, 3, 1, CHANNELS)) / 3.0,
            "pw2": jax.random.normal(k[3], (1, 1, CHANNELS, CHANNELS)) * CHANNELS ** -0.5,
            "head": dense_init(k[4], CHANNELS, CLASSES)}


def batch(key):
    kx, ky = jax.random.split(key)
    return {"images": jax.random.normal(kx, (BATCH, SIZE, SIZE, CHANNELS)),
            "labels": jax.random.randint(ky, (BATCH,), 0, CLASSES)}


def conv(x, w, groups=1):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", feature_group_count=groups,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def forward(params, images):
    h = images
    for i in (1, 2):
        h = jax.nn.relu(conv(h, params[f"dw{i}"], groups=CHANNELS))
        h = jax.nn.relu(conv(h, params[f"pw{i}"]))
    return h.mean(axis=(1, 2)) @ params["head"]


def loss(params, batch):
    return token_loss(forward(params, batch["images"]), batch["labels"])


tx = adamw()
train_step = make_train_step(loss, tx)
