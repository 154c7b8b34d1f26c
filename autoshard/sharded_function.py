"""``ShardedFunction``: a planned, sharded step that behaves like the result of ``jax.jit``.

It holds one ``PlannedStep`` per call signature (argument shapes, dtypes and static values, the
static leaves inside arguments included: passes/arguments.py), as ``jax.jit`` holds one
executable per trace: a call with a new signature plans again (planner.py, logged), a call with
a known one places its arguments where the plan wants them and runs the executable
``.lower(*args).compile()`` returns.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any, Callable, Sequence

import jax
from jax.sharding import Mesh, NamedSharding

from autoshard.ir.errors import ArgumentError
from autoshard.ir.graph import Graph
from autoshard.ir.mesh import MeshSpec
from autoshard.ir.plan import Plan, PlanCandidate
from autoshard.linen import box_annotations, context_rules
from autoshard.passes.arguments import combine, partition
from autoshard.passes.lower import on_mesh
from autoshard.passes.trace import abstract_arguments, function_name
from autoshard.planner import (CompileOptions, PlannedStep, abstract_with_shardings,
                               argument_spans, plan_step)
from autoshard.runtime import multihost

log = logging.getLogger("autoshard")


class ShardedFunction:
    """A planned, sharded version of a function; behaves like the result of ``jax.jit``.

    ``candidates`` (``planner="measured"``): the plans weighed, each a ``PlanCandidate``."""

    candidates: tuple[PlanCandidate, ...] | None = None

    def __init__(self, fn: Callable, options: CompileOptions, example_args: Sequence[Any],
                 known_plans: dict[str, dict] | None = None):
        """``known_plans``: plan records shared with other signatures of the same step
        (``planner.plan_step``); by default this function's own."""
        self._fn = fn
        self._options = options
        self._cache: dict[Any, PlannedStep] = {}
        self._known_plans = {} if known_plans is None else known_plans
        self.__name__ = function_name(fn)
        self.__doc__ = getattr(fn, "__doc__", None)
        self._nargs = len(example_args)
        self._rules = context_rules()    # linen's rules in effect at compile, for replans
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

    def summary(self) -> str:
        """The plan for the example arguments, as text (``Plan.summary``)."""
        return self.plan.summary()

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
        span = argument_spans(planned.traced, self._nargs, opts.static_argnums)[argnum]
        traced, static = partition(local_batch)
        leaves, tree = jax.tree_util.tree_flatten(traced)
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
        return combine(jax.tree_util.tree_unflatten(tree, placed), static)

    def argument_shardings(self, argnum: int) -> Any:
        """The plan's layout of argument ``argnum`` (for the example arguments): a pytree of
        ``NamedSharding`` shaped like its arrays."""
        planned = self._cache[self._example_key]
        spans = argument_spans(planned.traced, self._nargs, self._options.static_argnums)
        if argnum not in spans:
            raise ArgumentError(f"{self.__name__}: argument {argnum} is not a (non-static) "
                                f"argument of the {self._nargs} it was compiled for")
        dynamic = [i for i in range(self._nargs) if i not in self._options.static_argnums]
        tree = planned.traced.in_tree.children()[dynamic.index(argnum)]
        return jax.tree_util.tree_unflatten(
            tree, [planned.lowered_plan.in_shardings[i] for i in spans[argnum]])

    def init(self, create: Callable[[], Any], argnums: int | Sequence[int]) -> Any:
        """Build what ``create()`` returns (say ``(params, opt_state)`` for arguments ``(0, 1)``)
        directly in the layouts the plan chose for those arguments: ``create`` runs under
        ``jax.jit`` with them as ``out_shardings``, so XLA computes each shard on its own device
        (jax's partitionable threefry makes random initializers shardable) and no array is
        ever whole on one device. Returns one pytree, or a tuple as ``create``."""
        nums = (argnums,) if isinstance(argnums, int) else tuple(argnums)
        made = jax.eval_shape(create)
        objects = made if len(nums) > 1 else (made,)
        if not isinstance(objects, tuple) or len(objects) != len(nums):
            raise ArgumentError(f"{self.__name__}.init: create() must return one pytree per "
                                f"argument of argnums={nums}")
        planned = self._cache[self._example_key]
        spans = argument_spans(planned.traced, self._nargs, self._options.static_argnums)
        shardings = []
        for argnum, made_arg in zip(nums, objects):
            layout = self.argument_shardings(argnum)
            got = jax.tree_util.tree_leaves(made_arg)
            want = [planned.graph.inputs[i] for i in spans[argnum]]
            if [tuple(a.shape) for a in got] != [tuple(v.shape) for v in want]:
                raise ArgumentError(
                    f"{self.__name__}.init: create() makes argument {argnum} with arrays of "
                    f"shapes {[tuple(a.shape) for a in got]}; the step was compiled for "
                    f"{[tuple(v.shape) for v in want]}")
            shardings.append(layout)
        return jax.jit(create, out_shardings=tuple(shardings) if len(nums) > 1
                       else shardings[0])()

    def __call__(self, *args: Any) -> Any:
        planned = self._planned(args)
        results = planned.jitted(*self._place(planned, args))
        if self.mesh is not planned.lowered_plan.mesh:
            results = jax.tree.map(lambda r: on_mesh(r, self.mesh), results)
        return combine(results, planned.traced.out_static)

    def lower(self, *args: Any) -> jax.stages.Lowered:
        """jax's ``Lowered`` for these arguments (arrays or ShapeDtypeStructs); its
        ``.compile()`` is the executable a call with such arguments runs."""
        planned = self._planned(args)
        return planned.jitted.lower(*abstract_with_shardings(
            args, planned.lowered_plan.in_shardings, self._options.static_argnums,
            self.__name__))

    def __repr__(self) -> str:
        return (f"<autoshard.ShardedFunction {self.__name__} on mesh "
                f"{MeshSpec.from_jax(self.mesh)}, {len(self._cache)} signature(s)>")

    # -- signatures and planning ----------------------------------------------------------------

    def _signature(self, args: Sequence[Any]) -> Any:
        opts = self._options
        if len(args) != self._nargs:
            raise ArgumentError(f"{self.__name__} was compiled for {self._nargs} positional "
                                f"arguments, got {len(args)}")
        arguments = abstract_arguments(self._fn, args, opts.static_argnums)
        avals = tuple((a.shape, str(a.dtype), a.weak_type) for a in arguments.avals)
        statics = tuple(_hashable(args[i], i, self.__name__) for i in opts.static_argnums)
        return arguments.in_tree, avals, statics, arguments.statics

    def _planned(self, args: Sequence[Any]) -> PlannedStep:
        key = self._signature(args)
        planned = self._cache.get(key)
        if planned is None:
            if self._cache:
                log.info("autoshard: planning %s again for a new argument signature",
                         self.__name__)
            planned = self._plan(args)
            self._cache[key] = planned
        return planned

    def _plan(self, args: Sequence[Any]) -> PlannedStep:
        options = self._options
        if options.annotations != "ignore" and options.annotation_specs is None:
            rules = options.logical_axis_rules
            if rules is None:
                rules = context_rules() or self._rules
            options = replace(options, annotation_specs=box_annotations(
                self._fn, args, options.static_argnums, options.mesh, rules))
        try:
            return plan_step(self._fn, args, options, self.__name__, self._known_plans)
        except Exception as err:
            multihost.report_failure(self.__name__, err)  # the other processes stop, naming it
            raise

    # -- argument placement ---------------------------------------------------------------------

    def _place(self, planned: PlannedStep, args: Sequence[Any]) -> list:
        """Put each traced argument leaf where the plan wants it, without copying what is
        already there (static leaves become None: the plan's trace closed over them).

        An array laid out equivalently on the user's (Explicit) mesh is re-wrapped, zero-copy,
        on the Auto view: jit would otherwise trace it with its Explicit type (results are
        re-wrapped back onto the user's mesh). Anything else is moved with ``device_put``.
        """
        shardings = iter(planned.lowered_plan.in_shardings)
        out = list(args)
        for i, arg in enumerate(args):
            if i in self._options.static_argnums:
                continue
            leaves, tree = jax.tree_util.tree_flatten(partition(arg)[0])
            out[i] = jax.tree_util.tree_unflatten(tree, [_placed(leaf, next(shardings),
                                                                 self.__name__)
                                                         for leaf in leaves])
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


def _hashable(value: Any, argnum: int, fn_name: str) -> Any:
    try:
        hash(value)
    except TypeError:
        raise ArgumentError(f"{fn_name}: static argument {argnum} ({type(value).__name__}) is "
                            "not hashable; static arguments must be hashable, as for jax.jit"
                            ) from None
    return value
