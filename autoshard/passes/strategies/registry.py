"""Strategies: the legal ways to run one node on the mesh, and the registry of rules that list
them (Alpa's intra-operator strategies, Zheng et al., OSDI 2022).

A strategy fixes the spec each operand must arrive in, the spec of each output, how many ways
the node's work is divided, and any collective the node performs internally (a max over a
split dim). Moving an operand from its producer's spec to the required one is *not* part of the
strategy: that is an edge cost, resharding, decided jointly by the solver.

One rule per primitive family, registered in ``strategy_rules`` next to its definition, in the
family modules beside this one (``contraction.py``, ``indexing.py``, ``layout.py``; the package
imports them, so the registry is complete wherever it is used). A primitive without a rule gets
the replicated strategy and is reported as *unplanned*, never silently.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from autoshard.ir.graph import Literal, Node, Value
from autoshard.ir.mesh import MeshSpec
from autoshard.ir.sharding import PARTIAL, SBP, B, Broadcast, Partial, ShardingSpec, Split


@dataclass(frozen=True, slots=True)
class Strategy:
    """Operand specs (None for literals and operands the node reads whole on every device as
    scalars), output specs, the work divisor, and internal collectives ``(kind, axes, bytes)``
    with bytes per device in the collective_time convention."""

    inputs: tuple[ShardingSpec | None, ...]
    outputs: tuple[ShardingSpec, ...]
    divisor: int = 1
    comm: tuple[tuple[str, tuple[int, ...], float], ...] = ()
    label: str = ""

    def describe(self, mesh: MeshSpec) -> str:
        outs = "; ".join(s.format(mesh) for s in self.outputs)
        return f"{self.label + ': ' if self.label else ''}{outs}"


#: Whether ops linear in a partial-sum operand (sums, casts, broadcasts, reshapes, transposes,
#: slices) may pass the partial sum on. The SBP algebra allows it, and it lets a reduction move
#: to where it is cheapest; but in Auto mode XLA's partitioners have no unreduced layout between
#: ops and reduce a partial sum at the op that made it, so plans that carry one further compile
#: to other collectives than they predict (most of the predicted bytes then match nothing
#: compiled). Producers of partial sums (contractions, sums over split dims, vocab-split
#: gathers, scatter-adds of split updates) keep them either way.
CARRY_PARTIAL = False

Rule = Callable[[Node, MeshSpec], list[Strategy]]
strategy_rules: dict[str, Rule] = {}


def register(*names: str):
    """Decorator: ``rule`` lists the strategies of nodes whose primitive is one of ``names``."""
    def wrap(rule: Rule) -> Rule:
        for name in names:
            strategy_rules[name] = rule
        return rule
    return wrap


def replicated_strategy(node: Node, mesh: MeshSpec) -> Strategy:
    rep = ShardingSpec.replicated(mesh.ndim)
    return Strategy(tuple(None if isinstance(a, Literal) else rep for a in node.inputs),
                    tuple(rep for _ in node.outputs), 1, (), "replicated")


def strategies_for(node: Node, mesh: MeshSpec) -> tuple[list[Strategy], bool]:
    """(strategies, planned): planned is False when no rule covers the primitive."""
    rule = strategy_rules.get(node.op)
    if rule is None:
        return [replicated_strategy(node, mesh)], False
    found = rule(node, mesh)
    if not found:
        return [replicated_strategy(node, mesh)], True
    return _dedupe(found), True


def _dedupe(strategies: Iterable[Strategy]) -> list[Strategy]:
    seen, out = set(), []
    for s in strategies:
        key = (s.inputs, s.outputs)
        if key not in seen:
            seen.add(key)
            out.append(s)
    return out


# -- enumeration helpers used by the rules ----------------------------------------------------

def axis_assignments(mesh: MeshSpec, options: Sequence[object]) -> Iterable[tuple[object, ...]]:
    """Every assignment of one option per mesh axis (an option: a role, a dim, or None)."""
    return itertools.product(options, repeat=mesh.ndim)


def divides(shape: Sequence[int], per_dim_axes: dict[int, list[int]], mesh: MeshSpec) -> bool:
    return all(shape[d] % mesh.size(*axes) == 0 for d, axes in per_dim_axes.items())


def spec_from_dims(dims: Sequence[int | None | str], shape: Sequence[int], mesh: MeshSpec
                   ) -> ShardingSpec | None:
    """Spec with mesh axis i splitting ``dims[i]`` (None: broadcast, "P": partial sum), or None
    when the split does not divide the shape."""
    sbp: list[SBP] = []
    per_dim: dict[int, list[int]] = {}
    for axis, d in enumerate(dims):
        if d is None:
            sbp.append(B)
        elif d == "P":
            sbp.append(PARTIAL)
        else:
            sbp.append(Split(d))
            per_dim.setdefault(d, []).append(axis)
    if not divides(shape, per_dim, mesh):
        return None
    return ShardingSpec(tuple(sbp))


def tensor_specs(shape: Sequence[int], mesh: MeshSpec, dims: Iterable[int] | None = None,
                 *, partial: bool = False) -> list[ShardingSpec]:
    """Every spec of a tensor splitting only ``dims`` (default: all), in canonical mesh order;
    with ``partial`` also P entries."""
    return list(_tensor_specs(tuple(shape), mesh, None if dims is None else tuple(dims), partial))


@functools.lru_cache(maxsize=4096)
def _tensor_specs(shape: tuple[int, ...], mesh: MeshSpec, dims: tuple[int, ...] | None,
                  partial: bool) -> tuple[ShardingSpec, ...]:
    options: list[int | None | str] = [None, *(range(len(shape)) if dims is None else dims)]
    if partial:
        options.append("P")
    out = []
    for dims_per_axis in axis_assignments(mesh, options):
        spec = spec_from_dims(dims_per_axis, shape, mesh)
        if spec is not None and all(shape[d] > 1 for d in dims_per_axis if isinstance(d, int)):
            out.append(spec)
    return tuple(out)


def split_ways(spec: ShardingSpec, mesh: MeshSpec) -> int:
    """Devices the work divides over: mesh axes where the spec splits or is partial."""
    ways = 1
    for i, e in enumerate(spec.sbp):
        if isinstance(e, (Split, Partial)):
            ways *= mesh.axis_sizes[i]
    return ways


def map_spec(spec: ShardingSpec, dim_map: dict[int, int | None]) -> ShardingSpec | None:
    """``spec`` with split dims renamed by ``dim_map`` (None: the dim vanishes -> broadcast is
    not allowed, the mapping fails). Partial and broadcast entries pass through."""
    sbp: list[SBP] = []
    for e in spec.sbp:
        if isinstance(e, Split):
            if dim_map.get(e.dim) is None:
                return None
            sbp.append(Split(dim_map[e.dim]))
        else:
            sbp.append(e)
    order = spec.split_order
    return ShardingSpec(tuple(sbp), order)


def is_array_operand(atom: Value | Literal, like: Sequence[int]) -> bool:
    """An operand that carries a spec: a Value of the given shape (scalars and literals are
    read whole)."""
    return isinstance(atom, Value) and tuple(atom.shape) == tuple(like) and len(like) > 0
