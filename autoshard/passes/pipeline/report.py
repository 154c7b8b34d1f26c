"""A pipeline's predicted step: its schedule simulated over the sliced loss's chunk times
(cost_model/pipeline_simulator.py), summarised per stage as a ``PipelinePlan``.

The simulation is what chooses the microbatch count and, for ``pipeline="auto"``, the
schedule, so it must price every candidate from one slicing: ``rescaled_slicing`` scales a
slicing's per-microbatch costs to another microbatch size instead of tracing the loss again.
A backward costs ``backward_factor`` forwards (the gradient's two matmuls per forward matmul,
plus the forward again when the runtime recomputes it). Between steps the runtime's parameter
and gradient exchange and the optimizer update are priced outside the tick loop.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from jax.sharding import Mesh

from autoshard.cost_model.collectives import collective_time
from autoshard.cost_model.hardware import Hardware
from autoshard.cost_model.pipeline_simulator import simulate
from autoshard.ir.mesh import MeshSpec
from autoshard.ir.pipeline import Pipeline, PipelinePlan, StageReport
from autoshard.passes.pipeline.intra_stage import IntraStagePlan
from autoshard.passes.pipeline.stages import Slicing

#: Backward work relative to forward: the gradient (2x), plus the forward when the runtime
#: recomputes it (``Pipeline(recompute=True)``).
BACKWARD_FACTOR = 2.0
RECOMPUTED_BACKWARD_FACTOR = 3.0
#: Bytes an AdamW update moves per parameter byte: read parameter, gradient and two moments,
#: write parameter and moments (HBM-bound; the gradient stays in float32).
OPTIMIZER_BYTES_PER_PARAMETER_BYTE = 7.0
#: Seconds each pipeline tick costs beyond its compute (a kernel launch and the permutes' sync).
TICK_OVERHEAD = 10e-6


def backward_factor(pipe: Pipeline) -> float:
    return RECOMPUTED_BACKWARD_FACTOR if pipe.recompute else BACKWARD_FACTOR


def rescaled_slicing(slicing: Slicing, factor: float) -> Slicing:
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
    sim = simulated_schedule(slicing, pipe, microbatches, spec, hw, forward, TICK_OVERHEAD)
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
    # the runtime's parameter and gradient exchange (runtime/parameter_stores.py): a stage
    # gathers its parameters' ZeRO pieces, reduce-scatters its gradients into pieces and
    # all-gathers the pieces across stages; the optimizer updates a 1/others share per device
    sync = (collective_time(hw, spec, "all-gather", stage_bytes, other_axes)
            + collective_time(hw, spec, "reduce-scatter", stage_bytes, other_axes)
            + collective_time(hw, spec, "all-gather", total_bytes / others, (stage_index,)))
    update = OPTIMIZER_BYTES_PER_PARAMETER_BYTE * total_bytes / others / hw.memory_rate
    return PipelinePlan(tuple(stages), pipe.schedule, microbatches, pipe.virtual_stages,
                        sim.step_seconds, sim.bubble_fraction, timeline, sync + update,
                        intra.describe() if intra is not None else "")


def simulated_schedule(slicing: Slicing, pipe: Pipeline, microbatches: int, spec: MeshSpec,
                       hw: Hardware, forward: list[float], tick_overhead: float):
    """The schedule with chunk forward times ``forward`` (backward ``backward_factor`` x),
    each transfer a permute of the widest crossing over the stage axis plus
    ``tick_overhead``."""
    link = collective_time(hw, spec, "collective-permute",
                           max(slicing.crossing_bytes, default=0), (spec.index(pipe.axis),))
    return simulate(pipe.schedule, pipe.stages, microbatches, pipe.virtual_stages, forward,
                    [backward_factor(pipe) * f for f in forward], link + tick_overhead)
