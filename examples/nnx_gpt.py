"""Auto-shard a Flax NNX GPT-2-style language model trained with optax AdamW, on 8 devices.

    python examples/nnx_gpt.py                        # mesh (2, 4): data x model
    python examples/nnx_gpt.py --mesh 8               # 1-D mesh
    python examples/nnx_gpt.py --annotations ignore   # plan as if there were no annotations

The model carries Megatron-style logical sharding annotations (``nnx.with_partitioning``), the
train step is the one the Flax documentation writes for ``nnx.jit``; the only autoshard lines are
``autoshard.compile`` and ``step.init`` (building the model straight into the planned layouts).
"""

from __future__ import annotations

import argparse
import dataclasses
import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import autoshard  # noqa: E402

init = nnx.initializers


@dataclasses.dataclass(frozen=True)
class Config:
    vocab: int = 256
    seq: int = 64
    d_model: int = 128
    heads: int = 4
    layers: int = 2


def logical_rules(mesh) -> list[tuple[str, str | None]]:
    """Megatron: attention heads and the MLP hidden dim split over "model", the rest whole."""
    model = "model" if "model" in mesh.axis_names else None
    return [("batch", "data"), ("embed", None), ("heads", model), ("mlp", model),
            ("vocab", model)]


def dense(d_in, d_out, axes, rngs):
    return nnx.Linear(d_in, d_out, rngs=rngs,
                      kernel_init=nnx.with_partitioning(init.lecun_normal(), axes),
                      bias_init=nnx.with_partitioning(init.zeros_init(), axes[1:]))


def layer_norm(d, rngs):
    return nnx.LayerNorm(d, rngs=rngs, scale_init=nnx.with_partitioning(init.ones, ("embed",)),
                         bias_init=nnx.with_partitioning(init.zeros, ("embed",)))


class Block(nnx.Module):
    def __init__(self, cfg: Config, rngs: nnx.Rngs):
        d = cfg.d_model
        self.heads = cfg.heads
        self.ln1 = layer_norm(d, rngs)
        self.qkv = dense(d, 3 * d, ("embed", "heads"), rngs)
        self.proj = dense(d, d, ("heads", "embed"), rngs)
        self.ln2 = layer_norm(d, rngs)
        self.up = dense(d, 4 * d, ("embed", "mlp"), rngs)
        self.down = dense(4 * d, d, ("mlp", "embed"), rngs)

    def attention(self, x):
        b, t, d = x.shape
        q, k, v = jnp.split(self.qkv(x).reshape(b, t, 3 * self.heads, d // self.heads), 3, 2)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(d // self.heads)
        scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -1e9)
        y = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
        return self.proj(y.reshape(b, t, d))

    def __call__(self, x):
        x = x + self.attention(self.ln1(x))
        return x + self.down(jax.nn.gelu(self.up(self.ln2(x))))


class GPT(nnx.Module):
    def __init__(self, cfg: Config, rngs: nnx.Rngs):
        self.embed = nnx.Embed(cfg.vocab, cfg.d_model, rngs=rngs, embedding_init=(
            nnx.with_partitioning(init.normal(0.02), ("vocab", "embed"))))
        self.pos = nnx.Embed(cfg.seq, cfg.d_model, rngs=rngs, embedding_init=(
            nnx.with_partitioning(init.normal(0.02), (None, "embed"))))
        self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.layers)])
        self.ln_f = layer_norm(cfg.d_model, rngs)

    def __call__(self, tokens):
        x = self.embed(tokens) + self.pos(jnp.arange(tokens.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.embed.attend(self.ln_f(x))      # tied embeddings


def create(cfg: Config, learning_rate: float = 3e-3):
    """The model and its optimizer, as the Flax docs build them."""
    model = GPT(cfg, rngs=nnx.Rngs(0))
    return model, nnx.Optimizer(model, optax.adamw(learning_rate), wrt=nnx.Param)


def train_step(model, optimizer, batch):
    def loss_fn(model):
        logits = model(batch["inputs"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


def make_batch(cfg: Config, batch: int, seed: int = 1):
    tokens = jax.random.randint(jax.random.key(seed), (batch, cfg.seq + 1), 0, cfg.vocab)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mesh", default="2,4", help="mesh shape: 2,4 or 8")
    parser.add_argument("--annotations", default="hint", choices=("ignore", "hint", "require"))
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()

    shape = tuple(int(s) for s in args.mesh.split(","))
    mesh = jax.make_mesh(shape, ("data", "model")[: len(shape)])
    cfg = Config(layers=args.layers)
    batch = make_batch(cfg, args.batch)
    with nnx.logical_axis_rules(logical_rules(mesh)), nnx.use_eager_sharding(False):
        abstract_model, abstract_optimizer = nnx.eval_shape(lambda: create(cfg))
        step = autoshard.compile(train_step, abstract_model, abstract_optimizer, batch,
                                 mesh=mesh, annotations=args.annotations)
    print(step.plan.summary(max_rows=16))
    model, optimizer = step.init(lambda: create(cfg), argnums=(0, 1))
    for i in range(args.steps):
        loss = step(model, optimizer, batch)
        print(f"step {i}: loss {float(loss):.4f}")
    kernel = model.blocks[0].up.kernel
    print(f"\nblocks[0].up.kernel: {kernel.get_value().sharding.spec}, metadata out_sharding "
          f"{kernel.get_metadata()['out_sharding']}")


if __name__ == "__main__":
    main()
