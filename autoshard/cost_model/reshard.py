"""Resharding: the collectives that turn one SBP layout of a value into another.

OneFlow's boxing table (Yuan et al., 2021) names the moves per mesh axis:

    from \\ to   B              S(j)               P
    B            -              slice (free)       free (zero-fill)
    S(i)         all-gather     all-to-all (i!=j)  free (zero-fill)
    P            all-reduce     reduce-scatter     -

but the plan only *pins* layouts (``with_sharding_constraint``); XLA's SPMD partitioner picks
the collectives, and on a mesh of two or more axes it often does something else (compiled
``x -> constraint(x, dst)`` on CPU, every B/S pair on (2,4), (4,2), (2,2,2)):

* a B axis that starts splitting a dim *major* to the axis already there, or a split moving
  from one mesh axis to another, is a collective-permute of the destination shard:
  (B, S0) -> (S0, S0) is a permute of 1/8 where the table says free; (S0, B) -> (B, S0) a
  permute of 1/4, not an all-gather of 1.
* replicated axes are sliced *before* an all-to-all, so it moves the destination shard:
  (B, S0) -> (S1, S1) is an all-to-all of 1/8 over 4 devices, not 1/4.
* an all-to-all that leaves the axes in another device order is followed by a permute;
  swapping the order of two axes on one dim is a permute, not an all-to-all.
* when no such move exists the value is replicated and sliced: (S0, S0) -> (S1, S2) is one
  all-gather of the whole value over all 8 devices.
* all-gathers go one tensor dim at a time, *last dim first*: (S0, S1) -> (B, B) gathers 1/2
  then 1, not the table's 1.25.

So the S/B part of a transition is priced by replaying the partitioner on tile assignments
(spmd_partitioner.py), which reproduces every compiled collective of those pairs (kind, group
size, bytes); a few patterns depend on the value's rank, which callers may pass (``ndim``).

Partial sums (P) are reduced as in the table (reduce-scatters, then all-reduces), except that
a B axis the destination splits is sliced *before* the reduction, which then moves less
((B, P) -> (S0, B) is an all-reduce of 1/2 over "model", not of 1), unless a reduce-scatter
lands on the same dim; there the slice comes after and costs nothing in any axis order. B or
S -> P stays free. What a dot itself chooses is the dot strategy's business, not resharding's.

Step bytes follow the collective_time convention, as ``measure/hlo.py`` reads them from the
HLO: the result for all-gather / all-to-all / collective-permute / all-reduce, the input for
reduce-scatter. A step's ``axes`` are the mesh axes its device groups span. Every collective's
time is affine in the value's size, so a transition is summarised once per (source,
destination, mesh) as steps with byte *factors* and costed per value (``reshard_affine``).
"""

from __future__ import annotations

import functools

from autoshard.cost_model.collectives import collective_time
from autoshard.cost_model.hardware import Hardware
from autoshard.cost_model.spmd_partitioner import ReshardStep, partitioner_steps
from autoshard.ir.mesh import MeshSpec
from autoshard.ir.sharding import Broadcast, Partial, ShardingSpec, Split

_B = Broadcast()


def _fraction(sbp: list, mesh: MeshSpec) -> float:
    ways = 1
    for i, e in enumerate(sbp):
        if isinstance(e, Split):
            ways *= mesh.axis_sizes[i]
    return 1.0 / ways


@functools.lru_cache(maxsize=65536)
def reshard_steps(src: ShardingSpec, dst: ShardingSpec, mesh: MeshSpec,
                  ndim: int | None = None) -> tuple[ReshardStep, ...]:
    """The collectives, in order, that take a value from ``src`` to ``dst``. ``ndim``, the
    value's rank, matters in rare cases (the partitioner matches some patterns on the full tile
    shape); by default the smallest rank both specs fit."""
    if src == dst:
        return ()
    cur = list(src.sbp)
    steps: list[ReshardStep] = []

    def emit(kind: str, axes: list[int], factor: float) -> None:
        if axes:
            steps.append(ReshardStep(kind, tuple(sorted(axes)), factor))

    # reductions. A B axis the destination splits is sliced first (the producer computes only
    # that slice) unless a reduction scatters onto the same dim, where it is sliced after it
    # (the scatter can leave any piece); P -> S(j) is a reduce-scatter (grouped by j), P -> B
    # an all-reduce.
    changed: set[int] = set()
    after: list[int] = []
    reduced = [i for i, (s, d) in enumerate(zip(cur, dst.sbp))
               if isinstance(s, Partial) and not isinstance(d, Partial)]
    if reduced:
        scatter_dims = {dst.sbp[i].dim for i in reduced if isinstance(dst.sbp[i], Split)}
        for i, (s, d) in enumerate(zip(cur, dst.sbp)):
            if isinstance(s, Broadcast) and isinstance(d, Split):
                if d.dim in scatter_dims:
                    after.append(i)
                else:
                    cur[i] = d
                    changed.add(i)
    scattered: set[int] = set()
    for dim in sorted({e.dim for e in dst.sbp if isinstance(e, Split)}):
        axes = [i for i, (s, d) in enumerate(zip(cur, dst.sbp))
                if isinstance(s, Partial) and d == Split(dim)]
        if axes:
            scattered.add(dim)
            emit("reduce-scatter", axes, _fraction(cur, mesh))
            for i in axes:
                cur[i] = Split(dim)
            changed.update(axes)
    axes = [i for i, (s, d) in enumerate(zip(cur, dst.sbp))
            if isinstance(s, Partial) and isinstance(d, Broadcast)]
    if axes:
        emit("all-reduce", axes, _fraction(cur, mesh))
        for i in axes:
            cur[i] = dst.sbp[i]
    for i in after:
        cur[i] = dst.sbp[i]
        changed.add(i)
    # what is left partial in both stays put; B or S -> P is a local zero-fill: keep the source.
    # On a dim the steps above split further, the axes land in the destination's order (a
    # slice can pick any piece), except that a reduce-scatter splits the piece a device already
    # holds: on a dim the source splits, the source's axes stay major (a permute follows where
    # the destination puts a scattered axis first, as the lowering's shard_map does).
    target = [c if isinstance(d, Partial) else d for c, d in zip(cur, dst.sbp)]
    touched = {cur[a].dim for a in changed}
    order = [a for a in src.ordered_split_axes() if isinstance(src.sbp[a], Split)
             and src.sbp[a].dim in scattered]
    order += [a for a in dst.ordered_split_axes() if isinstance(cur[a], Split)
              and cur[a] == dst.sbp[a] and cur[a].dim in touched]
    order += [a for a in src.ordered_split_axes() if isinstance(cur[a], Split)]
    here = ShardingSpec(tuple(_B if isinstance(e, Partial) else e for e in cur),
                        _order(cur, order))
    there = ShardingSpec(tuple(_B if isinstance(e, Partial) else e for e in target),
                         _order(target, [a for a in dst.ordered_split_axes()
                                         if isinstance(target[a], Split)] + order))
    if here != there:
        rank = max(here.max_split_dim(), there.max_split_dim(), (ndim or 0) - 1) + 1
        steps += partitioner_steps(here, there, mesh, rank)
    return tuple(steps)


def _order(sbp: list, order: list[int]) -> tuple[int, ...]:
    split = [i for i, e in enumerate(sbp) if isinstance(e, Split)]
    seen = list(dict.fromkeys(a for a in order if a in split))
    return tuple(seen + [a for a in split if a not in seen])


@functools.lru_cache(maxsize=65536)
def reshard_affine(hw: Hardware, mesh: MeshSpec, src: ShardingSpec, dst: ShardingSpec
                   ) -> tuple[float, float]:
    """(latency seconds, seconds per full-value byte): a transition of a value of b bytes takes
    ``latency + slope * b`` (0 when nothing moves)."""
    steps = reshard_steps(src, dst, mesh)
    if not steps:
        return 0.0, 0.0
    big = 2.0 ** 30
    small = sum(collective_time(hw, mesh, s.kind, s.factor, s.axes) for s in steps)
    large = sum(collective_time(hw, mesh, s.kind, big * s.factor, s.axes) for s in steps)
    slope = (large - small) / (big - 1.0)
    return small - slope, slope


def reshard_time(hw: Hardware, mesh: MeshSpec, src: ShardingSpec, dst: ShardingSpec,
                 nbytes: float) -> float:
    """Seconds to reshard a value of ``nbytes`` (full, unsharded size) from ``src`` to ``dst``."""
    if src == dst or nbytes <= 0:
        return 0.0
    fixed, slope = reshard_affine(hw, mesh, src, dst)
    return fixed + slope * nbytes
