"""Auto-shard a Flax linen language model with logical axis rules, trained with optax AdamW.

    python examples/linen_lm.py                        # mesh (2, 4): data x model
    python examples/linen_lm.py --annotations ignore   # plan as if there were no annotations

The model is written as Flax's lm1b example writes it: every parameter initializer wrapped in
``nn.with_logical_partitioning`` with logical names (``"embed"``, ``"mlp"``, ``"heads"``, ...),
and ``nn.logical_axis_rules`` mapping those names to mesh axes. ``model.init`` returns the
parameters boxed (``nn.LogicallyPartitioned``), optax keeps the boxes around its moments, and
the train step is the one written for ``jax.jit``; autoshard reads the boxes as annotations
(``annotations="hint"`` by default: the plan follows them unless another layout is cheaper,
and its summary reports every difference). The script checks the sharded step against
``jax.jit`` after two AdamW steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count=8").strip()

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import autoshard  # noqa: E402

init = nn.initializers


@dataclasses.dataclass(frozen=True)
class Config:
    vocab: int = 256
    seq: int = 64
    width: int = 128
    heads: int = 4
    layers: int = 2


def logical_rules(mesh) -> tuple[tuple[str, str | None], ...]:
    """Megatron: attention heads, the MLP hidden dim and the vocabulary split over "model"."""
    model = "model" if "model" in mesh.axis_names else None
    return (("batch", "data"), ("vocab", model), ("embed", None), ("mlp", model),
            ("heads", model), ("kv", None))


def partitioned(initializer, names):
    return nn.with_logical_partitioning(initializer, names)


class Attention(nn.Module):
    cfg: Config

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        projection = functools.partial(
            nn.DenseGeneral, features=(cfg.heads, cfg.width // cfg.heads),
            kernel_init=partitioned(init.lecun_normal(), ("embed", "heads", "kv")),
            bias_init=partitioned(init.zeros_init(), ("heads", "kv")))
        q, k, v = (projection(name=name)(x) for name in ("query", "key", "value"))
        mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
        y = nn.dot_product_attention(q, k, v, mask=mask)
        return nn.DenseGeneral(
            cfg.width, axis=(-2, -1), name="out",
            kernel_init=partitioned(init.lecun_normal(), ("heads", "kv", "embed")),
            bias_init=partitioned(init.zeros_init(), ("embed",)))(y)


class Mlp(nn.Module):
    cfg: Config

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(4 * self.cfg.width,
                     kernel_init=partitioned(init.lecun_normal(), ("embed", "mlp")),
                     bias_init=partitioned(init.zeros_init(), ("mlp",)))(x)
        return nn.Dense(self.cfg.width,
                        kernel_init=partitioned(init.lecun_normal(), ("mlp", "embed")),
                        bias_init=partitioned(init.zeros_init(), ("embed",)))(nn.gelu(h))


def layer_norm():
    return nn.LayerNorm(scale_init=partitioned(init.ones_init(), ("embed",)),
                        bias_init=partitioned(init.zeros_init(), ("embed",)))


class Block(nn.Module):
    cfg: Config

    @nn.compact
    def __call__(self, x):
        x = x + Attention(self.cfg)(layer_norm()(x))
        return x + Mlp(self.cfg)(layer_norm()(x))


class LanguageModel(nn.Module):
    cfg: Config

    @nn.compact
    def __call__(self, tokens):
        cfg = self.cfg
        embed = nn.Embed(cfg.vocab, cfg.width, name="embed",
                         embedding_init=partitioned(init.normal(0.02), ("vocab", "embed")))
        positions = self.param("positions", partitioned(init.normal(0.02), (None, "embed")),
                               (cfg.seq, cfg.width))
        x = embed(tokens) + positions[: tokens.shape[1]]
        for _ in range(cfg.layers):
            x = Block(cfg)(x)
        return embed.attend(layer_norm()(x))      # tied embeddings, as lm1b


def make_optimizer(learning_rate: float = 3e-3) -> optax.GradientTransformation:
    return optax.adamw(learning_rate)


def loss_fn(model: LanguageModel, params, batch: dict) -> jax.Array:
    logits = model.apply({"params": params}, batch["inputs"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()


def make_train_step(model: LanguageModel, optimizer: optax.GradientTransformation):
    """The train step as written for ``jax.jit``: boxed parameters in, boxed parameters out."""

    def train_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(functools.partial(loss_fn, model))(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return train_step


def create(cfg: Config, optimizer: optax.GradientTransformation, seed: int = 0):
    """The model, its boxed parameters and the optimizer state (boxed like them)."""
    model = LanguageModel(cfg)
    params = model.init(jax.random.key(seed), jnp.zeros((1, cfg.seq), jnp.int32))["params"]
    return model, params, optimizer.init(params)


def make_batch(cfg: Config, batch: int, seed: int = 1) -> dict:
    tokens = jax.random.randint(jax.random.key(seed), (batch, cfg.seq + 1), 0, cfg.vocab)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


def nonzero_gradient(model: LanguageModel, params, batch: dict, noise: float = 1e-6):
    """Per parameter (unboxed), where the loss's gradient at ``params`` is nonzero: above
    ``noise`` times the largest, since an exactly-zero gradient (the attention key bias, which
    softmax cancels) comes out as rounding noise."""
    grads = nn.unbox(jax.jit(jax.grad(functools.partial(loss_fn, model)))(params, batch))
    largest = max(float(np.abs(g).max()) for g in jax.tree.leaves(grads))
    return jax.tree.map(lambda g: np.abs(np.asarray(g)) > noise * largest, grads)


def run(step, params, opt_state, batch, steps: int = 2):
    """(losses, parameters after ``steps`` steps)."""
    losses = []
    for _ in range(steps):
        params, opt_state, loss = step(params, opt_state, batch)
        losses.append(float(loss))
    return losses, params


def assert_same_training(got: tuple, want: tuple, mask, rtol: float = 1e-4,
                         atol: float = 1e-4) -> None:
    """``got`` and ``want`` (losses, params) agree: the losses, and the parameters where
    ``mask`` (``nonzero_gradient``) holds. Adam turns rounding noise on an exactly-zero
    gradient (the attention key bias) into +-lr steps, so those entries are not compared."""
    np.testing.assert_allclose(got[0], want[0], rtol=rtol, atol=atol)
    flat_mask = jax.tree_util.tree_flatten_with_path(mask)[0]
    for (path, m), a, b in zip(flat_mask, jax.tree.leaves(nn.unbox(got[1])),
                               jax.tree.leaves(nn.unbox(want[1]))):
        np.testing.assert_allclose(np.asarray(a)[m], np.asarray(b)[m], rtol=rtol, atol=atol,
                                   err_msg=f"params{jax.tree_util.keystr(path)}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--annotations", default="hint", choices=("ignore", "hint", "require"))
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()

    mesh = jax.make_mesh((2, 4), ("data", "model"))
    cfg = Config()
    optimizer = make_optimizer()
    model, params, opt_state = create(cfg, optimizer)
    train_step = make_train_step(model, optimizer)
    batch = make_batch(cfg, args.batch)
    with nn.logical_axis_rules(logical_rules(mesh)):
        step = autoshard.compile(train_step, params, opt_state, batch, mesh=mesh,
                                 annotations=args.annotations)
    print(step.plan.summary(max_rows=16))

    mask = nonzero_gradient(model, params, batch)
    got = run(step, params, opt_state, batch)
    want = run(jax.jit(train_step), params, opt_state, batch)
    assert_same_training(got, want, mask)
    print(f"losses {got[0]} equal jax.jit's {want[0]}; parameters equal where the gradient is "
          "nonzero")


if __name__ == "__main__":
    main()
