"""``autoshard.compile(step, ..., pipeline=...)``: ``PipelinedFunction``, a train step whose
``autoshard.value_and_grad`` loss runs as a pipeline over the mesh's stage axis.

It jits the step with parameters and optimizer state split like ZeRO over the non-stage axes
and the batch over the data axes, and traces it under a ``PipelineContext`` so that the loss's
wrapper (gradients.py) plans and pipelines it; everything around the loss (the optimizer
update) runs after the pipeline, partitioned by XLA. It reports the predicted plan
(``pipeline_plan``) and measures the compiled step (``roofline``): a roofline of the HLO cannot
see which tick waits for which, so the tick loop is simulated and only what runs outside it is
read from the HLO.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from autoshard.cost_model.hardware import Hardware
from autoshard.dump import trace_events
from autoshard.gradients import PipelineContext, TracedPipeline, pipelining
from autoshard.ir.errors import ArgumentError, PlanError
from autoshard.ir.mesh import MeshSpec
from autoshard.ir.pipeline import Pipeline, PipelinePlan
from autoshard.measure.hlo import hlo_stats, measured_step
from autoshard.measure.verify import device_positions, peak_memory
from autoshard.passes.lower import auto_mesh
from autoshard.passes.pipeline.microbatches import data_parallel_axes
from autoshard.passes.pipeline.report import simulated_schedule
from autoshard.passes.pipeline.stages import Slicing
from autoshard.passes.trace import function_name
from autoshard.progress import planning
from autoshard.runtime.parameter_stores import state_layout, zero_axes
from autoshard.runtime.pipeline import crossing_avals

log = logging.getLogger("autoshard")


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


class PipelinedFunction:
    """A train step whose ``autoshard.value_and_grad`` loss runs as a pipeline; behaves like
    ``jax.jit(step)``. ``pipeline_plan`` reports stages, per-stage time and memory and the
    simulated bubble."""

    def __init__(self, fn: Callable, example_args: Sequence[Any], *, mesh: Mesh,
                 pipeline: Pipeline, hardware: Hardware, donate_argnums: tuple[int, ...],
                 static_argnums: tuple[int, ...], batch_argnums: tuple[int, ...] | None,
                 solver_time_limit: float = 30.0, intra_plans: dict | None = None,
                 progress: bool = True):
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
        # one record per traced loss, the last one reported
        self._traced: list[TracedPipeline] = []
        # intra-stage plans by shapes; a dict shared between pipelines of one step is planned
        # once for all of them
        self._intra_plans: dict = {} if intra_plans is None else intra_plans
        with planning(f"{self.__name__} ({pipeline.stages} stages, {pipeline.schedule})",
                      progress):
            self.lower(*example_args)
        self.planning_seconds = time.perf_counter() - start
        if not self._traced:
            raise PlanError(f"autoshard.compile({self.__name__}, pipeline=...): the step never "
                            "called autoshard.value_and_grad or autoshard.grad, so there is no "
                            "loss to pipeline; wrap the loss in one of them")
        log.info("autoshard: pipelined %s in %.2fs\n%s", self.__name__, self.planning_seconds,
                 self.pipeline_plan.summary())

    @property
    def pipeline_plan(self) -> PipelinePlan:
        return self._traced[-1].plan

    @property
    def plan(self) -> PipelinePlan:
        """``pipeline_plan``, under the name every compiled step has (``autoshard.Step``)."""
        return self.pipeline_plan

    def summary(self) -> str:
        """The pipeline plan as text (``PipelinePlan.summary``)."""
        return self.pipeline_plan.summary()

    @property
    def slicing(self) -> Slicing:
        """Where the loss was cut (chunks, per-chunk forward seconds and matmul FLOPs)."""
        return self._traced[-1].slicing

    def roofline(self, *args) -> "PipelineRoofline":
        """The plan-quality benchmark's step measure, applied to this pipeline (module
        docstring of benchmarks/pipeline.py): a roofline of the HLO cannot see which tick
        waits for which, so the schedule is simulated with each chunk's matmul FLOPs at the
        profile's matmul rate (backward ``backward_factor`` x forward) and one permute of
        the crossing activation per transfer; the collectives outside the tick loop (the
        gradient exchange) are read from the compiled HLO and priced on the profile's links.
        Peak memory is the executable's."""
        compiled = self.lower(*args).compile()
        slicing, inside = self.slicing, self._traced[-1]
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
        sim = simulated_schedule(slicing, self.pipeline, self.pipeline_plan.microbatches,
                                 MeshSpec.from_jax(self.mesh), self.hardware, forward, 0.0)
        return PipelineRoofline(sim.step_seconds, sum(
            t for kind, t in outside.collective_seconds.items()
            if kind != "collective-permute"), sim.bubble_fraction, peak_memory(compiled))

    def _chunk_forward_seconds(self, inside: TracedPipeline) -> list[float]:
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
        context = PipelineContext(self.mesh, self.pipeline, self.hardware,
                                  intra_plans=self._intra_plans, traced=self._traced,
                                  solver_time_limit=self._solver_time_limit)
        with pipelining(context):
            return self._fn(*args)

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

