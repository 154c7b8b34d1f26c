"""The intra-stage plan of a pipeline: which of the mesh's other axes carry data parallelism and
which a tensor-parallel parameter layout, chosen by the intra-operator ILP (``search_plan``).

The ILP plans the gradient of the loss (``jax.value_and_grad``) on the whole step's batch over
the mesh without the stage axis, so a layout is priced per step as the pipeline runs it: its
compute and activation collectives scale with the batch, its gradient synchronisation is paid
once. Its answer is read in two parts:

- the axes it splits the batch's leading dim over become the pipeline's data axes, manual in
  the runtime's ``shard_map``: each device accumulates its own gradients over the microbatches
  and they are reduced once, after the tick loop;
- the remaining axes (the *model axes*) stay automatic inside the ``shard_map``; the plan's
  parameter layouts over them are applied as sharding constraints and XLA's partitioner
  propagates them through each chunk (a Megatron column/row split then gives one all-reduce
  per block), inside the tick's ``lax.switch``. Every device of a model-axis group runs the
  same tick row, so the partitioner's collectives there are reached by all of the group.

Only parameter layouts are carried over: the chunks evaluate the loss's own graph, whose values
are not the planned gradient graph's, so the layout of every other value inside a stage is
XLA's propagation from the parameters. When the plan puts no parameter on a model axis (it
replicates compute there, or splits only activations), or lays out less than
``TENSOR_PARALLEL_MIN_SHARE`` of the parameter bytes, the stage is data parallel over every
axis, as the rule without a plan does, even when the caller named the data axes (logged).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from autoshard.cost_model.hardware import Hardware
from autoshard.ir.mesh import MeshSpec
from autoshard.passes.lift import lift
from autoshard.passes.pins import collect_pins
from autoshard.passes.search import search_plan
from autoshard.passes.trace import trace

log = logging.getLogger("autoshard")

#: Share of the parameter bytes the ILP must lay out over the model axes for the stage to run
#: them as model axes. Only parameter layouts carry over (module docstring): where the plan
#: keeps a parameter whole and splits the batch over a model axis instead, the partitioner
#: replicates that work, so a plan mostly of such parameters runs better as data parallel.
TENSOR_PARALLEL_MIN_SHARE = 0.5


@dataclass(frozen=True)
class IntraStagePlan:
    """``data_axes``: the axes a microbatch is split over (most to least major);
    ``model_axes``: the axes the parameters are laid out over by ``param_specs`` (one
    PartitionSpec per differentiated leaf, naming only model axes); ``param_specs`` is None
    when the stage is data parallel only. ``predicted_seconds``: the ILP's step prediction for
    the whole batch on one stage's devices (None for the rule)."""

    data_axes: tuple[str, ...]
    model_axes: tuple[str, ...] = ()
    param_specs: tuple[PartitionSpec, ...] | None = None
    method: str = "data parallel (rule)"
    predicted_seconds: float | None = None

    @property
    def tensor_parallel(self) -> bool:
        return self.param_specs is not None

    def data_axes_for(self, mesh: Mesh, microbatch: int) -> tuple[str, ...]:
        """The data axes a microbatch of ``microbatch`` splits over: the last ones are dropped
        until the device count divides it."""
        axes = list(self.data_axes)
        while axes and microbatch % int(np.prod([mesh.shape[a] for a in axes])):
            axes.pop()
        return tuple(axes)

    def describe(self) -> str:
        data = f"data parallel over {self.data_axes}" if self.data_axes else "no data axes"
        if not self.tensor_parallel:
            return f"{data} ({self.method})"
        split = sum(1 for s in self.param_specs if any(e is not None for e in s))
        return (f"{data}; {split} of {len(self.param_specs)} parameters laid out over "
                f"{self.model_axes} ({self.method})")


def data_parallel_stages(mesh: Mesh, stage_axis: str) -> IntraStagePlan:
    """The rule: every other axis is a data axis."""
    return IntraStagePlan(tuple(a for a in mesh.axis_names if a != stage_axis))


def plan_intra_stage(loss: Callable[[list, list], Any], params: Sequence[Any],
                     batch: Sequence[Any], mesh: Mesh, stage_axis: str, hw: Hardware, *,
                     data_axes: tuple[str, ...] | None = None, time_limit: float = 30.0,
                     progress: Callable[[str], None] | None = None) -> IntraStagePlan:
    """Plan ``jax.value_and_grad(loss)(params, batch)`` (``batch``: the whole step's batch
    leaves) over the mesh's axes other than ``stage_axis`` and split its answer into data and
    model axes (module docstring). ``data_axes`` fixes the data axes (the batch's leading dim
    is pinned to them) and leaves the ILP the layout over the others.

    No memory budget is given to the ILP: under one it shards parameters over the batch axes
    (ZeRO), which the pipeline runtime, holding parameters whole on every data replica, does
    not run."""
    rule = data_parallel_stages(mesh, stage_axis)
    others = tuple(a for a in mesh.axis_names if a != stage_axis and int(mesh.shape[a]) > 1)
    if not others or not params:
        return rule
    # the devices of one stage are consecutive on the mesh's minor axes, which is where the
    # hardware profile's links place them when the stage axis is the major one
    sub = MeshSpec(others, tuple(int(mesh.shape[a]) for a in others))
    p_avals = [jax.ShapeDtypeStruct(np.shape(p), jax.numpy.result_type(p)) for p in params]
    b_avals = [jax.ShapeDtypeStruct(np.shape(x), jax.numpy.result_type(x)) for x in batch]

    def step(p, b):
        return jax.value_and_grad(loss)(p, b)

    traced = trace(step, (p_avals, b_avals))
    graph = lift(traced)
    in_specs = None
    if data_axes is not None:
        lead = PartitionSpec(tuple(data_axes) or None)
        in_specs = ([None] * len(params), [lead] * len(batch))
    pins = collect_pins(graph, sub, in_specs=in_specs, in_tree=traced.in_tree,
                        out_tree=traced.out_tree)
    plan = search_plan(graph, sub, hw, pins, in_tree=traced.in_tree, out_tree=traced.out_tree,
                       donated=set(), updated={}, memory_budget=None, time_limit=time_limit,
                       progress=progress or (lambda message: log.info(
                           "autoshard: intra-stage plan over %s: %s", others, message)))
    specs = [s.to_partition_spec(sub, v.ndim, partial="replicate")
             for s, v in zip(plan.input_specs, graph.inputs)]
    batch_axes = set()
    for spec in specs[len(params):]:
        if len(spec) and spec[0] is not None:
            batch_axes.update((spec[0],) if isinstance(spec[0], str) else spec[0])
    if data_axes is not None:
        batch_axes = set(data_axes)
    data = tuple(a for a in others if a in batch_axes)
    model = tuple(a for a in others if a not in batch_axes)
    laid = tuple(_restricted(s, model) for s in specs[:len(params)])
    predicted = plan.prediction.step_seconds if plan.prediction is not None else None
    def nbytes(v) -> int:
        return math.prod(v.shape) * np.dtype(v.dtype).itemsize

    total = sum(nbytes(v) for v in graph.inputs[:len(params)])
    share = sum(nbytes(v) for v, s in zip(graph.inputs, laid)
                if any(e is not None for e in s)) / max(total, 1)
    if not model or share < TENSOR_PARALLEL_MIN_SHARE:
        # the ILP keeps (most) parameters whole on the model axes: it splits the batch over
        # them inside the step there or replicates work; run as data parallel, not as the
        # replicated compute a partitioner propagating from whole parameters would make
        if data_axes is not None and model:
            log.warning("autoshard: the intra-stage plan lays out %.0f%% of the parameter "
                        "bytes over %s; they are data axes too (data_axes=%s asked for them "
                        "as model axes)", 100 * share, model, tuple(data_axes))
        return IntraStagePlan(rule.data_axes, method=f"data parallel (the ILP's plan lays out "
                              f"{share:.0%} of the parameter bytes over model axes)",
                              predicted_seconds=predicted)
    return IntraStagePlan(data, model, laid, f"ILP: {plan.method}", predicted)


def _restricted(spec: PartitionSpec, axes: tuple[str, ...]) -> PartitionSpec:
    """``spec`` with every mesh axis not in ``axes`` dropped."""
    out = []
    for entry in spec:
        names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        kept = tuple(n for n in names if n in axes)
        out.append(None if not kept else kept[0] if len(kept) == 1 else kept)
    while out and out[-1] is None:
        out.pop()
    return PartitionSpec(*out)
