"""Auto-shard a Flax NNX language model written in JAX's explicit sharding mode, on 8 devices.

    python examples/nnx_explicit.py               # mesh (2, 4): data x model
    python examples/nnx_explicit.py --planner data-parallel

The model is written as Flax's Gemma example writes explicit-mode code: its parameters carry
``nnx.with_partitioning`` annotations, every einsum says how its result is laid out
(``jnp.einsum(..., out_sharding=P("data", None, "model"))``: batch over "data", heads and the
MLP hidden dim over "model"), and it runs under ``jax.set_mesh``. Autoshard reads the
``out_sharding``s as pins and the parameter annotations as hints; the script checks the sharded
step against ``nnx.jit`` under the same ``jax.set_mesh`` after two AdamW steps.
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
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import autoshard  # noqa: E402

init = nnx.initializers


@dataclasses.dataclass(frozen=True)
class Config:
    vocab: int = 256
    seq: int = 64
    width: int = 128
    heads: int = 4
    layers: int = 2


def param(rngs: nnx.Rngs, initializer, shape: tuple[int, ...], sharding: tuple) -> nnx.Param:
    return nnx.Param(nnx.with_partitioning(initializer, sharding)(rngs.params(), shape))


class Attention(nnx.Module):
    def __init__(self, cfg: Config, rngs: nnx.Rngs):
        head = cfg.width // cfg.heads
        normal = init.lecun_normal(in_axis=0, out_axis=(1, 2))
        self.query = param(rngs, normal, (cfg.width, cfg.heads, head), (None, "model", None))
        self.key = param(rngs, normal, (cfg.width, cfg.heads, head), (None, "model", None))
        self.value = param(rngs, normal, (cfg.width, cfg.heads, head), (None, "model", None))
        self.out = param(rngs, init.lecun_normal(in_axis=(0, 1), out_axis=2),
                         (cfg.heads, head, cfg.width), ("model", None, None))

    def __call__(self, x):
        heads = P("data", None, "model", None)
        q = jnp.einsum("btd,dhk->bthk", x, self.query[...], out_sharding=heads)
        k = jnp.einsum("btd,dhk->bthk", x, self.key[...], out_sharding=heads)
        v = jnp.einsum("btd,dhk->bthk", x, self.value[...], out_sharding=heads)
        scores = jnp.einsum("bqhk,bshk->bhqs", q, k, out_sharding=P("data", "model", None, None))
        seq = x.shape[1]
        scores = jnp.where(jnp.tril(jnp.ones((seq, seq), bool)), scores / np.sqrt(q.shape[-1]),
                           -1e9)
        y = jnp.einsum("bhqs,bshk->bqhk", jax.nn.softmax(scores, axis=-1), v,
                       out_sharding=heads)
        return jnp.einsum("bqhk,hkd->bqd", y, self.out[...], out_sharding=P("data", None, None))


class Mlp(nnx.Module):
    def __init__(self, cfg: Config, rngs: nnx.Rngs):
        self.up = param(rngs, init.lecun_normal(), (cfg.width, 4 * cfg.width), (None, "model"))
        self.down = param(rngs, init.lecun_normal(), (4 * cfg.width, cfg.width), ("model", None))

    def __call__(self, x):
        h = jnp.einsum("btd,df->btf", x, self.up[...], out_sharding=P("data", None, "model"))
        return jnp.einsum("btf,fd->btd", jax.nn.gelu(h), self.down[...],
                          out_sharding=P("data", None, None))


class RMSNorm(nnx.Module):
    def __init__(self, cfg: Config, rngs: nnx.Rngs):
        self.scale = param(rngs, init.ones, (cfg.width,), (None,))

    def __call__(self, x):
        return x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + 1e-6) * self.scale[...]


class Block(nnx.Module):
    def __init__(self, cfg: Config, rngs: nnx.Rngs):
        self.norm1 = RMSNorm(cfg, rngs)
        self.attention = Attention(cfg, rngs)
        self.norm2 = RMSNorm(cfg, rngs)
        self.mlp = Mlp(cfg, rngs)

    def __call__(self, x):
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class LanguageModel(nnx.Module):
    def __init__(self, cfg: Config, rngs: nnx.Rngs):
        self.embedding = param(rngs, init.normal(0.02), (cfg.vocab, cfg.width), (None, None))
        self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.layers)])
        self.norm = RMSNorm(cfg, rngs)

    def __call__(self, tokens):
        x = self.embedding[...].at[tokens].get(out_sharding=P("data", None, None))
        for block in self.blocks:
            x = block(x)
        return jnp.einsum("btd,vd->btv", self.norm(x), self.embedding[...],
                          out_sharding=P("data", None, None))      # tied embeddings


def create(cfg: Config, learning_rate: float = 3e-3):
    model = LanguageModel(cfg, rngs=nnx.Rngs(0))
    return model, nnx.Optimizer(model, optax.adamw(learning_rate), wrt=nnx.Param)


def loss_fn(model: LanguageModel, batch: dict) -> jax.Array:
    logits = model(batch["inputs"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()


def train_step(model, optimizer, batch):
    loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
    optimizer.update(model, grads)
    return loss


def make_batch(cfg: Config, batch: int, mesh, seed: int = 1) -> dict:
    """Tokens split over "data", as explicit mode expects its batch."""
    tokens = jax.random.randint(jax.random.key(seed), (batch, cfg.seq + 1), 0, cfg.vocab)
    split = NamedSharding(mesh, P("data"))
    return {"inputs": jax.device_put(tokens[:, :-1], split),
            "targets": jax.device_put(tokens[:, 1:], split)}


def nonzero_gradient(model: LanguageModel, batch: dict, noise: float = 1e-6):
    """Per parameter, where the loss's gradient at ``model`` is nonzero: above ``noise`` times
    the largest (an exactly-zero gradient comes out as rounding noise)."""
    grads = nnx.jit(nnx.grad(loss_fn))(model, batch)
    leaves = [np.asarray(g) for g in jax.tree.leaves(grads)]
    largest = max(float(np.abs(g).max()) for g in leaves)
    return [np.abs(g) > noise * largest for g in leaves]


def run(step, model, optimizer, batch, steps: int = 2) -> list[float]:
    return [float(step(model, optimizer, batch)) for _ in range(steps)]


def assert_same_training(got: tuple, want: tuple, mask, rtol: float = 1e-4,
                         atol: float = 1e-4) -> None:
    """``got`` and ``want`` (losses, model) agree: the losses, and the parameters where
    ``mask`` (``nonzero_gradient``) holds."""
    np.testing.assert_allclose(got[0], want[0], rtol=rtol, atol=atol)
    named = jax.tree_util.tree_flatten_with_path(nnx.state(got[1], nnx.Param))[0]
    for (path, a), b, m in zip(named, jax.tree.leaves(nnx.state(want[1], nnx.Param)), mask):
        np.testing.assert_allclose(np.asarray(a)[m], np.asarray(b)[m], rtol=rtol, atol=atol,
                                   err_msg=f"model{jax.tree_util.keystr(path)}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--planner", default="search", choices=("search", "data-parallel"))
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()

    mesh = jax.make_mesh((2, 4), ("data", "model"))       # Explicit axes
    cfg = Config()
    with jax.set_mesh(mesh):
        batch = make_batch(cfg, args.batch, mesh)
        model, optimizer = create(cfg)
        step = autoshard.compile(train_step, model, optimizer, batch, mesh=mesh,
                                 planner=args.planner)
        print(step.plan.summary(max_rows=16))
        losses = run(step, model, optimizer, batch)

        ref_model, ref_optimizer = create(cfg)
        mask = nonzero_gradient(ref_model, batch)
        want = run(nnx.jit(train_step), ref_model, ref_optimizer, batch)
    assert_same_training((losses, model), (want, ref_model), mask)
    print(f"losses {losses} equal nnx.jit's {want}; parameters equal where the gradient is "
          "nonzero")


if __name__ == "__main__":
    main()
