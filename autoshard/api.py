"""``autoshard.compile``: trace -> lift -> pins -> plan -> lower -> jit.

This module only wires the passes together and keeps a ``jax.jit``-like object around them.
A ``ShardedFunction`` holds one planned executable per call signature (argument shapes, dtypes
and static values), as ``jax.jit`` holds one per trace: a call with a new signature plans again
(logged), a call with a known one runs the executable ``.lower(*args).compile()`` returns.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import jax
from jax.sharding import Mesh, NamedSharding

from autoshard.ir.errors import ArgumentError, PlanInfeasibleError
from autoshard.ir.graph import Graph
from autoshard.ir.graph import verify as verify_graph
from autoshard.ir.mesh import MeshSpec
from autoshard.ir.plan import Plan
from autoshard.cost_model.hardware import Hardware, get_hardware
from autoshard.passes.data_parallel import data_parallel_plan
from autoshard.passes.lift import lift
from autoshard.passes.lower import LoweredPlan, lower, on_mesh
from autoshard.passes.pins import collect_pins
from autoshard.passes.plan_search import search_plan
from autoshard.passes.state import updated_arguments
from autoshard.passes.trace import (TracedFunction, abstract_arguments, abstractify_leaf,
                                    function_name, normalize_static_argnums, trace)
from autoshard.verify import peak_memory

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


@dataclass(frozen=True)
class _Planned:
    """Everything made for one call signature."""

    traced: TracedFunction
    graph: Graph
    plan: Plan
    lowered_plan: LoweredPlan
    jitted: Any
    planning_seconds: float


PLANNERS = ("search", "data-parallel")


def compile(fn: Callable, *example_args: Any, mesh: Mesh, memory_budget: int | None = None,
            hardware: str | Hardware | None = None, pipeline: Any = None,
            donate_argnums: int | Sequence[int] = (), static_argnums: int | Sequence[int] = (),
            in_specs: Any = None, out_specs: Any = None,
            batch_argnums: int | Sequence[int] | None = None, planner: str = "search",
            solver_time_limit: float = 30.0) -> ShardedFunction:
    """Plan ``fn`` for ``mesh`` on ``example_args`` (arrays or ``jax.ShapeDtypeStruct``s) and
    return a ``ShardedFunction`` that runs it sharded.

    ``planner="search"`` (default) solves for the plan with the cost model of ``hardware``
    (a profile name — ``"h100"``, ``"h100-2node"``, ``"a100"``, ``"tpu-v5e"``, ``"cpu"`` — or an
    ``autoshard.Hardware``; default ``"h100"``) under ``memory_budget`` (bytes per device);
    ``solver_time_limit`` bounds the solve (deterministic work units of about a second each,
    so that every process finds the same plan). ``planner="data-parallel"`` is the simple rule:
    split the batch (``batch_argnums``), replicate the rest.

    ``in_specs`` / ``out_specs`` pin argument / result layouts (pytree prefixes of
    ``PartitionSpec``s, as ``jax.jit``'s shardings; ``None`` leaves a leaf to the planner);
    ``autoshard.hint`` pins values inside the function. ``pipeline`` is not available yet.
    """
    if not isinstance(mesh, Mesh):
        raise ArgumentError(f"autoshard.compile({function_name(fn)}): mesh must be a "
                            f"jax.sharding.Mesh (jax.make_mesh(...)), got {type(mesh).__name__}")
    if pipeline is not None:
        raise NotImplementedError(
            f"autoshard.compile({function_name(fn)}, pipeline={pipeline!r}): pipeline stages "
            "are not in this release yet; leave pipeline=None.")
    if planner not in PLANNERS:
        raise ArgumentError(f"autoshard.compile({function_name(fn)}): planner must be one of "
                            f"{PLANNERS}, got {planner!r}")
    if memory_budget is not None and (not isinstance(memory_budget, (int, float))
                                      or memory_budget <= 0):
        raise ArgumentError(f"memory_budget must be a positive number of bytes per device, got "
                            f"{memory_budget!r}")
    if memory_budget is not None and planner != "search":
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
                       else int(memory_budget), float(solver_time_limit))
    return ShardedFunction(fn, options, example_args)


class ShardedFunction:
    """A planned, sharded version of a function; behaves like the result of ``jax.jit``."""

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
        return self._cache[self._example_key].planning_seconds

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
        opts = self._options
        start = time.perf_counter()
        traced = trace(self._fn, args, static_argnums=opts.static_argnums)
        graph = lift(traced)
        verify_graph(graph)
        mesh_spec = MeshSpec.from_jax(opts.mesh)
        pins = collect_pins(graph, mesh_spec, in_specs=opts.in_specs, out_specs=opts.out_specs,
                            in_tree=traced.in_tree, out_tree=traced.out_tree)
        spans = self._argument_spans(traced, len(args))
        if opts.planner == "data-parallel":
            plan = data_parallel_plan(graph, mesh_spec, pins, in_tree=traced.in_tree,
                                      out_tree=traced.out_tree,
                                      batch_inputs=self._batch_inputs(traced, spans))
            lowered = lower(plan, opts.mesh)
            jitted = self._jit(traced, lowered, len(args))
        else:
            donated = {i for a in opts.donate_argnums if a in spans for i in spans[a]}
            plan, lowered, jitted = self._search_within_budget(
                args, traced, graph, mesh_spec, pins, donated)
        seconds = time.perf_counter() - start
        log.info("autoshard: planned %s in %.2fs (%d nodes)", self.__name__, seconds,
                 graph.num_nodes())
        return _Planned(traced, graph, plan, lowered, jitted, seconds)

    def _search_within_budget(self, args, traced, graph, mesh_spec, pins, donated):
        """Search, lower, and hold the compiled executable to the memory budget.

        The cost model's peak memory is an estimate; the budget is a promise about the program
        that runs. When XLA's buffer assignment (``memory_analysis``) exceeds the budget, the
        search runs again with the budget scaled down by the overshoot, up to three times."""
        opts = self._options
        target = opts.memory_budget
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
                return plan, lowered, jitted
            target = int(target * opts.memory_budget / peak * 0.97)
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
        """Flat input positions of the batch arguments (see passes/data_parallel.py)."""
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
