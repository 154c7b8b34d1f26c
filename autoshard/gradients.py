"""``autoshard.value_and_grad`` / ``autoshard.grad``: the gradient-accumulation boundary of a
pipelined train step.

The function they wrap is what runs per microbatch. Outside a pipelined ``compile`` they are
``jax.value_and_grad`` / ``jax.grad``, so the same step runs anywhere. While
``PipelinedFunction`` traces a step it sets a ``PipelineContext`` (a contextvar: the wrappers
are called from the user's step, which cannot pass it along); the wrapped loss is then planned
inside a stage (passes/pipeline/intra_stage.py), cut into chunks at the microbatch count chosen
(passes/pipeline/microbatches.py) and run by the SPMD runtime (runtime/pipeline.py), and each
traced loss leaves one ``TracedPipeline`` on the context for the function to report.

The arguments a wrapper differentiates are the parameters; its other arguments are the batch,
split into microbatches along their leading dim, and the loss must be a mean over the batch
(the pipeline averages the microbatch losses and gradients).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from autoshard.cost_model.hardware import Hardware
from autoshard.ir.errors import ArgumentError
from autoshard.ir.pipeline import Pipeline, PipelinePlan
from autoshard.passes.lower import auto_mesh
from autoshard.passes.pipeline.intra_stage import (IntraStagePlan, data_parallel_stages,
                                                   plan_intra_stage)
from autoshard.passes.pipeline.microbatches import choose_microbatches, data_parallel_axes
from autoshard.passes.pipeline.report import pipeline_report
from autoshard.passes.pipeline.stages import Slicing
from autoshard.passes.trace import function_name
from autoshard.progress import phase, report
from autoshard.runtime.pipeline import pipelined_value_and_grad

log = logging.getLogger("autoshard")


@dataclass(frozen=True)
class TracedPipeline:
    """What tracing one pipelined loss decided: the predicted ``plan``, where the loss was cut
    (``slicing``), and what runs inside each stage: the intra-stage plan (parameter layouts
    per layer), the data axes at its microbatch size, and the avals of the parameters and of
    one device's microbatch."""

    plan: PipelinePlan
    slicing: Slicing
    intra: IntraStagePlan
    data_axes: tuple[str, ...]
    param_avals: tuple[jax.ShapeDtypeStruct, ...]
    micro_avals: tuple[jax.ShapeDtypeStruct, ...]


@dataclass(frozen=True)
class PipelineContext:
    """What a pipelined step is traced under. ``intra_plans`` caches intra-stage plans by the
    shapes of parameters and batch (a step is traced again whenever it is lowered again);
    each traced loss appends its ``TracedPipeline`` to ``traced``."""

    mesh: Mesh
    pipeline: Pipeline
    hardware: Hardware
    intra_plans: dict = field(default_factory=dict)
    traced: list[TracedPipeline] = field(default_factory=list)
    solver_time_limit: float = 30.0


_context: contextvars.ContextVar[PipelineContext | None] = contextvars.ContextVar(
    "autoshard_pipeline", default=None)


@contextlib.contextmanager
def pipelining(context: PipelineContext) -> Iterator[None]:
    """Within the block, ``value_and_grad`` and ``grad`` pipeline their loss under ``context``."""
    token = _context.set(context)
    try:
        yield
    finally:
        _context.reset(token)


def value_and_grad(fun: Callable, argnums: int | Sequence[int] = 0, has_aux: bool = False
                   ) -> Callable:
    """``jax.value_and_grad`` that marks ``fun`` as the per-microbatch loss of a pipeline."""
    plain = jax.value_and_grad(fun, argnums=argnums, has_aux=has_aux)

    def wrapped(*args):
        context = _context.get()
        if context is None:
            return plain(*args)
        if has_aux:
            raise ArgumentError(f"autoshard.value_and_grad({function_name(fun)}, has_aux=True) "
                                "cannot be pipelined yet; return the loss only")
        return _pipelined(fun, argnums, args, context)

    wrapped.__name__ = f"value_and_grad({function_name(fun)})"
    return wrapped


def grad(fun: Callable, argnums: int | Sequence[int] = 0) -> Callable:
    """``jax.grad`` that marks ``fun`` as the per-microbatch loss of a pipeline."""
    vg = value_and_grad(fun, argnums)

    def wrapped(*args):
        return vg(*args)[1]

    wrapped.__name__ = f"grad({function_name(fun)})"
    return wrapped


def _pipelined(fun: Callable, argnums, args: Sequence[Any], context: PipelineContext):
    nums = (argnums,) if isinstance(argnums, int) else tuple(argnums)
    diff = [args[i] for i in nums]
    rest = [a for i, a in enumerate(args) if i not in nums]
    params, ptree = jax.tree.flatten(diff)
    batch, btree = jax.tree.flatten(rest)
    pipe = context.pipeline
    loss_name = f"autoshard.value_and_grad({function_name(fun)}) under {pipe}"
    if not batch:
        raise ArgumentError(f"{loss_name}: a pipelined loss needs batch arguments (the ones "
                            "not differentiated) to split into microbatches; pass the batch "
                            "to the loss")
    size = int(batch[0].shape[0]) if batch[0].shape else 0
    if any(not x.shape or x.shape[0] != size for x in batch):
        raise ArgumentError(f"{loss_name}: every argument not differentiated is split into "
                            "microbatches on its leading dim, so they need the same leading "
                            f"dim; got {[tuple(x.shape) for x in batch]}; close over the "
                            "others (e.g. a table) instead of passing them")
    mesh = auto_mesh(context.mesh)

    def flat_loss(p, b):
        inner = jax.tree.unflatten(ptree, p)
        others = iter(jax.tree.unflatten(btree, b))
        call = [inner[nums.index(i)] if i in nums else next(others) for i in range(len(args))]
        return fun(*call)

    intra = _intra_stage_plan(flat_loss, params, batch, mesh, pipe, context,
                              function_name(fun))
    cut = choose_microbatches(flat_loss, params, batch, mesh, pipe, context.hardware, intra,
                              what=function_name(fun), where=loss_name)
    slicing, data_axes, expansion = cut.slicing, cut.data_axes, cut.expansion
    microbatches = cut.microbatches
    replicas = int(np.prod([mesh.shape[a] for a in data_axes]))
    layered = [params[k] if layer is None else params[k][layer] for k, layer in expansion]
    if intra.tensor_parallel:   # a layer's layout is its stack's without the layer dim
        intra = replace(intra, param_specs=tuple(
            intra.param_specs[k] if layer is None else PartitionSpec(*intra.param_specs[k][1:])
            for k, layer in expansion))
    param_avals = tuple(jax.ShapeDtypeStruct(np.shape(p), p.dtype) for p in layered)
    micro_avals = tuple(jax.ShapeDtypeStruct((size // microbatches // replicas, *x.shape[1:]),
                                             x.dtype) for x in batch)
    batch_axes = data_parallel_axes(mesh, pipe.axis, size)
    if tuple(data_axes) != tuple(batch_axes):
        # the batch arrives split over more axes than a microbatch splits over (compile's
        # input sharding cannot know the microbatch): gather it over the others first, which
        # XLA's partitioner otherwise does by replicating the whole batch
        batch = [jax.lax.with_sharding_constraint(x, NamedSharding(
            mesh, PartitionSpec(tuple(data_axes)) if data_axes else PartitionSpec()))
            for x in batch]
    stash: dict = {}
    loss, layer_grads = pipelined_value_and_grad(
        slicing.chunks, layered, batch, mesh=mesh, stage_axis=pipe.axis, schedule=pipe.schedule,
        microbatches=microbatches, virtual=pipe.virtual_stages, data_axes=data_axes,
        param_specs=intra.param_specs, recompute=pipe.recompute, stash=stash)
    plan = pipeline_report(slicing, pipe, microbatches, context.mesh, context.hardware,
                           replace(intra, data_axes=tuple(data_axes)),
                           stash["activation_bytes"] + stash["residual_bytes"])
    context.traced.append(TracedPipeline(plan, slicing, intra, data_axes, param_avals,
                                         micro_avals))
    by_param: dict[int, list] = {}
    for (k, _), g in zip(expansion, layer_grads):
        by_param.setdefault(k, []).append(g)
    split = {k for k, layer in expansion if layer is not None}
    grads = [jnp.stack(by_param[k]) if k in split else by_param[k][0]
             for k in range(len(params))]
    grads = jax.tree.unflatten(ptree, grads)
    return loss, (grads[0] if isinstance(argnums, int) else tuple(grads))


def _intra_stage_plan(flat_loss, params, batch, mesh: Mesh, pipe: Pipeline,
                      context: PipelineContext, what: str) -> IntraStagePlan:
    """The ILP's intra-stage plan, once per parameter and batch shapes (a step is traced again
    when it is lowered again)."""
    if pipe.intra_stage == "data":
        return data_parallel_stages(mesh, pipe.axis)
    key = tuple((np.shape(x), str(x.dtype)) for x in (*params, *batch))
    if key not in context.intra_plans:
        start = time.perf_counter()
        phase("intra-stage plan", what)

        def progress(message: str) -> None:
            log.info("autoshard: pipeline %s: intra-stage plan: %s", what, message)
            report(message)

        plan = plan_intra_stage(flat_loss, params, batch, mesh, pipe.axis, context.hardware,
                                data_axes=pipe.data_axes,
                                time_limit=context.solver_time_limit, progress=progress)
        phase("pipelining", what)
        log.info("autoshard: pipeline %s: intra-stage plan in %.2fs: %s", what,
                 time.perf_counter() - start, plan.describe())
        context.intra_plans[key] = plan
    return context.intra_plans[key]
