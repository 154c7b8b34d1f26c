"""The one graph interpreter: re-evaluates a Graph by binding its primitives.

Used eagerly by tests (graph == function), under ``jax.jit`` by the lowering (with an
``on_value`` hook that applies the plan's sharding constraints, inside region bodies too), and
abstractly (``jax.eval_shape``) wherever only shapes are needed.

Region nodes are rebuilt with lax's public control-flow functions from their body graphs, so a
hook reaches the values inside loop bodies; every other node is ``primitive.bind(*ins, **params)``.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from jax import lax

from autoshard.ir.graph import Graph, Literal, Node, Value

ValueHook = Callable[[Value, Any], Any]
OperandHook = Callable[[Node, list], list]
NodeHook = Callable[[Node, list], "list | None"]
RegionRule = Callable[[Node, list, Callable[[Graph, Sequence], list]], list]


def evaluate(graph: Graph, args: Sequence[Any], *, on_value: ValueHook | None = None,
             on_operands: OperandHook | None = None, run_node: NodeHook | None = None) -> list:
    """Outputs of ``graph`` on ``args``; ``on_value(value, array)`` may replace every array the
    graph binds: its inputs (a loop body's too), constants and node results;
    ``on_operands(node, arrays)`` may replace a node's operands just before it runs;
    ``run_node(node, arrays)`` may run a node another way (its outputs, or None)."""
    if len(args) != len(graph.inputs):
        raise TypeError(f"graph takes {len(graph.inputs)} inputs, got {len(args)}")
    env: dict[int, Any] = {v.id: (on_value(v, a) if on_value else a)
                           for v, a in zip(graph.inputs, args)}
    for value in graph.constant_values:
        data = graph.constants[value.id]
        env[value.id] = on_value(value, data) if on_value else data

    def read(atom):
        return atom.value if isinstance(atom, Literal) else env[atom.id]

    def run(region: Graph, region_args: Sequence[Any]) -> list:
        return evaluate(region, region_args, on_value=on_value, on_operands=on_operands,
                        run_node=run_node)

    for node in graph.nodes:
        ins = [read(a) for a in node.inputs]
        if on_operands is not None:
            ins = on_operands(node, ins)
        outs = None if run_node is None else run_node(node, ins)
        if outs is None:
            rule = region_rules.get(node.op)
            if rule is not None:
                outs = rule(node, ins, run)
            else:
                outs = node.primitive.bind(*ins, **node.params)
                if not node.primitive.multiple_results:
                    outs = [outs]
        for value, out in zip(node.outputs, outs, strict=True):
            env[value.id] = on_value(value, out) if on_value else out
    return [read(a) for a in graph.outputs]


def _scan_rule(node: Node, ins: list, run) -> list:
    p = node.params
    (body,) = node.regions
    nconst, ncarry = p["num_consts"], p["num_carry"]
    consts, init, xs = ins[:nconst], ins[nconst:nconst + ncarry], ins[nconst + ncarry:]

    def step(carry, x):
        outs = run(body, [*consts, *carry, *x])
        return outs[:ncarry], outs[ncarry:]

    carry, ys = lax.scan(step, init, xs, length=p["length"], reverse=p["reverse"],
                         unroll=p["unroll"])
    return [*carry, *ys]


def _while_rule(node: Node, ins: list, run) -> list:
    p = node.params
    cond, body = node.regions
    nc, nb = p["cond_nconsts"], p["body_nconsts"]
    cond_consts, body_consts, init = ins[:nc], ins[nc:nc + nb], ins[nc + nb:]
    return lax.while_loop(lambda c: run(cond, [*cond_consts, *c])[0],
                          lambda c: run(body, [*body_consts, *c]), list(init))


def _cond_rule(node: Node, ins: list, run) -> list:
    index, ops = ins[0], ins[1:]
    branches = [lambda *a, _b=b: run(_b, a) for b in node.regions]
    return lax.switch(index, branches, *ops)


region_rules: dict[str, RegionRule] = {
    "scan": _scan_rule,
    "while": _while_rule,
    "cond": _cond_rule,
}

