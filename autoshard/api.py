"""``autoshard.compile`` and ``autoshard.shard_batch``: the public entry points.

``compile`` checks its arguments, gathers them into ``CompileOptions`` and hands the step to the
front end that fits it: ``NnxFunction`` for steps over Flax NNX objects, a pipeline
(``pipeline=``), the measured choice among plans (``planner="measured"``), or a
``ShardedFunction``, which plans each call signature with ``planner.plan_step``.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from jax.sharding import Mesh

from autoshard.candidates import compile_measured, compile_pipelined
from autoshard.cost_model.hardware import Hardware, get_hardware
from autoshard.ir.errors import ArgumentError
from autoshard.ir.pipeline import Pipeline
from autoshard.nnx import NnxFunction, has_nnx_objects
from autoshard.passes.pins import ANNOTATION_MODES
from autoshard.passes.trace import function_name, normalize_static_argnums
from autoshard.plan_cache import PlanCache, cache_enabled
from autoshard.planner import PLANNERS, RULES, CompileOptions
from autoshard.progress import progress_enabled
from autoshard.sharded_function import ShardedFunction
from autoshard.step import Step


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
            annotations: str = "hint",
            logical_axis_rules: Sequence[tuple[str, Any]] | None = None,
            progress: bool | None = None) -> Step:
    """Plan ``fn`` for ``mesh`` on ``example_args`` (arrays or ``jax.ShapeDtypeStruct``s) and
    return a ``Step`` that runs it sharded: a ``ShardedFunction``, or an ``NnxFunction`` /
    ``PipelinedFunction`` for the cases below.

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
    over the mesh axis ``"stage"``; ``pipeline="auto"`` pipelines over a mesh axis when the
    pipeline's executable measures faster than the best plan without one (candidates.py).

    Flax NNX steps (arguments holding ``nnx.Module`` / ``nnx.Optimizer`` objects, or the
    ``nnx.split`` form: a ``GraphDef`` and ``State``s) are planned over their state and called
    like ``nnx.jit`` (autoshard/nnx.py). Their ``nnx.with_partitioning`` annotations are used
    per ``annotations``: ``"hint"`` (default) prefers them and overrides them only where another
    layout is cheaper, ``"require"`` pins them, ``"ignore"`` plans as if there were none; the
    plan's ``annotation_report`` (in ``plan.summary()``) lists every difference and its cost.
    Flax linen parameters boxed by ``nn.with_logical_partitioning`` / ``nn.with_partitioning``
    (``nn.LogicallyPartitioned`` / ``nn.Partitioned`` in the params pytree, and around optax's
    moments) are read the same way (autoshard/linen.py). Logical names resolve as flax resolves
    them, by ``logical_axis_rules`` (``(logical name, mesh axis or None)`` pairs) when given,
    else by the ``nn.logical_axis_rules`` / ``nnx.logical_axis_rules`` context around
    ``compile``.

    Equinox modules are passed as they are, as to ``eqx.filter_jit``: their arrays are traced
    and every other leaf (an activation function, a ``bool`` or ``int`` field) is static, part
    of the call signature (a new value plans again). Outside modules, Python scalars are traced
    as ``jax.jit`` traces them, and any other non-array leaf is static (passes/arguments.py).

    Solved plans are cached on disk (``AUTOSHARD_CACHE_DIR``, default ``~/.cache/autoshard``)
    under a fingerprint of the program, arguments, mesh, hardware, budget and options; a later
    compile of the same step reuses the plan instead of solving. ``cache=False`` (or
    ``AUTOSHARD_CACHE=0``) bypasses the cache. After ``jax.distributed.initialize`` every process
    plans and the plans are checked equal across processes (``PlanAgreementError`` otherwise).

    A plan that takes over a second shows its progress on stderr (phase, graph size, solver
    messages, elapsed time: one updating line on a terminal, plain lines elsewhere;
    autoshard/progress.py); ``progress=False`` or ``AUTOSHARD_PROGRESS=0`` turns it off.
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
    rules = None if logical_axis_rules is None else _checked_rules(logical_axis_rules, fn)
    options = CompileOptions(mesh, donate, statics, in_specs, out_specs, batch, planner,
                             get_hardware(hardware), None if memory_budget is None
                             else int(memory_budget), float(solver_time_limit),
                             PlanCache.default() if planner in ("search", "measured")
                             and cache_enabled(cache) else None, annotations,
                             logical_axis_rules=rules, progress=progress_enabled(progress))
    if has_nnx_objects(example_args):
        if pipeline is not None:
            raise ArgumentError(f"autoshard.compile({function_name(fn)}): pipelines over Flax "
                                "NNX objects are not supported yet; pipeline a functional step "
                                "(nnx.split the model and pass its State arrays)")
        if planner == "measured":
            raise ArgumentError(f"autoshard.compile({function_name(fn)}): planner='measured' "
                                "is not supported for Flax NNX steps yet; use 'search'")
        return NnxFunction(fn, options, example_args)
    if pipeline is not None:
        return compile_pipelined(fn, example_args, options, pipeline)
    if planner == "measured":
        return compile_measured(fn, example_args, options)
    return ShardedFunction(fn, options, example_args)


def _checked_rules(rules: Any, fn: Callable) -> tuple[tuple[str, Any], ...]:
    """``logical_axis_rules`` as a tuple of ``(logical name, mesh axes)`` pairs, as flax takes
    them."""
    try:
        pairs = tuple((name, tuple(axes) if isinstance(axes, list) else axes)
                      for name, axes in rules)
    except (TypeError, ValueError):
        pairs = None
    if pairs is None or not all(isinstance(name, str) for name, _ in pairs):
        raise ArgumentError(f"autoshard.compile({function_name(fn)}): logical_axis_rules must "
                            "be a sequence of (logical name, mesh axis or None) pairs, as for "
                            f"nn.logical_axis_rules, got {rules!r}")
    return pairs
