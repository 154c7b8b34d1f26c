"""Trace the user's function on example arguments into a jaxpr, naming every argument leaf.

Tracing uses abstract values only (``ShapeDtypeStruct`` with any sharding stripped), outside any
mesh context: the plan is made later, and a trace that carried the example arrays' shardings
would bake them into the jaxpr's ``out_sharding`` params. Leaves are named by the function's
parameter names and their pytree paths (``params['blocks'][0]['w']``) so that every later error
and every row of a plan speaks the user's vocabulary.
"""

from __future__ import annotations

import functools
import inspect
import os
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import jax
import numpy as np

from autoshard.ir.errors import ArgumentError, UnsupportedPrimitiveError

_SCALARS = (bool, int, float, complex, np.generic)


@dataclass(frozen=True)
class TracedFunction:
    """A traced step: its closed jaxpr, argument and result trees, leaf names."""

    fn_name: str
    jaxpr: Any  # jax.extend.core.ClosedJaxpr
    in_tree: Any
    out_tree: Any
    arg_names: tuple[str, ...]
    out_names: tuple[str, ...]
    in_avals: tuple[jax.ShapeDtypeStruct, ...]
    static_argnums: tuple[int, ...]


def function_name(fn: Callable) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)


def parameter_names(fn: Callable, nargs: int) -> list[str]:
    """Names for positional arguments: the signature's where it has them, ``args[i]`` beyond."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        params = []
    names = []
    for i in range(nargs):
        if i < len(params) and params[i].kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                  inspect.Parameter.POSITIONAL_OR_KEYWORD):
            names.append(params[i].name)
        else:
            names.append(f"args[{i}]")
    return names


def normalize_static_argnums(static_argnums: int | Sequence[int], nargs: int) -> tuple[int, ...]:
    nums = (static_argnums,) if isinstance(static_argnums, int) else tuple(static_argnums)
    out = []
    for n in nums:
        if not isinstance(n, int) or not -nargs <= n < nargs:
            raise ArgumentError(f"static_argnums entry {n!r} is out of range for {nargs} "
                                "positional arguments")
        out.append(n % nargs)
    return tuple(sorted(set(out)))


def abstractify_leaf(leaf: Any, where: str, fn_name: str) -> jax.ShapeDtypeStruct:
    """A sharding-free ShapeDtypeStruct for one argument leaf, or an ArgumentError naming it."""
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, weak_type=leaf.weak_type)
    if isinstance(leaf, jax.Array):
        aval = leaf.aval if hasattr(leaf, "aval") else jax.typeof(leaf)
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, weak_type=aval.weak_type)
    if isinstance(leaf, np.ndarray):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)
    if isinstance(leaf, _SCALARS):
        aval = jax.typeof(leaf)
        return jax.ShapeDtypeStruct(aval.shape, aval.dtype, weak_type=aval.weak_type)
    raise ArgumentError(
        f"{fn_name}: argument {where} is a {type(leaf).__module__}.{type(leaf).__qualname__} "
        f"({_short_repr(leaf)}); autoshard.compile traces array arguments only (jax or numpy "
        "arrays, Python scalars, jax.ShapeDtypeStruct). Pass an array, or mark the argument "
        "static with static_argnums if it configures the function rather than feeding it data.")


def abstract_arguments(fn: Callable, args: Sequence[Any], static_argnums: tuple[int, ...]
                       ) -> tuple[tuple[str, ...], tuple[jax.ShapeDtypeStruct, ...], Any]:
    """Names, sharding-free avals and the tree of the dynamic arguments' leaves."""
    fn_name = function_name(fn)
    names = parameter_names(fn, len(args))
    dynamic = [i for i in range(len(args)) if i not in static_argnums]
    leaves_with_path, in_tree = jax.tree_util.tree_flatten_with_path(
        tuple(args[i] for i in dynamic))
    arg_names, avals = [], []
    for path, leaf in leaves_with_path:
        (first, *rest) = path
        where = names[dynamic[first.idx]] + jax.tree_util.keystr(tuple(rest))
        arg_names.append(where)
        avals.append(abstractify_leaf(leaf, where, fn_name))
    return tuple(arg_names), tuple(avals), in_tree


def trace(fn: Callable, args: Sequence[Any], *,
          static_argnums: tuple[int, ...] = ()) -> TracedFunction:
    arg_names, avals, in_tree = abstract_arguments(fn, args, static_argnums)
    dynamic = [i for i in range(len(args)) if i not in static_argnums]
    abstract_dynamic = jax.tree_util.tree_unflatten(in_tree, avals)
    abstract_args = list(args)
    for slot, i in enumerate(dynamic):
        abstract_args[i] = abstract_dynamic[slot]
    try:
        closed, out_shape = jax.make_jaxpr(fn, static_argnums=static_argnums,
                                           return_shape=True)(*abstract_args)
    except Exception as err:
        unsupported = _unsupported_in_trace(err, function_name(fn))
        if unsupported is not None:
            raise unsupported from err
        err.add_note(f"autoshard: raised while tracing {function_name(fn)} (at "
                     f"{_innermost_user_line(err)}) on abstract example arguments that carry no "
                     "sharding; code that reads its arguments' shardings (jax.sharding.reshard, "
                     "explicit-sharding APIs) cannot run under autoshard.compile, where "
                     "autoshard.hint pins layouts instead.")
        raise
    out_paths, out_tree = jax.tree_util.tree_flatten_with_path(out_shape)
    out_names = tuple("out" + jax.tree_util.keystr(p) for p, _ in out_paths)
    return TracedFunction(function_name(fn), closed, in_tree, out_tree, arg_names, out_names,
                          avals, static_argnums)


def _unsupported_in_trace(err: Exception, fn_name: str) -> Exception | None:
    """shard_map checks its in_specs against the arguments' shardings while tracing, so it fails
    before the lifter can name it; say what it is and what to do."""
    if "shard_map" not in str(err):
        return None
    return UnsupportedPrimitiveError(
        f"{fn_name}: jax.shard_map at {_innermost_user_line(err)} cannot be traced inside "
        "autoshard.compile, which traces on unsharded abstract arguments and chooses layouts "
        "itself. Call the shard_map outside the compiled function, or write its body as "
        "ordinary jax.numpy code and pin layouts with autoshard.hint(x, spec).")


def _innermost_user_line(err: Exception) -> str:
    library = (f"{os.sep}jax{os.sep}", f"{os.sep}autoshard{os.sep}", "site-packages",
               "dist-packages")
    frames = [f for f in traceback.extract_tb(err.__traceback__)
              if not any(part in f.filename for part in library)]
    if not frames:
        return "an unknown line"
    return f"{short_path(frames[-1].filename)}:{frames[-1].lineno} ({frames[-1].name})"


@functools.lru_cache(maxsize=None)
def short_path(path: str) -> str:
    """``path`` relative to the working directory when it lies below it."""
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return path if rel.startswith("..") else rel


def _short_repr(obj: Any) -> str:
    text = repr(obj)
    return text if len(text) <= 60 else text[:57] + "..."
