"""Flax NNX train steps under ``autoshard.compile``: modules in, modules out.

A step written for ``nnx.jit`` takes ``nnx.Module`` / ``nnx.Optimizer`` objects and updates them
in place. Autoshard plans pure functions of arrays, so ``NnxFunction`` does what ``nnx.jit``
does around ``jax.jit`` (with flax's public API only: ``nnx.split`` / ``merge`` / ``update``):

* per call, the dynamic arguments are split together (``nnx.split`` of the argument tuple, so a
  module reachable from two arguments is one state), one ``State`` per argument;
* a pure function over those states merges them into fresh objects, runs the user's step, and
  splits the objects and the result again; it returns every object argument's new state and
  the result (as a state when it holds objects). It is that function autoshard traces, plans and
  lowers, with the user's parameter names, so the plan reads ``model['blocks'][0]['attn']...``;
  the traced function reads nothing but its arguments (no Python side effects on the user's
  modules); the graphdef of its outputs is recorded while tracing it, as jax records out_tree;
* after the call, ``nnx.update`` writes the new, sharded state into the user's objects, and each
  Variable's ``out_sharding`` metadata is set to the layout the plan chose (flax's
  ``nnx.get_partition_spec`` then reads it back). The user's own annotation is kept once under
  ``sharding_annotation`` so a later compile still sees what the user wrote. Objects returned by
  the step that are argument objects come back as the user's objects, others as new ones.

The functional form (``graphdef, state = nnx.split(model)``, a step taking the ``GraphDef`` and
``State``s) needs no merging: ``GraphDef`` arguments become static (they are hashable, as for
``nnx.jit``) and ``State``s are pytrees whose results are new ``State``s, as under ``jax.jit``.

Variable metadata is part of a ``State``'s pytree structure, so every call is normalized onto the
structure of the first call with the same shapes (``_Entry.template``): setting the chosen
sharding in the metadata must not make the next call look like a new signature. Static values
in the graphdef are compared as ``nnx.jit`` compares them, so objects rebuilt by ``step.init``
(an ``nnx.Optimizer``'s new optax transformation, which compares by identity) are a new
signature; it is traced again, and takes the first signature's plan when it lifts to the same
graph (``planner.plan_step``'s ``known_plans``), without planning again.

Annotations (``nnx.with_partitioning``, logical names through ``nnx.logical_axis_rules`` and
a Variable's ``sharding_rules``, as flax resolves them) are read per flat argument leaf and
checked against the mesh here, where the error can name the parameter and the rule to add.
"""

from __future__ import annotations

import inspect
import logging
import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import flax.core.spmd as flax_spmd
import jax
from flax import nnx
from flax.nnx import graphlib
from jax.sharding import NamedSharding, PartitionSpec

from autoshard.ir.errors import ArgumentError, ShardingError
from autoshard.passes.trace import function_name, parameter_names
from autoshard.planner import CompileOptions
from autoshard.sharded_function import ShardedFunction

log = logging.getLogger("autoshard")

#: Where the user's own annotation is kept once autoshard writes the plan's into out_sharding.
ANNOTATION_KEY = "sharding_annotation"


def _is_nnx_leaf(x: Any) -> bool:
    return isinstance(x, (nnx.Pytree, nnx.Variable, nnx.GraphDef))


def _is_object(x: Any) -> bool:
    return isinstance(x, nnx.Pytree)


def has_nnx_objects(args: Sequence[Any]) -> bool:
    """Whether any argument holds a Flax NNX object (module, optimizer, Variable, GraphDef)."""
    return any(_is_nnx_leaf(x) for x in jax.tree_util.tree_leaves(args, is_leaf=_is_nnx_leaf))


def _has_objects(tree: Any) -> bool:
    return any(_is_object(x) for x in jax.tree_util.tree_leaves(tree, is_leaf=_is_object))


@dataclass
class _Outputs:
    """What tracing the pure function learned about the step's results."""

    graphdef: Any = None
    result_has_objects: bool = False


@dataclass
class _Entry:
    """One call signature: the graphdef of the argument objects (None in the functional form),
    the flat-leaf structure every call is normalized onto, and the planned inner function."""

    graphdef: Any
    template: Any
    object_positions: tuple[int, ...]     # indices into the dynamic arguments
    outputs: _Outputs
    sharded: Any


class NnxFunction:
    """``autoshard.compile`` of a step over Flax NNX objects; behaves like ``nnx.jit``'s result
    and exposes the ``ShardedFunction`` interface (``plan``, ``lower``, ``plan_source``, ...)."""

    def __init__(self, fn: Callable, options: CompileOptions, example_args: Sequence[Any]):
        self._fn = fn
        self._nargs = len(example_args)
        graphdefs = tuple(i for i, a in enumerate(example_args) if isinstance(a, nnx.GraphDef))
        self._options = replace(options, static_argnums=tuple(sorted(
            set(options.static_argnums) | set(graphdefs))))
        self._dynamic = [i for i in range(self._nargs) if i not in self._options.static_argnums]
        self._names = parameter_names(fn, self._nargs)
        self._rules = flax_spmd.get_logical_axis_rules()  # in effect at compile, for replans
        self._entries: dict[Any, _Entry] = {}
        self._known_plans: dict[str, dict] = {}   # shared by every signature (planner.plan_step)
        self.__name__ = function_name(fn)
        self.__doc__ = getattr(fn, "__doc__", None)
        self._example_key, _ = self._entry(example_args)

    # -- the ShardedFunction interface ----------------------------------------------------------

    @property
    def sharded(self) -> ShardedFunction:
        """The ``ShardedFunction`` of the example signature (over states)."""
        return self._entries[self._example_key].sharded

    plan = property(lambda self: self.sharded.plan)
    graph = property(lambda self: self.sharded.graph)
    mesh = property(lambda self: self._options.mesh)
    plan_source = property(lambda self: self.sharded.plan_source)
    plan_digest = property(lambda self: self.sharded.plan_digest)
    planning_seconds = property(lambda self: self.sharded.planning_seconds)

    def plan_for(self, *args: Any) -> Any:
        return self._entry(args)[1].sharded.plan

    def summary(self) -> str:
        """The plan for the example arguments, as text (``Plan.summary``)."""
        return self.plan.summary()

    def lower(self, *args: Any) -> jax.stages.Lowered:
        key, entry = self._entry(args)
        return entry.sharded.lower(*self._inner_args(entry, args))

    def shard_batch(self, local_batch: Any, argnum: int | None = None) -> Any:
        return self.sharded.shard_batch(local_batch, argnum)

    def state_shardings(self, argnum: int) -> Any:
        """The plan's ``NamedSharding``s for argument ``argnum``'s state, shaped like
        ``nnx.state(that argument)`` (leaves where its arrays are)."""
        entry = self._entries[self._example_key]
        planned = entry.sharded._cache[entry.sharded._example_key]
        shardings = iter(planned.lowered_plan.in_shardings)
        example = jax.tree_util.tree_unflatten(entry.template, [None] * entry.template.num_leaves)
        picked = None
        for k, i in enumerate(self._dynamic):
            leaves, tree = jax.tree_util.tree_flatten(example[k], is_leaf=lambda x: x is None)
            taken = [next(shardings) for _ in leaves]
            if i == argnum:
                picked = jax.tree_util.tree_unflatten(tree, taken)
        if picked is None:
            raise ArgumentError(f"{self.__name__}: argument {argnum} is not a dynamic argument")
        return picked

    def planned_state(self, create: Callable[[], Any], argnums: int | Sequence[int]
                      ) -> tuple[Any, Any, list]:
        """(graphdef, abstract state, one plan sharding per state leaf) of the objects
        ``create()`` returns, which stand for the step's arguments ``argnums``; nothing is
        computed (``nnx.eval_shape``)."""
        nums = (argnums,) if isinstance(argnums, int) else tuple(argnums)
        with nnx.use_eager_sharding(False):
            made = nnx.eval_shape(create)
        objects = made if isinstance(made, tuple) else (made,)
        if len(objects) != len(nums):
            raise ArgumentError(f"{self.__name__}: create() returned {len(objects)} objects for "
                                f"the {len(nums)} arguments {nums}")
        graphdef, state = nnx.split(objects)
        leaves = jax.tree_util.tree_leaves(state)
        shardings = [s for n in nums for s in jax.tree_util.tree_leaves(
            self.state_shardings(n), is_leaf=lambda x: isinstance(x, NamedSharding))]
        if len(shardings) != len(leaves):
            raise ArgumentError(f"{self.__name__}: the objects create() returns have "
                                f"{len(leaves)} arrays, arguments {nums} had {len(shardings)} "
                                "when the step was compiled; create the same objects")
        return graphdef, state, shardings

    def init(self, create: Callable[[], Any], argnums: int | Sequence[int]) -> Any:
        """Build the objects ``create()`` returns (say ``(model, optimizer)`` for arguments
        ``(0, 1)``) directly in the layouts the plan chose for those arguments.

        ``create`` runs under ``jax.jit`` with the plan's shardings as ``out_shardings`` (and
        flax's eager sharding off, so annotations stay metadata): XLA computes each shard on its
        own device (jax's partitionable threefry makes random initializers shardable), so no
        parameter is ever whole on one device. Returns one object, or a tuple as ``create``."""
        graphdef, state, shardings = self.planned_state(create, argnums)
        treedef = jax.tree_util.tree_structure(state)

        def build():
            with nnx.use_eager_sharding(False):
                made = create()
            return jax.tree_util.tree_leaves(nnx.split(made if isinstance(made, tuple)
                                                       else (made,))[1])

        leaves = jax.jit(build, out_shardings=shardings)()
        objects = nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, leaves))
        record_shardings(objects)
        return objects if len(objects) > 1 else objects[0]

    def __repr__(self) -> str:
        return f"<autoshard NNX function {self.__name__}, {len(self._entries)} signature(s)>"

    # -- calls ------------------------------------------------------------------------------------

    def __call__(self, *args: Any) -> Any:
        key, entry = self._entry(args)
        results = entry.sharded(*self._inner_args(entry, args))
        if entry.graphdef is None:
            return _with_chosen_sharding(results)
        *new_parts, result = results
        dyn = tuple(args[i] for i in self._dynamic)
        for k, part in zip(entry.object_positions, new_parts):
            nnx.update(dyn[k], part)
        record_shardings(dyn)
        if not entry.outputs.result_has_objects:
            return result
        return self._merge_result(entry, dyn, new_parts, result)

    def _merge_result(self, entry: _Entry, dyn: tuple, new_parts, result) -> Any:
        """Results holding objects: merged from the traced output graphdef; objects that are
        the user's argument objects come back as those very objects."""
        _, state = nnx.split(dyn)
        parts = {k: state[k] for k in range(len(dyn)) if k in state}
        parts.update(zip(entry.object_positions, new_parts))
        joint = nnx.State({0: nnx.State(parts), 1: result})
        fresh_args, fresh_out = nnx.merge(entry.outputs.graphdef, joint)
        originals = {id(f): o for (_, f), (_, o) in zip(nnx.iter_graph(fresh_args),
                                                        nnx.iter_graph(dyn))}
        return jax.tree_util.tree_map(lambda x: originals.get(id(x), x), fresh_out,
                                      is_leaf=lambda x: _is_object(x) or
                                      isinstance(x, nnx.Variable))

    # -- signatures -------------------------------------------------------------------------------

    def _split(self, args: Sequence[Any]) -> tuple[Any, list, tuple[int, ...]]:
        """(graphdef or None, one state per dynamic argument, the positions holding objects)."""
        if len(args) != self._nargs:
            raise ArgumentError(f"{self.__name__} was compiled for {self._nargs} positional "
                                f"arguments, got {len(args)}")
        dyn = tuple(args[i] for i in self._dynamic)
        if not _has_objects(dyn):
            return None, list(dyn), ()
        graphdef, state = nnx.split(dyn)
        parts = [state[k] if k in state else nnx.State({}) for k in range(len(dyn))]
        return graphdef, parts, tuple(k for k, a in enumerate(dyn) if _has_objects(a))

    def _entry(self, args: Sequence[Any]) -> tuple[Any, _Entry]:
        graphdef, parts, positions = self._split(args)
        leaves = jax.tree_util.tree_flatten_with_path(parts, is_leaf=_is_variable)[0]
        shapes = tuple((jax.tree_util.keystr(p), type(x).__name__,
                        tuple(getattr(_value(x), "shape", ())),
                        str(getattr(_value(x), "dtype", type(_value(x)).__name__)))
                       for p, x in leaves)
        statics = tuple(args[i] for i in self._options.static_argnums)
        key = (_structure(graphdef), shapes, statics)
        entry = self._entries.get(key)
        if entry is None:
            if self._entries:
                log.info("autoshard: planning %s again for a new argument signature",
                         self.__name__)
            entry = self._plan(args, graphdef, parts, positions)
            self._entries[key] = entry
        return key, entry

    def _plan(self, args, graphdef, parts, positions) -> _Entry:
        template = jax.tree_util.tree_structure(parts)
        outputs = _Outputs()
        fn = self._fn if graphdef is None else self._pure(graphdef, positions, outputs)
        inner = list(args)
        for k, i in enumerate(self._dynamic):
            inner[i] = parts[k]
        options = self._options
        if options.annotations != "ignore":
            rules = options.logical_axis_rules
            if rules is None:
                rules = flax_spmd.get_logical_axis_rules() or self._rules
            with flax_spmd.logical_axis_rules(rules):
                options = replace(options, annotation_specs=self._annotations(parts))
        sharded = ShardedFunction(fn, options, inner, self._known_plans)
        return _Entry(graphdef, template, positions, outputs, sharded)

    def _inner_args(self, entry: _Entry, args: Sequence[Any]) -> list:
        _, parts, _ = self._split(args)
        leaves = jax.tree_util.tree_leaves(parts)
        parts = jax.tree_util.tree_unflatten(entry.template, leaves)
        inner = list(args)
        for k, i in enumerate(self._dynamic):
            inner[i] = parts[k]
        return inner

    def _pure(self, graphdef, positions: tuple[int, ...], outputs: _Outputs) -> Callable:
        """The step as a pure function of per-argument states (module docstring)."""
        fn, dynamic = self._fn, self._dynamic

        def pure(*inner):
            state = nnx.State({k: inner[i] for k, i in enumerate(dynamic)})
            objects = nnx.merge(graphdef, state)
            call = list(inner)
            for k, i in enumerate(dynamic):
                call[i] = objects[k]
            out = fn(*call)
            outputs.result_has_objects = _has_objects(out)
            if outputs.result_has_objects:
                outputs.graphdef, new = nnx.split((objects, out))
                result = new[1] if 1 in new else nnx.State({})
                new = new[0]
            else:
                _, new = nnx.split(objects)
                result = out
            return (*(new[k] if k in new else nnx.State({}) for k in positions), result)

        pure.__name__ = getattr(fn, "__name__", "step")
        pure.__qualname__ = function_name(fn)
        pure.__doc__ = getattr(fn, "__doc__", None)
        try:
            pure.__signature__ = inspect.signature(fn)
        except (TypeError, ValueError):
            pass
        return pure

    # -- annotations ------------------------------------------------------------------------------

    def _annotations(self, parts: list) -> tuple | None:
        """One resolved PartitionSpec (or None) per flat argument leaf, in trace order."""
        mesh = self._options.mesh
        specs: list = []
        found = False
        for k, i in enumerate(self._dynamic):
            for path, x in jax.tree_util.tree_flatten_with_path(parts[k], is_leaf=_is_variable)[0]:
                count = len(jax.tree_util.tree_leaves(x))
                spec = None
                if isinstance(x, nnx.Variable) and count == 1:
                    where = self._names[i] + jax.tree_util.keystr(path) + ".value"
                    spec = annotation_spec(x, mesh, where)
                found = found or spec is not None
                specs += [spec] * count if count == 1 else [None] * count
        return tuple(specs) if found else None


def _structure(graphdef: Any) -> Any:
    """A graphdef without its Variables' metadata (which holds the layout a call chose and
    so changes after the first call, module docstring)."""
    if graphdef is None:
        return None
    nodes = tuple((type(n).__name__, getattr(n, "type", None), getattr(n, "index", None))
                  if isinstance(n, graphlib.VariableDef) else n for n in graphdef.nodes)
    return nodes, tuple(graphdef.attributes)


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _value(x: Any) -> Any:
    return x.get_value() if isinstance(x, nnx.Variable) else x


# -- annotations --------------------------------------------------------------------------------

def raw_annotation(var: nnx.Variable) -> tuple | None:
    """What the user annotated: ``out_sharding`` as ``nnx.with_partitioning`` sets it (or the
    copy autoshard keeps once it has written the plan's layout there)."""
    metadata = var.get_metadata()
    raw = metadata.get(ANNOTATION_KEY, metadata.get("out_sharding"))
    if not raw:
        return None
    if isinstance(raw, NamedSharding):
        raw = raw.spec
    return tuple(raw)


def annotation_spec(var: nnx.Variable, mesh: jax.sharding.Mesh, where: str
                    ) -> PartitionSpec | None:
    """The annotation of ``var`` as a PartitionSpec over ``mesh``'s axes, logical names resolved
    as flax resolves them (context rules from ``nnx.logical_axis_rules`` composed with the
    Variable's own ``sharding_rules``); a ShardingError names ``where`` and the fix."""
    raw = raw_annotation(var)
    if raw is None:
        return None
    local = var.get_metadata().get("sharding_rules") or ()
    rules = dict(flax_spmd.composite_rules(flax_spmd.get_logical_axis_rules(), local))
    shape = tuple(getattr(var.get_value(), "shape", ()))
    if len(raw) > len(shape):
        raise ShardingError(f"{where}: its sharding annotation {raw} has {len(raw)} entries for "
                            f"a {len(shape)}-d array of shape {shape}; fix the "
                            "nnx.with_partitioning call, or compile with annotations='ignore'")
    entries = []
    for dim, entry in enumerate(raw):
        names = entry if isinstance(entry, tuple) else (entry,)
        resolved: list[str] = []
        for name in names:
            if name is None or name is PartitionSpec.UNCONSTRAINED:
                continue
            axis = rules.get(name, name)
            mapped = [a for a in (axis if isinstance(axis, tuple) else (axis,)) if a]
            for a in mapped:
                if a not in mesh.axis_names:
                    raise ShardingError(_unknown_axis_message(where, raw, name, a, name in rules,
                                                              mesh))
            resolved += mapped
        size = math.prod(mesh.shape[a] for a in resolved)
        if shape[dim] % size:
            raise ShardingError(
                f"{where}: its sharding annotation {raw} splits dim {dim} (size {shape[dim]}) "
                f"over mesh axes {tuple(resolved)} of {size} devices, which does not divide "
                "it; annotate a dim the axes divide, or compile with annotations='ignore'")
        entries.append(None if not resolved else
                       resolved[0] if len(resolved) == 1 else tuple(resolved))
    return PartitionSpec(*entries)


def _chosen_metadata(var: nnx.Variable) -> None:
    """Write the layout the variable's array has into its ``out_sharding`` metadata."""
    value = var.get_value()
    sharding = getattr(value, "sharding", None)
    if not isinstance(sharding, NamedSharding):
        return
    spec = tuple(sharding.spec) + (None,) * (value.ndim - len(sharding.spec))
    metadata = var.get_metadata()
    if metadata.get("out_sharding") == spec:
        return
    if ANNOTATION_KEY not in metadata:
        var.set_metadata(**{ANNOTATION_KEY: metadata.get("out_sharding")})
    var.set_metadata(out_sharding=spec)


def record_shardings(objects: Any) -> None:
    for _, node in nnx.iter_graph(objects):
        if isinstance(node, nnx.Variable):
            _chosen_metadata(node)


def _with_chosen_sharding(results: Any) -> Any:
    for leaf in jax.tree_util.tree_leaves(results, is_leaf=_is_variable):
        if isinstance(leaf, nnx.Variable):
            _chosen_metadata(leaf)
    return results


def _unknown_axis_message(where: str, raw, name: str, axis: str, has_rule: bool, mesh) -> str:
    """Rules do not chain (as in flax), so the fix is to the rule or the annotation itself."""
    axes = tuple(mesh.axis_names)
    if has_rule:
        return (f"{where}: its sharding annotation {raw} has the logical axis {name!r}, which "
                f"your rules map to {axis!r}, not an axis of the mesh {axes}; change that rule "
                f"to a mesh axis or None (e.g. ({name!r}, {axes[-1]!r})), or compile with "
                "annotations='ignore'")
    return (f"{where}: its sharding annotation {raw} names {axis!r}, which is neither an axis "
            f"of the mesh {axes} nor a logical axis with a rule; add a rule mapping it to a "
            f"mesh axis or None (nnx.logical_axis_rules([({axis!r}, {axes[-1]!r})]) around "
            "autoshard.compile), or compile with annotations='ignore'")
