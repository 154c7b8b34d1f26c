"""Auto-shard a Flax NNX vision transformer (ViT) classifier trained with optax AdamW.

    python examples/nnx_vit.py                 # mesh (2, 4): data x model
    python examples/nnx_vit.py --mesh 8        # 1-D mesh

Patches are embedded by a linear layer, a class token and learned positions are added, and
pre-norm transformer blocks carry logical sharding annotations; the train step is the Flax
documentation's, compiled with ``autoshard.compile`` instead of ``nnx.jit``.
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
    image: int = 32
    patch: int = 8
    channels: int = 3
    d_model: int = 128
    heads: int = 4
    layers: int = 2
    classes: int = 10


def logical_rules(mesh) -> list[tuple[str, str | None]]:
    model = "model" if "model" in mesh.axis_names else None
    return [("batch", "data"), ("embed", None), ("heads", model), ("mlp", model)]


def dense(d_in, d_out, axes, rngs):
    return nnx.Linear(d_in, d_out, rngs=rngs,
                      kernel_init=nnx.with_partitioning(init.lecun_normal(), axes),
                      bias_init=nnx.with_partitioning(init.zeros_init(), axes[1:]))


class EncoderBlock(nnx.Module):
    def __init__(self, cfg: Config, rngs: nnx.Rngs):
        d = cfg.d_model
        self.ln1 = nnx.LayerNorm(d, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            cfg.heads, d, decode=False, rngs=rngs,
            kernel_init=nnx.with_partitioning(init.lecun_normal(), ("embed", "heads", None)),
            out_kernel_init=nnx.with_partitioning(init.lecun_normal(), ("heads", None, "embed")))
        self.ln2 = nnx.LayerNorm(d, rngs=rngs)
        self.up = dense(d, 4 * d, ("embed", "mlp"), rngs)
        self.down = dense(4 * d, d, ("mlp", "embed"), rngs)

    def __call__(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.down(jax.nn.gelu(self.up(self.ln2(x))))


class ViT(nnx.Module):
    def __init__(self, cfg: Config, rngs: nnx.Rngs):
        self.cfg = cfg
        patches = (cfg.image // cfg.patch) ** 2
        self.patch_embed = dense(cfg.patch * cfg.patch * cfg.channels, cfg.d_model,
                                 (None, "embed"), rngs)
        self.cls = nnx.Param(init.zeros(rngs.params(), (1, 1, cfg.d_model)))
        self.pos = nnx.Param(init.normal(0.02)(rngs.params(), (1, patches + 1, cfg.d_model)))
        self.blocks = nnx.List([EncoderBlock(cfg, rngs) for _ in range(cfg.layers)])
        self.ln = nnx.LayerNorm(cfg.d_model, rngs=rngs)
        self.head = dense(cfg.d_model, cfg.classes, ("embed", None), rngs)

    def __call__(self, images):
        b, h, w, c = images.shape
        p = self.cfg.patch
        x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        x = self.patch_embed(x.reshape(b, (h // p) * (w // p), p * p * c))
        x = jnp.concatenate([jnp.broadcast_to(self.cls[...], (b, 1, x.shape[-1])), x], 1)
        x = x + self.pos[...]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x[:, 0]))


def create(cfg: Config, learning_rate: float = 1e-3):
    model = ViT(cfg, rngs=nnx.Rngs(0))
    return model, nnx.Optimizer(model, optax.adamw(learning_rate), wrt=nnx.Param)


def train_step(model, optimizer, batch):
    def loss_fn(model):
        logits = model(batch["image"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


def make_batch(cfg: Config, batch: int, seed: int = 1):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {"image": jax.random.normal(k1, (batch, cfg.image, cfg.image, cfg.channels)),
            "label": jax.random.randint(k2, (batch,), 0, cfg.classes)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mesh", default="2,4", help="mesh shape: 2,4 or 8")
    parser.add_argument("--annotations", default="hint", choices=("ignore", "hint", "require"))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()

    shape = tuple(int(s) for s in args.mesh.split(","))
    mesh = jax.make_mesh(shape, ("data", "model")[: len(shape)])
    cfg = Config()
    batch = make_batch(cfg, args.batch)
    with nnx.logical_axis_rules(logical_rules(mesh)), nnx.use_eager_sharding(False):
        model, optimizer = create(cfg)
        step = autoshard.compile(train_step, model, optimizer, batch, mesh=mesh,
                                 annotations=args.annotations)
    print(step.plan.summary(max_rows=16))
    for i in range(args.steps):
        print(f"step {i}: loss {float(step(model, optimizer, batch)):.4f}")


if __name__ == "__main__":
    main()
