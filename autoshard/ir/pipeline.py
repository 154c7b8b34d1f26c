"""Pipeline values: the user's request (``Pipeline``), one chunk of a cut loss function
(``Chunk``, what the runtime executes) and the pipeline half of a plan (``PipelinePlan``).
"""

from __future__ import annotations

import math

from dataclasses import dataclass
from typing import Callable

from autoshard.ir.errors import ArgumentError
from autoshard.ir.pipeline_schedule import SCHEDULES

ChunkFn = Callable[[list, list, list], list]
#: How the mesh axes other than the stage axis are used inside a stage.
INTRA_STAGE = ("plan", "data")


@dataclass(frozen=True)
class Pipeline:
    """``autoshard.compile(..., pipeline=autoshard.Pipeline(stages, microbatches, schedule))``.

    The mesh needs an axis named ``axis`` (default ``"stage"``) of size ``stages``; the loss
    wrapped in ``autoshard.value_and_grad`` / ``autoshard.grad`` is cut into ``stages *
    virtual_stages`` chunks, chunk ``c`` on stage ``c % stages``, and runs per microbatch.
    ``microbatches=None`` lets the planner choose. ``intra_stage="plan"`` lets the ILP split
    the mesh's other axes into data axes and model axes with a parameter layout
    (passes/pipeline/intra_stage.py), or only lay out the parameters over the axes not in
    ``data_axes`` when those are given; ``"data"`` keeps every other axis data parallel.
    A chunk's forward keeps its vjp residuals for the backward (memory per microbatch in
    flight); ``recompute=True`` keeps only the chunk's input and recomputes the forward in the
    backward (a third more matmul work)."""

    stages: int
    microbatches: int | None = None
    schedule: str = "1f1b"
    virtual_stages: int = 1
    axis: str = "stage"
    intra_stage: str = "plan"
    data_axes: tuple[str, ...] | None = None
    recompute: bool = False

    def __post_init__(self):
        if not isinstance(self.stages, int) or self.stages < 1:
            raise ArgumentError(f"Pipeline(stages={self.stages!r}): stages must be an int >= 1")
        if self.microbatches is not None and (not isinstance(self.microbatches, int)
                                              or self.microbatches < 1):
            raise ArgumentError(f"Pipeline(microbatches={self.microbatches!r}): an int >= 1 "
                                "or None (the planner chooses)")
        if self.schedule not in SCHEDULES:
            raise ArgumentError(f"Pipeline(schedule={self.schedule!r}): one of {SCHEDULES}")
        if not isinstance(self.virtual_stages, int) or self.virtual_stages < 1:
            raise ArgumentError(f"Pipeline(virtual_stages={self.virtual_stages!r}): an int >= 1")
        if self.intra_stage not in INTRA_STAGE:
            raise ArgumentError(f"Pipeline(intra_stage={self.intra_stage!r}): one of "
                                f"{INTRA_STAGE}")
        if self.data_axes is not None:
            if isinstance(self.data_axes, str) or not all(
                    isinstance(a, str) for a in self.data_axes):
                raise ArgumentError(f"Pipeline(data_axes={self.data_axes!r}): a tuple of mesh "
                                    "axis names, e.g. ('data',)")
            if self.intra_stage != "plan":
                raise ArgumentError("Pipeline(data_axes=...) names the data axes of an "
                                    "intra-stage plan; it needs intra_stage='plan'")
            if self.axis in self.data_axes:
                raise ArgumentError(f"Pipeline(data_axes={self.data_axes!r}) includes the "
                                    f"stage axis {self.axis!r}")
            object.__setattr__(self, "data_axes", tuple(self.data_axes))
        if self.virtual_stages > 1 and self.schedule != "interleaved":
            raise ArgumentError(f"Pipeline(virtual_stages={self.virtual_stages}) needs "
                                "schedule='interleaved'")

    @property
    def chunks(self) -> int:
        return self.stages * self.virtual_stages


@dataclass(frozen=True)
class Chunk:
    """One pipeline chunk: ``fn(params, batch, crossing_in) -> crossing_out`` (the last chunk
    returns ``[loss]``); ``params`` index the differentiated leaves it reads, ``batch`` the
    microbatch leaves."""

    fn: ChunkFn
    params: tuple[int, ...]
    batch: tuple[int, ...]
    label: str = ""


@dataclass(frozen=True)
class StageReport:
    """One pipeline stage (device group) of a plan: its chunks' forward / backward seconds per
    microbatch, parameter bytes, and the bytes per device of its activation, cotangent and
    residual stashes (what the runtime allocates)."""

    name: str
    chunks: tuple[str, ...]
    forward_seconds: float
    backward_seconds: float
    parameter_bytes: int
    activation_bytes: int


@dataclass(frozen=True)
class PipelinePlan:
    """The inter-operator half of a plan: stages, schedule, microbatches, the simulated step
    (``step_seconds``, ``bubble_fraction``) and its timeline ``(stage, label, start, end)``."""

    stages: tuple[StageReport, ...]
    schedule: str
    microbatches: int
    virtual_stages: int
    step_seconds: float
    bubble_fraction: float
    timeline: tuple[tuple[int, str, float, float], ...] = ()
    outside_seconds: float = 0.0
    intra_stage: str = ""

    @property
    def total_seconds(self) -> float:
        """The simulated pipeline plus what runs outside it (gradient all-reduce over the
        other mesh axes, the optimizer update)."""
        return self.step_seconds + self.outside_seconds

    def summary(self) -> str:
        lines = [f"pipeline: {len(self.stages)} stages x {self.virtual_stages} virtual, "
                 f"{self.microbatches} microbatches, {self.schedule}; simulated step "
                 f"{self.step_seconds * 1e3:.3f} ms, bubble {self.bubble_fraction:.1%}, "
                 f"+ {self.outside_seconds * 1e3:.3f} ms outside the pipeline"]
        if self.intra_stage:
            lines.append(f"  inside each stage: {self.intra_stage}")
        for s in self.stages:
            lines.append(f"  {s.name}: {', '.join(s.chunks)}; fwd {s.forward_seconds * 1e6:.1f} "
                         f"us, bwd {s.backward_seconds * 1e6:.1f} us per microbatch; params "
                         f"{s.parameter_bytes / 2**20:.2f} MiB, stashed activations "
                         f"(with residuals) {s.activation_bytes / 2**20:.2f} MiB per device")
        return "\n".join(lines)

    def to_json(self) -> dict:
        """The ``pipeline`` section of plan.json (autoshard.dump)."""
        return {"schedule": self.schedule, "microbatches": self.microbatches,
                "virtual_stages": self.virtual_stages, "step_seconds": self.step_seconds,
                "bubble_fraction": self.bubble_fraction, "outside_seconds": self.outside_seconds,
                "intra_stage": self.intra_stage,
                "stages": [{"name": s.name, "chunks": list(s.chunks),
                            "forward_seconds": s.forward_seconds,
                            "backward_seconds": s.backward_seconds,
                            "parameter_bytes": s.parameter_bytes,
                            "activation_bytes": s.activation_bytes} for s in self.stages],
                "timeline": [{"stage": d, "name": label, "start": start, "end": end}
                             for d, label, start, end in self.timeline]}


@dataclass(frozen=True)
class AutoDecision:
    """What ``pipeline="auto"`` weighed: the pipelined step and the step planned without a
    pipeline, each predicted by the cost model and measured on its compiled executable the
    way the plan-quality benchmark measures (seconds per step). The measured times decide,
    among the candidates that fit ``memory_budget`` (compiled peak bytes per device): the flat
    plan's prediction can be far from what XLA compiles (it reshards where the plan did not),
    and the pipeline's prediction prices the optimizer update the measure leaves out.
    ``schedules`` lists the pipelines weighed, ``(stages, schedule, virtual_stages,
    microbatches, predicted seconds, measured seconds)``; ``pipeline`` is the one measured
    fastest among those that fit. ``unmeasured`` lists pipelines over other stage counts
    that the simulator predicted slower than every pipeline over the mesh's own axis, so they
    were not compiled, ``(stages, schedule, virtual_stages, microbatches, predicted
    seconds)``. ``flat_candidates`` are the plans without a pipeline, ``(plan method,
    measured seconds, peak bytes)``; the ``flat_*`` fields describe the fastest that fits
    (``flat_method``), ``flat_predicted`` is NaN when it has no cost-model prediction."""

    pipeline: Pipeline
    pipelined_predicted: float
    flat_predicted: float
    pipelined_measured: float
    flat_measured: float
    schedules: tuple[tuple[str, int, int, float, float], ...] = ()
    pipelined_peak_bytes: int = 0
    flat_peak_bytes: int = 0
    memory_budget: int | None = None
    flat_method: str = ""
    flat_candidates: tuple[tuple[str, float, int], ...] = ()
    unmeasured: tuple[tuple[int, str, int, int, float], ...] = ()

    @property
    def pipelined_fits(self) -> bool:
        return self.memory_budget is None or self.pipelined_peak_bytes <= self.memory_budget

    @property
    def flat_fits(self) -> bool:
        return self.memory_budget is None or self.flat_peak_bytes <= self.memory_budget

    @property
    def pipelined(self) -> bool:
        return self.pipelined_fits and (not self.flat_fits
                                        or self.pipelined_measured < self.flat_measured)

    def summary(self) -> str:
        flats = ", ".join(f"{method} {t * 1e3:.3f} ms" for method, t, _ in
                          self.flat_candidates) or self.flat_method
        tried = ", ".join(f"{n} stages {s} x{v} M={m} {measured * 1e3:.3f} ms "
                          f"({t * 1e3:.3f} predicted)"
                          for n, s, v, m, t, measured in self.schedules)
        if self.unmeasured:
            tried += "; predicted slower, not compiled: " + ", ".join(
                f"{n} stages {s} x{v} M={m} ({t * 1e3:.3f} predicted)"
                for n, s, v, m, t in self.unmeasured)
        over = "" if self.pipelined_fits else (
            f"; the pipeline's peak {_size(self.pipelined_peak_bytes)} exceeds the "
            f"budget {_size(self.memory_budget)}")
        return (f"pipeline='auto': measured {tried}; pipelined ({self.pipeline.schedule} x"
                f"{self.pipeline.virtual_stages}, {self.pipeline.stages} stages over "
                f"{self.pipeline.axis!r}) {self.pipelined_measured * 1e3:.3f} ms measured / "
                f"{self.pipelined_predicted * 1e3:.3f} ms predicted, peak "
                f"{_size(self.pipelined_peak_bytes)}; not pipelined "
                f"({flats}) {self.flat_measured * 1e3:.3f} ms measured"
                f"{_predicted(self.flat_predicted)}, peak "
                f"{_size(self.flat_peak_bytes)}{over}; "
                f"{'pipelining' if self.pipelined else 'not pipelining'}")


def _predicted(seconds: float) -> str:
    """`` / X ms predicted``, or nothing for a plan made by a rule (no cost-model prediction)."""
    return "" if math.isnan(seconds) else f" / {seconds * 1e3:.3f} ms predicted"


def _size(nbytes: int) -> str:
    """Bytes in the largest binary unit that keeps a digit before the point (0.56 MB budgets
    are not "0.00 GiB")."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes} B"
