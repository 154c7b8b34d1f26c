"""Auto-shard a GPT-2-style train step (pure JAX + optax AdamW) on 8 simulated devices.

    python examples/gpt.py                # mesh (2, 4): data x model
    python examples/gpt.py --mesh 8       # 1-D mesh
    python examples/gpt.py --layers 4 --steps 5

The train step is written for one device; the only autoshard line is ``autoshard.compile``.
"""

from __future__ import annotations

import argparse
import os
import time

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import autoshard  # noqa: E402


def init_params(key, *, vocab, d_model, n_heads, n_layers, seq_len):
    def dense(k, shape):
        return jax.random.normal(k, shape) * shape[0] ** -0.5

    keys = iter(jax.random.split(key, 4 + 6 * n_layers))
    blocks = []
    for _ in range(n_layers):
        blocks.append({
            "ln1": {"scale": jnp.ones(d_model), "bias": jnp.zeros(d_model)},
            "attn": {"q": dense(next(keys), (d_model, d_model)),
                     "k": dense(next(keys), (d_model, d_model)),
                     "v": dense(next(keys), (d_model, d_model)),
                     "out": dense(next(keys), (d_model, d_model))},
            "ln2": {"scale": jnp.ones(d_model), "bias": jnp.zeros(d_model)},
            "mlp": {"up": dense(next(keys), (d_model, 4 * d_model)),
                    "down": dense(next(keys), (4 * d_model, d_model))},
        })
    return {"embed": jax.random.normal(next(keys), (vocab, d_model)) * 0.02,
            "pos": jax.random.normal(next(keys), (seq_len, d_model)) * 0.02,
            "blocks": blocks,
            "ln_f": {"scale": jnp.ones(d_model), "bias": jnp.zeros(d_model)}}


def layer_norm(p, x):
    mean = x.mean(-1, keepdims=True)
    var = x.var(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + 1e-5) * p["scale"] + p["bias"]


def attention(p, x, n_heads):
    b, t, d = x.shape
    split = lambda y: y.reshape(b, t, n_heads, d // n_heads)  # noqa: E731
    q, k, v = split(x @ p["q"]), split(x @ p["k"]), split(x @ p["v"])
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d // n_heads)
    scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -1e9)
    y = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
    return y.reshape(b, t, d) @ p["out"]


def gpt(params, tokens, n_heads):
    x = params["embed"][tokens] + params["pos"][: tokens.shape[1]]
    for blk in params["blocks"]:
        x = x + attention(blk["attn"], layer_norm(blk["ln1"], x), n_heads)
        x = x + jax.nn.gelu(layer_norm(blk["ln2"], x) @ blk["mlp"]["up"]) @ blk["mlp"]["down"]
    return layer_norm(params["ln_f"], x) @ params["embed"].T  # tied embeddings


def make_train_step(optimizer, n_heads):
    def loss_fn(params, batch):
        logits = gpt(params, batch["inputs"], n_heads)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()

    def train_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return train_step


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mesh", default="2,4", help="mesh shape, e.g. 2,4 or 8")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--dump", default="demo_plan",
                        help="directory for the plan viewer (index.html + plan.json); '' skips")
    args = parser.parse_args()

    shape = tuple(int(s) for s in args.mesh.split(","))
    mesh = jax.make_mesh(shape, ("data", "model")[: len(shape)] if len(shape) <= 2 else
                         tuple(f"axis{i}" for i in range(len(shape))))
    key = jax.random.key(0)
    params = init_params(key, vocab=args.vocab, d_model=args.d_model, n_heads=args.heads,
                         n_layers=args.layers, seq_len=args.seq)
    optimizer = optax.adamw(3e-3)
    opt_state = optimizer.init(params)
    tokens = jax.random.randint(jax.random.key(1), (args.batch, args.seq + 1), 0, args.vocab)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    train_step = make_train_step(optimizer, args.heads)

    start = time.perf_counter()
    step = autoshard.compile(train_step, params, opt_state, batch, mesh=mesh)
    source = {"cache": "reused from the plan cache", "solved": "solved"}[step.plan_source]
    print(f"planned in {time.perf_counter() - start:.2f}s ({source})\n")
    print(step.plan.summary(max_rows=12))
    print()
    if args.dump:
        verification = autoshard.verify(step, params, opt_state, batch)
        out = autoshard.dump(step, args.dump, verification=verification)
        print(verification.summary())
        print(f"\nplan viewer: {out / 'index.html'} (open it in a browser, or run "
              f"`autoshard view {out}`)\n")

    reference = jax.jit(train_step)(params, opt_state, batch)
    for i in range(args.steps):
        params, opt_state, loss = step(params, opt_state, batch)
        print(f"step {i}: loss {float(loss):.4f}")
        if i == 0:
            diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in
                       zip(jax.tree.leaves(params), jax.tree.leaves(reference[0])))
            print(f"        max |sharded - single-device| over new params: {diff:.2e}")
    print(f"\nloss sharding: {loss.sharding}")


if __name__ == "__main__":
    main()
