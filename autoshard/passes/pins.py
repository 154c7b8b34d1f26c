"""Collect what the user fixed: ``in_specs`` / ``out_specs`` given to ``compile`` and the
``autoshard.hint`` nodes inside the function.

Pins are hard constraints for every planner (the rules and the search), so they are gathered
and validated once, here, against the mesh and each value's shape; errors name the argument path
or the hint's source line. ``None`` in ``in_specs`` / ``out_specs`` means "free: let the planner
choose", as opposed to ``PartitionSpec()``, which pins a replicated layout.

Annotations (Flax ``nnx.with_partitioning`` metadata, resolved by autoshard/nnx.py to one spec
or None per flat input position) join here too: ``annotations="require"`` makes them pins like
``in_specs`` (an explicit ``in_specs`` entry wins), and pins each result that is the annotated
argument's new value (passes/state.py) to the same layout, so the state keeps the annotated
layout step after step; ``"hint"`` records them in ``Pins.preferred``, a soft preference the
problem builder prices (problem.py, ``leaf_slot``); ``"ignore"`` drops them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import jax
from jax.sharding import PartitionSpec

from autoshard.ir.errors import ArgumentError
from autoshard.ir.graph import Graph
from autoshard.ir.hint import hint_p
from autoshard.ir.mesh import MeshSpec
from autoshard.ir.sharding import ShardingSpec, as_sharding_spec
from autoshard.passes.state import updated_arguments

ANNOTATION_MODES = ("ignore", "hint", "require")


@dataclass(frozen=True)
class Pins:
    """Pinned specs: input / output positions (flat leaf order) and intermediate value ids;
    ``preferred``: soft preferences by input position (annotations as hints), which the solver
    follows unless another layout is cheaper; ``annotated``: every annotated input position
    and its annotation, whatever the mode (for the plan's annotation report)."""

    inputs: dict[int, ShardingSpec] = field(default_factory=dict)
    outputs: dict[int, ShardingSpec] = field(default_factory=dict)
    values: dict[int, ShardingSpec] = field(default_factory=dict)
    reasons: dict[str | int, str] = field(default_factory=dict)
    preferred: dict[int, ShardingSpec] = field(default_factory=dict)
    annotated: dict[int, ShardingSpec] = field(default_factory=dict)


@dataclass(frozen=True)
class _Broadcast:
    """One prefix spec standing for ``count`` argument leaves (a pytree leaf itself)."""

    spec: Any
    count: int


def _is_spec_leaf(x: Any) -> bool:
    return x is None or isinstance(x, (PartitionSpec, ShardingSpec, str))


def flatten_spec_prefix(specs: Any, tree: Any, what: str) -> list:
    """Broadcast a pytree prefix of specs (as ``jax.jit``'s in_shardings allows) to the leaves
    of ``tree``: ``P()`` for a whole parameter dict pins every leaf in it."""
    if _is_spec_leaf(specs):
        return [specs] * len(jax.tree_util.tree_leaves(tree))
    try:
        expanded = jax.tree_util.tree_map(
            lambda spec, sub: _Broadcast(spec, len(jax.tree_util.tree_leaves(sub))), specs, tree,
            is_leaf=_is_spec_leaf)
    except (ValueError, TypeError) as err:
        raise ArgumentError(f"{what} must be a pytree prefix of the function's "
                            f"{'arguments' if 'in' in what else 'results'} (as jax.jit's "
                            f"shardings are): {err}") from None
    return [group.spec for group in jax.tree_util.tree_leaves(expanded)
            for _ in range(group.count)]


def collect_pins(graph: Graph, mesh: MeshSpec, *, in_specs: Any = None,
                 out_specs: Any = None, in_tree: Any = None, out_tree: Any = None,
                 annotations: tuple | None = None, annotation_mode: str = "ignore") -> Pins:
    """``annotations``: one spec (or None) per flat input position, in ``annotation_mode``
    (module docstring)."""
    pins = Pins()
    if in_specs is not None:
        dummy = jax.tree_util.tree_unflatten(in_tree, list(range(len(graph.inputs))))
        flat = flatten_spec_prefix(in_specs, dummy, "in_specs")
        for i, (value, spec) in enumerate(zip(graph.inputs, flat)):
            if spec is not None:
                pins.inputs[i] = _checked(spec, value.shape, mesh, f"argument {value.name}")
                pins.reasons[f"in:{i}"] = "in_specs"
    if out_specs is not None:
        dummy = jax.tree_util.tree_unflatten(out_tree, list(range(len(graph.outputs))))
        flat = flatten_spec_prefix(out_specs, dummy, "out_specs")
        for i, (atom, spec) in enumerate(zip(graph.outputs, flat)):
            if spec is not None:
                name = graph.output_names[i] if graph.output_names else f"out[{i}]"
                pins.outputs[i] = _checked(spec, atom.shape, mesh, f"result {name}")
                pins.reasons[f"out:{i}"] = "out_specs"
    for node, _ in graph.walk():
        if node.primitive is hint_p:
            (value,) = node.outputs
            where = f"autoshard.hint at {node.source or 'an unknown line'}"
            pins.values[value.id] = _checked(node.params["spec"], value.shape, mesh, where)
            pins.reasons[value.id] = f"hint ({node.source})"
    if annotations is not None and annotation_mode != "ignore":
        _annotation_pins(pins, graph, mesh, annotations, annotation_mode)
    return pins


def _annotation_pins(pins: Pins, graph: Graph, mesh: MeshSpec, annotations: tuple,
                     mode: str) -> None:
    if len(annotations) != len(graph.inputs):
        raise ArgumentError(f"{len(annotations)} annotations for {len(graph.inputs)} arguments")
    for i, (value, spec) in enumerate(zip(graph.inputs, annotations)):
        if spec is None:
            continue
        pins.annotated[i] = _checked(spec, value.shape, mesh,
                                     f"the sharding annotation of {value.name}")
        if mode == "hint":
            pins.preferred[i] = pins.annotated[i]
        elif i not in pins.inputs:
            pins.inputs[i] = pins.annotated[i]
            pins.reasons[f"in:{i}"] = "annotation (required)"
    if mode == "require":
        for o, i in updated_arguments(graph).items():
            if i in pins.annotated and o not in pins.outputs:
                pins.outputs[o] = pins.inputs[i]
                pins.reasons[f"out:{o}"] = "annotation (required)"


def _checked(spec: Any, shape: tuple[int, ...], mesh: MeshSpec, what: str) -> ShardingSpec:
    sharding = as_sharding_spec(spec, mesh, len(shape), what=what)
    sharding.validate(shape, mesh, what=f"{what}")
    return sharding
