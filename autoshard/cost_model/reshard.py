"""Resharding: the collectives that turn one SBP layout of a value into another.

OneFlow's boxing table (Yuan et al., 2021), applied per mesh axis:

    from \\ to   B              S(j)               P
    B            -              slice (free)       free (zero-fill)
    S(i)         all-gather     all-to-all (i!=j)  free (zero-fill)
    P            all-reduce     reduce-scatter     -

Axes are composed in an order that keeps buffers small: reductions first (reduce-scatters before
all-reduces), then all-to-alls, then all-gathers. Transitions of the same kind onto the same
tensor dim over several mesh axes are one collective over the axis group, as XLA emits them.
Every collective's time is affine in the value's size, so a transition is summarised once per
(source, destination, mesh) as a list of steps with byte *factors* and costed per value.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from autoshard.cost_model.collectives import collective_time
from autoshard.cost_model.hardware import Hardware
from autoshard.ir.mesh import MeshSpec
from autoshard.ir.sharding import Broadcast, Partial, ShardingSpec, Split


@dataclass(frozen=True, slots=True)
class ReshardStep:
    """One collective: ``kind`` over mesh ``axes`` moving ``factor`` x the value's full bytes
    per device (the collective_time byte convention)."""

    kind: str
    axes: tuple[int, ...]
    factor: float


def _fraction(sbp: list, mesh: MeshSpec) -> float:
    ways = 1
    for i, e in enumerate(sbp):
        if isinstance(e, Split):
            ways *= mesh.axis_sizes[i]
    return 1.0 / ways


@functools.lru_cache(maxsize=65536)
def reshard_steps(src: ShardingSpec, dst: ShardingSpec, mesh: MeshSpec) -> tuple[ReshardStep, ...]:
    """The collectives, in order, that take a value from ``src`` to ``dst``."""
    if src == dst:
        return ()
    cur = list(src.sbp)
    steps: list[ReshardStep] = []

    def emit(kind: str, axes: list[int], factor: float) -> None:
        if axes:
            steps.append(ReshardStep(kind, tuple(sorted(axes)), factor))

    # reductions: P -> S(j) (reduce-scatter, grouped by j), then P -> B (all-reduce)
    for dim in sorted({e.dim for e in dst.sbp if isinstance(e, Split)}):
        axes = [i for i, (s, d) in enumerate(zip(cur, dst.sbp))
                if isinstance(s, Partial) and d == Split(dim)]
        if axes:
            emit("reduce-scatter", axes, _fraction(cur, mesh))
            for i in axes:
                cur[i] = Split(dim)
    axes = [i for i, (s, d) in enumerate(zip(cur, dst.sbp))
            if isinstance(s, Partial) and isinstance(d, Broadcast)]
    if axes:
        emit("all-reduce", axes, _fraction(cur, mesh))
        for i in axes:
            cur[i] = dst.sbp[i]
    # S(i) -> S(j): one all-to-all over the group of axes making the same move
    moves = sorted({(s.dim, d.dim) for s, d in zip(cur, dst.sbp) if isinstance(s, Split)
                    and isinstance(d, Split) and s.dim != d.dim})
    for i_dim, j_dim in moves:
        axes = [i for i, (s, d) in enumerate(zip(cur, dst.sbp))
                if s == Split(i_dim) and d == Split(j_dim)]
        emit("all-to-all", axes, _fraction(cur, mesh))
        for i in axes:
            cur[i] = dst.sbp[i]
    # S(i) -> B: all-gather, grouped by the dim being gathered
    for dim in sorted({e.dim for e in cur if isinstance(e, Split)}):
        axes = [i for i, (s, d) in enumerate(zip(cur, dst.sbp))
                if s == Split(dim) and isinstance(d, Broadcast)]
        if axes:
            for i in axes:
                cur[i] = dst.sbp[i]
            emit("all-gather", axes, _fraction(cur, mesh))
    # same dims and axes split in another major-to-minor order: a shuffle among the group
    if tuple(cur) == dst.sbp and src.ordered_split_axes() != dst.ordered_split_axes() and \
            set(src.ordered_split_axes()) == set(dst.ordered_split_axes()) and not steps:
        moved = [a for a, b in zip(src.ordered_split_axes(), dst.ordered_split_axes()) if a != b]
        emit("all-to-all", moved, _fraction(cur, mesh))
    # B -> S, B -> P, S -> P are local; nothing else remains
    return tuple(steps)


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
