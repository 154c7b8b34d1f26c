"""The graph IR: a jaxpr with calls inlined and control flow kept as region nodes.

Shaped like a jaxpr on purpose (``Value`` ~ ``Var``, ``Node`` ~ ``JaxprEqn``) so that lifting is
a walk and interpretation is ``primitive.bind``. What a jaxpr lacks and the planner needs is
added here: globally unique value ids (a plan maps value id -> spec, across nested bodies too),
producer/consumer indexes, user-facing names for arguments and outputs, and the user's source
line on every node (for errors and the viewer).

All IR objects are frozen; identity is the id, so values hash cheaply as dict keys.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Iterator, Mapping

import numpy as np

from autoshard.ir.errors import PlanError


@dataclass(frozen=True, slots=True, eq=False)
class Value:
    """One array in the program. ``name`` is set for arguments and outputs (``params['w1']``)."""

    id: int
    shape: tuple[int, ...]
    dtype: Any
    weak_type: bool = False
    name: str = ""

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * dtype_itemsize(self.dtype)

    def __repr__(self) -> str:
        label = f" {self.name}" if self.name else ""
        return f"%{self.id}{label}:{dtype_name(self.dtype)}{list(self.shape)}"


@dataclass(frozen=True, slots=True, eq=False)
class Literal:
    """A constant operand written into a node, as jaxpr ``Literal``s are (scalars mostly)."""

    value: Any
    shape: tuple[int, ...]
    dtype: Any

    def __repr__(self) -> str:
        return f"{np.asarray(self.value).tolist()!r}:{dtype_name(self.dtype)}"


Atom = Value | Literal


@dataclass(frozen=True, slots=True, eq=False)
class Node:
    """One primitive application. Region nodes (scan, while, cond) carry their bodies in
    ``regions``; their params keep everything of the jaxpr eqn except the body jaxprs."""

    id: int
    primitive: Any
    params: Mapping[str, Any]
    inputs: tuple[Atom, ...]
    outputs: tuple[Value, ...]
    name_stack: str = ""
    source: str = ""
    regions: tuple["Graph", ...] = ()

    @property
    def op(self) -> str:
        return self.primitive.name

    def describe(self) -> str:
        """How errors name a node: the op, its name scope and the user's source line."""
        scope = f" in {self.name_stack}" if self.name_stack else ""
        where = f" at {self.source}" if self.source else ""
        return f"{self.op}{scope}{where}"

    def __repr__(self) -> str:
        outs = ", ".join(map(repr, self.outputs))
        ins = ", ".join(map(repr, self.inputs))
        return f"{outs} = {self.op}({ins})"


@dataclass(frozen=True, slots=True, eq=False)
class Graph:
    """Ordered nodes with input and output values; ``constants`` holds closed-over arrays.

    Outputs may be inputs, constants or literals directly, as in a jaxpr. ``output_names``
    (top-level graphs only) are the result's pytree paths, as inputs carry theirs in ``name``.
    """

    inputs: tuple[Value, ...]
    outputs: tuple[Atom, ...]
    nodes: tuple[Node, ...]
    constants: Mapping[int, Any] = field(default_factory=dict)
    constant_values: tuple[Value, ...] = ()
    output_names: tuple[str, ...] = ()
    _producer: dict = field(init=False, repr=False, compare=False)
    _consumers: dict = field(init=False, repr=False, compare=False)
    _deep_index: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "constants", MappingProxyType(dict(self.constants)))
        producer: dict[int, Node] = {}
        consumers: dict[int, list[Node]] = {}
        for node in self.nodes:
            for atom in node.inputs:
                if isinstance(atom, Value):
                    consumers.setdefault(atom.id, []).append(node)
            for value in node.outputs:
                producer[value.id] = node
        object.__setattr__(self, "_producer", producer)
        object.__setattr__(self, "_consumers", {k: tuple(v) for k, v in consumers.items()})
        object.__setattr__(self, "_deep_index", {})

    def producer(self, value: Value) -> Node | None:
        """The node computing ``value`` in this graph (None for inputs and constants)."""
        return self._producer.get(value.id)

    def consumers(self, value: Value) -> tuple[Node, ...]:
        """Nodes of this graph (not of nested regions) that read ``value``."""
        return self._consumers.get(value.id, ())

    def walk(self) -> Iterator[tuple[Node, "Graph"]]:
        """Every node with the graph that owns it, nested regions included, in program order."""
        for node in self.nodes:
            yield node, self
            for region in node.regions:
                yield from region.walk()

    def all_values(self) -> Iterator[Value]:
        """Every value defined anywhere in the program: inputs, constants, node outputs."""
        yield from self.inputs
        yield from self.constant_values
        for node in self.nodes:
            yield from node.outputs
            for region in node.regions:
                yield from region.all_values()

    def value_index(self) -> dict[int, Value]:
        """Every value of the program by id (built once, the graph being immutable)."""
        if "values" not in self._deep_index:
            self._deep_index["values"] = {v.id: v for v in self.all_values()}
        return self._deep_index["values"]

    def node_of(self, value_id: int) -> Node | None:
        """The producing node of a value anywhere in the program (None for inputs, constants)."""
        if "producers" not in self._deep_index:
            self._deep_index["producers"] = {v.id: node for node, _ in self.walk()
                                             for v in node.outputs}
        return self._deep_index["producers"].get(value_id)

    def num_nodes(self, *, recursive: bool = True) -> int:
        return sum(1 for _ in self.walk()) if recursive else len(self.nodes)

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for node, _ in self.walk():
            counts[node.op] = counts.get(node.op, 0) + 1
        return dict(sorted(counts.items()))

    def pretty(self, indent: int = 0) -> str:
        pad = "  " * indent
        lines = [f"{pad}graph({', '.join(map(repr, self.inputs))}):"]
        for value in self.constant_values:
            lines.append(f"{pad}  {value!r} = constant")
        for node in self.nodes:
            lines.append(f"{pad}  {node!r}")
            for region in node.regions:
                lines.append(region.pretty(indent + 2))
        lines.append(f"{pad}  return {', '.join(map(repr, self.outputs))}")
        return "\n".join(lines)


def verify(graph: Graph) -> None:
    """Check the IR's invariants; raise PlanError describing the first broken one.

    Tests run it after every pass: values defined once and before use, regions arity-consistent
    with their node, outputs defined.
    """
    seen: set[int] = set()

    def define(value: Value, where: str) -> None:
        if not isinstance(value, Value):
            raise PlanError(f"{where}: expected a Value, got {value!r}")
        if value.id in seen:
            raise PlanError(f"{where}: value %{value.id} is defined twice")
        seen.add(value.id)

    def check(g: Graph, outer: set[int]) -> None:
        local: set[int] = set()
        for v in (*g.inputs, *g.constant_values):
            define(v, "graph input")
            local.add(v.id)
        for vid in g.constants:
            if vid not in local:
                raise PlanError(f"constant %{vid} has data but no constant value")
        for node in g.nodes:
            for atom in node.inputs:
                if isinstance(atom, Value) and atom.id not in local:
                    raise PlanError(f"node {node.describe()} reads %{atom.id} before it is "
                                    "defined (or from an enclosing region)")
            for region in node.regions:
                check(region, local)
            _check_region_arity(node)
            for v in node.outputs:
                define(v, f"node {node.describe()}")
                local.add(v.id)
        for atom in g.outputs:
            if isinstance(atom, Value) and atom.id not in local:
                raise PlanError(f"graph output %{atom.id} is not defined in its graph")

    check(graph, set())


def _check_region_arity(node: Node) -> None:
    p = node.params
    if node.op == "scan":
        (body,) = node.regions
        ok = (len(body.inputs) == len(node.inputs)
              and len(body.outputs) == len(node.outputs)
              and p["num_consts"] + p["num_carry"] <= len(node.inputs))
    elif node.op == "while":
        cond, body = node.regions
        ncarry = len(node.inputs) - p["cond_nconsts"] - p["body_nconsts"]
        ok = (len(cond.inputs) == p["cond_nconsts"] + ncarry and len(cond.outputs) == 1
              and len(body.inputs) == p["body_nconsts"] + ncarry
              and len(body.outputs) == ncarry == len(node.outputs))
    elif node.op == "cond":
        ok = all(len(b.inputs) == len(node.inputs) - 1 and len(b.outputs) == len(node.outputs)
                 for b in node.regions)
    else:
        ok = not node.regions
    if not ok:
        raise PlanError(f"region node {node.describe()} does not match its bodies' signatures")


@functools.lru_cache(maxsize=None)
def dtype_itemsize(dtype: Any) -> int:
    try:
        return np.dtype(dtype).itemsize
    except TypeError:
        return int(getattr(dtype, "itemsize", 0) or 0)


def dtype_name(dtype: Any) -> str:
    try:
        return np.dtype(dtype).name
    except TypeError:
        return str(dtype)
