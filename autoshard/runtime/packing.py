"""Carrying a chunk's leaves in one float32 vector: ``pack``/``unpack``, how activations cross
a cut (``Carrier``), and which of a chunk's vjp residuals the forward stores for its backward
(``ResidualLayout``).

The pipeline's stashes, parameter vectors and gradient accumulators are fixed-shape arrays
threaded through one ``lax.switch``, so every chunk's values of mixed shapes and dtypes must
fit one buffer. Packing into float32 is exact: narrower floats widen, 32-bit integers are
bit-cast, smaller integers are exact in float32. Activations skip packing when every cut
carries one array of the same shape and dtype (the residual stream of a transformer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def to_f32(x):
    if x.dtype == jnp.float32:
        return x
    if jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == jnp.bool_:
        return x.astype(jnp.float32)
    if x.dtype.itemsize == 4:
        return lax.bitcast_convert_type(x, jnp.float32)
    return x.astype(jnp.float32)  # small integers are exact in float32


def _from_f32(v, aval):
    if aval.dtype == jnp.float32:
        return v
    if jnp.issubdtype(aval.dtype, jnp.floating) or aval.dtype == jnp.bool_:
        return v.astype(aval.dtype)
    if np.dtype(aval.dtype).itemsize == 4:
        return lax.bitcast_convert_type(v, aval.dtype)
    return v.astype(aval.dtype)


def pack(leaves: Sequence, size: int):
    flat = [to_f32(jnp.asarray(x)).reshape(-1) for x in leaves]
    used = sum(int(f.size) for f in flat)
    return jnp.concatenate(flat + [jnp.zeros((size - used,), jnp.float32)]) if flat or size \
        else jnp.zeros((0,), jnp.float32)


def unpack(vector, avals: Sequence) -> list:
    out, start = [], 0
    for a in avals:
        n = math.prod(a.shape)
        out.append(_from_f32(vector[start:start + n], a).reshape(a.shape))
        start += n
    return out


@dataclass(frozen=True)
class Carrier:
    """How activations crossing a cut travel: in their own shape (``shape``/``dtype``) when
    every cut carries one array alike, else as a float32 vector of ``size``."""

    shape: tuple[int, ...]
    dtype: object
    uniform: bool

    @classmethod
    def of(cls, crossings: list[list]) -> Carrier:
        first = crossings[0] if crossings else []
        if crossings and all(len(c) == 1 for c in crossings) and all(
                (c[0].shape, c[0].dtype) == (first[0].shape, first[0].dtype) for c in crossings):
            return cls(tuple(first[0].shape), first[0].dtype, True)
        size = max([sum(math.prod(a.shape) for a in c) for c in crossings] + [1])
        return cls((size,), jnp.float32, False)

    def zeros(self):
        return jnp.zeros(self.shape, self.dtype)

    def put(self, leaves: list):
        return leaves[0] if self.uniform else pack(leaves, self.shape[0])

    def take(self, buffer, avals: list) -> list:
        return [buffer] if self.uniform else unpack(buffer, avals)



_PARAM, _INPUT, _INDEX, _STASHED, _STORED = "param", "input", "index", "stashed", "stored"


@dataclass(frozen=True)
class ResidualLayout:
    """Where each residual of a chunk's vjp comes from in the backward: one of the chunk's
    parameters, its crossing input (already in the activation stash), the microbatch index or
    batch stash (``sources``), else *stored*: packed into the chunk's slot of the residual
    stash by its forward. ``treedef`` rebuilds the pullback from the residuals (a vjp's
    pullback is a pytree of them, with its linear program as static data)."""

    treedef: object
    sources: tuple[tuple[str, int], ...]
    stored_avals: tuple[jax.ShapeDtypeStruct, ...]

    @property
    def size(self) -> int:
        return sum(math.prod(a.shape) for a in self.stored_avals)

    def stored(self, pullback, size: int):
        leaves = jax.tree.leaves(pullback)
        return pack([r for r, (kind, _) in zip(leaves, self.sources) if kind == _STORED], size)

    def pullback(self, vector, ps, x, m, mb):
        stored = iter(unpack(vector, self.stored_avals))
        leaves = [ps[i] if kind == _PARAM else x if kind == _INPUT else m if kind == _INDEX
                  else mb[i] if kind == _STASHED else next(stored)
                  for kind, i in self.sources]
        return jax.tree.unflatten(self.treedef, leaves)


def residual_layout(vjp, param_avals, x_aval, mb_avals) -> ResidualLayout | None:
    """The residual layout of ``vjp(ps, x, m, mb) -> (outs, pullback)``, found by tracing it
    abstractly: a residual that *is* one of its inputs (JAX forwards inputs a vjp needs rather
    than copying them) is taken from there in the backward, not stored. None when a residual
    cannot travel in a float32 vector (a PRNG key): that chunk recomputes its forward."""
    found = {}

    def probe(ps, x, m, mb):
        _, pullback = vjp(ps, x, m, mb)
        leaves, found["treedef"] = jax.tree.flatten(pullback)
        sources = []
        for r in leaves:
            source = next(((_PARAM, i) for i, p in enumerate(ps) if r is p), None)
            source = source or ((_INPUT, 0) if r is x else (_INDEX, 0) if r is m else None)
            source = source or next(((_STASHED, i) for i, b in enumerate(mb) if r is b), None)
            sources.append(source or (_STORED, 0))
        found["sources"] = tuple(sources)
        return [r for r, (kind, _) in zip(leaves, sources) if kind == _STORED]

    stored = jax.eval_shape(probe, list(param_avals), x_aval,
                            jax.ShapeDtypeStruct((), jnp.int32), list(mb_avals))
    if any(not _packable(a.dtype) for a in stored):
        return None
    return ResidualLayout(found["treedef"], found["sources"],
                           tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in stored))


def _packable(dtype) -> bool:
    return (jnp.issubdtype(dtype, jnp.floating) or dtype == jnp.bool_
            or jnp.issubdtype(dtype, jnp.integer) and np.dtype(dtype).itemsize <= 4)

