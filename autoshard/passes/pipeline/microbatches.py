"""The microbatch count of a pipelined loss, and the loss cut into chunks at that count.

A pipelined loss is planned on one device's share of a microbatch: it is traced at that shape,
its scanned layer stacks unrolled and stacked parameters split into their layers (unroll.py),
lifted, and cut into the pipeline's chunks (stages.py). The count is either the caller's or the
one whose simulated step (report.py) is fastest among the divisors of the batch (multiples of
the stages for the interleaved schedule), preferring counts whose microbatches still split over
every data axis. The loss is sliced once and rescaled for the other counts, then sliced again
at the count chosen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from autoshard.cost_model.hardware import Hardware
from autoshard.ir.errors import ArgumentError
from autoshard.ir.pipeline import Pipeline
from autoshard.passes.lift import lift_jaxpr
from autoshard.passes.pipeline.intra_stage import IntraStagePlan, data_parallel_stages
from autoshard.passes.pipeline.report import pipeline_report, rescaled_slicing
from autoshard.passes.pipeline.stages import Slicing, slice_loss
from autoshard.passes.pipeline.unroll import split_layer_params


@dataclass(frozen=True)
class SlicedLoss:
    """The loss cut for ``microbatches``: the slicing, the data axes a microbatch splits over,
    and which layer of which parameter each of the slicing's parameters is (``expansion``,
    ``(parameter, layer or None)``, from ``split_layer_params``)."""

    microbatches: int
    slicing: Slicing
    data_axes: tuple[str, ...]
    expansion: tuple[tuple[int, int | None], ...]


def data_parallel_axes(mesh: Mesh, stage_axis: str, microbatch: int) -> tuple[str, ...]:
    """The non-stage axes a microbatch is split over: all of them, dropping the last ones
    until their device count divides the microbatch."""
    return data_parallel_stages(mesh, stage_axis).data_axes_for(mesh, microbatch)


def sliced_loss(flat_loss: Callable[[list, list], Any], params: Sequence[Any],
                batch: Sequence[Any], mesh: Mesh, pipe: Pipeline, hw: Hardware,
                intra: IntraStagePlan, microbatches: int, *, what: str) -> SlicedLoss:
    """``flat_loss(params, batch)`` traced on one device's share of a microbatch when the
    batch is split into ``microbatches``, unrolled, lifted and cut into ``pipe.chunks``."""
    size = int(batch[0].shape[0])
    data_axes = intra.data_axes_for(mesh, size // microbatches)
    replicas = int(np.prod([mesh.shape[a] for a in data_axes])) if data_axes else 1
    micro = [jax.ShapeDtypeStruct((size // microbatches // replicas, *x.shape[1:]), x.dtype)
             for x in batch]
    avals = [jax.ShapeDtypeStruct(np.shape(p), p.dtype) for p in params]
    traced = jax.make_jaxpr(flat_loss)(avals, micro)
    # scanned layer stacks unrolled, a stacked parameter split into its layers
    unrolled, expansion = split_layer_params(traced, range(len(params)))
    graph = lift_jaxpr(unrolled)
    return SlicedLoss(microbatches, slice_loss(graph, len(expansion), pipe.chunks, hw,
                                               what=what), data_axes, expansion)


def choose_microbatches(flat_loss: Callable[[list, list], Any], params: Sequence[Any],
                        batch: Sequence[Any], mesh: Mesh, pipe: Pipeline, hw: Hardware,
                        intra: IntraStagePlan, *, what: str, where: str) -> SlicedLoss:
    """The loss sliced at ``pipe.microbatches``, or at the count the simulation predicts
    fastest when that is None (module docstring). ``what`` names the loss, ``where`` the
    wrapper call in error messages."""
    size = int(batch[0].shape[0])
    candidates = [m for m in range(1, size + 1) if size % m == 0 and (
        pipe.schedule != "interleaved" or m % pipe.stages == 0)]
    # microbatches that still split over every other axis keep the stages data parallel
    full = int(np.prod([mesh.shape[a] for a in intra.data_axes]))
    parallel = [m for m in candidates if (size // m) % full == 0]
    if pipe.microbatches is not None:
        microbatches = pipe.microbatches
        if size % microbatches:
            raise ArgumentError(f"{where}: microbatches={microbatches} must divide "
                                f"the batch of {size}; pick a divisor, or microbatches=None "
                                "for the planner to choose")
        if microbatches not in candidates:
            raise ArgumentError(f"{where}: the interleaved schedule needs "
                                f"microbatches ({microbatches}) to be a multiple of the "
                                f"{pipe.stages} stages; pick one, or microbatches=None for "
                                "the planner to choose")
        return sliced_loss(flat_loss, params, batch, mesh, pipe, hw, intra, microbatches,
                           what=what)
    if not candidates:
        raise ArgumentError(f"{where}: no microbatch count divides the batch "
                            f"of {size} into a multiple of {pipe.stages} microbatches; "
                            "use a batch divisible by the stages, or another schedule")
    choices = parallel or candidates
    first = choices[0]
    cut = sliced_loss(flat_loss, params, batch, mesh, pipe, hw, intra, first, what=what)
    microbatches = min(choices, key=lambda m: pipeline_report(
        rescaled_slicing(cut.slicing, first / m), pipe, m, mesh, hw, intra).total_seconds)
    if microbatches != first:
        cut = sliced_loss(flat_loss, params, batch, mesh, pipe, hw, intra, microbatches,
                          what=what)
    return cut
