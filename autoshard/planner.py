"""Planning one call signature: trace -> lift -> pins -> plan -> lower -> jit -> agree.

``plan_step`` is the whole flow for one set of argument shapes, dtypes and static values; the
jit-like wrapper around it (sharded_function.py) keeps one ``PlannedStep`` per signature. The
plan comes from a rule (passes/rules.py), from the plan cache (plan_cache.py) or from the
search (passes/search.py) held to the memory budget by compiling; in a multi-process run every
process must then have chosen the same plan (runtime/multihost.py).
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import jax
from jax.sharding import Mesh

from autoshard.cost_model.hardware import Hardware
from autoshard.ir.errors import PlanInfeasibleError, SolverTimeLimitWarning
from autoshard.ir.graph import Graph
from autoshard.ir.graph import verify as verify_graph
from autoshard.ir.mesh import MeshSpec
from autoshard.ir.plan import Plan
from autoshard.ir.plan_json import fingerprint, graph_fingerprint, plan_from_json, plan_to_json
from autoshard.ir.version import __version__
from autoshard.measure.verify import peak_memory
from autoshard.passes.annotations import annotation_report
from autoshard.passes.lift import lift
from autoshard.passes.lower import LoweredPlan, lower
from autoshard.passes.pins import Pins, collect_pins
from autoshard.passes.rules import data_parallel_plan
from autoshard.passes.search import search_plan
from autoshard.passes.state import updated_arguments
from autoshard.passes.trace import TracedFunction, abstractify_leaf, dynamic_arguments, trace
from autoshard.plan_cache import PlanCache
from autoshard.progress import phase, planning, report
from autoshard.runtime import multihost

log = logging.getLogger("autoshard")

PLANNERS = ("search", "data-parallel", "fully-sharded", "measured")
#: The rules (no search): data parallel, and FSDP / ZeRO-3 (passes/rules.py).
RULES = ("data-parallel", "fully-sharded")
#: Under annotations="hint", how much faster (predicted) the searched plan must be to override
#: the user's annotated layouts.
HINT_MARGIN = 0.02
#: A time-limited solve this close to its lower bound is not worth a warning.
NEGLIGIBLE_GAP = 5e-4


@dataclass(frozen=True)
class CompileOptions:
    """``autoshard.compile``'s options, checked and normalized (argnums as tuples, the hardware
    profile resolved, the plan cache opened or None)."""

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
    logical_axis_rules: tuple | None = None   # given to compile; None: flax's context (linen.py)
    progress: bool = True                    # the planning display (autoshard/progress.py)


@dataclass(frozen=True)
class PlannedStep:
    """Everything made for one call signature. ``source`` says where the plan came from:
    ``"solved"``, ``"cache"`` (with ``cache_path``), ``"rule"`` (data-parallel) or
    ``"reused"`` (an earlier signature's, whose graph is the same: ``plan_step``)."""

    traced: TracedFunction
    graph: Graph
    plan: Plan
    lowered_plan: LoweredPlan
    jitted: Any
    planning_seconds: float
    source: str = "solved"
    cache_path: str | None = None
    digest: str = ""


def plan_step(fn: Callable, args: Sequence[Any], options: CompileOptions, name: str,
              known_plans: dict[str, dict] | None = None) -> PlannedStep:
    """Plan ``fn`` (called ``name`` in messages) for arguments shaped like ``args``.

    ``known_plans``: the plan records of ``fn``'s earlier call signatures, by ``reuse_key``. A
    new signature that lifts to the same graph (a static argument the step does not read, an
    NNX optimizer rebuilt by ``step.init`` with a new optax object) takes that plan as it is
    (source ``"reused"``) instead of planning again; new plans are added to it."""
    with planning(name, options.progress):
        return _plan_step(fn, args, options, name, known_plans)


def _plan_step(fn: Callable, args: Sequence[Any], options: CompileOptions, name: str,
               known_plans: dict[str, dict] | None) -> PlannedStep:
    start = time.perf_counter()
    nargs = len(args)
    traced = trace(fn, args, static_argnums=options.static_argnums, mesh=options.mesh)
    phase("lifting")
    graph = lift(traced)
    phase("pins", f"{graph.num_nodes()} nodes")
    verify_graph(graph)
    mesh_spec = MeshSpec.from_jax(options.mesh)
    pins = collect_pins(graph, mesh_spec, in_specs=options.in_specs,
                        out_specs=options.out_specs, in_tree=traced.in_tree,
                        out_tree=traced.out_tree, annotations=options.annotation_specs,
                        annotation_mode=options.annotations)
    spans = argument_spans(traced, nargs, options.static_argnums)
    graph_digest = graph_fingerprint(graph)  # the cache key, the record and the agreement
    key = cache_path = None
    reuse = reuse_key(options, graph_digest)
    known = None if known_plans is None else known_plans.get(reuse)
    if known is not None:
        source = "reused"
        plan = plan_from_json(known, graph, in_tree=traced.in_tree, out_tree=traced.out_tree,
                              where=f"the plan of an earlier call of {name}",
                              graph_digest=graph_digest)
        lowered, jitted = lower_and_jit(plan, traced, nargs, options, name)
    elif options.planner in RULES:
        source = "rule"
        plan = data_parallel_plan(graph, mesh_spec, pins, in_tree=traced.in_tree,
                                  out_tree=traced.out_tree,
                                  batch_inputs=batch_inputs(traced, spans, options.batch_argnums),
                                  fully_sharded=options.planner == "fully-sharded")
        lowered, jitted = lower_and_jit(plan, traced, nargs, options, name)
    else:
        key = cache_key(options, graph_digest, args) if options.cache is not None else None
        plan = None if key is None else options.cache.load(
            key, graph, in_tree=traced.in_tree, out_tree=traced.out_tree,
            graph_digest=graph_digest)
        if plan is not None:
            source, cache_path = "cache", str(options.cache.path(key))
            _progress(name, f"plan cache hit: {cache_path}")
            lowered, jitted = lower_and_jit(plan, traced, nargs, options, name)
        else:
            source = "solved"
            phase("solving", f"{graph.num_nodes()} nodes")
            donated = {i for a in options.donate_argnums if a in spans for i in spans[a]}
            plan, lowered, jitted = search_within_budget(
                args, traced, graph, mesh_spec, pins, donated, options, name)
            plan, lowered, jitted = with_annotation_report(
                plan, lowered, jitted, traced, graph, mesh_spec, pins, donated, nargs, options,
                name)
            warn_if_time_limited(plan, options, name)
    record = plan_to_json(plan, graph_digest=graph_digest)
    if known_plans is not None:
        known_plans.setdefault(reuse, record)
    if source == "solved" and key is not None:
        cache_path = store_in_cache(options.cache, key, record, name)
    phase("agreeing" if jax.process_count() > 1 else "done")
    digest = multihost.agree(name, record, graph)
    seconds = time.perf_counter() - start
    log.info("autoshard: planned %s in %.2fs (%d nodes, plan %s%s)", name, seconds,
             graph.num_nodes(), source, f", {cache_path}" if cache_path else "")
    return PlannedStep(traced, graph, plan, lowered, jitted, seconds, source, cache_path, digest)


# -- the search ---------------------------------------------------------------------------------

def search_within_budget(args, traced, graph, mesh_spec, pins, donated, options: CompileOptions,
                         name: str) -> tuple[Plan, LoweredPlan, Any]:
    """Search, lower, and hold the compiled executable to the memory budget.

    The cost model's peak is an estimate; the budget is a promise about the program that runs.
    When XLA's buffer assignment (``memory_analysis``) exceeds it, the search runs again with the
    target scaled down by the overshoot, up to three times. The first retry scales the last
    target: a slightly lower one often admits another plan, where the solver's own peak would
    ask for far less. Once the search returns the same plan again, the target is scaled from
    the peak the solver's own constraint saw for that plan (below the predicted and compiled
    peaks), so that this plan cannot fit again."""
    target = options.memory_budget
    previous = None
    # a plan that leaves a mesh axis unused is priced against one that splits the batch over it
    batch = batch_inputs(traced, argument_spans(traced, len(args), options.static_argnums),
                         options.batch_argnums)
    for _ in range(4):
        plan = search_plan(graph, mesh_spec, options.hardware, pins, in_tree=traced.in_tree,
                           out_tree=traced.out_tree, donated=donated,
                           updated=updated_arguments(graph), memory_budget=target,
                           time_limit=options.solver_time_limit,
                           progress=_progress_of(name), batch_inputs=batch)
        lowered, jitted = lower_and_jit(plan, traced, len(args), options, name)
        if options.memory_budget is None:
            return plan, lowered, jitted
        compiled = jitted.lower(*abstract_with_shardings(
            args, lowered.in_shardings, options.static_argnums, name)).compile()
        peak = peak_memory(compiled)
        if peak <= options.memory_budget:
            if target != options.memory_budget and plan.prediction is not None:
                # the summary states the user's budget, not the scaled-down target
                plan = replace(plan, prediction=replace(
                    plan.prediction, memory_budget=options.memory_budget))
            return plan, lowered, jitted
        scale = options.memory_budget / peak * 0.97
        if previous is not None and (previous.input_specs, previous.value_specs) == (
                plan.input_specs, plan.value_specs):
            constrained = plan.solver.details.get("constrained_peak", target)
            target = int(min(target, constrained) * scale)
        else:
            target = int(target * scale)
        previous = plan
        predicted = plan.prediction.peak_memory_bytes
        _progress(name, f"compiled peak {peak:,} bytes exceeds the budget "
                        f"{options.memory_budget:,} (predicted {predicted:,}); planning again "
                        f"for {target:,}")
    raise PlanInfeasibleError(
        f"{name}: no plan found whose compiled program fits memory_budget="
        f"{options.memory_budget:,} bytes per device; the last one needs {peak:,} bytes "
        f"(XLA's memory_analysis). Raise the budget or use a larger mesh.")


def with_annotation_report(plan: Plan, lowered, jitted, traced, graph, mesh_spec, pins: Pins,
                           donated, nargs: int, options: CompileOptions, name: str):
    """Solve the step in the other annotation mode too and attach the comparison
    (passes/annotations.py says why both are solved). Under ``"hint"`` without a memory
    budget, the annotated plan runs unless the search is predicted faster by more than
    ``HINT_MARGIN``: a user's layout is not overridden for a rounding-level gain (with a
    budget the searched plan is the one held to it, so it runs)."""
    if options.annotations == "ignore" or not pins.annotated:
        return plan, lowered, jitted
    other_mode = "require" if options.annotations == "hint" else "hint"
    other_pins = collect_pins(graph, mesh_spec, in_specs=options.in_specs,
                              out_specs=options.out_specs, in_tree=traced.in_tree,
                              out_tree=traced.out_tree, annotations=options.annotation_specs,
                              annotation_mode=other_mode)
    _progress(name, f"solving with annotations as {other_mode} too, for the annotation report")
    updated = updated_arguments(graph)
    other = search_plan(graph, mesh_spec, options.hardware, other_pins, in_tree=traced.in_tree,
                        out_tree=traced.out_tree, donated=donated, updated=updated,
                        memory_budget=options.memory_budget,
                        time_limit=options.solver_time_limit, progress=_progress_of(name))
    hint_pins = pins if options.annotations == "hint" else other_pins
    if (options.annotations == "hint" and options.memory_budget is None
            and other.prediction is not None and plan.prediction is not None
            and other.prediction.step_seconds
            <= plan.prediction.step_seconds * (1 + HINT_MARGIN)):
        _progress(name, f"keeping the annotated layouts: the search is predicted only "
                        f"{other.prediction.step_seconds / plan.prediction.step_seconds - 1:.2%}"
                        f" faster (margin {HINT_MARGIN:.0%})")
        report = annotation_report(other, plan, hint_pins, "require", options.hardware,
                                   donated=donated, updated=updated)
        plan = replace(other, annotation_report=replace(report, mode="hint"))
        return (plan, *lower_and_jit(plan, traced, nargs, options, name))
    report = annotation_report(plan, other, hint_pins, options.annotations, options.hardware,
                               donated=donated, updated=updated)
    return replace(plan, annotation_report=report), lowered, jitted


def warn_if_time_limited(plan: Plan, options: CompileOptions, name: str) -> None:
    """Warn when the solver stopped at ``solver_time_limit`` short of proving its plan optimal
    (unless the gap to its lower bound is negligible)."""
    stats = plan.solver
    if stats is None or not stats.details.get("time_limit_reached"):
        return
    if stats.gap is not None and stats.gap < NEGLIGIBLE_GAP:
        return                  # not proven, but within rounding of the bound
    bound = "no lower bound" if stats.bound is None else (
        f"lower bound {stats.bound * 1e3:.4g} ms, gap "
        f"{'unknown' if stats.gap is None else f'{stats.gap:.1%}'}")
    warnings.warn(SolverTimeLimitWarning(
        f"autoshard.compile({name}): the solver reached solver_time_limit="
        f"{options.solver_time_limit:g}s before proving its plan optimal; using the best "
        f"plan found ({stats.engine}: cost {stats.objective * 1e3:.4g} ms, {bound}). Raise "
        "solver_time_limit for a better plan."), stacklevel=4)


# -- the plan cache -----------------------------------------------------------------------------

def cache_key(options: CompileOptions, graph_digest: str, args: Sequence[Any]) -> str:
    """The plan cache key: everything the plan depends on (plan_cache.py)."""
    shardings = [_sharding_key(leaf) for leaf in jax.tree_util.tree_leaves(
        dynamic_arguments(args, options.static_argnums))]
    mesh = options.mesh
    return fingerprint(
        "autoshard", __version__, "jax", jax.__version__, graph_digest,
        shardings, list(mesh.axis_names), [int(s) for s in mesh.axis_sizes],
        [str(t) for t in getattr(mesh, "axis_types", ())], repr(options.hardware),
        options.memory_budget, options.planner, list(options.donate_argnums),
        list(options.static_argnums), None if options.batch_argnums is None
        else list(options.batch_argnums), repr(options.in_specs), repr(options.out_specs),
        options.solver_time_limit, options.annotations, None if options.annotation_specs is None
        else [None if s is None else str(s) for s in options.annotation_specs])


def reuse_key(options: CompileOptions, graph_digest: str) -> str:
    """What decides whether a call signature may take an earlier one's plan: the graph, and the
    one option that differs between the signatures of one compiled step (the annotations an
    NNX step reads from its arguments). Where the arguments lie now does not matter: each call
    places them where the plan wants them."""
    return fingerprint(graph_digest, None if options.annotation_specs is None
                       else [None if s is None else str(s) for s in options.annotation_specs])


def store_in_cache(cache: PlanCache, key: str, record: dict, name: str) -> str | None:
    """Write the plan's record to the cache; a cache that cannot be written costs a warning,
    not the run."""
    try:
        return str(cache.store(key, record))
    except OSError as err:
        log.warning("autoshard: could not write the plan cache entry for %s under %s: %s",
                    name, cache.directory, err)
        return None


def _sharding_key(leaf: Any) -> Any:
    """How an argument is laid out, for the cache key (None for host data)."""
    sharding = getattr(leaf, "sharding", None)
    spec = getattr(sharding, "spec", None)
    if spec is None:
        return None if sharding is None else type(sharding).__name__
    return [str(spec), list(getattr(sharding.mesh, "axis_names", ()))]


# -- arguments and the executable ---------------------------------------------------------------

def argument_spans(traced: TracedFunction, nargs: int,
                   static_argnums: tuple[int, ...]) -> dict[int, range]:
    """Positional argument -> its range of flat input positions."""
    dynamic = [i for i in range(nargs) if i not in static_argnums]
    spans, start = {}, 0
    for argnum, subtree in zip(dynamic, traced.in_tree.children()):
        spans[argnum] = range(start, start + subtree.num_leaves)
        start += subtree.num_leaves
    return spans


def batch_inputs(traced: TracedFunction, spans: dict[int, range],
                 batch_argnums: tuple[int, ...] | None) -> tuple[int, ...]:
    """Flat input positions of the batch arguments (see passes/rules.py): those of
    ``batch_argnums``, else of the last argument whose leaves share one leading dim."""
    if batch_argnums is not None:
        return tuple(i for a in batch_argnums if a in spans for i in spans[a])
    for argnum in sorted(spans, reverse=True):
        leading = {traced.in_avals[i].shape[:1] for i in spans[argnum]}
        if len(spans[argnum]) and len(leading) == 1 and leading != {()}:
            return tuple(spans[argnum])
    return ()


def lower_and_jit(plan: Plan, traced: TracedFunction, nargs: int, options: CompileOptions,
                  name: str) -> tuple[LoweredPlan, Any]:
    """The plan lowered onto the mesh, and the ``jax.jit`` that runs it on the user's
    (unflattened) arguments with the plan's in/out shardings. Static leaves inside the dynamic
    arguments and results are ``None`` there (``dynamic_arguments``; the caller puts the
    results' back, ``traced.out_static``)."""
    phase("lowering")
    lowered = lower(plan, options.mesh)
    dynamic = [i for i in range(nargs) if i not in options.static_argnums]
    in_tree, out_tree = traced.in_tree, traced.out_tree

    def sharded_step(*args):
        flat = jax.tree_util.tree_leaves(tuple(args[i] for i in dynamic))
        return jax.tree_util.tree_unflatten(out_tree, lowered.fn(*flat))

    sharded_step.__name__ = name.split(".")[-1].replace("<", "").replace(">", "")
    jitted = jax.jit(sharded_step, static_argnums=options.static_argnums,
                     donate_argnums=options.donate_argnums,
                     in_shardings=jax.tree_util.tree_unflatten(in_tree, lowered.in_shardings),
                     out_shardings=jax.tree_util.tree_unflatten(out_tree, lowered.out_shardings))
    return lowered, jitted


def abstract_with_shardings(args: Sequence[Any], in_shardings: Sequence[Any],
                            static_argnums: tuple[int, ...], name: str) -> list:
    """``args`` as ``ShapeDtypeStruct``s carrying the plan's input shardings (static arguments
    as they are, static leaves as None): what the jitted step lowers and compiles without
    data."""
    shardings = iter(in_shardings)
    out = list(args)
    dynamic = iter(dynamic_arguments(args, static_argnums))
    for i in range(len(args)):
        if i in static_argnums:
            continue
        out[i] = jax.tree_util.tree_map(
            lambda leaf: _with_sharding(abstractify_leaf(leaf, "", name), next(shardings)),
            next(dynamic))
    return out


def _with_sharding(aval: jax.ShapeDtypeStruct, sharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(aval.shape, aval.dtype, weak_type=aval.weak_type,
                                sharding=sharding)


def _progress(name: str, message: str) -> None:
    log.info("autoshard: planning %s: %s", name, message)
    report(message)


def _progress_of(name: str) -> Callable[[str], None]:
    """The search's progress callback for ``name``."""
    return lambda message: _progress(name, message)
