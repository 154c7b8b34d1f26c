"""The device mesh as the planner sees it: axis names and sizes, nothing about device ids.

Plans are made for a mesh *shape*; which physical device sits where is the runtime's business
(device ids are not contiguous across processes, so nothing here may depend on them). Keeping
the description free of devices also makes it a stable part of a plan's fingerprint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax

from autoshard.ir.errors import ShardingError


@dataclass(frozen=True, slots=True)
class MeshSpec:
    """Axis names and sizes of a device mesh, in the mesh's own (major-to-minor) order."""

    axis_names: tuple[str, ...]
    axis_sizes: tuple[int, ...]

    def __post_init__(self):
        if len(self.axis_names) != len(self.axis_sizes):
            raise ShardingError(
                f"mesh has {len(self.axis_names)} axis names {self.axis_names} but "
                f"{len(self.axis_sizes)} sizes {self.axis_sizes}")
        if len(set(self.axis_names)) != len(self.axis_names):
            raise ShardingError(f"mesh axis names must be distinct, got {self.axis_names}")
        for name, size in zip(self.axis_names, self.axis_sizes):
            if not isinstance(size, int) or size < 1:
                raise ShardingError(f"mesh axis {name!r} has size {size!r}; sizes are positive ints")

    @classmethod
    def from_jax(cls, mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh) -> MeshSpec:
        return cls(tuple(str(n) for n in mesh.axis_names),
                   tuple(int(s) for s in mesh.axis_sizes))

    @property
    def ndim(self) -> int:
        return len(self.axis_names)

    @property
    def num_devices(self) -> int:
        return math.prod(self.axis_sizes)

    def index(self, axis: str) -> int:
        """Position of ``axis`` in the mesh; a ShardingError naming the known axes otherwise."""
        try:
            return self.axis_names.index(axis)
        except ValueError:
            raise ShardingError(
                f"mesh axis {axis!r} does not exist; this mesh has axes "
                f"{', '.join(repr(a) for a in self.axis_names)} with sizes {self.axis_sizes}"
            ) from None

    def size(self, *axes: str | int) -> int:
        """Number of devices in the group spanned by ``axes`` (names or positions)."""
        return math.prod(self.axis_sizes[a if isinstance(a, int) else self.index(a)] for a in axes)

    def __str__(self) -> str:
        return "(" + ", ".join(f"{n}={s}" for n, s in zip(self.axis_names, self.axis_sizes)) + ")"
