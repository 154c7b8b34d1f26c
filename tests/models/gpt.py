"""A GPT-2-style language model: token + position embeddings, pre-LN blocks with causal
multi-head attention and a GELU MLP, an untied head, AdamW."""

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from tests.models.layers import (adamw, causal_attention, dense_init, layer_norm, ln_init,
                                 make_train_step, token_loss)

VOCAB, D, HEADS, FF, LAYERS, SEQ, BATCH = 128, 64, 8, 128, 2, 16, 8


def init_block(key):
    k = jax.random.split(key, 6)
    return {"ln1": ln_init(D), "ln2": ln_init(D),
            "wq": dense_init(k[0], D, D), "wk": dense_init(k[1], D, D),
            "wv": dense_init(k[2], D, D), "wo": dense_init(k[3], D, D),
            "w1": dense_init(k[4], D, FF), "b1": jnp.zeros((FF,)),
            "w2": dense_init(k[5], FF, D), "b2": jnp.zeros((D,))}


def init(key, layers=LAYERS):
    k = jax.random.split(key, layers + 3)
    return {"wte": jax.random.normal(k[0], (VOCAB, D)) * 0.02,
            "wpe": jax.random.normal(k[1], (SEQ, D)) * 0.02,
            "blocks": [init_block(k[3 + i]) for i in range(layers)],
            "ln_f": ln_init(D), "head": dense_init(k[2], D, VOCAB)}


def batch(key):
    tokens = jax.random.randint(key, (BATCH, SEQ + 1), 0, VOCAB)
    return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:]}


def block(p, x):
    b, s, _ = x.shape
    h = layer_norm(p["ln1"], x)
    q, k, v = (jnp.reshape(h @ p[n], (b, s, HEADS, D // HEADS)) for n in ("wq", "wk", "wv"))
    x = x + causal_attention(q, k, v).reshape(b, s, D) @ p["wo"]
    h = layer_norm(p["ln2"], x)
    return x + jax.nn.gelu(h @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def forward(params, tokens):
    x = params["wte"][tokens] + params["wpe"][: tokens.shape[1]]
    for p in params["blocks"]:
        x = block(p, x)
    return layer_norm(params["ln_f"], x) @ params["head"]


def loss(params, batch):
    return token_loss(forward(params, batch["tokens"]), batch["labels"])


tx = adamw()
train_step = make_train_step(loss, tx)


def block_megatron_specs(tp, lead=()):
    """Column-parallel q/k/v and w1, row-parallel wo and w2 (Shoeybi et al., 2019)."""
    col, row, rep = P(*lead, None, tp), P(*lead, tp, None), P()
    return {"ln1": {"g": rep, "b": rep}, "ln2": {"g": rep, "b": rep},
            "wq": col, "wk": col, "wv": col, "wo": row,
            "w1": col, "b1": P(*lead, tp), "w2": row, "b2": rep}


def megatron_specs(params, tp):
    return {"wte": P(), "wpe": P(), "blocks": [block_megatron_specs(tp) for _ in
                                               params["blocks"]],
            "ln_f": {"g": P(), "b": P()}, "head": P(None, tp)}
