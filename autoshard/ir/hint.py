"""``autoshard.hint``: a user's pin on one tensor, carried through tracing as a primitive.

A dedicated primitive rather than ``with_sharding_constraint``: the user's function must trace
without a mesh in scope (planning happens later, and may be for several meshes), and the lifter
must see the pin as a pin. Outside ``autoshard.compile`` the primitive is the identity, so a
hinted function still runs under plain ``jax.jit``. Like a sharding constraint, the pin is
linear: the tangent and the cotangent of a hinted value get the same pin, which is what a user
pinning an activation wants for its gradient too.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir
from jax.sharding import PartitionSpec

from autoshard.ir.errors import ShardingError
from autoshard.ir.sharding import ShardingSpec

hint_p = Primitive("autoshard_hint")


def hint(x: Any, spec: PartitionSpec | ShardingSpec | str | None) -> Any:
    """Pin ``x`` (an array, or a pytree of arrays) to ``spec`` inside an autoshard-compiled
    function. ``spec`` is a ``PartitionSpec`` (``P("data", None)``), an SBP ``ShardingSpec``, its
    string form (``"(S0, B)"``), or None for replicated. The planner treats the pin as a hard
    constraint and the lowering applies it as a sharding constraint.
    """
    if not isinstance(spec, (PartitionSpec, ShardingSpec, str, type(None))):
        raise ShardingError(
            f"autoshard.hint expects a PartitionSpec, an autoshard ShardingSpec, its string form "
            f"or None; got {type(spec).__name__} {spec!r}")
    if isinstance(spec, PartitionSpec) and any(e is PartitionSpec.UNCONSTRAINED for e in spec):
        raise ShardingError(f"autoshard.hint({spec}): UNCONSTRAINED entries cannot be pinned; "
                            "use None for a replicated dim")
    return jax.tree.map(lambda leaf: hint_p.bind(leaf, spec=spec), x)


def _hint_impl(x, *, spec):
    return x


def _hint_abstract_eval(aval, *, spec):
    return aval


def _hint_transpose(ct, x, *, spec):
    return [hint_p.bind(ct, spec=spec) if not isinstance(ct, ad.Zero) else ct]


def _hint_batch(args, dims, *, spec):
    (x,), (d,) = args, dims
    if isinstance(spec, PartitionSpec) and d is not None:
        entries = list(spec) + [None] * (x.ndim - 1 - len(spec))
        entries.insert(d, None)
        spec = PartitionSpec(*entries)
    elif isinstance(spec, ShardingSpec) and d is not None:
        raise ShardingError("autoshard.hint with an SBP spec cannot be vmapped; use a "
                            "PartitionSpec so the batch dimension can be inserted")
    return hint_p.bind(x, spec=spec), d


hint_p.def_impl(_hint_impl)
hint_p.def_abstract_eval(_hint_abstract_eval)
ad.deflinear2(hint_p, _hint_transpose)
batching.primitive_batchers[hint_p] = _hint_batch
mlir.register_lowering(hint_p, mlir.lower_fun(_hint_impl, multiple_results=False))
