"""SBP sharding specs: one Split / Broadcast / Partial entry per mesh axis.

The planner reasons per mesh axis, as OneFlow's nd-SBP does (Yuan et al., "OneFlow: Redesign
the Distributed Deep Learning Framework from Scratch", 2021): on each axis a value is split
along one tensor dim (``S(d)``), broadcast (``B``, replicated) or a partial sum (``P``, the true
value is the sum over the axis). Resharding costs then compose axis by axis.

GSPMD's ``PartitionSpec`` is the per-*dimension* view of the same thing. When several mesh
axes split one dim the order of those axes matters (major to minor); the SBP tuple alone holds
mesh order, so a spec keeps an explicit ``split_order`` only when it differs. ``P`` has no
PartitionSpec form: it exists inside a plan and must be reduced before it reaches a boundary.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence, Union

from jax.sharding import PartitionSpec

from autoshard.ir.errors import ShardingError
from autoshard.ir.mesh import MeshSpec


@dataclass(frozen=True, slots=True)
class Split:
    """The value is split along tensor dimension ``dim`` over this mesh axis."""

    dim: int

    def __post_init__(self):
        if not isinstance(self.dim, int) or self.dim < 0:
            raise ShardingError(f"S(dim) needs a non-negative int dim, got {self.dim!r}")

    def __str__(self) -> str:
        return f"S{self.dim}"


@dataclass(frozen=True, slots=True)
class Broadcast:
    """Every device on this mesh axis holds the whole value (replicated)."""

    def __str__(self) -> str:
        return "B"


@dataclass(frozen=True, slots=True)
class Partial:
    """Each device holds a summand; the value is the sum over this mesh axis."""

    def __str__(self) -> str:
        return "P"


SBP = Union[Split, Broadcast, Partial]
B = Broadcast()
PARTIAL = Partial()


def fsdp_dim(shape: Sequence[int], ways: int) -> int | None:
    """The dim ZeRO-3 / FSDP splits a parameter or optimizer-state leaf on over ``ways``
    devices: its largest dim they divide (the earlier on ties, so a leaf and its optimizer
    moments agree); None when none divides (the leaf stays replicated)."""
    dims = [d for d in range(len(shape)) if ways > 1 and shape[d] % ways == 0]
    return max(dims, key=lambda d: (shape[d], -d)) if dims else None


def S(dim: int) -> Split:
    return Split(dim)


@dataclass(frozen=True, slots=True)
class ShardingSpec:
    """How one value is laid out on a mesh: ``sbp[i]`` is its entry on mesh axis ``i``.

    ``split_order`` lists the split mesh axes major to minor when that is not mesh order (only
    observable when two axes split the same dim); it is empty in the canonical mesh-order case,
    so equal layouts compare and hash equal.
    """

    sbp: tuple[SBP, ...]
    split_order: tuple[int, ...] = ()

    def __post_init__(self):
        for entry in self.sbp:
            if not isinstance(entry, (Split, Broadcast, Partial)):
                raise ShardingError(f"SBP entries are S(d), B or P, got {entry!r}")
        if self.split_order:
            split = tuple(i for i, e in enumerate(self.sbp) if isinstance(e, Split))
            if sorted(self.split_order) != list(split):
                raise ShardingError(
                    f"split_order {self.split_order} must list exactly the split mesh axes {split}")
            if list(self.split_order) == sorted(self.split_order):
                object.__setattr__(self, "split_order", ())

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def replicated(cls, mesh_ndim: int) -> ShardingSpec:
        return cls((B,) * mesh_ndim)

    @classmethod
    def from_partition_spec(cls, pspec: PartitionSpec | Sequence, mesh: MeshSpec,
                            ndim: int | None = None, *, what: str = "value") -> ShardingSpec:
        """The SBP form of ``pspec`` on ``mesh``; ``what`` names the user's object in errors."""
        entries = tuple(pspec)
        unreduced = getattr(pspec, "unreduced", None)
        if unreduced:
            raise ShardingError(f"{what}: PartitionSpec with unreduced axes {set(unreduced)} is "
                                "not supported; use a plan's Partial (P) entry instead")
        if ndim is not None and len(entries) > ndim:
            raise ShardingError(
                f"{what}: PartitionSpec {pspec} has {len(entries)} entries but the value has rank "
                f"{ndim}; give at most one entry per dimension")
        sbp: list[SBP] = [B] * mesh.ndim
        order: list[int] = []
        for dim, entry in enumerate(entries):
            if entry is None:
                continue
            if entry is PartitionSpec.UNCONSTRAINED:
                raise ShardingError(
                    f"{what}: PartitionSpec.UNCONSTRAINED in dim {dim} cannot be pinned; "
                    "use None for replicated or leave the value without a hint")
            names = (entry,) if isinstance(entry, str) else tuple(entry)
            for name in names:
                if not isinstance(name, str):
                    raise ShardingError(f"{what}: PartitionSpec entry {entry!r} in dim {dim} "
                                        "must be a mesh axis name or a tuple of names")
                try:
                    axis = mesh.index(name)
                except ShardingError as err:
                    raise ShardingError(f"{what}: {err}") from None
                if not isinstance(sbp[axis], Broadcast):
                    raise ShardingError(f"{what}: mesh axis {name!r} appears twice in {pspec}; "
                                        "a mesh axis can split at most one dimension")
                sbp[axis] = Split(dim)
                order.append(axis)
        return cls(tuple(sbp), tuple(order))

    @classmethod
    def parse(cls, text: str, mesh: MeshSpec | None = None) -> ShardingSpec:
        """Inverse of ``str(spec)``: ``"(S0, B)"``, ``"S1,P"``, ``"(S0, S0 | order=1,0)"``."""
        body, _, order_text = text.strip().strip("()").partition("|")
        sbp: list[SBP] = []
        for token in (t.strip() for t in body.split(",") if t.strip()):
            if token == "B":
                sbp.append(B)
            elif token == "P":
                sbp.append(PARTIAL)
            elif m := re.fullmatch(r"S\(?(\d+)\)?", token):
                sbp.append(Split(int(m.group(1))))
            else:
                raise ShardingError(f"cannot parse SBP entry {token!r} in {text!r}; "
                                    "expected S<dim>, B or P")
        if mesh is not None and len(sbp) != mesh.ndim:
            raise ShardingError(f"spec {text!r} has {len(sbp)} entries; mesh {mesh} has "
                                f"{mesh.ndim} axes")
        order = ()
        if order_text.strip():
            order = tuple(int(i) for i in order_text.split("=")[-1].split(","))
        return cls(tuple(sbp), order)

    # -- queries --------------------------------------------------------------------------------

    @property
    def mesh_ndim(self) -> int:
        return len(self.sbp)

    @property
    def is_replicated(self) -> bool:
        return all(isinstance(e, Broadcast) for e in self.sbp)

    @property
    def partial_axes(self) -> tuple[int, ...]:
        return tuple(i for i, e in enumerate(self.sbp) if isinstance(e, Partial))

    @property
    def has_partial(self) -> bool:
        return any(isinstance(e, Partial) for e in self.sbp)

    def ordered_split_axes(self) -> tuple[int, ...]:
        """Split mesh axes, major to minor."""
        if self.split_order:
            return self.split_order
        return tuple(i for i, e in enumerate(self.sbp) if isinstance(e, Split))

    def dim_axes(self, dim: int) -> tuple[int, ...]:
        """Mesh axes splitting tensor dim ``dim``, major to minor."""
        return tuple(i for i in self.ordered_split_axes() if self.sbp[i].dim == dim)

    def max_split_dim(self) -> int:
        return max((e.dim for e in self.sbp if isinstance(e, Split)), default=-1)

    def shard_shape(self, shape: Sequence[int], mesh: MeshSpec) -> tuple[int, ...]:
        """Per-device shape (assumes ``validate`` passed)."""
        return tuple(size // mesh.size(*self.dim_axes(d)) for d, size in enumerate(shape))

    def shard_fraction(self, mesh: MeshSpec) -> float:
        """Fraction of the full value each device stores (partial values are stored whole)."""
        return 1.0 / math.prod(mesh.axis_sizes[i] for i, e in enumerate(self.sbp)
                               if isinstance(e, Split))

    def validate(self, shape: Sequence[int], mesh: MeshSpec, *, what: str = "value") -> None:
        """Raise a ShardingError naming ``what`` unless this spec can lay out ``shape``."""
        if self.mesh_ndim != mesh.ndim:
            raise ShardingError(f"{what}: spec {self} has {self.mesh_ndim} SBP entries but mesh "
                                f"{mesh} has {mesh.ndim} axes")
        for axis, entry in enumerate(self.sbp):
            if isinstance(entry, Split) and entry.dim >= len(shape):
                raise ShardingError(
                    f"{what} has shape {tuple(shape)} (rank {len(shape)}) but mesh axis "
                    f"{mesh.axis_names[axis]!r} splits dim {entry.dim}")
        for dim, size in enumerate(shape):
            axes = self.dim_axes(dim)
            ways = mesh.size(*axes)
            if axes and size % ways:
                names = " x ".join(f"{mesh.axis_names[a]!r} (size {mesh.axis_sizes[a]})"
                                   for a in axes)
                raise ShardingError(
                    f"{what} has shape {tuple(shape)}: mesh axis {names} does not divide dim "
                    f"{dim} (size {size}); split a dim that {ways} divides, use a smaller mesh "
                    f"axis, or pad the dim to a multiple of {ways}")

    # -- conversion -----------------------------------------------------------------------------

    def to_partition_spec(self, mesh: MeshSpec, ndim: int | None = None,
                          *, partial: str = "error") -> PartitionSpec:
        """The GSPMD form. ``partial="replicate"`` drops P entries (the caller reduces them)."""
        if self.has_partial and partial != "replicate":
            raise ShardingError(f"spec {self} has a partial-sum (P) entry, which has no "
                                "PartitionSpec form; reduce it first")
        rank = self.max_split_dim() + 1 if ndim is None else ndim
        entries = []
        for dim in range(rank):
            names = tuple(mesh.axis_names[a] for a in self.dim_axes(dim))
            entries.append(None if not names else names[0] if len(names) == 1 else names)
        while entries and entries[-1] is None:
            entries.pop()
        return PartitionSpec(*entries)

    def format(self, mesh: MeshSpec) -> str:
        """``data:S0 model:B`` — the compact form with the mesh's axis names."""
        text = " ".join(f"{n}:{e}" for n, e in zip(mesh.axis_names, self.sbp))
        if self.split_order:
            text += " order=" + ">".join(mesh.axis_names[i] for i in self.split_order)
        return text

    def __str__(self) -> str:
        text = ", ".join(str(e) for e in self.sbp)
        if self.split_order:
            text += " | order=" + ",".join(str(i) for i in self.split_order)
        return f"({text})"


def as_sharding_spec(spec: ShardingSpec | PartitionSpec | str | Sequence | None, mesh: MeshSpec,
                     ndim: int, *, what: str) -> ShardingSpec:
    """Accept the forms users write (PartitionSpec, SBP spec, its string, None) as a spec."""
    if isinstance(spec, ShardingSpec):
        if spec.mesh_ndim != mesh.ndim:
            raise ShardingError(f"{what}: spec {spec} has {spec.mesh_ndim} SBP entries but mesh "
                                f"{mesh} has {mesh.ndim} axes")
        return spec
    if spec is None:
        return ShardingSpec.replicated(mesh.ndim)
    if isinstance(spec, str):
        if spec in mesh.axis_names:
            return ShardingSpec.from_partition_spec(PartitionSpec(spec), mesh, ndim, what=what)
        try:
            return ShardingSpec.parse(spec, mesh)
        except ShardingError as err:
            raise ShardingError(f"{what}: {spec!r} is neither a mesh axis name nor an SBP spec "
                                f"such as '(S0, B)' ({err})") from None
    if isinstance(spec, (PartitionSpec, tuple, list)):
        return ShardingSpec.from_partition_spec(spec, mesh, ndim, what=what)
    raise ShardingError(f"{what}: expected a PartitionSpec, an autoshard ShardingSpec or None, "
                        f"got {type(spec).__name__} {spec!r}")
