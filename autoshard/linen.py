"""Flax linen's partitioning boxes, read as sharding annotations.

``nn.with_logical_partitioning`` (and ``nn.with_partitioning``) wrap a parameter's value in a
box, ``nn.LogicallyPartitioned`` (``nn.Partitioned``): a pytree node holding the array, with the
names of its dims in the tree structure. Linen unboxes the value when the model reads the
parameter, and optax keeps the boxes around the optimizer's moments, so a linen step over boxed
parameters is an ordinary jax function, planned by ``ShardedFunction``; this module reads the
box around each flat argument leaf into the one-spec-per-leaf annotations that the
``annotations=`` modes use (passes/pins.py), as autoshard/nnx.py does for NNX Variables.

Names resolve as flax resolves them (``nn.logical_to_mesh_axes``): rules in order of precedence,
each mesh axis used once per array, a logical name without a rule left unsharded. The rules are
the box's own ``rules``, else ``autoshard.compile(logical_axis_rules=...)``, else those of the
``nn.logical_axis_rules`` context around ``compile`` (or around a later call that plans a new
signature). ``nn.Partitioned`` names mesh axes directly.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Sequence

import flax.core.spmd as flax_spmd
import flax.linen as nn
import jax
from flax.core import meta
from jax.sharding import Mesh, PartitionSpec

from autoshard.ir.errors import ShardingError
from autoshard.passes.trace import dynamic_arguments, parameter_names

log = logging.getLogger("autoshard")

Rules = tuple[tuple[str, Any], ...]


def is_box(x: Any) -> bool:
    """A linen partitioning box (``nn.Partitioned`` or its subclass ``nn.LogicallyPartitioned``)."""
    return isinstance(x, meta.Partitioned)


def context_rules() -> Rules:
    """The logical axis rules of the ``nn.logical_axis_rules`` context now (maybe empty)."""
    return tuple(flax_spmd.get_logical_axis_rules() or ())


def box_annotations(fn: Callable, args: Sequence[Any], static_argnums: tuple[int, ...],
                    mesh: Mesh, rules: Rules) -> tuple | None:
    """One PartitionSpec over ``mesh``'s axes (or None) per traced argument leaf, in trace
    order, from the boxes around them; None when no argument holds a box."""
    dynamic = [i for i in range(len(args)) if i not in static_argnums]
    names = parameter_names(fn, len(args))
    flat = jax.tree_util.tree_flatten_with_path(dynamic_arguments(args, static_argnums),
                                                is_leaf=is_box)[0]
    if not any(is_box(x) for _, x in flat):
        return None
    specs: list = []
    logical_without_rules = []
    for path, x in flat:
        if not is_box(x):
            specs.append(None)
            continue
        count = len(jax.tree_util.tree_leaves(x))
        if count != 1:
            specs += [None] * count
            continue
        where = names[dynamic[path[0].idx]] + jax.tree_util.keystr(tuple(path[1:])) + ".value"
        if isinstance(x, nn.LogicallyPartitioned) and not (x.rules or rules):
            logical_without_rules.append(where)
        specs.append(box_spec(x, mesh, rules, where))
    if logical_without_rules:
        log.warning("autoshard: %s and %d other parameters carry logical axis names but no "
                    "logical axis rules are in effect, so flax (and autoshard) leave them "
                    "unsharded; pass autoshard.compile(..., logical_axis_rules=...) or compile "
                    "inside nn.logical_axis_rules(...)", logical_without_rules[0],
                    len(logical_without_rules) - 1)
    return tuple(specs)


def box_spec(box: meta.Partitioned, mesh: Mesh, rules: Rules, where: str) -> PartitionSpec:
    """The box's annotation as a PartitionSpec over ``mesh``'s axes; a ShardingError names
    ``where`` (the parameter) and the rule or annotation to fix."""
    names = tuple(box.names)
    shape = tuple(getattr(box.value, "shape", ()))
    logical = isinstance(box, nn.LogicallyPartitioned)
    own_rules = tuple(box.rules or ()) if logical else ()
    used = own_rules or tuple(rules)
    if len(names) > len(shape):
        raise ShardingError(f"{where}: its partitioning names {names} have {len(names)} entries "
                            f"for a {len(shape)}-d array of shape {shape}; fix the "
                            "nn.with_logical_partitioning call, or compile with "
                            "annotations='ignore'")
    if logical:
        try:
            spec = nn.logical_to_mesh_axes(names, used)
        except ValueError as err:
            raise ShardingError(f"{where}: flax cannot resolve its logical axis names {names}: "
                                f"{err}") from None
    else:
        spec = PartitionSpec(*names)
    entries = []
    for dim, entry in enumerate(spec):
        axes = tuple(a for a in (entry if isinstance(entry, tuple) else (entry,))
                     if a is not None and a is not PartitionSpec.UNCONSTRAINED)
        for axis in axes:
            if axis not in mesh.axis_names:
                raise ShardingError(_unknown_axis_message(where, names, names[dim], axis,
                                                          logical, mesh))
        size = math.prod(mesh.shape[a] for a in axes)
        if shape[dim] % size:
            raise ShardingError(
                f"{where}: its partitioning names {names} split dim {dim} (size {shape[dim]}) "
                f"over mesh axes {axes} of {size} devices, which does not divide it; change "
                "the rule or the annotation, or compile with annotations='ignore'")
        entries.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*entries)


def _unknown_axis_message(where: str, names: tuple, name: Any, axis: str, logical: bool,
                          mesh: Mesh) -> str:
    axes = tuple(mesh.axis_names)
    if logical:
        return (f"{where}: its logical axis {name!r} (of {names}) maps by your rules to "
                f"{axis!r}, not an axis of the mesh {axes}; change that rule to a mesh axis or "
                f"None (e.g. ({name!r}, {axes[-1]!r})), or compile with annotations='ignore'")
    return (f"{where}: its nn.with_partitioning names {names} name {axis!r}, not an axis of "
            f"the mesh {axes}; name mesh axes, or use nn.with_logical_partitioning with "
            "logical_axis_rules, or compile with annotations='ignore'")
