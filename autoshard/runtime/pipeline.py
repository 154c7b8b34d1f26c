"""The SPMD pipeline runtime: one program, ``shard_map``-ed over the ``"stage"`` mesh axis,
stepping every device through a static tick table (``ir/pipeline_schedule.py``) in lock-step.

Each tick a device runs the op its row of the table names — a chunk's forward or backward on a
microbatch, or nothing — through ``lax.switch`` over all chunks' code, then sends what it made
to its neighbours with two ``lax.ppermute``s (activations to ``d + 1``, cotangents to ``d - 1``,
wrapping around for interleaved chunks). What arrives is written into per-microbatch stashes the
next tick, at the slot the table says; so an op may consume its input several ticks after it
arrived, and any order the schedule picks (GPipe, 1F1B, interleaved) runs the same code. The
microbatch loop is a ``lax.scan`` over ticks; explicit permutes between neighbours take about
2.5x fewer collective-permutes than letting the partitioner move a rolled buffer (as reported
in the pipeline issue; not re-measured here).

A chunk's forward is taken with ``jax.vjp`` and its residuals are packed into a slot of a
float32 residual stash (slots are reused once their backward ran: ``residual_slots``, so 1F1B
holds only its microbatches in flight); the backward rebuilds the pullback from them
(``_ResidualLayout``), so no forward runs twice. Residuals that are the chunk's own inputs
(parameters, its crossing input) are not copied. With ``recompute=True`` only chunk inputs are
stashed and a backward recomputes its chunk's forward (a third more matmul work, less memory
per microbatch in flight). The gradient accumulator goes through the
tick's ``lax.switch`` and only a backward touches it, with the gradient taken with respect to
the unpacked parameter leaves: on the benchmark's 8-layer d=1024 GPT (2 stages x 4, 1F1B,
M=8) that cut the compiled temporaries from 4.42 to 0.88 GiB per device (peak 7.06 -> 3.52
GiB), against branches that each returned a gradient vector (zeros but for a backward) and
a vjp through the unpack (one zero-padded vector per leaf). Loss and gradients are averaged
over microbatches (the loss function is taken to be a mean over its batch, as
``jax.value_and_grad`` of a mean loss on the whole batch gives); the optimizer update runs after
the pipeline, outside it.

Parameters travel packed when every non-stage axis is a data axis: each device flattens the
parameters of the chunks it holds into one float32 vector per chunk (``[virtual, size]``).
Between steps parameters and optimizer state are split like ZeRO over the non-stage axes
(``state_layout``), so the optimizer update after the pipeline runs on a share per device; a
stage gathers its own chunks' pieces on entry, and gradients leave in pieces: reduce-scattered
within the stage, the pieces all-gathered across stages (only 1/replicas of a stage's
gradients crosses the stage axis per device). With an intra-stage parameter layout over model
axes, parameters and gradients travel as leaves in that layout instead (``_Leaves``).
Activations crossing a cut travel in their own shape when every cut carries one array of the
same shape and dtype (the residual stream of a transformer), else packed into float32 (exact:
narrower floats widen, 32-bit integers are bit-cast).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec

from autoshard.ir.errors import ArgumentError
from autoshard.ir.pipeline import Chunk
from autoshard.ir.sharding import fsdp_dim
from autoshard.ir.pipeline_schedule import tick_table

# -- packing ------------------------------------------------------------------------------------

def _to_f32(x):
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
    flat = [_to_f32(jnp.asarray(x)).reshape(-1) for x in leaves]
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
class _Carrier:
    """How activations crossing a cut travel: in their own shape (``shape``/``dtype``) when
    every cut carries one array alike, else as a float32 vector of ``size``."""

    shape: tuple[int, ...]
    dtype: object
    uniform: bool

    @classmethod
    def of(cls, crossings: list[list]) -> _Carrier:
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


# -- the program --------------------------------------------------------------------------------

def pipelined_value_and_grad(chunks: Sequence[Chunk], params: Sequence, batch: Sequence, *,
                             mesh, stage_axis: str, schedule: str, microbatches: int,
                             virtual: int = 1, data_axes: tuple[str, ...] = (),
                             param_specs: Sequence[PartitionSpec] | None = None,
                             recompute: bool = False, stash: dict | None = None) -> tuple:
    """Mean loss and gradients (one per parameter leaf) of the chunked loss over ``batch``
    (leaves with the batch as leading dim), pipelined over mesh axis ``stage_axis`` and data
    parallel over ``data_axes``: each microbatch is split over them, and the chunks take the
    shapes of one device's part.

    The stage and data axes are manual inside the pipeline. Data parallelism is explicit:
    every device accumulates its own gradients over the microbatches and they are averaged over
    ``data_axes`` once, after the tick loop (a partitioner placing that reduction would do it
    in every backward). Without ``param_specs`` every mesh axis is a stage or data axis and
    parameters travel packed. With ``param_specs`` (one PartitionSpec per leaf, naming only
    the mesh's other axes, passes/pipeline/intra_stage.py) those other axes stay automatic: parameters
    and their gradient accumulators travel as leaves constrained to the specs, and the
    partitioner lays out each chunk from them. Its collectives sit inside one branch of the
    tick's ``lax.switch``, which is safe because they run over model axes only, and every
    device of a model-axis group runs the same tick row (a collective reached by some devices
    of its group and not others deadlocks, as seen on the CPU runtime)."""
    stages = int(mesh.shape[stage_axis])
    replicas = int(np.prod([mesh.shape[a] for a in data_axes])) if data_axes else 1
    if len(chunks) != stages * virtual:
        raise ArgumentError(f"{len(chunks)} pipeline chunks for {stages} stages x {virtual} "
                            "virtual stages")
    batch_size = {int(x.shape[0]) for x in batch}
    if len(batch_size) != 1 or next(iter(batch_size)) % microbatches:
        raise ArgumentError(f"the batch arguments' leading dims {sorted(batch_size)} must be "
                            f"one size divisible by microbatches={microbatches}")
    micro = [x.reshape(microbatches, x.shape[0] // microbatches, *x.shape[1:]) for x in batch]
    if any(x.shape[1] % replicas for x in micro):
        raise ArgumentError(f"a microbatch of {micro[0].shape[1]} does not split over the "
                            f"{replicas} devices of mesh axes {data_axes}")
    micro_avals = [jax.ShapeDtypeStruct((x.shape[1] // replicas, *x.shape[2:]), x.dtype)
                   for x in micro]
    param_avals = [jax.ShapeDtypeStruct(jnp.shape(p), jnp.result_type(p)) for p in params]
    crossings = crossing_avals(chunks, param_avals, micro_avals)
    carrier = _Carrier.of(crossings[:-1])
    loss_dtype = crossings[-1][0].dtype
    store = (_Packed(chunks, param_avals, stages, virtual, *zero_axes(mesh, stage_axis))
             if param_specs is None else _Leaves(chunks, param_avals, tuple(param_specs)))
    tables = _tables(schedule, stages, microbatches, virtual)
    slots = int(tables["slot"].max()) + 1
    n_chunks = len(chunks)

    def chunk_call(c, ps, xbuf, m, mb):
        xs = [] if c == 0 else carrier.take(xbuf, crossings[c - 1])
        data = [lax.dynamic_index_in_dim(mb[i], m, keepdims=False) for i in chunks[c].batch]
        return chunks[c].fn(ps, data, xs)

    def chunk_vjp(c, ps, x, m, mb):
        return jax.vjp(lambda p, xb: chunk_call(c, p, xb, m, mb), ps, x)

    layouts = [None if recompute else _residual_layout(
        lambda ps, x, m, mb, _c=c: chunk_vjp(_c, ps, x, m, mb),
        [param_avals[i] for i in chunks[c].params],
        jax.ShapeDtypeStruct(carrier.shape, carrier.dtype),
        [jax.ShapeDtypeStruct((microbatches, *a.shape), a.dtype) for a in micro_avals])
        for c in range(n_chunks)]
    residual_size = max([lay.size for lay in layouts if lay is not None] + [1])
    if stash is not None:   # what the stashes below take per device, for the plan's report
        stash["activation_bytes"] = (2 * virtual * microbatches * math.prod(carrier.shape)
                                     * np.dtype(carrier.dtype).itemsize)
        stash["residual_bytes"] = (slots if any(layouts) else 0) * residual_size * 4

    # Every branch takes the gradient accumulator and returns it: a backward adds its chunk's
    # gradient in place, the others pass it through, so no branch materializes a zero
    # gradient vector and the tick adds nothing (measured on the d=1024 pipeline benchmark:
    # see the module docstring).
    # The residual stash (``res``) goes through the switch like the gradients: a forward
    # writes its microbatch's slot, a backward reads it, the others pass it through.
    def forward_branch(c):
        def run(state, grads, res, m, slot, mb):
            act = state["act"]
            v = c // stages
            x = act[v, m] if c > 0 else carrier.zeros()
            ps = store.chunk_params(state["params"], c)
            if layouts[c] is None:
                outs = chunk_call(c, ps, x, m, mb)
            else:
                outs, pullback = chunk_vjp(c, ps, x, m, mb)
                res = res.at[slot].set(layouts[c].stored(pullback, residual_size))
            if c == n_chunks - 1:   # accumulated in float32 whatever the loss's dtype
                return (carrier.zeros(), carrier.zeros(), grads, res,
                        outs[0].astype(jnp.float32) / microbatches)
            return carrier.put(outs), carrier.zeros(), grads, res, jnp.zeros(())
        return run

    def backward_branch(c):
        def run(state, grads, res, m, slot, mb):
            v = c // stages
            x = state["act"][v, m] if c > 0 else carrier.zeros()
            # differentiate with respect to the unpacked leaves: the gradient of an unpack
            # would be one zero-padded packed vector per leaf
            ps = store.chunk_params(state["params"], c)
            if layouts[c] is None:   # recompute the chunk's forward
                _, pullback = chunk_vjp(c, ps, x, m, mb)
            else:
                pullback = layouts[c].pullback(res[slot], ps, x, m, mb)
            if c == n_chunks - 1:
                seed = [jnp.full((), 1.0 / microbatches, loss_dtype)]
            else:
                seed = carrier.take(state["cot"][v, m], crossings[c])
                seed = [s if jnp.issubdtype(s.dtype, jnp.floating)
                        else np.zeros(s.shape, jax.dtypes.float0) for s in seed]
            gp, gx = pullback(seed)
            gp = [g if g.dtype != jax.dtypes.float0 else np.zeros(g.shape, np.float32)
                  for g in gp]
            send_b = gx if c > 0 else carrier.zeros()
            grads = store.add_gradients(grads, c, gp)
            return carrier.zeros(), send_b.astype(carrier.dtype), grads, res, jnp.zeros(())
        return run

    def idle(state, grads, res, m, slot, mb):
        return carrier.zeros(), carrier.zeros(), grads, res, jnp.zeros(())

    branches = ([forward_branch(c) for c in range(n_chunks)]
                + [backward_branch(c) for c in range(n_chunks)] + [idle])
    forward_perm = [(i, (i + 1) % stages) for i in range(stages)]
    backward_perm = [(i, (i - 1) % stages) for i in range(stages)]

    def body(leaves, mb, table):
        d = lax.axis_index(stage_axis)
        pk = store.enter(d, list(leaves))
        if param_specs is not None:   # one copy of the microbatch per model-axis group
            mb = [lax.with_sharding_constraint(x, PartitionSpec()) for x in mb]
        state0 = {"act": jnp.zeros((virtual, microbatches, *carrier.shape), carrier.dtype),
                  "cot": jnp.zeros((virtual, microbatches, *carrier.shape), carrier.dtype),
                  "grads": store.zero_gradients(),
                  "res": jnp.zeros((slots if any(layouts) else 0, residual_size),
                                   jnp.float32),
                  "loss": jnp.zeros((), jnp.float32),
                  "send_f": carrier.zeros(), "send_b": carrier.zeros()}

        def tick(state, row):
            row = {k: lax.dynamic_index_in_dim(r, d, keepdims=False) for k, r in row.items()}
            got_f = lax.ppermute(state["send_f"], stage_axis, forward_perm)
            got_b = lax.ppermute(state["send_b"], stage_axis, backward_perm)
            act = _stash(state["act"], row["recv_f"], row["recv_f_v"], row["recv_f_m"], got_f)
            cot = _stash(state["cot"], row["recv_b"], row["recv_b_v"], row["recv_b_m"], got_b)
            view = {"act": act, "cot": cot, "params": pk}
            send_f, send_b, grads, res, loss = lax.switch(
                row["branch"], branches, view, state["grads"], state["res"], row["m"],
                row["slot"], mb)
            return {"act": act, "cot": cot, "grads": grads, "res": res,
                    "loss": state["loss"] + loss, "send_f": send_f, "send_b": send_b}, None

        final, _ = lax.scan(tick, state0, table)
        loss = lax.psum(final["loss"], stage_axis)
        if data_axes:
            loss = lax.pmean(loss, data_axes)
        return store.exchange(d, final["grads"], stage_axis, data_axes, replicas), loss

    batch_spec = PartitionSpec(None, tuple(data_axes)) if data_axes else PartitionSpec()
    manual = set(mesh.axis_names) if param_specs is None else {stage_axis, *data_axes}
    run = jax.shard_map(body, mesh=mesh, axis_names=manual, check_vma=False,
                        in_specs=(store.in_specs(), [batch_spec] * len(micro), PartitionSpec()),
                        out_specs=(store.in_specs(), PartitionSpec()))
    grads, loss = run(list(params), micro, {k: jnp.asarray(v) for k, v in tables.items()})
    return loss.astype(loss_dtype), [g.astype(a.dtype) for g, a in zip(grads, param_avals)]


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


class _Packed:
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
    return jnp.moveaxis(_to_f32(x), dim, 0)


def _unmoved(block, shape, dim):
    """The leaf of ``shape`` whose ZeRO dim ``dim`` was moved first and flattened into
    ``block`` ([pieces, n], pieces stacked along that dim)."""
    moved = (shape[dim], *(s for k, s in enumerate(shape) if k != dim))
    return jnp.moveaxis(block.reshape(moved), 0, dim)


def _piece_shape(shape, dim, ways) -> tuple[int, ...]:
    if dim is None:
        return tuple(shape)
    return tuple(s // ways if k == dim else s for k, s in enumerate(shape))


class _Leaves:
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


_PARAM, _INPUT, _INDEX, _STASHED, _STORED = "param", "input", "index", "stashed", "stored"


@dataclass(frozen=True)
class _ResidualLayout:
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


def _residual_layout(vjp, param_avals, x_aval, mb_avals) -> _ResidualLayout | None:
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
    return _ResidualLayout(found["treedef"], found["sources"],
                           tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in stored))


def _packable(dtype) -> bool:
    return (jnp.issubdtype(dtype, jnp.floating) or dtype == jnp.bool_
            or jnp.issubdtype(dtype, jnp.integer) and np.dtype(dtype).itemsize <= 4)


def residual_slots(table) -> np.ndarray:
    """``slots[t, d]``: the residual-stash slot the op at tick t on device d writes (a
    forward) or reads (its backward). A chunk's residuals live from its forward to its
    backward on the same device; slots are reused once freed (interval colouring in tick
    order), so 1F1B keeps as many as it has microbatches in flight, not one per microbatch."""
    ticks, stages = len(table), len(table[0]) if table else 0
    slots = np.zeros((ticks, stages), np.int32)
    for d in range(stages):
        held, free, used = {}, [], 0
        for t in range(ticks):
            op = table[t][d]
            if op is None:
                continue
            key = (op.chunk, op.microbatch)
            if op.kind == "F":
                if free:
                    slot = free.pop(min(range(len(free)), key=free.__getitem__))
                else:
                    slot, used = used, used + 1
                held[key] = slot
            else:
                slot = held.pop(key)
                free.append(slot)
            slots[t, d] = slot
    return slots


def _stash(stash, valid, v, m, incoming):
    current = stash[v, m]
    return stash.at[v, m].set(jnp.where(valid > 0, incoming, current))


def crossing_avals(chunks, param_avals, micro_avals) -> list[list]:
    """Shapes crossing each cut (after chunk c), by abstract evaluation on one microbatch."""
    crossings, previous = [], []
    for c, chunk in enumerate(chunks):
        ps = [param_avals[i] for i in chunk.params]
        data = [micro_avals[i] for i in chunk.batch]
        outs = jax.eval_shape(lambda p, b, x, _f=chunk.fn: _f(p, b, x), ps, data, previous)
        previous = [jax.ShapeDtypeStruct(o.shape, o.dtype) for o in outs]
        crossings.append(previous)
    if len(crossings[-1]) != 1 or crossings[-1][0].shape != ():
        raise ArgumentError(f"the last pipeline chunk must return the scalar loss, got "
                            f"{crossings[-1]}")
    return crossings


def _tables(schedule: str, stages: int, microbatches: int, virtual: int) -> dict:
    """The tick table as int arrays [ticks, stages]: which branch to run on which microbatch
    and chunk slot, and what the permutes delivered at the start of the tick."""
    table = tick_table(schedule, stages, microbatches, virtual)
    chunks = stages * virtual
    ticks = len(table)
    names = ("branch", "m", "v", "recv_f", "recv_f_v", "recv_f_m", "recv_b", "recv_b_v",
             "recv_b_m", "slot")
    out = {k: np.zeros((ticks, stages), np.int32) for k in names}
    out["branch"][:] = 2 * chunks
    out["slot"][:] = residual_slots(table)
    for t, row in enumerate(table):
        for d, op in enumerate(row):
            if op is None:
                continue
            out["branch"][t, d] = op.chunk if op.kind == "F" else chunks + op.chunk
            out["m"][t, d] = op.microbatch
            out["v"][t, d] = op.chunk // stages
            if t + 1 >= ticks:
                continue
            if op.kind == "F" and op.chunk < chunks - 1:
                to = (op.chunk + 1) % stages
                out["recv_f"][t + 1, to] = 1
                out["recv_f_v"][t + 1, to] = (op.chunk + 1) // stages
                out["recv_f_m"][t + 1, to] = op.microbatch
            if op.kind == "B" and op.chunk > 0:
                to = (op.chunk - 1) % stages
                out["recv_b"][t + 1, to] = 1
                out["recv_b_v"][t + 1, to] = (op.chunk - 1) // stages
                out["recv_b_m"][t + 1, to] = op.microbatch
    return out
