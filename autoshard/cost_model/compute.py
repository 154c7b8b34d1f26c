"""Roofline compute time of one node on one device.

time = max(FLOPs / achievable FLOP/s, bytes moved / achievable HBM bandwidth) (Williams,
Waterman and Patterson, "Roofline", CACM 2009). FLOPs come from one rule per primitive family
(a dot is 2·batch·M·N·K, a convolution 2·outputs·window·in-features/groups); everything else
counts one operation per output element, or per input element for reductions. A node's work
divides over the mesh axes its strategy splits (or makes partial); the axes it leaves
replicated repeat the work.

Layout-only ops (reshape, broadcast, squeeze) cost nothing and elementwise ops a tenth of their
roofline (``FUSED_FRACTION``): XLA fuses them into the kernels around them (a matmul's
epilogue, a reduction's prologue, one loop fusion per chain), so their operands never make a
round trip through HBM of their own. Counting each one's bytes would price a replicated
optimizer update or layer norm at several times what the fused program spends, and push plans
towards splitting cheap elementwise work at the price of real collectives; the compiled
programs the plans are measured by count matmul FLOPs and collectives. Reductions, gathers,
scatters, sorts and the like keep their roofline cost.

Every kernel but a matmul then counts ``OTHER_KERNEL_WEIGHT`` of that: the step time plans are
measured by (and the plan-quality benchmark ranks by) is matmul FLOPs plus collectives, and at
full weight the HBM time of a replicated optimizer update would buy collectives the compiled
program does pay, making searched plans slower than data parallel's. The small weight still
breaks ties towards splitting work.
"""

from __future__ import annotations

import math
from typing import Callable

from autoshard.cost_model.hardware import Hardware
from autoshard.ir.graph import Node, Value, dtype_name
from autoshard.ir.primitives import ELEMENTWISE

FlopRule = Callable[[Node], float]
flop_rules: dict[str, FlopRule] = {}
MATMUL_OPS = {"dot_general", "conv_general_dilated"}
FREE_OPS = {"reshape", "broadcast_in_dim", "squeeze", "optimization_barrier", "iota", "stack",
            "unstack", "transpose", "autoshard_hint", "copy", "copy_p", "stop_gradient"}
#: What an elementwise op costs relative to its unfused roofline: most are fused away, but
#: not all, and a cost of exactly zero leaves the LP many tied optima to choose among.
FUSED_FRACTION = 0.1
#: What every kernel but a matmul or convolution counts of its roofline (module docstring).
OTHER_KERNEL_WEIGHT = 0.05


def _dot_flops(node: Node) -> float:
    lhs, rhs = node.inputs[:2]
    (lc, _), (lb, _) = node.params["dimension_numbers"]
    contracted = math.prod(lhs.shape[d] for d in lc)
    return 2.0 * node.outputs[0].size * contracted


def _conv_flops(node: Node) -> float:
    rhs = node.inputs[1]
    dn = node.params["dimension_numbers"]
    window = math.prod(rhs.shape[d] for d in dn.rhs_spec[2:])
    in_features = rhs.shape[dn.rhs_spec[1]]
    # a strided convolution's input gradient dilates its input with zeros; one tap in the
    # dilation meets a value, as in the forward convolution it transposes (measure.hlo._conv_count)
    skipped = math.prod(node.params.get("lhs_dilation") or (1,))
    return 2.0 * node.outputs[0].size * window * in_features / skipped


def _reduction_flops(node: Node) -> float:
    return float(sum(a.size for a in node.inputs if isinstance(a, Value)))


flop_rules["dot_general"] = _dot_flops
flop_rules["conv_general_dilated"] = _conv_flops
for _name in ("reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and",
              "reduce_or", "argmax", "argmin", "cumsum", "cumprod", "cummax", "cummin",
              "cumlogsumexp", "reduce_window_sum", "reduce_window_max", "reduce_window_min"):
    flop_rules[_name] = _reduction_flops


def node_flops(node: Node) -> float:
    """Total FLOPs of the node, unsharded."""
    if node.op in FREE_OPS:
        return 0.0
    rule = flop_rules.get(node.op)
    if rule is not None:
        return rule(node)
    return float(sum(v.size for v in node.outputs))


def strategy_bytes(node: Node, input_fractions, output_fractions) -> float:
    """Bytes one device reads and writes for the node, given the fraction of each operand and
    result it holds (1 for replicated or partial, 1/n for split n ways; None: a literal)."""
    if node.op in FREE_OPS:
        return 0.0
    total = sum(a.nbytes * f for a, f in zip(node.inputs, input_fractions)
                if isinstance(a, Value) and f is not None)
    return float(total + sum(v.nbytes * f for v, f in zip(node.outputs, output_fractions)))


def compute_time(hw: Hardware, node: Node, flops_per_device: float,
                 bytes_per_device: float) -> float:
    """Roofline seconds for one device's share of ``node``."""
    if flops_per_device == 0 and bytes_per_device == 0:
        return 0.0
    if node.op in MATMUL_OPS:
        rate = hw.matmul_rate(dtype_name(node.inputs[0].dtype))
    else:
        rate = hw.vector_rate
    seconds = max(flops_per_device / rate, bytes_per_device / hw.memory_rate)
    if node.op in MATMUL_OPS:
        return seconds
    return seconds * OTHER_KERNEL_WEIGHT * (FUSED_FRACTION if node.op in ELEMENTWISE else 1.0)
