"""A LLaMA-style decoder: RMSNorm, rotary position embeddings, grouped-query attention and a
SwiGLU MLP, no biases, AdamW."""

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from tests.models.layers import (adamw, causal_attention, dense_init, make_train_step,
                                 rms_norm, token_loss)

VOCAB, D, HEADS, KV_HEADS, FF, LAYERS, SEQ, BATCH = 128, 64, 8, 4, 128, 2, 16, 8
HEAD_DIM = D // HEADS


def init(key):
    keys = jax.random.split(key, 2 + LAYERS)
    blocks = []
    for kb in keys[2:]:
        k = jax.random.split(kb, 7)
        blocks.append({"attn_norm": jnp.ones((D,)), "mlp_norm": jnp.ones((D,)),
                       "wq": dense_init(k[0], D, HEADS * HEAD_DIM),
                       "wk": dense_init(k[1], D, KV_HEADS * HEAD_DIM),
                       "wv": dense_init(k[2], D, KV_HEADS * HEAD_DIM),
                       "wo": dense_init(k[3], HEADS * HEAD_DIM, D),
                       "w_gate": dense_init(k[4], D, FF), "w_up": dense_init(k[5], D, FF),
                       "w_down": dense_init(k[6], FF, D)})
    return {"embed": jax.random.normal(keys[0], (VOCAB, D)) * 0.02, "blocks": blocks,
            "norm": jnp.ones((D,)), "head": dense_init(keys[1], D, VOCAB)}


def batch(key):
    tokens = jax.random.randint(key, (BATCH, SEQ + 1), 0, VOCAB)
    return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:]}


def rope(x, positions, base=10000.0):
    """Rotary embedding on (B, S, H, Dh), rotating pairs (i, i + Dh/2) (Su et al., 2021)."""
    half = x.shape[-1] // 2
    freqs = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions[:, None].astype(jnp.float32) * freqs[None, :]
    cos, sin = jnp.cos(angles)[None, :, None, :], jnp.sin(angles)[None, :, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def block(p, x):
    b, s, _ = x.shape
    positions = jnp.arange(s)
    h = rms_norm(p["attn_norm"], x)
    q = rope((h @ p["wq"]).reshape(b, s, HEADS, HEAD_DIM), positions)
    k = rope((h @ p["wk"]).reshape(b, s, KV_HEADS, HEAD_DIM), positions)
    v = (h @ p["wv"]).reshape(b, s, KV_HEADS, HEAD_DIM)
    x = x + causal_attention(q, k, v).reshape(b, s, D) @ p["wo"]
    h = rms_norm(p["mlp_norm"], x)
    return x + (jax.nn.silu(h @ p["w_gate"]) * (h @ p["w_up"])) @ p["w_down"]


def forward(params, tokens):
    x = params["embed"][tokens]
    for p in params["blocks"]:
        x = block(p, x)
    return rms_norm(params["norm"], x) @ params["head"]


def loss(params, batch):
    return token_loss(forward(params, batch["tokens"]), batch["labels"])


tx = adamw()
train_step = make_train_step(loss, tx)


def megatron_specs(params, tp, tp_size=None):
    """Heads split over ``tp``; k/v projections too when the KV heads divide evenly."""
    kv = P(None, tp) if tp_size is None or KV_HEADS % tp_size == 0 else P()
    blk = {"attn_norm": P(), "mlp_norm": P(), "wq": P(None, tp), "wk": kv, "wv": kv,
           "wo": P(tp, None), "w_gate": P(None, tp), "w_up": P(None, tp), "w_down": P(tp, None)}
    return {"embed": P(), "blocks": [blk for _ in params["blocks"]], "norm": P(),
            "head": P(None, tp)}
