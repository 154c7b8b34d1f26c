"""Choosing among compiled candidates: ``planner="measured"`` and ``pipeline="auto"``.

The cost model decides the searched plan; these modes compile it next to the plans a user would
write first (the data-parallel and fully-sharded rules) and, for ``pipeline="auto"``, next to
pipelines over the mesh's axes, then keep the executable that measures fastest (matmul FLOPs
and collectives read from its HLO, priced on the hardware's links) among those whose compiled
peak fits ``memory_budget``. The cost model can misjudge exactly these comparisons: tight
budgets, steps so small that start-up latency decides, and flat against pipelined predictions.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from autoshard.ir.errors import AutoshardError, PlanInfeasibleError
from autoshard.ir.pipeline import AutoDecision, Pipeline
from autoshard.ir.plan import PlanCandidate
from autoshard.measure.verify import compiled_roofline, peak_memory
from autoshard.passes.trace import function_name
from autoshard.passes.pipeline.auto_candidates import auto_pipeline_candidates
from autoshard.pipelined_function import PipelinedFunction
from autoshard.planner import RULES, CompileOptions
from autoshard.progress import phase, planning
from autoshard.sharded_function import ShardedFunction
from autoshard.step import Step

log = logging.getLogger("autoshard")


def _flat_candidates(fn, example_args, options: CompileOptions) -> list[ShardedFunction]:
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


def _measured(step: ShardedFunction, example_args, options: CompileOptions) -> tuple[float, int]:
    """(step seconds, peak bytes per device) of ``step``'s executable, measured as the
    plan-quality benchmark measures."""
    compiled = step.lower(*example_args).compile()
    return (compiled_roofline(compiled, options.hardware, options.mesh).step_seconds,
            peak_memory(compiled))


def _fastest_fitting(measures: list[tuple[float, int]], budget: int | None) -> int | None:
    fits = [k for k, (_, peak) in enumerate(measures) if budget is None or peak <= budget]
    return min(fits, key=lambda k: measures[k][0]) if fits else None


def compile_measured(fn, example_args, options: CompileOptions) -> ShardedFunction:
    """``planner="measured"``: the fastest executable among the searched plan and the rules'
    that fits the budget; ``step.candidates`` lists what was weighed. The cost model decides
    the searched plan; measuring decides between it and the plans a user would write first,
    which the cost model can misjudge (tight budgets, where the search may stop short of the
    FSDP layout; steps so small that start-up latency decides)."""
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


def compile_pipelined(fn, example_args, options: CompileOptions, pipeline) -> Step:
    """An explicit ``Pipeline`` is built as asked. ``"auto"`` slices the step for each schedule
    (``auto_pipeline_candidates``), plans it without a pipeline too (searched, and by the
    rules), compiles them all and keeps the executable that measures fastest among those that
    fit ``memory_budget``; ``step.auto_decision`` (an ``AutoDecision``) says why. Measured,
    because neither the cost model's flat and pipelined predictions nor the simulator's ranking
    of schedules are accurate enough to decide alone."""
    intra_plans: dict = {}   # per mesh: one intra-stage plan serves every schedule

    def build(mesh, pipe):
        return PipelinedFunction(fn, example_args, mesh=mesh, pipeline=pipe,
                                 intra_plans=intra_plans.setdefault(mesh.devices.shape, {}),
                                 hardware=options.hardware, donate_argnums=options.donate_argnums,
                                 static_argnums=options.static_argnums,
                                 batch_argnums=options.batch_argnums,
                                 solver_time_limit=options.solver_time_limit,
                                 progress=options.progress)

    if isinstance(pipeline, Pipeline):
        return build(options.mesh, pipeline)
    with planning(f"{function_name(fn)} (pipeline='auto')", options.progress):
        return _auto_pipelined(fn, example_args, options, build)


def _auto_pipelined(fn, example_args, options: CompileOptions, build) -> Step:
    """``compile_pipelined``'s ``"auto"``: ``build(mesh, pipe)`` makes one pipeline."""
    name = function_name(fn)

    def unpipelined():
        if options.planner == "measured":
            return compile_measured(fn, example_args, options)
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
    phase("measuring", f"{len(built)} pipelines, {len(flats)} flat plans")
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


