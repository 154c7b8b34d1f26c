"""A transformer with a top-2 mixture-of-experts MLP written with dispatch / combine einsums
(GShard-style, Lepikhin et al., 2020): router, top_k, capacity via cumsum, load-balancing loss."""

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from tests.models.layers import (adamw, causal_attention, dense_init, layer_norm, ln_init,
                                 make_train_step, token_loss)

VOCAB, D, HEADS, FF, EXPERTS, TOP_K, SEQ, BATCH = 128, 64, 8, 64, 8, 2, 16, 8
CAPACITY = 2 * TOP_K * BATCH * SEQ // EXPERTS // 2


def init(key):
    k = jax.random.split(key, 8)
    return {"wte": jax.random.normal(k[0], (VOCAB, D)) * 0.02,
            "ln1": ln_init(D), "ln2": ln_init(D), "ln_f": ln_init(D),
            "wq": dense_init(k[1], D, D), "wk": dense_init(k[2], D, D),
            "wv": dense_init(k[3], D, D), "wo": dense_init(k[4], D, D),
            "router": dense_init(k[5], D, EXPERTS),
            "experts_in": jax.random.normal(k[6], (EXPERTS, D, FF)) * D ** -0.5,
            "experts_out": jax.random.normal(k[7], (EXPERTS, FF, D)) * FF ** -0.5,
            "head": dense_init(k[0], D, VOCAB)}


def batch(key):
    """Token batches of this module's own sizes: sharing the GPT's batch made the plan-quality
    benchmark's MoE rows depend on whether the GPT's sizes had been set before them."""
    tokens = jax.random.randint(key, (BATCH, SEQ + 1), 0, VOCAB)
    return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:]}


def moe(p, x):
    """x: (T, D) tokens -> (T, D), plus the auxiliary load-balancing loss."""
    probs = jax.nn.softmax(x @ p["router"], axis=-1)                      # (T, E)
    gates, experts = jax.lax.top_k(probs, TOP_K)                          # (T, K)
    expert_mask = jax.nn.one_hot(experts, EXPERTS)                        # (T, K, E)
    flat = expert_mask.reshape(-1, EXPERTS)                               # (T*K, E), k-major
    position = (jnp.cumsum(flat, axis=0) - 1.0) * flat                    # slot in expert
    position = position.reshape(expert_mask.shape).sum(-1)                # (T, K)
    keep = (position < CAPACITY).astype(x.dtype)
    slot = jax.nn.one_hot(position.astype(jnp.int32), CAPACITY)           # (T, K, C)
    dispatch = jnp.einsum("tke,tkc,tk->tec", expert_mask, slot, keep)     # (T, E, C)
    combine = jnp.einsum("tec,tk,tke->tec", dispatch, gates, expert_mask)
    expert_in = jnp.einsum("tec,td->ecd", dispatch, x)
    h = jax.nn.gelu(jnp.einsum("ecd,edf->ecf", expert_in, p["experts_in"]))
    expert_out = jnp.einsum("ecf,efd->ecd", h, p["experts_out"])
    aux = EXPERTS * jnp.mean(probs.mean(0) * expert_mask[:, 0].mean(0))
    return jnp.einsum("tec,ecd->td", combine, expert_out), aux


def forward(params, tokens):
    b, s = tokens.shape
    x = params["wte"][tokens]
    h = layer_norm(params["ln1"], x)
    q, k, v = (jnp.reshape(h @ params[n], (b, s, HEADS, D // HEADS)) for n in ("wq", "wk", "wv"))
    x = x + causal_attention(q, k, v).reshape(b, s, D) @ params["wo"]
    y, aux = moe(params, layer_norm(params["ln2"], x).reshape(b * s, D))
    x = x + y.reshape(b, s, D)
    return layer_norm(params["ln_f"], x) @ params["head"], aux


def loss(params, batch):
    logits, aux = forward(params, batch["tokens"])
    return token_loss(logits, batch["labels"]) + 0.01 * aux


tx = adamw()
train_step = make_train_step(loss, tx)


def megatron_specs(params, tp):
    """Attention heads split; each expert's FFN split column/row over ``tp``."""
    rep = P()
    return {"wte": rep, "ln1": {"g": rep, "b": rep}, "ln2": {"g": rep, "b": rep},
            "ln_f": {"g": rep, "b": rep}, "wq": P(None, tp), "wk": P(None, tp),
            "wv": P(None, tp), "wo": P(tp, None), "router": rep,
            "experts_in": P(None, None, tp), "experts_out": P(None, tp, None),
            "head": P(None, tp)}


def expert_parallel_specs(params, ep):
    specs = megatron_specs(params, None)
    return {**specs, "experts_in": P(ep), "experts_out": P(ep)}
