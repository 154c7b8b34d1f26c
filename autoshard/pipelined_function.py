"""Pipelined train steps: ``autoshard.value_and_grad`` / ``autoshard.grad`` and
``autoshard.compile(..., pipeline=...)``.

The two wrappers mark the gradient-accumulation boundary: the function they wrap is what runs
per microbatch. Outside a pipelined ``compile`` they are ``jax.value_and_grad`` / ``jax.grad``,
so the same step runs anywhere. While ``compile`` traces a step with a pipeline, the wrapped
loss is traced on one microbatch, lifted, cut into chunks (passes/pipeline/stages.py), scheduled
(ir/pipeline_schedule.py, simulated by cost_model/pipeline_simulator.py) and executed by the SPMD runtime
(runtime/pipeline.py); everything around it (the optimizer update) runs after the pipeline,
partitioned by XLA. The arguments a wrapper differentiates are the parameters; its other
arguments are the batch, split into microbatches along their leading dim, and the loss must be
a mean over the batch (the pipeline averages the microbatch losses and gradients).

Inside a stage, the intra-operator ILP decides how the mesh's other axes are used
(passes/pipeline/intra_stage.py): the axes it splits the batch over are data parallel (explicit in the
runtime, gradients reduced once per step), and its parameter layouts over the remaining axes
(e.g. Megatron's column/row split) are applied as sharding constraints that XLA propagates
through each chunk. One plan serves every stage (it is made for the whole loss), and only
parameter layouts carry over: the rest of a stage's layout is XLA's propagation.
"""

from __future__ import annotations

import contextvars
import json
import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from autoshard.cost_model.collectives import collective_time
from autoshard.cost_model.hardware import Hardware
from autoshard.cost_model.pipeline_simulator import simulate
from autoshard.dump import trace_events
from autoshard.ir.errors import ArgumentError, PlanError
from autoshard.ir.mesh import MeshSpec
from autoshard.ir.pipeline import Pipeline, PipelinePlan, StageReport
from autoshard.passes.pipeline.intra_stage import IntraStagePlan, data_parallel_stages, plan_intra_stage
from autoshard.passes.lift import lift_jaxpr
from autoshard.passes.lower import auto_mesh
from autoshard.passes.pipeline.stages import Slicing, slice_loss
from autoshard.passes.trace import function_name
from autoshard.passes.pipeline.unroll import split_layer_params
from autoshard.measure.hlo import hlo_stats, measured_step
from autoshard.runtime.pipeline import (crossing_avals, pipelined_value_and_grad, state_layout,
                                        zero_axes)
from autoshard.measure.verify import device_positions, peak_memory

log = logging.getLogger("autoshard")

#: Backward work relative to forward: the gradient (2x), plus the forward when the runtime
#: recomputes it (``Pipeline(recompute=True)``).
BACKWARD_FACTOR = 2.0
RECOMPUTED_BACKWARD_FACTOR = 3.0


def backward_factor(pipe: Pipeline) -> float:
    return RECOMPUTED_BACKWARD_FACTOR if pipe.recompute else BACKWARD_FACTOR
#: Bytes an AdamW update moves per parameter byte: read parameter, gradient and two moments,
#: write parameter and moments (HBM-bound; the gradient stays in float32).
OPTIMIZER_BYTES_PER_PARAMETER_BYTE = 7.0
#: Seconds each pipeline tick costs beyond its compute (a kernel launch and the permutes' sync).
TICK_OVERHEAD = 10e-6


@dataclass
class _PipelineContext:
    mesh: Mesh
    pipeline: Pipeline
    hardware: Hardware
    plans: list = field(default_factory=list)
    slicings: list = field(default_factory=list)
    intra_plans: dict = field(default_factory=dict)   # (shapes of params, batch) -> plan
    stages_inside: list = field(default_factory=list)  # _Inside of each traced pipeline
    solver_time_limit: float = 30.0


_context: contextvars.ContextVar[_PipelineContext | None] = contextvars.ContextVar(
    "autoshard_pipeline", default=None)


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


def _pipelined(fun: Callable, argnums, args: Sequence[Any], context: _PipelineContext):
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

    def sliced(microbatches: int) -> tuple[Slicing, tuple[str, ...], tuple]:
        """The loss cut for ``microbatches``, the data axes they split over, and which layer
        of which parameter each of the slicing's parameters is (``split_layer_params``)."""
        data_axes = intra.data_axes_for(mesh, size // microbatches)
        replicas = int(np.prod([mesh.shape[a] for a in data_axes])) if data_axes else 1
        micro = [jax.ShapeDtypeStruct((size // microbatches // replicas, *x.shape[1:]), x.dtype)
                 for x in batch]
        avals = [jax.ShapeDtypeStruct(np.shape(p), p.dtype) for p in params]
        traced = jax.make_jaxpr(flat_loss)(avals, micro)
        # scanned layer stacks unrolled, a stacked parameter split into its layers
        unrolled, expansion = split_layer_params(traced, range(len(params)))
        graph = lift_jaxpr(unrolled)
        return slice_loss(graph, len(expansion), pipe.chunks, context.hardware,
                          what=function_name(fun)), data_axes, expansion

    candidates = [m for m in range(1, size + 1) if size % m == 0 and (
        pipe.schedule != "interleaved" or m % pipe.stages == 0)]
    # microbatches that still split over every other axis keep the stages data parallel
    full = int(np.prod([mesh.shape[a] for a in intra.data_axes]))
    parallel = [m for m in candidates if (size // m) % full == 0]
    if pipe.microbatches is not None:
        microbatches = pipe.microbatches
        if size % microbatches:
            raise ArgumentError(f"{loss_name}: microbatches={microbatches} must divide "
                                f"the batch of {size}; pick a divisor, or microbatches=None "
                                "for the planner to choose")
        if microbatches not in candidates:
            raise ArgumentError(f"{loss_name}: the interleaved schedule needs "
                                f"microbatches ({microbatches}) to be a multiple of the "
                                f"{pipe.stages} stages; pick one, or microbatches=None for "
                                "the planner to choose")
        slicing, data_axes, expansion = sliced(microbatches)
    else:
        if not candidates:
            raise ArgumentError(f"{loss_name}: no microbatch count divides the batch "
                                f"of {size} into a multiple of {pipe.stages} microbatches; "
                                "use a batch divisible by the stages, or another schedule")
        choices = parallel or candidates
        first = choices[0]
        slicing, data_axes, expansion = sliced(first)
        microbatches = min(choices, key=lambda m: pipeline_report(
            _rescaled(slicing, first / m), pipe, m, mesh, context.hardware,
            intra).total_seconds)
        if microbatches != first:
            slicing, data_axes, expansion = sliced(microbatches)
    context.slicings.append(slicing)
    replicas = int(np.prod([mesh.shape[a] for a in data_axes]))
    layered = [params[k] if layer is None else params[k][layer] for k, layer in expansion]
    if intra.tensor_parallel:   # a layer's layout is its stack's without the layer dim
        intra = replace(intra, param_specs=tuple(
            intra.param_specs[k] if layer is None else PartitionSpec(*intra.param_specs[k][1:])
            for k, layer in expansion))
    context.stages_inside.append(_Inside(
        intra, data_axes,
        tuple(jax.ShapeDtypeStruct(np.shape(p), p.dtype) for p in layered),
        tuple(jax.ShapeDtypeStruct((size // microbatches // replicas, *x.shape[1:]), x.dtype)
              for x in batch)))
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
    context.plans.append(pipeline_report(slicing, pipe, microbatches, context.mesh,
                                         context.hardware,
                                         replace(intra, data_axes=tuple(data_axes)),
                                         stash["activation_bytes"] + stash["residual_bytes"]))
    by_param: dict[int, list] = {}
    for (k, _), g in zip(expansion, layer_grads):
        by_param.setdefault(k, []).append(g)
    split = {k for k, layer in expansion if layer is not None}
    grads = [jnp.stack(by_param[k]) if k in split else by_param[k][0]
             for k in range(len(params))]
    grads = jax.tree.unflatten(ptree, grads)
    return loss, (grads[0] if isinstance(argnums, int) else tuple(grads))


@dataclass(frozen=True)
class _Inside:
    """What a traced pipeline runs inside each stage: the intra-stage plan, the data axes used
    at its microbatch size, and the avals of the parameters and of one device's microbatch."""

    intra: IntraStagePlan
    data_axes: tuple[str, ...]
    param_avals: tuple[jax.ShapeDtypeStruct, ...]
    micro_avals: tuple[jax.ShapeDtypeStruct, ...]


def _intra_stage_plan(flat_loss, params, batch, mesh: Mesh, pipe: Pipeline,
                      context: _PipelineContext, what: str) -> IntraStagePlan:
    """The ILP's intra-stage plan, once per parameter and batch shapes (a step is traced again
    when it is lowered again)."""
    if pipe.intra_stage == "data":
        return data_parallel_stages(mesh, pipe.axis)
    key = tuple((np.shape(x), str(x.dtype)) for x in (*params, *batch))
    if key not in context.intra_plans:
        start = time.perf_counter()
        plan = plan_intra_stage(flat_loss, params, batch, mesh, pipe.axis, context.hardware,
                                data_axes=pipe.data_axes,
                                time_limit=context.solver_time_limit)
        log.info("autoshard: pipeline %s: intra-stage plan in %.2fs: %s", what,
                 time.perf_counter() - start, plan.describe())
        context.intra_plans[key] = plan
    return context.intra_plans[key]


def data_parallel_axes(mesh: Mesh, stage_axis: str, microbatch: int) -> tuple[str, ...]:
    """The non-stage axes a microbatch is split over: all of them, dropping the last ones
    until their device count divides the microbatch."""
    return data_parallel_stages(mesh, stage_axis).data_axes_for(mesh, microbatch)


# -- choosing and reporting -----------------------------------------------------------------------

def _rescaled(slicing: Slicing, factor: float) -> Slicing:
    """The slicing's per-microbatch costs for microbatches ``factor`` times as large (compute
    and activations scale with the microbatch)."""
    return replace(slicing, forward_seconds=tuple(t * factor for t in slicing.forward_seconds),
                   matmul_flops=tuple(f * factor for f in slicing.matmul_flops),
                   crossing_bytes=tuple(int(b * factor) for b in slicing.crossing_bytes))


def pipeline_report(slicing: Slicing, pipe: Pipeline, microbatches: int, mesh: Mesh,
                    hw: Hardware, intra: IntraStagePlan | None = None,
                    stashed_bytes: int | None = None) -> PipelinePlan:
    """Simulate the sliced loss (sliced at one device's share of a microbatch, so its chunk
    times are per device and microbatch); permutes cross the stage axis. A stage's
    activation bytes are ``stashed_bytes`` when the runtime has laid out its stashes (the
    same on every device of the SPMD program), else its simulated microbatches in flight
    times the widest crossing. With a
    tensor-parallel ``intra`` plan a chunk's time is divided over its model axes' devices,
    and the collectives that layout costs inside the chunk are left out: the report is a
    prediction, ``PipelinedFunction.roofline`` measures them."""
    spec = MeshSpec.from_jax(mesh)
    stage_index = spec.index(pipe.axis)
    others = spec.num_devices // spec.axis_sizes[stage_index]
    model_devices = 1
    if intra is not None and intra.tensor_parallel:
        model_devices = int(np.prod([mesh.shape[a] for a in intra.model_axes]))
    forward = [t / model_devices for t in slicing.forward_seconds]
    backward = [backward_factor(pipe) * f for f in forward]
    crossing = max(slicing.crossing_bytes, default=0)
    sim = _simulated(slicing, pipe, microbatches, spec, hw, forward, TICK_OVERHEAD)
    stages = []
    for d in range(pipe.stages):
        chunks = [c for c in range(pipe.chunks) if c % pipe.stages == d]
        stages.append(StageReport(
            f"stage {d}", tuple(slicing.chunks[c].label for c in chunks),
            sum(forward[c] for c in chunks), sum(backward[c] for c in chunks),
            int(sum(slicing.parameter_bytes[c] for c in chunks)),
            int(sim.in_flight[d] * crossing) if stashed_bytes is None else stashed_bytes))
    timeline = tuple((t.device, f"{t.op.kind}{t.op.microbatch} c{t.op.chunk}", t.start, t.end)
                     for t in sim.ops)
    other_axes = tuple(i for i in range(spec.ndim) if i != stage_index)
    stage_bytes = max((s.parameter_bytes for s in stages), default=0)
    total_bytes = stage_bytes * pipe.stages
    # the runtime's parameter and gradient exchange (runtime/pipeline.py): a stage gathers its
    # parameters' ZeRO pieces, reduce-scatters its gradients into pieces and all-gathers the
    # pieces across stages; the optimizer updates a 1/others share per device
    sync = (collective_time(hw, spec, "all-gather", stage_bytes, other_axes)
            + collective_time(hw, spec, "reduce-scatter", stage_bytes, other_axes)
            + collective_time(hw, spec, "all-gather", total_bytes / others, (stage_index,)))
    update = OPTIMIZER_BYTES_PER_PARAMETER_BYTE * total_bytes / others / hw.memory_rate
    return PipelinePlan(tuple(stages), pipe.schedule, microbatches, pipe.virtual_stages,
                        sim.step_seconds, sim.bubble_fraction, timeline, sync + update,
                        intra.describe() if intra is not None else "")


def _simulated(slicing: Slicing, pipe: Pipeline, microbatches: int, spec: MeshSpec,
               hw: Hardware, forward: list[float], tick_overhead: float):
    """The schedule with chunk forward times ``forward`` (backward ``backward_factor`` x),
    each transfer a permute of the widest crossing over the stage axis plus
    ``tick_overhead``."""
    link = collective_time(hw, spec, "collective-permute",
                           max(slicing.crossing_bytes, default=0), (spec.index(pipe.axis),))
    return simulate(pipe.schedule, pipe.stages, microbatches, pipe.virtual_stages, forward,
                    [backward_factor(pipe) * f for f in forward], link + tick_overhead)


def auto_pipeline_candidates(mesh: Mesh) -> list[tuple[Mesh, list[Pipeline]]]:
    """The pipelines ``"auto"`` weighs, one group per stage count, the first group the
    mesh's own: over the axis named ``"stage"`` if the mesh has one (and only that), else
    over its first axis of size > 1 (on multi-node profiles the first axis is the one that
    crosses nodes), renamed ``"stage"`` on the same devices; each schedule (interleaved with
    two virtual stages), microbatches by simulation. Without a ``"stage"`` axis the devices
    are also factored into every other stage count ``s`` x the rest (a ``("stage",
    "inner")`` mesh over the same devices in the same order, so stages stay on consecutive
    devices and nodes): those groups hold the 1F1B schedule, which ``_compile_pipelined``
    replaces by the first group's best predicted schedule."""
    names = list(mesh.axis_names)
    if "stage" in names:
        axis = "stage"
    else:
        axis = next((a for a in names if int(mesh.shape[a]) > 1), None)
        if axis is None:
            return []
        names[names.index(axis)] = "stage"
    own = Mesh(mesh.devices, tuple(names), axis_types=mesh.axis_types)
    stages = int(own.shape["stage"])
    groups = []
    if stages >= 2:
        groups.append((own, [Pipeline(stages, None, "1f1b"), Pipeline(stages, None, "gpipe"),
                             Pipeline(stages, None, "interleaved", virtual_stages=2)]))
    if "stage" in mesh.axis_names:
        return groups
    devices = mesh.devices.flatten()
    for count in range(2, devices.size + 1):
        if devices.size % count or count == stages:
            continue
        rest = devices.size // count
        shape, axes = ((count, rest), ("stage", "inner")) if rest > 1 else ((count,), ("stage",))
        factored = Mesh(devices.reshape(shape), axes,
                        axis_types=(mesh.axis_types[0],) * len(axes))
        groups.append((factored, [Pipeline(count, None, "1f1b")]))
    return groups


@dataclass(frozen=True)
class PipelineRoofline:
    """``PipelinedFunction.roofline``: the simulated tick loop (matmuls and activation
    permutes), the collectives outside it, the simulated bubble, the compiled peak memory."""

    pipeline_seconds: float
    outside_seconds: float
    bubble_fraction: float
    peak_bytes: int

    @property
    def step_seconds(self) -> float:
        return self.pipeline_seconds + self.outside_seconds


# -- compile --------------------------------------------------------------------------------------

class PipelinedFunction:
    """A train step whose ``autoshard.value_and_grad`` loss runs as a pipeline; behaves like
    ``jax.jit(step)``. ``pipeline_plan`` reports stages, per-stage time and memory and the
    simulated bubble."""

    def __init__(self, fn: Callable, example_args: Sequence[Any], *, mesh: Mesh,
                 pipeline: Pipeline, hardware: Hardware, donate_argnums: tuple[int, ...],
                 static_argnums: tuple[int, ...], batch_argnums: tuple[int, ...] | None,
                 solver_time_limit: float = 30.0, intra_plans: dict | None = None):
        self._fn = fn
        self.__name__ = function_name(fn)
        if pipeline.axis not in mesh.axis_names:
            raise ArgumentError(
                f"autoshard.compile({self.__name__}, pipeline={pipeline}): the mesh has axes "
                f"{mesh.axis_names}; a pipeline needs an axis named {pipeline.axis!r} of size "
                f"{pipeline.stages} (e.g. jax.make_mesh(({pipeline.stages}, ...), "
                f"({pipeline.axis!r}, ...)))")
        if int(mesh.shape[pipeline.axis]) != pipeline.stages:
            raise ArgumentError(f"autoshard.compile({self.__name__}): mesh axis "
                                f"{pipeline.axis!r} has size {mesh.shape[pipeline.axis]}, the "
                                f"pipeline asks for {pipeline.stages} stages; ask for "
                                f"Pipeline({mesh.shape[pipeline.axis]}, ...) or make the "
                                f"mesh's {pipeline.axis!r} axis {pipeline.stages} long")
        unknown = [a for a in pipeline.data_axes or () if a not in mesh.axis_names]
        if unknown:
            raise ArgumentError(f"autoshard.compile({self.__name__}, pipeline={pipeline}): "
                                f"data_axes {unknown} are not axes of the mesh "
                                f"{tuple(mesh.axis_names)}; name some of "
                                f"{zero_axes(mesh, pipeline.axis)[0]}, or leave "
                                "data_axes=None for the planner to choose")
        self.mesh, self.pipeline, self.hardware = mesh, pipeline, hardware
        self._solver_time_limit = solver_time_limit
        self._statics = static_argnums
        dynamic = [i for i in range(len(example_args)) if i not in static_argnums]
        batch = batch_argnums if batch_argnums is not None else dynamic[-1:]
        auto = auto_mesh(mesh)
        others, ways = zero_axes(mesh, pipeline.axis)

        def in_sharding(i, arg):
            if i not in batch:   # parameters and optimizer state: split like ZeRO
                return jax.tree.map(lambda x: NamedSharding(
                    auto, state_layout(np.shape(x), others, ways)), arg)
            return jax.tree.map(lambda x: _batch_sharding(x, auto, pipeline.axis), arg)

        self._in_shardings = tuple(in_sharding(i, a) for i, a in enumerate(example_args)
                                   if i not in static_argnums)
        self._jitted = jax.jit(self._traced_step, static_argnums=static_argnums,
                               donate_argnums=donate_argnums)
        start = time.perf_counter()
        self._plans: list[PipelinePlan] = []
        self._slicings: list[Slicing] = []
        # intra-stage plans by shapes; a dict shared between pipelines of one step is planned
        # once for all of them
        self._intra_plans: dict = {} if intra_plans is None else intra_plans
        self._inside: list[_Inside] = []
        self.lower(*example_args)
        self.planning_seconds = time.perf_counter() - start
        if not self._plans:
            raise PlanError(f"autoshard.compile({self.__name__}, pipeline=...): the step never "
                            "called autoshard.value_and_grad or autoshard.grad, so there is no "
                            "loss to pipeline; wrap the loss in one of them")
        log.info("autoshard: pipelined %s in %.2fs\n%s", self.__name__, self.planning_seconds,
                 self.pipeline_plan.summary())

    @property
    def pipeline_plan(self) -> PipelinePlan:
        return self._plans[-1]

    @property
    def slicing(self) -> Slicing:
        """Where the loss was cut (chunks, per-chunk forward seconds and matmul FLOPs)."""
        return self._slicings[-1]

    def roofline(self, *args) -> "PipelineRoofline":
        """The plan-quality benchmark's step measure, applied to this pipeline (module
        docstring of benchmarks/pipeline.py): a roofline of the HLO cannot see which tick
        waits for which, so the schedule is simulated with each chunk's matmul FLOPs at the
        profile's matmul rate (backward ``backward_factor`` x forward) and one permute of
        the crossing activation per transfer; the collectives outside the tick loop (the
        gradient exchange) are read from the compiled HLO and priced on the profile's links.
        Peak memory is the executable's."""
        compiled = self.lower(*args).compile()
        slicing, inside = self.slicing, self._inside[-1]
        stats = hlo_stats(compiled.as_text())
        if inside.intra.tensor_parallel:
            # the model-axis collectives run inside the chunks, priced with them below
            model_only = _model_axis_groups(self.mesh, inside.intra.model_axes)
            stats.collectives = [(c, n) for c, n in stats.collectives if not model_only(c)]
            forward = self._chunk_forward_seconds(inside)
        else:
            rate = self.hardware.matmul_rate(slicing.dtype)
            forward = [f / rate for f in slicing.matmul_flops]
        outside = measured_step(stats, self.hardware, device_positions(self.mesh))
        sim = _simulated(slicing, self.pipeline, self.pipeline_plan.microbatches,
                         MeshSpec.from_jax(self.mesh), self.hardware, forward, 0.0)
        return PipelineRoofline(sim.step_seconds, sum(
            t for kind, t in outside.collective_seconds.items()
            if kind != "collective-permute"), sim.bubble_fraction, peak_memory(compiled))

    def _chunk_forward_seconds(self, inside: "_Inside") -> list[float]:
        """Each chunk's forward compiled alone on one model-axis group with the intra-stage
        parameter layouts, measured like a flat plan (matmul FLOPs + collectives)."""
        names = self.mesh.axis_names
        model = inside.intra.model_axes
        devices = self.mesh.devices[tuple(slice(None) if n in model else 0 for n in names)]
        group = Mesh(devices, tuple(n for n in names if n in model))
        positions = device_positions(self.mesh)
        specs = inside.intra.param_specs
        crossing = crossing_avals(self.slicing.chunks, list(inside.param_avals),
                                   list(inside.micro_avals))
        replicated = NamedSharding(group, PartitionSpec())
        seconds = []
        for c, chunk in enumerate(self.slicing.chunks):
            ps = [jax.ShapeDtypeStruct(inside.param_avals[i].shape, inside.param_avals[i].dtype,
                                       sharding=NamedSharding(group, specs[i]))
                  for i in chunk.params]
            data = [jax.ShapeDtypeStruct(inside.micro_avals[i].shape,
                                         inside.micro_avals[i].dtype, sharding=replicated)
                    for i in chunk.batch]
            xs = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated)
                  for a in (crossing[c - 1] if c else [])]
            compiled = jax.jit(chunk.fn).lower(ps, data, xs).compile()
            seconds.append(measured_step(hlo_stats(compiled.as_text()), self.hardware,
                                         positions).step_seconds)
        return seconds

    def save_trace(self, path) -> None:
        """The simulated schedule as Chrome trace events (open in Perfetto or xprof)."""
        with open(path, "w") as f:
            json.dump(trace_events(self.pipeline_plan.to_json()), f)

    def _traced_step(self, *args):
        context = _PipelineContext(self.mesh, self.pipeline, self.hardware, self._plans,
                                   self._slicings, self._intra_plans, self._inside,
                                   self._solver_time_limit)
        token = _context.set(context)
        try:
            return self._fn(*args)
        finally:
            _context.reset(token)

    def _placed(self, args):
        out, shardings = list(args), iter(self._in_shardings)
        for i, a in enumerate(args):
            if i in self._statics:
                continue
            out[i] = jax.tree.map(_placed_leaf, a, next(shardings))
        return out

    def lower(self, *args):
        return self._jitted.lower(*self._placed(args))

    def __call__(self, *args):
        return self._jitted(*self._placed(args))

    def __repr__(self):
        return f"<autoshard.PipelinedFunction {self.__name__} {self.pipeline}>"


def _model_axis_groups(mesh: Mesh, model_axes: tuple[str, ...]):
    """A predicate: does a collective run over model axes only (its groups' devices differ
    in no other mesh coordinate)?"""
    coords = {d.id: np.array(i) for i, d in np.ndenumerate(mesh.devices)}
    other = np.array([n not in model_axes for n in mesh.axis_names])

    def model_only(collective) -> bool:
        return all(len({tuple(coords[d][other]) for d in group if d in coords}) <= 1
                   for group in collective.groups)
    return model_only


def _placed_leaf(x, sharding: NamedSharding):
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    return jax.device_put(x, sharding)


def _batch_sharding(x, mesh: Mesh, stage_axis: str) -> NamedSharding:
    shape = np.shape(x)
    axes = data_parallel_axes(mesh, stage_axis, shape[0]) if shape else ()
    return NamedSharding(mesh, PartitionSpec(axes) if axes else PartitionSpec())

