"""Auto-shard an Equinox transformer language model trained with optax AdamW, on 8 devices.

    python examples/equinox_lm.py                  # mesh (2, 4): data x model, searched plan
    python examples/equinox_lm.py --planner data-parallel

The model is written as Equinox users write it: ``eqx.nn`` layers (``MultiheadAttention``, whose
``Dropout`` holds Python ``p`` and ``inference`` fields; ``MLP``, whose activation is a
``custom_jvp``) and a block with a plain ``causal: bool`` field. The step is the one written for
``eqx.filter_jit``, and the module is passed to ``autoshard.compile`` directly: as under
``filter_jit``, its arrays are traced and every other leaf is static. The script checks the
sharded step against ``eqx.filter_jit`` after two AdamW steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count=8").strip()

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import autoshard  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Config:
    vocab: int = 256
    seq: int = 64
    width: int = 128
    heads: int = 4
    layers: int = 2


class Block(eqx.Module):
    """Pre-norm attention and MLP; ``causal`` is a plain bool field (static, as under
    ``eqx.filter_jit``)."""

    norm1: eqx.nn.LayerNorm
    attention: eqx.nn.MultiheadAttention
    norm2: eqx.nn.LayerNorm
    mlp: eqx.nn.MLP
    causal: bool

    def __init__(self, cfg: Config, key: jax.Array):
        k1, k2 = jax.random.split(key)
        self.norm1 = eqx.nn.LayerNorm(cfg.width)
        self.attention = eqx.nn.MultiheadAttention(cfg.heads, cfg.width, key=k1)
        self.norm2 = eqx.nn.LayerNorm(cfg.width)
        self.mlp = eqx.nn.MLP(cfg.width, cfg.width, 4 * cfg.width, depth=1,
                              activation=jax.nn.gelu, key=k2)
        self.causal = True

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x``: [seq, width]."""
        seq = x.shape[0]
        mask = jnp.tril(jnp.ones((seq, seq), bool)) if self.causal else None
        h = jax.vmap(self.norm1)(x)
        x = x + self.attention(h, h, h, mask=mask)
        return x + jax.vmap(self.mlp)(jax.vmap(self.norm2)(x))


class LanguageModel(eqx.Module):
    embedding: eqx.nn.Embedding
    positions: jax.Array
    blocks: list[Block]
    norm: eqx.nn.LayerNorm
    head: eqx.nn.Linear

    def __init__(self, cfg: Config, key: jax.Array):
        k_embed, k_pos, k_head, *k_blocks = jax.random.split(key, 3 + cfg.layers)
        self.embedding = eqx.nn.Embedding(cfg.vocab, cfg.width, key=k_embed)
        self.positions = 0.02 * jax.random.normal(k_pos, (cfg.seq, cfg.width))
        self.blocks = [Block(cfg, k) for k in k_blocks]
        self.norm = eqx.nn.LayerNorm(cfg.width)
        self.head = eqx.nn.Linear(cfg.width, cfg.vocab, use_bias=False, key=k_head)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """``tokens``: [seq] int32 -> logits [seq, vocab]."""
        x = jax.vmap(self.embedding)(tokens) + self.positions[: tokens.shape[0]]
        for block in self.blocks:
            x = block(x)
        return jax.vmap(self.head)(jax.vmap(self.norm)(x))


def loss_fn(model: LanguageModel, batch: dict) -> jax.Array:
    logits = jax.vmap(model)(batch["inputs"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()


def make_optimizer(learning_rate: float = 3e-3) -> optax.GradientTransformation:
    return optax.adamw(learning_rate)


def make_train_step(optimizer: optax.GradientTransformation):
    """The train step as written for ``eqx.filter_jit``: the model in, the updated model out."""

    def train_step(model, opt_state, batch):
        loss, grads = eqx.filter_value_and_grad(loss_fn)(model, batch)
        updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), opt_state, loss

    return train_step


def create(cfg: Config, optimizer: optax.GradientTransformation, seed: int = 0):
    model = LanguageModel(cfg, jax.random.key(seed))
    return model, optimizer.init(eqx.filter(model, eqx.is_array))


def make_batch(cfg: Config, batch: int, seed: int = 1) -> dict:
    tokens = jax.random.randint(jax.random.key(seed), (batch, cfg.seq + 1), 0, cfg.vocab)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


def nonzero_gradient(model: LanguageModel, batch: dict, noise: float = 1e-6):
    """Per array of the model, where the loss's gradient at ``model`` is nonzero: above
    ``noise`` times the largest, since an exactly-zero gradient (an attention key bias, which
    softmax cancels) comes out as rounding noise."""
    grads = eqx.filter(eqx.filter_jit(eqx.filter_grad(loss_fn))(model, batch), eqx.is_array)
    largest = max(float(np.abs(g).max()) for g in jax.tree.leaves(grads))
    return jax.tree.map(lambda g: np.abs(np.asarray(g)) > noise * largest, grads)


def assert_same_training(got: tuple, want: tuple, mask, rtol: float = 1e-4,
                         atol: float = 1e-4) -> None:
    """``got`` and ``want`` (losses, model) agree: the losses, and the parameters where
    ``mask`` (``nonzero_gradient``) holds. Adam turns rounding noise on an exactly-zero
    gradient (an attention key bias) into +-lr steps, so those entries are not compared."""
    np.testing.assert_allclose(got[0], want[0], rtol=rtol, atol=atol)
    arrays = [jax.tree.leaves(eqx.filter(model, eqx.is_array)) for model in (got[1], want[1])]
    for (path, m), a, b in zip(jax.tree_util.tree_flatten_with_path(mask)[0], *arrays):
        np.testing.assert_allclose(np.asarray(a)[m], np.asarray(b)[m], rtol=rtol, atol=atol,
                                   err_msg=f"model{jax.tree_util.keystr(path)}")


def run(step, model, opt_state, batch, steps: int = 2):
    """(losses, model after ``steps`` steps)."""
    losses = []
    for _ in range(steps):
        model, opt_state, loss = step(model, opt_state, batch)
        losses.append(float(loss))
    return losses, model


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--planner", default="search", choices=("search", "data-parallel"))
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()

    mesh = jax.make_mesh((2, 4), ("data", "model"))
    cfg = Config()
    optimizer = make_optimizer()
    train_step = make_train_step(optimizer)
    model, opt_state = create(cfg, optimizer)
    batch = make_batch(cfg, args.batch)
    step = autoshard.compile(train_step, model, opt_state, batch, mesh=mesh,
                             planner=args.planner)
    print(step.plan.summary(max_rows=16))

    mask = nonzero_gradient(model, batch)
    got = run(step, model, opt_state, batch)
    want = run(eqx.filter_jit(train_step), model, opt_state, batch)
    assert_same_training(got, want, mask)
    print(f"losses {got[0]} equal eqx.filter_jit's {want[0]}; parameters equal where the "
          "gradient is nonzero")


if __name__ == "__main__":
    main()
