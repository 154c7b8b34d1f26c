"""Hardware profiles: what a device computes, stores and sends per second.

Peak figures are vendor datasheet numbers (sources cited per profile). The planner uses
*achievable* rates: peak times an efficiency. The efficiencies are round numbers from published
measurements (large-GEMM MFU around 0.6-0.75, HBM streaming around 0.8-0.9, NCCL bus bandwidth
around 0.8 of the link) and only scale costs: the choice between plans depends on ratios, which
these keep realistic. Calibrate with a measured profile (``Hardware(...)``) where it matters.

Links: ``intra_node`` connects devices inside a node, ``inter_node`` connects nodes. Devices are
numbered in mesh order (row-major over the mesh shape) and ``devices_per_node`` consecutive ones
share a node, so with 4 devices per node the first axis of a (2, 4) or (4, 2) mesh of 8 crosses
nodes and the others do not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from autoshard.ir.errors import ArgumentError


@dataclass(frozen=True, slots=True)
class Link:
    """Unidirectional per-device bandwidth (bytes/s) and per-collective latency (s)."""

    bandwidth: float
    latency: float


@dataclass(frozen=True)
class Hardware:
    """One device kind and how devices are connected.

    ``flops`` maps a dtype name to peak FLOP/s for matrix multiplies in that dtype; other dtypes
    use ``"float32"``. ``vector_flops`` is the rate for non-matmul arithmetic.
    """

    name: str
    flops: Mapping[str, float]
    vector_flops: float
    hbm_bandwidth: float
    memory_bytes: float
    intra_node: Link
    inter_node: Link
    devices_per_node: int
    matmul_efficiency: float = 0.7
    memory_efficiency: float = 0.85
    link_efficiency: float = 0.8
    notes: str = field(default="", compare=False)

    def __post_init__(self):
        # stored as sorted pairs so that a profile hashes (cost caches are keyed by it)
        object.__setattr__(self, "flops", tuple(sorted(dict(self.flops).items())))
        if "float32" not in dict(self.flops):
            raise ArgumentError(f"hardware {self.name!r}: flops needs a 'float32' entry")
        if self.devices_per_node < 1:
            raise ArgumentError(f"hardware {self.name!r}: devices_per_node must be >= 1")

    def matmul_rate(self, dtype: str) -> float:
        """Achievable matmul FLOP/s for operands of ``dtype``."""
        rates = dict(self.flops)
        peak = rates.get(str(dtype), rates["float32"])
        return peak * self.matmul_efficiency

    @property
    def vector_rate(self) -> float:
        return self.vector_flops * self.matmul_efficiency

    @property
    def memory_rate(self) -> float:
        return self.hbm_bandwidth * self.memory_efficiency


def _gpu(name, *, bf16, tf32, fp32, hbm, memory, nvlink, ib, per_node, notes):
    # NCCL latencies: ~5 us for an NVLink/NVSwitch collective, ~10-15 us across InfiniBand
    # (NCCL tests, nccl-tests README "Performance" and NVIDIA DGX H100 user guide figures).
    return Hardware(name, {"bfloat16": bf16, "float16": bf16, "float32": tf32}, fp32, hbm, memory,
                    Link(nvlink, 5e-6), Link(ib, 12e-6), per_node, notes=notes)


# NVIDIA H100 SXM5 datasheet: 989 TFLOP/s dense BF16/FP16, 494.7 TFLOP/s dense TF32 (JAX's
# default precision for float32 matmuls on Ampere and later is TF32), 66.9 TFLOP/s FP32 vector,
# 3.35 TB/s HBM3, 80 GB, NVLink 4 at 900 GB/s bidirectional = 450 GB/s each way.
# InfiniBand NDR (ConnectX-7): 400 Gb/s = 50 GB/s per GPU each way.
H100 = _gpu("h100", bf16=989e12, tf32=494.7e12, fp32=66.9e12, hbm=3.35e12, memory=80e9,
            nvlink=450e9, ib=50e9, per_node=8,
            notes="8x H100 SXM5 on one NVSwitch node")
H100_2NODE = _gpu("h100-2node", bf16=989e12, tf32=494.7e12, fp32=66.9e12, hbm=3.35e12,
                  memory=80e9, nvlink=450e9, ib=50e9, per_node=4,
                  notes="two nodes of 4x H100 SXM5, 400 Gb/s InfiniBand per GPU between nodes")
# NVIDIA A100 SXM4 80GB datasheet: 312 TFLOP/s dense BF16, 156 TFLOP/s dense TF32, 19.5 TFLOP/s
# FP32, 2,039 GB/s HBM2e, NVLink 3 at 600 GB/s bidirectional; HDR InfiniBand 200 Gb/s per GPU.
A100 = _gpu("a100", bf16=312e12, tf32=156e12, fp32=19.5e12, hbm=2.039e12, memory=80e9,
            nvlink=300e9, ib=25e9, per_node=8, notes="8x A100 SXM4 80GB on one NVSwitch node")
# Google Cloud TPU v5e documentation: 197 TFLOP/s BF16 per chip, 16 GiB HBM2 at 819 GB/s,
# inter-chip interconnect 1,600 Gbps (200 GB/s) per chip over 4 links of a 2-D torus; a mesh
# axis rides one torus dimension, two links of 25 GB/s each way. float32 matmuls run as
# multi-pass bf16 (about 1/3 of the bf16 rate).
TPU_V5E = Hardware("tpu-v5e", {"bfloat16": 197e12, "float32": 197e12 / 3}, 197e12 / 16, 819e9,
                   16 * 2**30, Link(50e9, 2e-6), Link(50e9, 2e-6), 256, matmul_efficiency=0.6,
                   notes="TPU v5e slice, ICI 2-D torus")
# A generic CPU host device (the simulated devices of the test suite): ~100 GFLOP/s of AVX-512
# FMA per core, ~20 GB/s of memory bandwidth per device, shared-memory "links".
CPU = Hardware("cpu", {"float32": 100e9, "bfloat16": 50e9}, 25e9, 20e9, 16 * 2**30,
               Link(10e9, 2e-5), Link(10e9, 2e-5), 1 << 30, notes="host CPU devices")

PROFILES: dict[str, Hardware] = {hw.name: hw for hw in (H100, H100_2NODE, A100, TPU_V5E, CPU)}


def get_hardware(hardware: str | Hardware | None) -> Hardware:
    """A profile by name (``"h100"``, ``"h100-2node"``, ``"a100"``, ``"tpu-v5e"``, ``"cpu"``),
    a ``Hardware`` as given, or ``"h100"`` for None."""
    if hardware is None:
        return H100
    if isinstance(hardware, Hardware):
        return hardware
    if isinstance(hardware, str) and hardware in PROFILES:
        return PROFILES[hardware]
    raise ArgumentError(f"unknown hardware {hardware!r}; use one of {sorted(PROFILES)} or an "
                        "autoshard.Hardware(...) describing your devices")


def axis_group_nodes(mesh_sizes: tuple[int, ...], axes: tuple[int, ...],
                     devices_per_node: int) -> tuple[int, int]:
    """(devices of one group inside one node, nodes one group spans) for the device groups that
    vary ``axes`` of a row-major mesh; the worst group counts."""
    if not axes:
        return 1, 1
    index = np.arange(int(np.prod(mesh_sizes))).reshape(mesh_sizes)
    moved = np.moveaxis(index, axes, tuple(range(-len(axes), 0)))
    groups = moved.reshape(-1, int(np.prod([mesh_sizes[a] for a in axes])))
    nodes = groups // devices_per_node
    spans = [len(np.unique(row)) for row in nodes]
    worst = int(np.argmax(spans))
    span = spans[worst]
    return groups.shape[1] // span, span
