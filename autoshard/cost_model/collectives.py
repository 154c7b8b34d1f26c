"""α-β cost of one collective over a group of mesh axes.

For n devices in one group moving b bytes per device, a ring collective takes
``α + f·b/β`` with f = 2(n-1)/n for all-reduce and (n-1)/n for all-gather, reduce-scatter and
all-to-all (Thakur, Rabenseifner and Gropp, "Optimization of Collective Communication Operations
in MPICH", 2005; the same bus-bandwidth factors as NCCL's nccl-tests). A group that spans nodes
runs hierarchically, as NCCL does: the inter-node phase moves only 1/n_in of the data over the
slow link, the intra-node phase moves the rest over the fast one.

Byte conventions (per device): all-reduce — the buffer; all-gather — the gathered result;
reduce-scatter — the unscattered input; all-to-all — the buffer each device holds; permute — the
bytes each device sends. These are the sizes XLA prints for the op's result (all-gather,
all-reduce, all-to-all, collective-permute) or operand (reduce-scatter).
"""

from __future__ import annotations

import functools

from autoshard.cost_model.hardware import Hardware, Link, axis_group_nodes
from autoshard.ir.mesh import MeshSpec

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


@functools.lru_cache(maxsize=4096)
def _group_nodes(sizes: tuple[int, ...], axes: tuple[int, ...], per_node: int) -> tuple[int, int]:
    return axis_group_nodes(sizes, axes, per_node)


def _phase(link: Link, efficiency: float, n: int, nbytes: float) -> float:
    if n <= 1 or nbytes < 0:
        return 0.0
    return link.latency + (n - 1) / n * nbytes / (link.bandwidth * efficiency)


def collective_time(hw: Hardware, mesh: MeshSpec, kind: str, nbytes: float,
                    axes: tuple[int, ...], *, latency: bool = True) -> float:
    """Seconds for collective ``kind`` of ``nbytes`` per device over mesh ``axes``; without
    ``latency``, only the bandwidth term (a collective XLA combines with others, whose start-up
    cost the combined op pays once)."""
    axes = tuple(sorted(axes))
    n = mesh.size(*axes)
    if n <= 1 or nbytes <= 0:
        return 0.0
    n_in, n_out = _group_nodes(mesh.axis_sizes, axes, hw.devices_per_node)
    t = _ring_time(hw, kind, nbytes, n_in, n_out)
    return t if latency else t - group_collective_latency(hw, kind, n_in, n_out)


def collective_latency(hw: Hardware, mesh: MeshSpec, kind: str, axes: tuple[int, ...]) -> float:
    """The start-up part of ``collective_time`` over mesh ``axes``: what one op costs with no
    bytes to move (0 over a single device)."""
    axes = tuple(sorted(axes))
    if mesh.size(*axes) <= 1:
        return 0.0
    n_in, n_out = _group_nodes(mesh.axis_sizes, axes, hw.devices_per_node)
    return group_collective_latency(hw, kind, n_in, n_out)


def group_collective_time(hw: Hardware, kind: str, nbytes: float, n_in: int, n_out: int
                          ) -> float:
    """Seconds for a collective over groups of ``n_in`` devices in each of ``n_out`` nodes."""
    if n_in * n_out <= 1 or nbytes <= 0:
        return 0.0
    return _ring_time(hw, kind, nbytes, n_in, n_out)


def group_collective_latency(hw: Hardware, kind: str, n_in: int, n_out: int) -> float:
    """The start-up part of ``group_collective_time``: what it costs with no bytes to move."""
    return 0.0 if n_in * n_out <= 1 else _ring_time(hw, kind, 0.0, n_in, n_out)


def _ring_time(hw: Hardware, kind: str, nbytes: float, n_in: int, n_out: int) -> float:
    n = n_in * n_out
    eff = hw.link_efficiency
    if kind in ("all-gather", "reduce-scatter", "all-reduce"):
        one_way = (_phase(hw.inter_node, eff, n_out, nbytes / n_in)
                   + _phase(hw.intra_node, eff, n_in, nbytes))
        return 2 * one_way if kind == "all-reduce" else one_way
    if kind == "all-to-all":
        if n_out == 1:
            return _phase(hw.intra_node, eff, n, nbytes)
        inter = (n - n_in) / n * nbytes / (hw.inter_node.bandwidth * eff)
        intra = (n_in - 1) / n * nbytes / (hw.intra_node.bandwidth * eff)
        return hw.inter_node.latency + max(inter, intra)
    if kind == "collective-permute":
        link = hw.inter_node if n_out > 1 else hw.intra_node
        return link.latency + nbytes / (link.bandwidth * eff)
    raise ValueError(f"unknown collective kind {kind!r}; expected one of {KINDS}")
