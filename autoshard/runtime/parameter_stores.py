"""How a pipeline's parameters enter the tick loop and its gradients leave it: the two
parameter stores the program in pipeline.py is written against.

``PackedParameters`` serves a data-parallel pipeline (every non-stage axis a data axis): each
device holds the parameters of the chunks it runs as one float32 vector per chunk, and between
steps parameters and optimizer state are split like ZeRO (Rajbhandari et al., 2020) over the
non-stage axes (``state_layout``), so the optimizer update after the pipeline runs on a share
per device and only 1/replicas of a stage's gradients crosses the stage axis per device.
``LeafParameters`` serves an intra-stage parameter layout over model axes: parameters and
gradients travel as leaves in that layout and XLA's partitioner lays out each chunk from them.
Both offer ``in_specs``, ``enter``, ``chunk_params``, ``zero_gradients``, ``add_gradients`` and
``exchange``, which is all the program uses.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec

from autoshard.ir.sharding import fsdp_dim
from autoshard.runtime.packing import pack, to_f32, unpack


def zero_axes(mesh, stage_axis: str) -> tuple[tuple[str, ...], int]:
    """The axes a data-parallel pipeline splits parameters and optimizer state over between
    steps (every non-stage axis), and their device count."""
    axes = tuple(a for a in mesh.axis_names if a != stage_axis)
    return axes, int(np.prod([mesh.shape[a] for a in axes]))


def state_layout(shape: Sequence[int], axes: tuple[str, ...], ways: int) -> PartitionSpec:
    """Where a data-parallel pipeline keeps a parameter or optimizer-state leaf between steps:
    split like ZeRO over the non-stage ``axes`` (``ways`` devices) on ``fsdp_dim``, so the
    optimizer update runs on a 1/ways share per device; replicated when no dim divides."""
    dim = fsdp_dim(shape, ways)
    if dim is None:
        return PartitionSpec()
    return PartitionSpec(*[tuple(axes) if i == dim else None for i in range(len(shape))])


class PackedParameters:
    """Parameters and gradients as one float32 vector per chunk slot (``[virtual, size]``):
    the accumulator holds only the chunks a device runs.

    Between steps every leaf is split like ZeRO over the non-stage axes (``state_layout``,
    ``ways`` pieces along ``dims[i]``; leaves no dim divides stay whole). A stage gathers only
    its own chunks' pieces on entry (one all-gather of ``[virtual, ways, piece]``), and its
    gradients leave the way ZeRO wants them: reduce-scattered into pieces within the stage,
    then the pieces (1/ways of a stage's gradients per device) all-gathered across stages, so
    no device ever holds a whole replicated gradient or optimizer state."""

    def __init__(self, chunks, param_avals, stages: int, virtual: int,
                 zero_axes: tuple[str, ...], ways: int):
        self.chunks, self.stages, self.virtual = chunks, stages, virtual
        self.zero_axes, self.ways = zero_axes, ways
        self.param_avals = param_avals
        self.dims = [fsdp_dim(a.shape, ways) for a in param_avals]
        self.avals = [[param_avals[i] for i in c.params] for c in chunks]
        self.split = [[i for i in c.params if self.dims[i] is not None] for c in chunks]
        self.whole = [[i for i in c.params if self.dims[i] is None] for c in chunks]
        self.size = max([sum(math.prod(a.shape) for a in avals) for avals in self.avals] + [1])
        self.piece = max([sum(self._count(i) for i in s) for s in self.split] + [0])
        self.rest = max([sum(self._count(i) for i in w) for w in self.whole] + [0])

    def _count(self, i) -> int:
        """Elements of leaf i per piece (all of it when it stays whole)."""
        return math.prod(self.param_avals[i].shape) // (self.ways if self.dims[i] is not None
                                                         else 1)

    def _spans(self, leaves: list[int], start: int = 0) -> list[tuple[int, int, int]]:
        """``(leaf, start, elements)`` of each of ``leaves`` laid end to end from ``start``."""
        out = []
        for i in leaves:
            out.append((i, start, self._count(i)))
            start += self._count(i)
        return out

    def in_specs(self) -> list[PartitionSpec]:
        return [state_layout(a.shape, self.zero_axes, self.ways) for a in self.param_avals]

    def _per_stage(self, d, make, *operands):
        return lax.switch(d, [make(s) for s in range(self.stages)], *operands)

    def _chunk(self, v, stage):
        return v * self.stages + stage

    def enter(self, d, leaves):
        def pieces(stage):
            def run(leaves):
                return jnp.stack([pack([_moved(leaves[i], self.dims[i])
                                        for i in self.split[self._chunk(v, stage)]],
                                       self.piece) for v in range(self.virtual)])
            return run

        mine = self._per_stage(d, pieces, leaves)                       # [virtual, piece]
        gathered = (lax.all_gather(mine, self.zero_axes, axis=1) if self.zero_axes
                    else mine[:, None])                                  # [virtual, ways, piece]

        def packer(stage):
            def run(gathered, leaves):
                rows = []
                for v in range(self.virtual):
                    c = self._chunk(v, stage)
                    full = {i: _unmoved(gathered[v, :, start:start + n],  # [ways, n]
                                        self.param_avals[i].shape, self.dims[i])
                            for i, start, n in self._spans(self.split[c])}
                    rows.append(pack([full[i] if i in full else leaves[i]
                                      for i in self.chunks[c].params], self.size))
                return jnp.stack(rows)
            return run

        return self._per_stage(d, packer, gathered, leaves)

    def chunk_params(self, packed, c) -> list:
        return unpack(packed[c // self.stages], self.avals[c])

    def zero_gradients(self):
        return jnp.zeros((self.virtual, self.size), jnp.float32)

    def add_gradients(self, grads, c, gp):
        return grads.at[c // self.stages].add(pack(gp, self.size))

    def exchange(self, d, grads, stage_axis, data_axes, replicas: int) -> list:
        """The mean gradient of every leaf, in its ``state_layout`` piece."""
        f32 = [[jax.ShapeDtypeStruct(a.shape, jnp.float32) for a in avals]
               for avals in self.avals]

        def rows(stage):
            def run(grads):
                split, whole = [], []
                for v in range(self.virtual):
                    c = self._chunk(v, stage)
                    by = dict(zip(self.chunks[c].params, unpack(grads[v], f32[c])))
                    blocks = [_moved(by[i], self.dims[i]).reshape(self.ways, -1)
                              for i in self.split[c]]
                    used = sum(b.shape[1] for b in blocks)
                    split.append(jnp.concatenate(
                        blocks + [jnp.zeros((self.ways, self.piece - used), jnp.float32)],
                        axis=1))
                    whole.append(pack([by[i] for i in self.whole[c]], self.rest))
                return jnp.stack(split), jnp.stack(whole)
            return run

        split, whole = self._per_stage(d, rows, grads)   # [virtual, ways, piece], [v, rest]
        if data_axes and tuple(data_axes) == tuple(self.zero_axes):
            split = lax.psum_scatter(split, data_axes, scatter_dimension=1, tiled=True)[:, 0]
        else:   # axes that are not data axes hold copies: keep this device's piece
            if data_axes:
                split = lax.psum(split, data_axes)
            index = lax.axis_index(self.zero_axes) if self.zero_axes else 0
            split = lax.dynamic_index_in_dim(split, index, axis=1, keepdims=False)
        if data_axes:
            whole = lax.psum(whole, data_axes)
        # the only exchange across stages: 1/ways of each stage's gradients per device
        mine = jnp.concatenate([split, whole], axis=1) / replicas
        every = lax.all_gather(mine, stage_axis, axis=0)     # [stages, virtual, piece + rest]
        out = [jnp.zeros(_piece_shape(a.shape, k, self.ways), jnp.float32)
               for a, k in zip(self.param_avals, self.dims)]
        for c, chunk in enumerate(self.chunks):
            row = every[c % self.stages, c // self.stages]
            for i, start, n in self._spans(self.split[c]):
                out[i] = out[i] + _unmoved(row[None, start:start + n], out[i].shape,
                                           self.dims[i])
            for i, start, n in self._spans(self.whole[c], self.piece):
                out[i] = out[i] + row[start:start + n].reshape(out[i].shape)
        return out


def _moved(x, dim):
    """``x`` with its ZeRO dim first (so that piece r is row r of a [ways, -1] reshape)."""
    return jnp.moveaxis(to_f32(x), dim, 0)


def _unmoved(block, shape, dim):
    """The leaf of ``shape`` whose ZeRO dim ``dim`` was moved first and flattened into
    ``block`` ([pieces, n], pieces stacked along that dim)."""
    moved = (shape[dim], *(s for k, s in enumerate(shape) if k != dim))
    return jnp.moveaxis(block.reshape(moved), 0, dim)


def _piece_shape(shape, dim, ways) -> tuple[int, ...]:
    if dim is None:
        return tuple(shape)
    return tuple(s // ways if k == dim else s for k, s in enumerate(shape))


class LeafParameters:
    """Parameters and float32 gradient accumulators as leaves laid out by ``specs`` over the
    automatic axes. Every device accumulates every leaf (zero for chunks it does not run),
    so gradients cost a full set per device, not the packed store's stage share; they are
    summed over the stage axis once at the end."""

    def __init__(self, chunks, param_avals, specs: tuple[PartitionSpec, ...]):
        self.chunks, self.param_avals, self.specs = chunks, param_avals, specs

    def _laid(self, leaves):
        return [lax.with_sharding_constraint(x, s) for x, s in zip(leaves, self.specs)]

    def enter(self, d, leaves):
        return self._laid(leaves)

    def chunk_params(self, leaves, c) -> list:
        return [leaves[i] for i in self.chunks[c].params]

    def zero_gradients(self):
        return self._laid([jnp.zeros(a.shape, jnp.float32) for a in self.param_avals])

    def add_gradients(self, grads, c, gp):
        grads = list(grads)
        for i, g in zip(self.chunks[c].params, gp):
            grads[i] = grads[i] + g.astype(jnp.float32)
        return self._laid(grads)

    def in_specs(self) -> list[PartitionSpec]:
        return [PartitionSpec()] * len(self.param_avals)

    def exchange(self, d, grads, stage_axis, data_axes, replicas: int) -> list:
        grads = lax.psum(grads, stage_axis)
        return list(lax.pmean(grads, data_axes) if data_axes else grads)

