"""``autoshard.compile``: trace -> lift -> pins -> plan -> lower -> jit.

This module only wires the passes together and keeps a ``jax.jit``-like object around them.
A ``ShardedFunction`` holds one planned executable per call signature (argument shapes, dtypes
and static values), as ``jax.jit`` holds one per trace: a call with a new signature plans again
(logged), a call with a known one runs the executable ``.lower(*args).compile()`` returns.

Planning a signature: trace, lift, collect pins, then the plan cache (plan_cache.py) or the
solver, then, in a multi-process run, the check that every process chose the same plan
(runtime/multihost.py), then lowering.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import jax
from jax.sharding import Mesh, NamedSharding

from autoshard.ir.errors import (ArgumentError, AutoshardError, PlanInfeasibleError,
                                 SolverTimeLimitWarning)
from autoshard.ir.graph import Graph
from autoshard.ir.graph import verify as verify_graph
from autoshard.ir.mesh import MeshSpec
from autoshard.ir.pipeline import AutoDecision, Pipeline
from autoshard.ir.plan import Plan, PlanCandidate
from autoshard.ir.plan_json import fingerprint, graph_fingerprint, plan_to_json
from autoshard.ir.version import __version__
from autoshard.cost_model.hardware import Hardware, get_hardware
from autoshard.passes.rules import data_parallel_plan
from autoshard.passes.lift import lift
from autoshard.passes.annotations import annotation_report
from autoshard.passes.lower import LoweredPlan, lower, on_mesh
from autoshard.passes.pins import ANNOTATION_MODES, Pins, collect_pins
from autoshard.passes.search import search_plan
from autoshard.passes.state import updated_arguments
from autoshard.passes.trace import (TracedFunction, abstract_arguments, abstractify_leaf,
                                    function_name, normalize_static_argnums, trace)
from autoshard.pipelined_function import PipelinedFunction, auto_pipeline_candidates
from autoshard.nnx import NnxFunction, has_nnx_objects
from autoshard.plan_cache import PlanCache, cache_enabled
from autoshard.runtime import multihost
from autoshard.measure.verify import compiled_roofline, peak_memory

log = logging.getLogger("autoshard")


@dataclass(frozen=True)
class _Options:
    mesh: Mesh
    donate_argnums: tuple[int, ...]
    static_argnums: tuple[int, ...]
    in_specs: Any
    out_specs: Any
    batch_argnums: tuple[int, ...] | None
    planner: str
    hardware: Hardware
    memory_budget: int | None
    solver_time_limit: float
    cache: PlanCache | None
    annotations: str = "ignore"
    annotation_specs: tuple | None = None    # per flat input position (autoshard/nnx.py)


@dataclass(frozen=True)
class _Planned:
    """Everything made for one call signature. ``source`` says where the plan came from:
    ``"solved"``, ``"cache"`` (with ``cache_path``) or ``"rule"`` (data-parallel)."""

    traced: TracedFunction
    graph: Graph
    plan: Plan
    lowered_plan: LoweredPlan
    jitted: Any
    planning_seconds: float
    source: str = "solved"
    cache_path: str | None = None
    digest: str = ""


PLANNERS = ("search", "data-parallel", "fully-sharded", "measured")
#: The rules (no search): data parallel, and FSDP / ZeRO-3 (passes/rules.py).
RULES = ("data-parallel", "fully-sharded")
#: Under annotations="hint", how much faster (predicted) the searched plan must be to override
#: the user's annotated layouts.
HINT_MARGIN = 0.02


def shard_batch(local_batch: Any, fn: ShardedFunction, argnum: int | None = None) -> Any:
    """``fn.shard_batch(local_batch, argnum)``: place this process's rows of a batch where the
    plan of ``fn`` wants them (see ``ShardedFunction.shard_batch``)."""
    if not isinstance(fn, ShardedFunction):
        raise ArgumentError(f"autoshard.shard_batch needs the ShardedFunction that "
                            f"autoshard.compile returned, got {type(fn).__name__}")
    return fn.shard_batch(local_batch, argnum)


def compile(fn: Callable, *example_args: Any, mesh: Mesh, memory_budget: int | None = None,
            hardware: str | Hardware | None = None, pipeline: Any = None,
            donate_argnums: int | Sequence[int] = (), static_argnums: int | Sequence[int] = (),
            in_specs: Any = None, out_specs: Any = None,
            batch_argnums: int | Sequence[int] | None = None, planner: str = "search",
            solver_time_limit: float = 30.0, cache: bool | None = None,
            annotations: str = "hint") -> ShardedFunction:
    """Plan ``fn`` for ``mesh`` on ``example_args`` (arrays or ``jax.ShapeDtypeStruct``s) and
    return a ``ShardedFunction`` that runs it sharded.

    ``planner="search"`` (default) solves for the plan with the cost model of ``hardware``
    (a profile name — ``"h100"``, ``"h100-2node"``, ``"a100"``, ``"tpu-v5e"``, ``"cpu"`` — or an
    ``autoshard.Hardware``; default ``"h100"``) under ``memory_budget`` (bytes per device);
    ``solver_time_limit`` bounds the solve (deterministic work units of about a second each,
    so that every process finds the same plan). ``planner="data-parallel"`` is the simple rule:
    split the batch (``batch_argnums``), replicate the rest; ``"fully-sharded"`` also splits
    the other arguments like FSDP / ZeRO-3. ``planner="measured"`` plans by the search and by
    both rules, compiles the three, and returns the one whose executable measures fastest
    (matmul FLOPs and collectives from its HLO on ``hardware``'s links) among those whose
    compiled peak fits ``memory_budget``; ``step.candidates`` lists what was weighed. It
    costs three XLA compiles, and a later call with new shapes keeps the chosen planner.

    ``in_specs`` / ``out_specs`` pin argument / result layouts (pytree prefixes of
    ``PartitionSpec``s, as ``jax.jit``'s shardings; ``None`` leaves a leaf to the planner);
    ``autoshard.hint`` pins values inside the function. ``pipeline=autoshard.Pipeline(stages,
    microbatches, schedule)`` pipelines the loss the step wraps in ``autoshard.value_and_grad``
    over the mesh axis ``"stage"``; ``pipeline="auto"`` pipelines over the mesh's first axis
    when the cost model predicts it faster than the best plan without a pipeline.

    Flax NNX steps (arguments holding ``nnx.Module`` / ``nnx.Optimizer`` objects, or the
    ``nnx.split`` form: a ``GraphDef`` and ``State``s) are planned over their state and called
    like ``nnx.jit`` (autoshard/nnx.py). Their ``nnx.with_partitioning`` annotations are used
    per ``annotations``: ``"hint"`` (default) prefers them and overrides them only where another
    layout is cheaper, ``"require"`` pins them, ``"ignore"`` plans as if there were none; the
    plan's ``annotation_report`` (in ``plan.summary()``) lists every difference and its cost.

    Solved plans are cached on disk (``AUTOSHARD_CACHE_DIR``, default ``~/.cache/autoshard``)
    under a fingerprint of the program, arguments, mesh, hardware, budget and options; a later
    compile of the same step reuses the plan instead of solving. ``cache=False`` (or
    ``AUTOSHARD_CACHE=0``) bypasses the cache. After ``jax.distributed.initialize`` every process
    plans and the plans are checked equal across processes (``PlanAgreementError`` otherwise).
    """
    if not isinstance(mesh, Mesh):
        raise ArgumentError(f"autoshard.compile({function_name(fn)}): mesh must be a "
                            f"jax.sharding.Mesh (jax.make_mesh(...)), got {type(mesh).__name__}")
    if pipeline is not None and not (isinstance(pipeline, Pipeline) or pipeline == "auto"):
        raise ArgumentError(f"autoshard.compile({function_name(fn)}): pipeline must be None, "
                            f"'auto' or an autoshard.Pipeline(...), got {pipeline!r}")
    if annotations not in ANNOTATION_MODES:
        raise ArgumentError(f"autoshard.compile({function_name(fn)}): annotations must be one "
                            f"of {ANNOTATION_MODES}, got {annotations!r}")
    if planner not in PLANNERS:
        raise ArgumentError(f"autoshard.compile({function_name(fn)}): planner must be one of "
                            f"{PLANNERS}, got {planner!r}")
    if memory_budget is not None and (not isinstance(memory_budget, (int, float))
                                      or memory_budget <= 0):
        raise ArgumentError(f"memory_budget must be a positive number of bytes per device, got "
                            f"{memory_budget!r}")
    if memory_budget is not None and planner in RULES:
        raise ArgumentError(f"memory_budget needs planner='search' (the {planner!r} rule does "
                            "not model memory)")
    nargs = len(example_args)
    statics = normalize_static_argnums(static_argnums, nargs)
    donate = normalize_static_argnums(donate_argnums, nargs)
    if set(donate) & set(statics):
        raise ArgumentError(f"arguments {sorted(set(donate) & set(statics))} are both donated "
                            "and static")
    batch = None if batch_argnums is None else normalize_static_argnums(batch_argnums, nargs)
    options = _Options(mesh, donate, statics, in_specs, out_specs, batch, planner,
                       get_hardware(hardware), None if memory_budget is None
                       else int(memory_budget), float(solver_time_limit),
                       PlanCache.default() if planner in ("search", "measured")
                       and cache_enabled(cache) else None, annotations)
    if has_nnx_objects(example_args):
        if pipeline is not None:
            raise ArgumentError(f"autoshard.compile({function_name(fn)}): pipelines over Flax "
                                "NNX objects are not supported yet; pipeline a functional step "
                                "(nnx.split the model and pass its State arrays)")
        if planner == "measured":
            raise ArgumentError(f"autoshard.compile({function_name(fn)}): planner='measured' "
                                "is not supported for Flax NNX steps yet; use 'search'")
        return NnxFunction(fn, options, example_args, ShardedFunction)
    if pipeline is not None:
        return _compile_pipelined(fn, example_args, options, pipeline)
    if planner == "measured":
        return _compile_measured(fn, example_args, options)
    return ShardedFunction(fn, options, example_args)


def _flat_candidates(fn, example_args, options: _Options) -> list[ShardedFunction]:
    """The searched plan (under the budget) and both rules' plans (budgets are checked on
    their executables); a candidate that cannot be planned is logged and left out."""
    out, errors = [], []
    for planner in ("search", *RULES):
        searched = planner == "search"
        try:
            out.append(ShardedFunction(fn, replace(
                options, planner=planner,
                memory_budget=options.memory_budget if searched else None,
                cache=options.cache if searched else None), example_args))
        except PlanInfeasibleError as err:
            errors.append(err)
            log.info("autoshard: %s: no %s candidate: %s", function_name(fn), planner, err)
    if not out:
        raise errors[0]
    return out


def _measured(step: ShardedFunction, example_args, options: _Options) -> tuple[float, int]:
    """(step seconds, peak bytes per device) of ``step``'s executable, measured as the
    plan-quality benchmark measures."""
    compiled = step.lower(*example_args).compile()
    return (compiled_roofline(compiled, options.hardware, options.mesh).step_seconds,
            peak_memory(compiled))


def _fastest_fitting(measures: list[tuple[float, int]], budget: int | None) -> int | None:
    fits = [k for k, (_, peak) in enumerate(measures) if budget is None or peak <= budget]
    return min(fits, key=lambda k: measures[k][0]) if fits else None


def _compile_measured(fn, example_args, options: _Options) -> ShardedFunction:
    """``planner="measured"``: the fastest executable among the searched plan and the rules'
    (``compile``'s docstring). The cost model decides the searched plan; measuring decides
    between it and the plans a user would write first, which the cost model can misjudge
    (tight budgets, where the search may stop short of the FSDP layout; steps so small that a
    few microseconds of start-up latency decide)."""
    built = _flat_candidates(fn, example_args, options)
    measures = [_measured(b, example_args, options) for b in built]
    budget = options.memory_budget
    best = _fastest_fitting(measures, budget)
    if best is None:
        k = min(range(len(built)), key=lambda i: measures[i][1])
        raise PlanInfeasibleError(
            f"autoshard.compile({function_name(fn)}, planner='measured'): no candidate's "
            f"compiled program fits memory_budget={budget:,} bytes per device; the smallest, "
            f"{built[k].plan.method}, needs {measures[k][1]:,}. Raise the budget or use a "
            "larger mesh.")
    step = built[best]
    step.candidates = tuple(
        PlanCandidate(b.plan.method, t, peak,
                      b.plan.prediction.step_seconds if b.plan.prediction else None, k == best)
        for k, (b, (t, peak)) in enumerate(zip(built, measures)))
    log.info("autoshard: planner='measured' for %s:\n%s", step.__name__,
             "\n".join(c.line() for c in step.candidates))
    return step


def _compile_pipelined(fn, example_args, options: _Options, pipeline) -> Any:
    """An explicit ``Pipeline`` is built as asked. ``"auto"`` slices the step for each schedule
    (``auto_pipeline_candidates``), plans it without a pipeline too (searched, and by the
    data-parallel and fully-sharded rules), compiles them all and keeps the one whose
    executable measures fastest among those that fit ``memory_budget`` (``AutoDecision`` says
    why: the cost model's flat and pipelined predictions are not
    comparable enough to decide alone, and the simulator's ranking of schedules was not the
    measured one: interleaved first at d=2048, measured 2% slower than GPipe)."""
    intra_plans: dict = {}   # per mesh: one intra-stage plan serves every schedule

    def build(mesh, pipe):
        return PipelinedFunction(fn, example_args, mesh=mesh, pipeline=pipe,
                                 intra_plans=intra_plans.setdefault(mesh.devices.shape, {}),
                                 hardware=options.hardware, donate_argnums=options.donate_argnums,
                                 static_argnums=options.static_argnums,
                                 batch_argnums=options.batch_argnums,
                                 solver_time_limit=options.solver_time_limit)

    if isinstance(pipeline, Pipeline):
        return build(options.mesh, pipeline)
    name = function_name(fn)

    def unpipelined():
        if options.planner == "measured":
            return _compile_measured(fn, example_args, options)
        return ShardedFunction(fn, options, example_args)

    groups = auto_pipeline_candidates(options.mesh)
    if not groups:
        log.info("autoshard: pipeline='auto' for %s: no mesh axis to pipeline over (the mesh "
                 "needs an axis of size > 1); not pipelined", name)
        return unpipelined()
    skipped: list[str] = []

    def attempt(mesh, pipe):
        try:
            return build(mesh, pipe)
        except AutoshardError as err:   # e.g. too few places to cut for interleaved chunks
            skipped.append(f"{pipe.stages} stages, {pipe.schedule} x{pipe.virtual_stages}: "
                           f"{err}")
            return None

    own_mesh, own_pipes = groups[0]
    built = [b for b in (attempt(own_mesh, p) for p in own_pipes) if b is not None]
    # other stage counts: built with the mesh's best predicted schedule, and compiled only
    # when the simulator predicts them faster than every pipeline over the mesh's own axis
    # (each compile costs seconds to minutes; stage counts the simulator ranks slower are
    # listed in the decision as not measured)
    threshold = min((b.pipeline_plan.total_seconds for b in built), default=float("inf"))
    schedule = (min(built, key=lambda b: b.pipeline_plan.total_seconds).pipeline
                if built else Pipeline(2, None, "1f1b"))
    unmeasured = []
    for mesh, pipes in groups[1:]:
        pipe = replace(pipes[0], schedule=schedule.schedule,
                       virtual_stages=schedule.virtual_stages)
        other = attempt(mesh, pipe)
        if other is None:
            continue
        plan = other.pipeline_plan
        if plan.total_seconds < threshold:
            built.append(other)
        else:
            unmeasured.append((pipe.stages, pipe.schedule, pipe.virtual_stages,
                               plan.microbatches, plan.total_seconds))
    for reason in skipped:
        log.info("autoshard: pipeline='auto' for %s: skipped %s", name, reason)
    if not built:
        log.info("autoshard: pipeline='auto' for %s: no pipeline applies; not pipelined", name)
        return unpipelined()
    # the rules too: the searched plan's prediction can miss what XLA compiles, and a
    # measuring mode should not lose to the simplest plans it can build
    flats = (_flat_candidates(fn, example_args, options)
             if options.planner in ("search", "measured")
             else [ShardedFunction(fn, options, example_args)])
    log.info("autoshard: pipeline='auto' for %s: compiling %d pipelines and %d flat plans to "
             "measure them", name, len(built), len(flats))
    budget = options.memory_budget

    def fastest(measures):
        best = _fastest_fitting(measures, budget)
        return best if best is not None else min(range(len(measures)),
                                                 key=lambda k: measures[k][0])

    rooflines = [b.roofline(*example_args) for b in built]
    best = fastest([(r.step_seconds, r.peak_bytes) for r in rooflines])
    piped, roofline = built[best], rooflines[best]
    flat_measures = [_measured(f, example_args, options) for f in flats]
    kept = fastest(flat_measures)
    flat, (flat_seconds, flat_peak) = flats[kept], flat_measures[kept]
    prediction = flat.plan.prediction          # None for planner="data-parallel"
    decision = AutoDecision(
        piped.pipeline, piped.pipeline_plan.total_seconds,
        prediction.step_seconds if prediction is not None else float("nan"),
        roofline.step_seconds, flat_seconds,
        tuple((b.pipeline.stages, b.pipeline.schedule, b.pipeline.virtual_stages,
               b.pipeline_plan.microbatches, b.pipeline_plan.total_seconds, r.step_seconds)
              for b, r in zip(built, rooflines)),
        roofline.peak_bytes, flat_peak, budget, flat.plan.method,
        tuple((f.plan.method, t, peak) for f, (t, peak) in zip(flats, flat_measures)),
        tuple(unmeasured))
    if not decision.pipelined_fits and not decision.flat_fits:
        raise auto_infeasible(name, budget, [
            (f"{b.pipeline.stages}-stage {b.pipeline.schedule} pipeline", r.peak_bytes)
            for b, r in zip(built, rooflines)] + [
            (f.plan.method, peak) for f, (_, peak) in zip(flats, flat_measures)])
    keep = piped if decision.pipelined else flat
    log.info("autoshard: %s: %s", flat.__name__, decision.summary())
    keep.auto_decision = decision
    return keep


def auto_infeasible(name: str, budget: int, peaks: list[tuple[str, int]]
                    ) -> PlanInfeasibleError:
    """The error ``pipeline="auto"`` raises when no candidate's compiled peak (``peaks``:
    what, bytes) fits ``budget``: keeping the fastest anyway would hide that the budget is
    not met."""
    what, peak = min(peaks, key=lambda e: e[1])
    return PlanInfeasibleError(
        f"autoshard.compile({name}, pipeline='auto'): no candidate's compiled program fits "
        f"memory_budget={budget:,} bytes per device; the smallest, the {what}, needs "
        f"{peak:,}. Raise the budget, use a larger mesh, or try Pipeline(..., "
        "recompute=True) with the 1F1B schedule.")


#: A time-limited solve this close to its lower bound is not worth a warning.
NEGLIGIBLE_GAP = 5e-4


class ShardedFunction:
    """A planned, sharded version of a function; behaves like the result of ``jax.jit``.

    ``candidates`` (``planner="measured"``): the plans weighed, each a ``PlanCandidate``."""

    candidates: tuple[PlanCandidate, ...] | None = None

    def __init__(self, fn: Callable, options: _Options, example_args: Sequence[Any]):
        self._fn = fn
        self._options = options
        self._cache: dict[Any, _Planned] = {}
        self.__name__ = function_name(fn)
        self.__doc__ = getattr(fn, "__doc__", None)
        self._nargs = len(example_args)
        self._example_key = self._signature(example_args)
        self._planned(example_args)

    # -- public ---------------------------------------------------------------------------------

    @property
    def plan(self) -> Plan:
        """The plan for the example arguments."""
        return self._cache[self._example_key].plan

    def plan_for(self, *args: Any) -> Plan:
        """The plan for arguments shaped like ``args`` (planned now if it is a new signature)."""
        return self._planned(args).plan

    @property
    def graph(self) -> Graph:
        return self._cache[self._example_key].graph

    @property
    def mesh(self) -> Mesh:
        return self._options.mesh

    @property
    def planning_seconds(self) -> float:
        """Seconds from tracing to the lowered plan (a cache hit skips the solve)."""
        return self._cache[self._example_key].planning_seconds

    @property
    def plan_source(self) -> str:
        """Where the plan came from: ``"solved"``, ``"cache"`` (a plan-cache hit) or ``"rule"``
        (``planner="data-parallel"``)."""
        return self._cache[self._example_key].source

    @property
    def plan_digest(self) -> str:
        """A digest of the plan's decisions; equal on every process of a multi-process run."""
        return self._cache[self._example_key].digest

    def shard_batch(self, local_batch: Any, argnum: int | None = None) -> Any:
        """Global arrays for argument ``argnum`` (default: the batch argument — the first of
        ``batch_argnums``, else the last argument) laid out as the plan wants, from this
        process's rows.

        The global batch is the concatenation, along the leading dim and in process-index order,
        of every process's ``local_batch`` (a pytree shaped like the argument, with the leading
        dims divided by ``jax.process_count()``). In a single process it is ``device_put``.
        """
        opts = self._options
        if argnum is None:
            dynamic = [i for i in range(self._nargs) if i not in opts.static_argnums]
            argnum = opts.batch_argnums[0] if opts.batch_argnums else dynamic[-1]
        if not 0 <= argnum < self._nargs or argnum in opts.static_argnums:
            raise ArgumentError(f"{self.__name__}.shard_batch: argnum {argnum} is not a "
                                f"(non-static) argument of the {self._nargs} it was compiled for")
        planned = self._cache[self._example_key]
        span = self._argument_spans(planned.traced, self._nargs)[argnum]
        leaves, tree = jax.tree_util.tree_flatten(local_batch)
        if len(leaves) != len(span):
            raise ArgumentError(f"{self.__name__}.shard_batch: the local batch has {len(leaves)} "
                                f"arrays but argument {argnum} has {len(span)}")
        placed = []
        for leaf, i in zip(leaves, span):
            value = planned.graph.inputs[i]
            what = f"{self.__name__} argument {value.name or argnum}"
            target = planned.lowered_plan.in_shardings[i]
            if jax.process_count() == 1:
                placed.append(jax.device_put(leaf, target))
            else:
                placed.append(multihost.shard_process_local(leaf, target, value.shape, what))
        return jax.tree_util.tree_unflatten(tree, placed)

    def __call__(self, *args: Any) -> Any:
        planned = self._planned(args)
        results = planned.jitted(*self._place(planned, args))
        if self.mesh is planned.lowered_plan.mesh:
            return results
        return jax.tree.map(lambda r: on_mesh(r, self.mesh), results)

    def lower(self, *args: Any) -> jax.stages.Lowered:
        """jax's ``Lowered`` for these arguments (arrays or ShapeDtypeStructs); its
        ``.compile()`` is the executable a call with such arguments runs."""
        planned = self._planned(args)
        return planned.jitted.lower(*self._abstract(planned, args))

    def __repr__(self) -> str:
        return (f"<autoshard.ShardedFunction {self.__name__} on mesh "
                f"{MeshSpec.from_jax(self.mesh)}, {len(self._cache)} signature(s)>")

    # -- signatures and planning ----------------------------------------------------------------

    def _signature(self, args: Sequence[Any]) -> Any:
        opts = self._options
        if len(args) != self._nargs:
            raise ArgumentError(f"{self.__name__} was compiled for {self._nargs} positional "
                                f"arguments, got {len(args)}")
        _, avals, tree = abstract_arguments(self._fn, args, opts.static_argnums)
        avals = tuple((a.shape, str(a.dtype), a.weak_type) for a in avals)
        statics = tuple(_hashable(args[i], i, self.__name__) for i in opts.static_argnums)
        return tree, avals, statics

    def _planned(self, args: Sequence[Any]) -> _Planned:
        key = self._signature(args)
        planned = self._cache.get(key)
        if planned is None:
            if self._cache:
                log.info("autoshard: planning %s again for a new argument signature",
                         self.__name__)
            planned = self._plan(args)
            self._cache[key] = planned
        return planned

    def _plan(self, args: Sequence[Any]) -> _Planned:
        try:
            return self._plan_and_agree(args)
        except Exception as err:
            multihost.report_failure(self.__name__, err)  # the other processes stop, naming it
            raise

    def _plan_and_agree(self, args: Sequence[Any]) -> _Planned:
        opts = self._options
        start = time.perf_counter()
        traced = trace(self._fn, args, static_argnums=opts.static_argnums)
        graph = lift(traced)
        verify_graph(graph)
        mesh_spec = MeshSpec.from_jax(opts.mesh)
        pins = collect_pins(graph, mesh_spec, in_specs=opts.in_specs, out_specs=opts.out_specs,
                            in_tree=traced.in_tree, out_tree=traced.out_tree,
                            annotations=opts.annotation_specs,
                            annotation_mode=opts.annotations)
        spans = self._argument_spans(traced, len(args))
        graph_digest = graph_fingerprint(graph)  # the cache key, the record and the agreement
        source, cache_path = "rule", None
        if opts.planner in RULES:
            plan = data_parallel_plan(graph, mesh_spec, pins, in_tree=traced.in_tree,
                                      out_tree=traced.out_tree,
                                      batch_inputs=self._batch_inputs(traced, spans),
                                      fully_sharded=opts.planner == "fully-sharded")
            lowered = lower(plan, opts.mesh)
            jitted = self._jit(traced, lowered, len(args))
        else:
            key = self._cache_key(graph_digest, args) if opts.cache is not None else None
            plan = None if key is None else opts.cache.load(
                key, graph, in_tree=traced.in_tree, out_tree=traced.out_tree,
                graph_digest=graph_digest)
            if plan is not None:
                source, cache_path = "cache", str(opts.cache.path(key))
                self._progress(f"plan cache hit: {cache_path}")
                lowered = lower(plan, opts.mesh)
                jitted = self._jit(traced, lowered, len(args))
            else:
                donated = {i for a in opts.donate_argnums if a in spans for i in spans[a]}
                plan, lowered, jitted = self._search_within_budget(
                    args, traced, graph, mesh_spec, pins, donated)
                plan, lowered, jitted = self._with_annotation_report(
                    plan, lowered, jitted, traced, graph, mesh_spec, pins, donated, len(args))
                source = "solved"
                self._warn_if_time_limited(plan)
        record = plan_to_json(plan, graph_digest=graph_digest)
        if source == "solved" and key is not None:
            cache_path = self._store(key, record)
        digest = multihost.agree(self.__name__, record, graph)
        seconds = time.perf_counter() - start
        log.info("autoshard: planned %s in %.2fs (%d nodes, plan %s%s)", self.__name__, seconds,
                 graph.num_nodes(), source, f", {cache_path}" if cache_path else "")
        return _Planned(traced, graph, plan, lowered, jitted, seconds, source, cache_path,
                        digest)

    def _warn_if_time_limited(self, plan: Plan) -> None:
        stats = plan.solver
        if stats is None or not stats.details.get("time_limit_reached"):
            return
        if stats.gap is not None and stats.gap < NEGLIGIBLE_GAP:
            return                  # not proven, but within rounding of the bound
        bound = "no lower bound" if stats.bound is None else (
            f"lower bound {stats.bound * 1e3:.4g} ms, gap "
            f"{'unknown' if stats.gap is None else f'{stats.gap:.1%}'}")
        warnings.warn(SolverTimeLimitWarning(
            f"autoshard.compile({self.__name__}): the solver reached solver_time_limit="
            f"{self._options.solver_time_limit:g}s before proving its plan optimal; using the best "
            f"plan found ({stats.engine}: cost {stats.objective * 1e3:.4g} ms, {bound}). Raise "
            "solver_time_limit for a better plan."), stacklevel=4)

    def _cache_key(self, graph_digest: str, args: Sequence[Any]) -> str:
        """The plan cache key: everything the plan depends on (plan_cache.py)."""
        opts = self._options
        shardings = [_sharding_key(leaf) for i, a in enumerate(args)
                     if i not in opts.static_argnums for leaf in jax.tree_util.tree_leaves(a)]
        return fingerprint(
            "autoshard", __version__, "jax", jax.__version__, graph_digest,
            shardings, list(opts.mesh.axis_names), [int(s) for s in opts.mesh.axis_sizes],
            [str(t) for t in getattr(opts.mesh, "axis_types", ())], repr(opts.hardware),
            opts.memory_budget, opts.planner, list(opts.donate_argnums),
            list(opts.static_argnums), None if opts.batch_argnums is None
            else list(opts.batch_argnums), repr(opts.in_specs), repr(opts.out_specs),
            opts.solver_time_limit, opts.annotations, None if opts.annotation_specs is None
            else [None if s is None else str(s) for s in opts.annotation_specs])

    def _with_annotation_report(self, plan: Plan, lowered, jitted, traced, graph, mesh_spec,
                                pins: Pins, donated, nargs: int):
        """Solve the step in the other annotation mode too and attach the comparison
        (passes/annotations.py says why both are solved). Under ``"hint"`` without a memory
        budget, the annotated plan runs unless the search is predicted faster by more than
        ``HINT_MARGIN``: a user's layout is not overridden for a rounding-level gain (with a
        budget the searched plan is the one held to it, so it runs)."""
        opts = self._options
        if opts.annotations == "ignore" or not pins.annotated:
            return plan, lowered, jitted
        other_mode = "require" if opts.annotations == "hint" else "hint"
        other_pins = collect_pins(graph, mesh_spec, in_specs=opts.in_specs,
                                  out_specs=opts.out_specs, in_tree=traced.in_tree,
                                  out_tree=traced.out_tree, annotations=opts.annotation_specs,
                                  annotation_mode=other_mode)
        self._progress(f"solving with annotations as {other_mode} too, for the annotation "
                       "report")
        updated = updated_arguments(graph)
        other = search_plan(graph, mesh_spec, opts.hardware, other_pins, in_tree=traced.in_tree,
                            out_tree=traced.out_tree, donated=donated, updated=updated,
                            memory_budget=opts.memory_budget,
                            time_limit=opts.solver_time_limit, progress=self._progress)
        hint_pins = pins if opts.annotations == "hint" else other_pins
        if (opts.annotations == "hint" and opts.memory_budget is None
                and other.prediction is not None and plan.prediction is not None
                and other.prediction.step_seconds
                <= plan.prediction.step_seconds * (1 + HINT_MARGIN)):
            self._progress(f"keeping the annotated layouts: the search is predicted only "
                           f"{other.prediction.step_seconds / plan.prediction.step_seconds - 1:.2%}"
                           f" faster (margin {HINT_MARGIN:.0%})")
            report = annotation_report(other, plan, hint_pins, "require", opts.hardware,
                                       donated=donated, updated=updated)
            plan = replace(other, annotation_report=replace(report, mode="hint"))
            lowered = lower(plan, opts.mesh)
            return plan, lowered, self._jit(traced, lowered, nargs)
        report = annotation_report(plan, other, hint_pins, opts.annotations, opts.hardware,
                                   donated=donated, updated=updated)
        return replace(plan, annotation_report=report), lowered, jitted

    def _store(self, key: str, record: dict) -> str | None:
        """Write the plan's record to the cache; a cache that cannot be written costs a
        warning, not the run."""
        try:
            return str(self._options.cache.store(key, record))
        except OSError as err:
            log.warning("autoshard: could not write the plan cache entry for %s under %s: %s",
                        self.__name__, self._options.cache.directory, err)
            return None

    def _search_within_budget(self, args, traced, graph, mesh_spec, pins, donated):
        """Search, lower, and hold the compiled executable to the memory budget.

        The cost model's peak memory is an estimate; the budget is a promise about the program
        that runs. When XLA's buffer assignment (``memory_analysis``) exceeds the budget, the
        search runs again with the budget scaled down by the overshoot, up to three times. Where
        the search returned the same plan as before, the budget is scaled from the peak the
        solver's own constraint saw for it instead (below the predicted and the compiled
        peaks), so that it cannot fit again: scaled from the last target alone, one plan
        fitted four targets in a row on an MLP-Mixer. Not from the first retry: a plan whose
        compiled peak is over often gives way to another at a slightly lower target, and the
        solver's own peak asks for far less (a budgeted GPT: 23 s of planning against 67)."""
        opts = self._options
        target = opts.memory_budget
        previous = None
        for attempt in range(4):
            plan = search_plan(graph, mesh_spec, opts.hardware, pins, in_tree=traced.in_tree,
                               out_tree=traced.out_tree, donated=donated,
                               updated=updated_arguments(graph), memory_budget=target,
                               time_limit=opts.solver_time_limit, progress=self._progress)
            lowered = lower(plan, opts.mesh)
            jitted = self._jit(traced, lowered, len(args))
            if opts.memory_budget is None:
                return plan, lowered, jitted
            planned = _Planned(traced, graph, plan, lowered, jitted, 0.0)
            compiled = jitted.lower(*self._abstract(planned, args)).compile()
            peak = peak_memory(compiled)
            if peak <= opts.memory_budget:
                if target != opts.memory_budget and plan.prediction is not None:
                    # the summary states the user's budget, not the scaled-down target
                    plan = replace(plan, prediction=replace(
                        plan.prediction, memory_budget=opts.memory_budget))
                return plan, lowered, jitted
            scale = opts.memory_budget / peak * 0.97
            if previous is not None and (previous.input_specs, previous.value_specs) == (
                    plan.input_specs, plan.value_specs):
                constrained = plan.solver.details.get("constrained_peak", target)
                target = int(min(target, constrained) * scale)
            else:
                target = int(target * scale)
            previous = plan
            predicted = plan.prediction.peak_memory_bytes
            self._progress(f"compiled peak {peak:,} bytes exceeds the budget "
                           f"{opts.memory_budget:,} (predicted {predicted:,}); planning again "
                           f"for {target:,}")
        raise PlanInfeasibleError(
            f"{self.__name__}: no plan found whose compiled program fits memory_budget="
            f"{opts.memory_budget:,} bytes per device; the last one needs {peak:,} bytes "
            f"(XLA's memory_analysis). Raise the budget or use a larger mesh.")

    def _progress(self, message: str) -> None:
        log.info("autoshard: planning %s: %s", self.__name__, message)

    def _argument_spans(self, traced: TracedFunction, nargs: int) -> dict[int, range]:
        """Positional argument -> its range of flat input positions."""
        dynamic = [i for i in range(nargs) if i not in self._options.static_argnums]
        spans, start = {}, 0
        for argnum, subtree in zip(dynamic, traced.in_tree.children()):
            spans[argnum] = range(start, start + subtree.num_leaves)
            start += subtree.num_leaves
        return spans

    def _batch_inputs(self, traced: TracedFunction, spans: dict[int, range]) -> tuple[int, ...]:
        """Flat input positions of the batch arguments (see passes/rules.py)."""
        if self._options.batch_argnums is not None:
            return tuple(i for a in self._options.batch_argnums if a in spans for i in spans[a])
        for argnum in sorted(spans, reverse=True):
            leading = {traced.in_avals[i].shape[:1] for i in spans[argnum]}
            if len(spans[argnum]) and len(leading) == 1 and leading != {()}:
                return tuple(spans[argnum])
        return ()

    def _jit(self, traced: TracedFunction, lowered: LoweredPlan, nargs: int):
        opts = self._options
        dynamic = [i for i in range(nargs) if i not in opts.static_argnums]
        in_tree, out_tree = traced.in_tree, traced.out_tree

        def sharded_step(*args):
            flat = jax.tree_util.tree_leaves(tuple(args[i] for i in dynamic))
            return jax.tree_util.tree_unflatten(out_tree, lowered.fn(*flat))

        sharded_step.__name__ = self.__name__.split(".")[-1].replace("<", "").replace(">", "")
        return jax.jit(sharded_step, static_argnums=opts.static_argnums,
                       donate_argnums=opts.donate_argnums,
                       in_shardings=jax.tree_util.tree_unflatten(in_tree, lowered.in_shardings),
                       out_shardings=jax.tree_util.tree_unflatten(out_tree, lowered.out_shardings))

    # -- argument placement ---------------------------------------------------------------------

    def _place(self, planned: _Planned, args: Sequence[Any]) -> list:
        """Put each argument leaf where the plan wants it, without copying what is already there.

        An array laid out equivalently on the user's (Explicit) mesh is re-wrapped, zero-copy,
        on the Auto view: jit would otherwise trace it with its Explicit type (results are
        re-wrapped back onto the user's mesh). Anything else is moved with ``device_put``.
        """
        shardings = iter(planned.lowered_plan.in_shardings)
        out = list(args)
        for i, arg in enumerate(args):
            if i in self._options.static_argnums:
                continue
            leaves, tree = jax.tree_util.tree_flatten(arg)
            out[i] = jax.tree_util.tree_unflatten(tree, [_placed(leaf, next(shardings),
                                                                 self.__name__)
                                                         for leaf in leaves])
        return out

    def _abstract(self, planned: _Planned, args: Sequence[Any]) -> list:
        shardings = iter(planned.lowered_plan.in_shardings)
        out = list(args)
        for i, arg in enumerate(args):
            if i in self._options.static_argnums:
                continue
            out[i] = jax.tree_util.tree_map(
                lambda leaf: _with_sharding(abstractify_leaf(leaf, "", self.__name__),
                                            next(shardings)), arg)
        return out


def _placed(leaf: Any, target: NamedSharding, fn_name: str) -> Any:
    if isinstance(leaf, jax.ShapeDtypeStruct):
        raise ArgumentError(f"{fn_name} was called with a ShapeDtypeStruct; use .lower(*args) "
                            "to compile without data")
    if isinstance(leaf, jax.core.Tracer):
        return leaf  # called under an outer transformation: jit's in_shardings constrain it
    if not isinstance(leaf, jax.Array):
        return jax.device_put(leaf, target)
    if leaf.sharding == target:
        return leaf
    moved = on_mesh(leaf, target.mesh)
    return moved if moved.sharding == target else jax.device_put(leaf, target)


def _sharding_key(leaf: Any) -> Any:
    """How an argument is laid out, for the cache key (None for host data)."""
    sharding = getattr(leaf, "sharding", None)
    spec = getattr(sharding, "spec", None)
    if spec is None:
        return None if sharding is None else type(sharding).__name__
    return [str(spec), list(getattr(sharding.mesh, "axis_names", ()))]


def _with_sharding(aval: jax.ShapeDtypeStruct, sharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(aval.shape, aval.dtype, weak_type=aval.weak_type,
                                sharding=sharding)


def _hashable(value: Any, argnum: int, fn_name: str) -> Any:
    try:
        hash(value)
    except TypeError:
        raise ArgumentError(f"{fn_name}: static argument {argnum} ({type(value).__name__}) is "
                            "not hashable; static arguments must be hashable, as for jax.jit"
                            ) from None
    return value
