"""XLA's SPMD partitioner's resharding, replayed on GSPMD tile assignments.

``reshard_steps`` (reshard.py) hands the split/broadcast part of a transition here, because
on meshes of two or more axes the partitioner does not move tiles the way a per-axis table
says. This module replays its decision procedure (``PartitionedHlo::ReshardNoCache``):
collective-permute if only the device order differs; all-to-all if tile counts swap between
dims; from a partially replicated layout, local slice (+ permute) or slice then all-to-all; to
one, (permute +) all-gather; the pattern rewrites of ``TryComplexReshardHandling``; grouping on
dims that keep their tile count; else replicate and slice ("involuntary full
rematerialization"). It works on the device array jax builds from a PartitionSpec (replicated
axes last, in mesh order) and records each collective the procedure creates: its kind, the
mesh axes its device groups span, and its bytes as a fraction of the full value. Shapes are
assumed to divide evenly (no halo exchanges or padding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from autoshard.ir.mesh import MeshSpec
from autoshard.ir.sharding import ShardingSpec


@dataclass(frozen=True, slots=True)
class ReshardStep:
    """One collective: ``kind`` over mesh ``axes`` moving ``factor`` x the value's full bytes
    per device (the collective_time byte convention)."""

    kind: str
    axes: tuple[int, ...]
    factor: float


def partitioner_steps(src: ShardingSpec, dst: ShardingSpec, mesh: MeshSpec,
                      rank: int) -> list[ReshardStep]:
    """The collectives, in order, the partitioner emits to take a value of ``rank`` dims from
    ``src`` to ``dst`` (layouts without partial sums)."""
    return _Partitioner(mesh).run(_tiles(src, mesh, rank), _tiles(dst, mesh, rank))


class _Tiles:
    """A GSPMD tiled sharding: the device array over tile dims, plus a last replication dim
    when ``partial`` (``last_tile_dim_replicate``)."""

    __slots__ = ("arr", "partial")

    def __init__(self, arr: np.ndarray, partial: bool):
        self.arr, self.partial = arr, partial

    @property
    def data(self) -> tuple[int, ...]:
        return self.arr.shape[:-1] if self.partial else self.arr.shape

    @property
    def repl(self) -> int:
        return self.arr.shape[-1] if self.partial else 1

    @property
    def tiles(self) -> int:
        return math.prod(self.data)

    def __eq__(self, other) -> bool:
        return isinstance(other, _Tiles) and self.partial == other.partial and \
            self.arr.shape == other.arr.shape and bool((self.arr == other.arr).all())

    __hash__ = None


_REPLICATED = "replicated"


def _make(arr, partial: bool):
    """HloSharding's normal form: no replication dim of 1; nothing tiled is replicated."""
    arr = np.asarray(arr)
    if partial and arr.shape[-1] == 1:
        arr, partial = arr.reshape(arr.shape[:-1]), False
    if math.prod(arr.shape[:-1] if partial else arr.shape) == 1:
        return _REPLICATED
    return _Tiles(arr, partial)


def _tiles(spec: ShardingSpec, mesh: MeshSpec, rank: int):
    """The tile assignment jax gives ``spec`` (devices numbered row-major over the mesh):
    each dim's axes major to minor, then the unused axes in mesh order as replication."""
    sizes = mesh.axis_sizes
    order, shape = [], []
    for d in range(rank):
        axes = list(spec.dim_axes(d))
        order += axes
        shape.append(math.prod(sizes[a] for a in axes))
    unused = [a for a in range(len(sizes)) if a not in order]
    grid = np.arange(mesh.num_devices).reshape(sizes).transpose(order + unused)
    return _make(grid.reshape(shape + [math.prod(sizes[a] for a in unused)]), True)


def _frac(s) -> float:
    return 1.0 if s is _REPLICATED else 1.0 / s.tiles


def _groups_along(arr: np.ndarray, axes: list[int]) -> np.ndarray:
    """Device groups of ``arr`` that differ only along array ``axes``, one per row."""
    keep = [i for i in range(arr.ndim) if i not in axes]
    return arr.transpose(keep + list(axes)).reshape(-1, math.prod(arr.shape[a] for a in axes))


def _split(arr: np.ndarray, factors: dict[int, int]) -> tuple[np.ndarray, list[int]]:
    """``arr`` with each dim d in ``factors`` split into (n / f, f); the positions of the f's."""
    shape, minor = [], []
    for i, n in enumerate(arr.shape):
        if i in factors:
            shape += [n // factors[i], factors[i]]
            minor.append(len(shape) - 1)
        else:
            shape.append(n)
    return arr.reshape(shape), minor


def _data_index(s: _Tiles) -> np.ndarray:
    """Per device id, its tile's index along each data dim."""
    out = np.zeros((s.arr.size, len(s.data)), dtype=np.int64)
    idx = np.indices(s.arr.shape).reshape(s.arr.ndim, -1)[:len(s.data)]
    out[s.arr.reshape(-1)] = idx.T
    return out


def _is_subtiling(sub: _Tiles, sharding: _Tiles) -> bool:
    """Every device's tile under ``sub`` lies inside its tile under ``sharding``."""
    if any(a % b for a, b in zip(sub.data, sharding.data)):
        return False
    ratio = np.array([a // b for a, b in zip(sub.data, sharding.data)], dtype=np.int64)
    return bool((_data_index(sub) // ratio == _data_index(sharding)).all())


def _compatible(partial, target):
    """``PartialReplicateReshardCompatibleSharding``: ``target``'s tile counts laid out so that
    ``partial`` gets there by slicing locally (its replicated devices split the new tiles)."""
    if partial is _REPLICATED or target is _REPLICATED or not partial.partial or \
            partial.arr.size != target.arr.size or len(partial.data) != len(target.data):
        return None
    rank = len(partial.data)
    expand, sizes = [-1] * rank, []
    for d in range(rank):
        if target.data[d] % partial.data[d]:
            return None
        if target.data[d] > partial.data[d]:
            expand[d] = len(sizes)
            sizes.append(target.data[d] // partial.data[d])
    if _is_subtiling(target, partial):
        return target
    shape, perm = list(partial.data) + sizes, []
    for d in range(rank):
        perm += [d] + ([rank + expand[d]] if expand[d] > -1 else [])
    if target.partial:
        shape.append(target.repl)
        perm.append(len(shape) - 1)
    arr = partial.arr.reshape(shape).transpose(perm).reshape(target.arr.shape)
    return _make(arr, target.partial)


def _all_to_all_dims(s, t):
    """``GetReshardAllToAllSourceTargetDims``: (source, target) tile dims to swap, one pair at a
    time, when the tile counts are a permutation of each other."""
    if s is _REPLICATED or t is _REPLICATED or s.arr.ndim != t.arr.ndim or s.tiles != t.tiles:
        return None
    src_at: dict[int, list[int]] = {}
    dst_at: dict[int, list[int]] = {}
    for i, (a, b) in enumerate(zip(s.arr.shape, t.arr.shape)):
        if a != b:
            src_at.setdefault(a, []).append(i)
            dst_at.setdefault(b, []).append(i)
    if not src_at or len(src_at) != len(dst_at) or any(
            len(dst_at.get(k, ())) != len(v) for k, v in src_at.items()):
        return None

    def drop(table, size, dim):
        table[size] = [x for x in table[size] if x != dim]
        if not table[size]:
            del table[size]

    pairs = []
    while src_at:
        size = min(src_at)
        i = src_at[size][-1]
        want = t.arr.shape[i]
        if want == size:
            drop(src_at, size, i)
            drop(dst_at, size, i)
            continue
        if size != 1 and want % size:
            return None
        options = src_at[want]
        # prefer a j whose target count makes the swap final; else the last one looked at
        j = next((j for j in options if (t.arr.shape[j] != 1 if size == 1 else
                                         t.arr.shape[j] == size)), options[-1])
        pairs.append((j, i))
        drop(dst_at, want, i)
        src_at[size][-1] = j
        drop(src_at, want, j)
    return pairs


def _after_all_to_all(s: _Tiles, sources: list[int], targets: list[int]):
    """``GetAllToAllSharding``: each target dim gains the minor part of its source dim."""
    arr = s.arr
    for sd, td in zip(sources, targets):
        shape, at_s, at_t = [], 0, 0
        for i, n in enumerate(arr.shape):
            if i == sd:
                shape += [arr.shape[td], n // arr.shape[td]]
                at_s = len(shape) - 1
            elif i == td:
                shape += [n, 1]
                at_t = len(shape) - 1
            else:
                shape.append(n)
        perm = list(range(len(shape)))
        perm[at_s], perm[at_t] = at_t, at_s
        swapped = list(arr.shape)
        swapped[sd], swapped[td] = swapped[td], swapped[sd]
        arr = arr.reshape(shape).transpose(perm).reshape(swapped)
    return _make(arr, s.partial)


class _Partitioner:
    """Replays ``PartitionedHlo::ReshardNoCache`` and records the collectives it creates. Inside
    a grouped reshard, device ids are positions in a group; ``to_global`` maps them back."""

    def __init__(self, mesh: MeshSpec):
        self.mesh = mesh
        self.to_global = np.arange(mesh.num_devices).reshape(1, -1)
        self.scale = 1.0
        self.out: list[ReshardStep] = []

    def run(self, src, dst) -> list[ReshardStep]:
        self.reshard(src, dst)
        return self.out

    # -- recording ---------------------------------------------------------------------------

    def _axes(self, groups: np.ndarray) -> tuple[int, ...]:
        """Mesh axes along which the devices of any group (a row, in group positions) differ."""
        ids = self.to_global[:, groups].reshape(-1, groups.shape[-1])
        coords = np.stack(np.unravel_index(ids, self.mesh.axis_sizes))
        return tuple(int(a) for a in np.flatnonzero(
            (coords != coords[:, :, :1]).any(axis=(1, 2))))

    def _emit(self, kind: str, groups: np.ndarray, frac: float) -> None:
        axes = self._axes(groups)
        if axes:
            self.out.append(ReshardStep(kind, axes, frac * self.scale))

    def _permute(self, s: _Tiles, t: _Tiles):
        pairs = np.stack([s.arr.reshape(-1), t.arr.reshape(-1)], axis=1)
        self._emit("collective-permute", pairs, _frac(t))
        return t

    @staticmethod
    def _can_permute(s, t) -> bool:
        return s is not _REPLICATED and t is not _REPLICATED and s.partial == t.partial and \
            s.arr.shape == t.arr.shape and not s == t

    # -- the decision procedure --------------------------------------------------------------

    def reshard(self, s, t, allow_full: bool = True):
        if s is t or s == t:
            return t
        if self._can_permute(s, t):
            return self._permute(s, t)
        pairs = _all_to_all_dims(s, t)
        if pairs is not None:
            return self._all_to_all(s, t, pairs)
        if s is not _REPLICATED and t is not _REPLICATED:
            if s.partial:
                for way in (self._slice_from_partial, self._partial_all_to_all):
                    if (r := way(s, t)) is not None:
                        return r
            if t.partial:
                for way in (self._gather_to_partial, self._partial_all_to_all):
                    if (r := way(s, t)) is not None:
                        return r
            if (r := self._complex(s, t)) is not None:
                return r
            same = [d for d in range(len(s.data)) if s.arr.shape[d] != 1
                    and t.arr.shape[d] == s.arr.shape[d]]
            if same:
                return self._grouped(s, t, same)
            if not allow_full:
                return s
        return self._rematerialize(s, t)

    def _rematerialize(self, s, t):
        """Involuntary full rematerialization: gather every dim (last first), then slice."""
        if s is not _REPLICATED:
            frac = _frac(s)
            for d in reversed(range(len(s.data))):
                if s.data[d] > 1:
                    frac *= s.data[d]
                    self._emit("all-gather", _groups_along(s.arr, [d]), frac)
        return t

    def _all_to_all(self, s, t, pairs, multiple: bool = True):
        """``ReshardWithAllToAll``: disjoint pairs in one all-to-all, the rest one at a time,
        then a permute if the device order still differs."""
        if s == t:
            return t
        if not pairs:
            return self._permute(s, t)
        if multiple:
            seen, sources, targets, sizes, rest = set(), [], [], [], []
            for sd, td in sorted(pairs, key=lambda p: p[1]):
                if sd in seen or td in seen or s.arr.shape[sd] % s.arr.shape[td] or \
                        s.arr.shape[sd] == s.arr.shape[td]:
                    rest.append((sd, td))
                    continue
                sources.append(sd)
                targets.append(td)
                sizes.append(s.arr.shape[sd] // s.arr.shape[td])
                seen |= {sd, td}
            if len(sources) >= 2:
                temp = _after_all_to_all(s, sources, targets)
                arr, minor = _split(temp.arr, dict(zip(targets, sizes)))
                self._emit("all-to-all", _groups_along(arr, minor), _frac(s))
                return self._all_to_all(temp, t, rest, False)
        sd, td = pairs[0]
        if s.arr.shape[sd] % s.arr.shape[td] or s.arr.shape[sd] == s.arr.shape[td]:
            return self._rematerialize(s, t)   # a swap XLA cannot do in one step (4+ dims)
        temp = _after_all_to_all(s, [sd], [td])
        arr, minor = _split(temp.arr, {td: s.arr.shape[sd] // s.arr.shape[td]})
        self._emit("all-to-all", _groups_along(arr, minor), _frac(s))
        return self._all_to_all(temp, t, pairs[1:], False)

    def _slice_from_partial(self, s, t):
        """``ReshardFromPartialReplicateWithDynamicSlice``: slice, then permute if needed."""
        temp = _compatible(s, t)
        if temp is None:
            return None
        return self._permute(temp, t) if self._can_permute(temp, t) else t

    def _gather_to_partial(self, s, t):
        """``ReshardToPartialReplicateWithAllGather``: permute if needed, then all-gather the
        dims whose tile count shrinks (last first)."""
        temp = _compatible(t, s)
        if temp is None:
            return None
        if self._can_permute(s, temp):
            self._permute(s, temp)
        factors = {d: temp.data[d] // t.data[d] for d in range(len(t.data))
                   if temp.data[d] > t.data[d]}
        arr, minor = _split(temp.arr, factors)
        frac = _frac(temp)
        for d, axis in reversed(list(zip(sorted(factors), minor))):
            frac *= factors[d]
            self._emit("all-gather", _groups_along(arr, [axis]), frac)
        return t

    def _partial_all_to_all(self, s, t):
        """``ReshardPartialReplicateWithAllToAll``: [1, a, .., r] replicated <-> [a, .., r]."""
        partial, tiled = (s, t) if s.partial else (t, s)
        if not partial.partial or tiled.partial:
            return None
        n = partial.repl
        if tiled.arr.ndim + 1 != partial.arr.ndim or partial.arr.shape[0] != 1:
            return None
        dim = -1
        for i in reversed(range(tiled.arr.ndim)):
            if tiled.arr.shape[i] > 1 and dim == -1:
                if tiled.arr.shape[i] != n:
                    return None
                dim = i
            if tiled.arr.shape[i] != partial.arr.shape[i + 1]:
                return None
        if dim == -1 or not (partial.arr.reshape(tiled.arr.shape) == tiled.arr).all():
            return None
        shape = list(tiled.arr.shape)
        shape[dim] = 1
        temp = _make(tiled.arr.reshape(shape + [n]), True)
        if s.partial:
            pairs = _all_to_all_dims(s, temp)
            return None if pairs is None else self.reshard(self._all_to_all(s, temp, pairs), t)
        mark = len(self.out)
        mid = self.reshard(s, temp)
        pairs = _all_to_all_dims(mid, t)
        if pairs is None:
            del self.out[mark:]
            return None
        return self._all_to_all(mid, t, pairs)

    def _complex(self, s, t):
        """``TryComplexReshardHandling``: split one tile dim in two, replicate one dim first,
        or turn the replication into a tile dim first; each must then finish without a full
        rematerialization."""
        mark = len(self.out)

        def reached(r):
            if r == t:
                return t
            del self.out[mark:]
            return None

        if len(s.data) == len(t.data) and s.partial == t.partial and s.repl == t.repl:
            ones, multiples = [], []
            for i, (a, b) in enumerate(zip(s.data, t.data)):
                if a != b:
                    if min(a, b) == 1:
                        ones.append(i)
                    elif max(a, b) % min(a, b) == 0:
                        multiples.append(i)
            pick = next(((i, min(s.data[i], t.data[i])) for i in multiples for j in ones
                         if s.data[i] * s.data[j] == t.data[i] * t.data[j]), None)
            if pick is None:
                pick = next(((i, t.data[i]) for i in multiples if s.data[i] > t.data[i]), None)
            if pick is not None:
                i, size = pick
                split_t = _split_dim(t, i, size)
                r = self.reshard(_split_dim(s, i, size), split_t, allow_full=False)
                if not r == split_t:
                    del self.out[mark:]
                    return None
                merged = _merge_dim(r, i)
                return reached(merged if merged == t else
                               self.reshard(merged, t, allow_full=False))
        if t.partial:
            for i, a in enumerate(s.data):
                if a != 1 and a * s.repl == t.repl:
                    mid = self.reshard(s, _replicate_dims(s, [i]))
                    return reached(self.reshard(mid, t, allow_full=False))
            return None
        if s.partial:
            first = next((i for i in range(t.arr.ndim) if t.arr.shape[i] != s.arr.shape[i]
                          and s.arr.shape[i] == 1 and t.arr.shape[i] % s.repl == 0), -1)
            if first == -1:
                return None
            perm = list(range(s.arr.ndim))
            perm[first], perm[-1] = perm[-1], perm[first]
            mid = self.reshard(s, _make(s.arr.transpose(perm), True))
            return reached(self.reshard(mid, t, allow_full=False))
        return None

    def _grouped(self, s, t, dims: list[int]):
        """Reshard inside the groups of devices that share their tiles along ``dims`` (equal
        tile counts in ``s`` and ``t``), then fix whatever order that leaves."""
        groups_s, inner_s = _group(s, dims)
        groups_t, inner_t = _group(t, dims)
        inner_t = _align(groups_t, inner_t, groups_s)
        outer = (self.to_global, self.scale)
        self.to_global = self.to_global[:, groups_s].reshape(-1, groups_s.shape[1])
        self.scale /= groups_s.shape[0]
        self.reshard(inner_s, inner_t)
        self.to_global, self.scale = outer
        mid = _ungroup(groups_s, inner_t, dims, [s.arr.shape[d] for d in dims], len(s.data))
        return self.reshard(mid, t)


def _split_dim(s: _Tiles, d: int, size: int):
    shape = list(s.arr.shape)
    shape[d:d + 1] = [size, shape[d] // size]
    return _make(s.arr.reshape(shape), s.partial)


def _merge_dim(s, d: int):
    if s is _REPLICATED:
        return s
    shape = list(s.arr.shape)
    shape[d:d + 2] = [shape[d] * shape[d + 1]]
    return _make(s.arr.reshape(shape), s.partial)


def _replicate_dims(s: _Tiles, dims: list[int]):
    """``PartiallyReplicateTiledShardingOnDims``: those dims join the replication, major."""
    rank = len(s.data)
    count = math.prod(s.data[d] for d in dims)
    if count == s.tiles:
        return _REPLICATED
    perm = sorted(range(rank), key=lambda d: d in dims) + ([rank] if s.partial else [])
    shape = [1 if d in dims else n for d, n in enumerate(s.data)] + [s.repl * count]
    return _make(s.arr.transpose(perm).reshape(shape), True)


def _group(s: _Tiles, dims: list[int]):
    """``GroupShardingOnDims`` on whole dims: the device groups (row g: group g's devices in
    tile order) and the sharding inside a group, over positions in the group."""
    rest = [i for i in range(s.arr.ndim) if i not in dims]
    groups = s.arr.transpose(list(dims) + rest).reshape(
        math.prod(s.arr.shape[d] for d in dims), -1)
    shape = [1 if i in dims else n for i, n in enumerate(s.arr.shape)]
    return groups, _make(np.arange(groups.shape[1]).reshape(shape), s.partial)


def _align(groups_t: np.ndarray, inner_t, groups_s: np.ndarray):
    """``AlignGroupsWith``: renumber ``inner_t`` to the source's groups when each target group
    is the same-numbered source group; otherwise keep it (and the source's groups)."""
    if (groups_t == groups_s).all() or inner_t is _REPLICATED:
        return inner_t
    group_of = np.empty(groups_s.size, dtype=np.int64)
    position = np.empty(groups_s.size, dtype=np.int64)
    for g, row in enumerate(groups_s):
        group_of[row] = g
        position[row] = np.arange(len(row))
    if not (group_of[groups_t] == np.arange(len(groups_t))[:, None]).all():
        return inner_t
    return _make(position[groups_t[0]][inner_t.arr], inner_t.partial)


def _ungroup(groups: np.ndarray, inner, dims: list[int], sizes: list[int], rank: int):
    """``UngroupSharding`` for whole-dim groups: group index major along each grouped dim."""
    n = groups.shape[1]
    if inner is _REPLICATED:
        inner = _Tiles(np.arange(n).reshape([1] * rank + [n]), True) if n > 1 else \
            _Tiles(np.zeros([1] * rank, dtype=np.int64), False)
    arr = inner.arr
    count = dict(zip(dims, sizes))
    index = np.indices([m * count.get(d, 1) for d, m in enumerate(arr.shape)])
    local = tuple(index[d] % m for d, m in enumerate(arr.shape))
    group = np.zeros(index.shape[1:], dtype=np.int64)
    for d, g in zip(dims, sizes):
        group = group * g + index[d] // arr.shape[d]
    return _make(groups[group, arr[local]], inner.partial)

