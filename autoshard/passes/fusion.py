"""What XLA's own passes do to a graph's values, as the strategy problem models them.

* Fusion: a value computed elementwise (or by a broadcast or reshape) and read only by
  elementwise ops, layout ops and reductions is computed inside its readers' kernels and holds
  no memory (``fused_values``).
* Combining: XLA's combiner passes (all-reduce, all-gather, reduce-scatter) merge collectives
  that do not depend on each other into one op, which pays its start-up latency once. Two kinds
  of values move that way in every training step: values computed from the state alone
  (parameters gathered before the forward pass, FSDP: ``head_values``) and values that reach
  the results without passing another matmul (gradients reduced for the optimizer, data
  parallel: ``tail_values``). problem.py charges their collectives bandwidth only, as a latency
  each would price data parallel's one combined gradient all-reduce as one per gradient; the
  one latency each combined op does pay is a fixed charge per plan (latency.py).
* Values made from nothing (an iota, a broadcast scalar) are made in whatever layout their
  readers need (``made_from_nothing``).
"""

from __future__ import annotations

from autoshard.cost_model.compute import MATMUL_OPS
from autoshard.ir.graph import Graph, Node, Value
from autoshard.ir.primitives import ELEMENTWISE


def made_from_nothing(node: Node) -> bool:
    """An iota, or a broadcast of a scalar: XLA makes the value in the layout its readers need
    (a slice of a broadcast is a smaller broadcast), so the plan's layout for it decides only
    the memory the prediction counts (``search.least_held_free_layouts``), and the
    lowering leaves it unconstrained."""
    return node.op == "iota" or node.op == "broadcast_in_dim" and all(
        not isinstance(a, Value) or a.ndim == 0 for a in node.inputs)


_LOOPS = ("scan", "while")
_FUSIBLE_PRODUCERS = ELEMENTWISE | {"broadcast_in_dim", "reshape", "squeeze", "iota"}
_FUSING_READERS = _FUSIBLE_PRODUCERS | {"transpose", "reduce_sum", "reduce_max", "reduce_min",
                                        "reduce_prod", "argmax", "argmin"}
#: Elementwise ops XLA's fusion will not duplicate into more than one reader's kernel (its
#: ``InstructionFusion::IsExpensive``: transcendentals, division, powers and roots).
_EXPENSIVE = {"atan2", "cbrt", "cos", "div", "erf", "exp", "exp2", "expm1", "log", "log1p",
              "logistic", "pow", "rem", "rsqrt", "sin", "sqrt", "tan", "tanh"}


def fused_values(graph: Graph) -> set[int]:
    """Ids of the values of ``graph`` XLA computes inside their readers' kernels (module
    docstring), or removes as dead code; results of the graph are always materialized.

    Without this rule the predicted peak of a train step counts every elementwise
    intermediate, well above ``memory_analysis()``. Values read again much later (saved for
    the backward pass) are fused too: XLA recomputes them in the backward kernels. An
    expensive elementwise value (``_EXPENSIVE``) read by more than one op is kept: XLA will not
    recompute it in each reader (a GELU's tanh, a softmax's exp, held for the backward pass).
    A value computed from constants alone (no argument upstream: an attention mask, a
    broadcast of -inf or 0) that only loops read is not made outside them either: XLA sinks
    such loop invariants into the body or unrolls the loop, and fuses them there, though
    ``jax.checkpoint`` under ``lax.scan`` hoists them out of the body (the compiled program
    holds no buffer for them; loop_liveness.py gives the peaks inside loops).
    """
    results = {a.id for a in graph.outputs if isinstance(a, Value)}
    constant = {v.id for v in graph.constant_values}
    fused = set()
    for node in graph.nodes:
        if not node.regions and all(a.id in constant for a in node.inputs
                                    if isinstance(a, Value)):
            constant.update(v.id for v in node.outputs)
        for v in node.outputs:
            readers = graph.consumers(v)
            if v.id in results:
                continue
            if not readers and not node.regions:     # dead: XLA removes it
                fused.add(v.id)
            elif (node.op in _FUSIBLE_PRODUCERS and all(r.op in _FUSING_READERS for r in readers)
                  and not (node.op in _EXPENSIVE and len({r.id for r in readers}) > 1)):
                fused.add(v.id)
            elif v.id in constant and all(r.op in _LOOPS for r in readers):
                fused.add(v.id)
    return fused


def head_values(graph: Graph, state_inputs: set[int]) -> set[int]:
    """Ids of the top-level values computed from state arguments (indices ``state_inputs``)
    alone, without a matmul, convolution or loop: what the forward pass gathers up front."""
    head = {graph.inputs[i].id for i in state_inputs}
    for node in graph.nodes:
        operands = [a for a in node.inputs if isinstance(a, Value)]
        if (node.op not in MATMUL_OPS and not node.regions and operands
                and all(a.id in head for a in operands)):
            head.update(v.id for v in node.outputs)
    return head


def tail_values(graph: Graph) -> set[int]:
    """Ids of the top-level values from which no matmul, convolution or loop is reachable: what
    moves after the last matmul."""
    feeds_matmul: set[int] = set()
    for node in reversed(graph.nodes):
        if (node.op in MATMUL_OPS or node.regions
                or any(v.id in feeds_matmul for v in node.outputs)):
            feeds_matmul.update(a.id for a in node.inputs if isinstance(a, Value))
    return {v.id for node in graph.nodes for v in node.outputs if v.id not in feeds_matmul}


def combined_values(graph: Graph, state_inputs: set[int]) -> set[int]:
    """Ids of the top-level values whose collectives XLA combines (module docstring)."""
    return head_values(graph, state_inputs) | tail_values(graph)
