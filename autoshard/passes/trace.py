"""Trace the user's function on example arguments into a jaxpr, naming every argument leaf.

Tracing uses abstract values only (``ShapeDtypeStruct`` with any sharding stripped), under no
mesh whatever the caller set: the plan is made later, and a trace that carried the example
arrays' shardings would bake them into the jaxpr's ``out_sharding`` params. A step written in
explicit sharding mode is traced again under an Explicit view of the mesh (passes/explicit.py).
Leaves are named by the function's parameter names and their pytree paths
(``params['blocks'][0]['w']``) so that every later error and every row of a plan speaks the
user's vocabulary.

Leaves that are not arrays (an Equinox module's activation function or ``bool`` field) are
static, as under ``eqx.filter_jit`` (passes/arguments.py says which): the jaxpr's inputs are the
traced leaves only, the static ones are part of the call signature and closed over by the trace,
and the results' static leaves are recorded here and put back by the caller.
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
from autoshard.passes.arguments import combine, partition
from autoshard.passes.explicit import explicit_mesh, is_sharding_error, neutral_mesh

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
    out_static: Any = None  # the results' static leaves, None where a leaf is traced


@dataclass(frozen=True)
class AbstractArguments:
    """The traced leaves of a call's dynamic arguments: their names and sharding-free avals;
    ``in_tree``, the arguments' structure with every static leaf a ``None``; ``statics``, each
    static leaf with its name (hashable: they are part of the call signature)."""

    names: tuple[str, ...]
    avals: tuple[jax.ShapeDtypeStruct, ...]
    in_tree: Any
    statics: tuple[tuple[str, Any], ...]


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
        f"({_short_repr(leaf)}), not an array or a Python scalar, so it cannot be traced")


def dynamic_arguments(args: Sequence[Any], static_argnums: tuple[int, ...]) -> tuple:
    """The dynamic positional arguments, each with its static leaves replaced by None: what the
    jitted step is called with."""
    return tuple(partition(a)[0] for i, a in enumerate(args) if i not in static_argnums)


def abstract_arguments(fn: Callable, args: Sequence[Any], static_argnums: tuple[int, ...]
                       ) -> AbstractArguments:
    """Names and sharding-free avals of the dynamic arguments' traced leaves, their tree, and
    their static leaves (named, checked hashable)."""
    fn_name = function_name(fn)
    names = parameter_names(fn, len(args))
    dynamic = [i for i in range(len(args)) if i not in static_argnums]
    parts = [partition(args[i]) for i in dynamic]
    leaves_with_path, in_tree = jax.tree_util.tree_flatten_with_path(
        tuple(traced for traced, _ in parts))
    arg_names, avals = [], []
    for path, leaf in leaves_with_path:
        where = _leaf_name(names, dynamic, path)
        arg_names.append(where)
        avals.append(abstractify_leaf(leaf, where, fn_name))
    statics = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(
            tuple(static for _, static in parts))[0]:
        where = _leaf_name(names, dynamic, path)
        statics.append((where, _hashable_static(leaf, where, fn_name)))
    return AbstractArguments(tuple(arg_names), tuple(avals), in_tree, tuple(statics))


def _leaf_name(names: list[str], dynamic: list[int], path: tuple) -> str:
    (first, *rest) = path
    return names[dynamic[first.idx]] + jax.tree_util.keystr(tuple(rest))


def _hashable_static(leaf: Any, where: str, fn_name: str) -> Any:
    try:
        hash(leaf)
    except TypeError:
        raise ArgumentError(
            f"{fn_name}: argument {where} is a {type(leaf).__module__}.{type(leaf).__qualname__}"
            f" ({_short_repr(leaf)}), which is not an array, so it is static (part of the call "
            "signature, as under eqx.filter_jit), but it is not hashable. Make it hashable, "
            "hold the data it carries as arrays, or close over it in the function.") from None
    return leaf


def trace(fn: Callable, args: Sequence[Any], *, static_argnums: tuple[int, ...] = (),
          mesh: jax.sharding.Mesh | None = None) -> TracedFunction:
    """Trace ``fn`` under no mesh; a step in explicit sharding mode, which needs one, under an
    Explicit view of ``mesh`` (passes/explicit.py)."""
    arguments = abstract_arguments(fn, args, static_argnums)
    dynamic = [i for i in range(len(args)) if i not in static_argnums]
    statics = {i: partition(args[i])[1] for i in dynamic}
    out_static = []

    def traced_step(*call_args):
        full = [combine(a, statics[i]) if i in statics else a for i, a in enumerate(call_args)]
        traced_out, static_out = partition(fn(*full))
        out_static.append(static_out)
        return traced_out

    _named_like(traced_step, fn)
    abstract_dynamic = jax.tree_util.tree_unflatten(arguments.in_tree, arguments.avals)
    abstract_args = list(args)
    for slot, i in enumerate(dynamic):
        abstract_args[i] = abstract_dynamic[slot]
    make = jax.make_jaxpr(traced_step, static_argnums=static_argnums, return_shape=True)
    try:
        with neutral_mesh():
            closed, out_shape = make(*abstract_args)
    except Exception as err:
        unsupported = _unsupported_in_trace(err, function_name(fn))
        if unsupported is not None:
            raise unsupported from err
        if not is_sharding_error(err):
            raise
        if mesh is None:
            _explicit_note(err, fn, None)
            raise
        try:
            with explicit_mesh(mesh):
                closed, out_shape = make(*abstract_args)
        except Exception as explicit_err:
            if is_sharding_error(explicit_err):
                _explicit_note(explicit_err, fn, mesh)
            raise explicit_err from None
    out_paths, out_tree = jax.tree_util.tree_flatten_with_path(out_shape)
    out_names = tuple("out" + jax.tree_util.keystr(p) for p, _ in out_paths)
    return TracedFunction(function_name(fn), closed, arguments.in_tree, out_tree,
                          arguments.names, out_names, arguments.avals, static_argnums,
                          out_static[-1])


def _explicit_note(err: Exception, fn: Callable, mesh: jax.sharding.Mesh | None) -> None:
    """What autoshard does with sharding code in a step, on an error about meshes or shardings
    (and only there: other errors are the user's own)."""
    where = (f"in explicit sharding mode on the mesh {dict(mesh.shape)}, every argument typed "
             "replicated (the plan chooses their layouts)" if mesh is not None else
             "under no mesh, on arguments that carry no sharding")
    err.add_note(f"autoshard: raised while tracing {function_name(fn)} (at "
                 f"{_innermost_user_line(err)}) {where}. out_sharding= and "
                 "jax.sharding.reshard are read as pins; code that reads its arguments' "
                 "shardings cannot run under autoshard.compile, where autoshard.hint(x, spec) "
                 "pins layouts instead.")


def _named_like(wrapper: Callable, fn: Callable) -> None:
    """Give ``wrapper`` the name and signature of ``fn``, which jax's debug info (and so its
    error messages) reads."""
    wrapper.__name__ = getattr(fn, "__name__", "step")
    wrapper.__qualname__ = function_name(fn)
    try:
        wrapper.__signature__ = inspect.signature(fn)
    except (TypeError, ValueError):
        pass


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
