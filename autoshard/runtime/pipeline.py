"""The SPMD pipeline runtime: one program, ``shard_map``-ed over the stage mesh axis, stepping
every device through a static tick table (``ir/pipeline_schedule.py``) in lock-step.

Each tick a device runs the op its row of the table names (a chunk's forward or backward on a
microbatch, or nothing) through ``lax.switch`` over all chunks' code, then sends what it made to
its neighbours with two ``lax.ppermute``s (activations to ``d + 1``, cotangents to ``d - 1``,
wrapping around for interleaved chunks). What arrives is written into per-microbatch stashes at
the slot the table says, so an op may consume its input ticks after it arrived and every
schedule (GPipe, 1F1B, interleaved) runs the same code. The microbatch loop is a ``lax.scan``
over ticks; explicit permutes between neighbours take fewer collective-permutes than letting
the partitioner move a rolled buffer.

A chunk's forward is taken with ``jax.vjp`` and the residuals it must store go into a slot of a
float32 residual stash (``ResidualLayout``; slots are reused once their backward ran,
``residual_slots``, so 1F1B holds only its microbatches in flight), so no forward runs twice.
With ``recompute=True`` only chunk inputs are stashed and a backward recomputes its chunk's
forward (a third more matmul work, less memory per microbatch in flight). The gradient
accumulator goes through the tick's switch and only a backward adds to it, differentiating with
respect to the unpacked parameter leaves, so no branch makes a zero gradient vector and no vjp
through an unpack makes a zero-padded vector per leaf. Loss and gradients are averaged over
microbatches (the loss is taken to be a mean over its batch); the optimizer update runs after
the pipeline, outside it. How parameters enter and gradients leave is parameter_stores.py.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec

from autoshard.ir.errors import ArgumentError
from autoshard.ir.pipeline import Chunk
from autoshard.ir.pipeline_schedule import tick_table
from autoshard.runtime.packing import Carrier, residual_layout
from autoshard.runtime.parameter_stores import LeafParameters, PackedParameters, zero_axes


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
    the mesh's other axes, passes/pipeline/intra_stage.py) those other axes stay automatic:
    parameters and their gradient accumulators travel as leaves constrained to the specs, and the
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
    carrier = Carrier.of(crossings[:-1])
    loss_dtype = crossings[-1][0].dtype
    store = (PackedParameters(chunks, param_avals, stages, virtual, *zero_axes(mesh, stage_axis))
             if param_specs is None else LeafParameters(chunks, param_avals, tuple(param_specs)))
    tables = _tables(schedule, stages, microbatches, virtual)
    slots = int(tables["slot"].max()) + 1
    n_chunks = len(chunks)

    def chunk_call(c, ps, xbuf, m, mb):
        xs = [] if c == 0 else carrier.take(xbuf, crossings[c - 1])
        data = [lax.dynamic_index_in_dim(mb[i], m, keepdims=False) for i in chunks[c].batch]
        return chunks[c].fn(ps, data, xs)

    def chunk_vjp(c, ps, x, m, mb):
        return jax.vjp(lambda p, xb: chunk_call(c, p, xb, m, mb), ps, x)

    layouts = [None if recompute else residual_layout(
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
    # gradient vector and the tick adds nothing.
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
