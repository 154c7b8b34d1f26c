"""Which leaves of a step's arguments and results are traced, and which are static.

``jax.jit`` traces arrays and Python scalars and rejects anything else; ``eqx.filter_jit``
traces arrays only and treats every other leaf as static (part of the signature, closed over
by the trace). Autoshard takes the union that keeps both kinds of program working:

* jax and numpy arrays (and ``jax.ShapeDtypeStruct``) are traced, everywhere;
* Python scalars are traced as ``jax.jit`` traces them (a learning rate or step count passed
  on its own, or in a dict, does not plan again when it changes), except inside an Equinox
  module, where ``eqx.filter_jit``'s rule holds: a module's ``num_heads: int`` or
  ``causal: bool`` field is configuration and is static;
* every other leaf (a function, a ``custom_jvp``, a string, an enum) is static.

A tree is split into its traced part and its static part, each the tree with the other part's
leaves replaced by ``None`` (``eqx.partition``'s pair); ``combine`` puts them back together.
Equinox is recognised from ``sys.modules`` and never imported here: a program holding an
``eqx.Module`` has imported equinox already.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import jax
import numpy as np

#: Leaves traced wherever they are (``eqx.is_array``'s types, and abstract arrays).
ARRAY_TYPES = (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct)
#: Leaves traced outside Equinox modules, as ``jax.jit`` traces them.
SCALAR_TYPES = (bool, int, float, complex)


def _module_predicate() -> Callable[[Any], bool] | None:
    """``isinstance(x, equinox.Module)`` when the program has imported equinox, else None."""
    module = getattr(sys.modules.get("equinox"), "Module", None)
    return None if module is None else (lambda x: isinstance(x, module))


def is_traced_leaf(leaf: Any, in_module: bool = False) -> bool:
    """Whether a leaf is traced (module docstring); ``in_module``: it lies in an Equinox module."""
    if isinstance(leaf, ARRAY_TYPES):
        return True
    return not in_module and isinstance(leaf, SCALAR_TYPES)


def partition(tree: Any) -> tuple[Any, Any]:
    """``(traced, static)``: ``tree`` with its static leaves, and with its traced leaves,
    replaced by ``None``; ``(tree, None)`` itself when nothing in it is static (most calls: the
    tree is not rebuilt)."""
    is_module = _module_predicate()
    outer = jax.tree_util.tree_leaves(tree, is_leaf=is_module)
    if all(is_traced_leaf(x) for x in outer):      # an Equinox module is not a traced leaf
        return tree, None

    def keep(x: Any, traced: bool) -> Any:
        if is_module is not None and is_module(x):
            return jax.tree.map(lambda leaf: leaf if is_traced_leaf(leaf, True) == traced
                                else None, x)
        return x if is_traced_leaf(x) == traced else None

    return (jax.tree.map(lambda x: keep(x, True), tree, is_leaf=is_module),
            jax.tree.map(lambda x: keep(x, False), tree, is_leaf=is_module))


def combine(traced: Any, static: Any) -> Any:
    """The tree ``partition`` split into ``traced`` and ``static``; ``traced`` itself when
    there is nothing static."""
    if not jax.tree_util.tree_leaves(static):
        return traced
    return jax.tree.map(lambda t, s: s if t is None else t, traced, static,
                        is_leaf=lambda x: x is None)
