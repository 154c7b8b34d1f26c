"""What XLA actually did: collectives in a compiled executable's optimized HLO text.

The cost model is only as good as its agreement with the compiled program, so plans are
measured from ``compiled.as_text()`` (the per-device SPMD program). A collective inside a
``while`` body runs once per iteration: counts and bytes are multiplied by the loop's
``known_trip_count`` (nested loops multiply), and computations reached through ``call`` /
``conditional`` are followed (a conditional's branches are counted as if each ran once, an
upper bound). Async pairs are counted at their ``-start`` op.

Bytes are those of the collective's result on one device (for an all-gather the gathered
buffer, for a reduce-scatter the scattered piece); group size is parsed from all three replica
group forms XLA prints: explicit ``{{0,1},{2,3}}``, iota ``[2,4]<=[8]`` and mesh
``mesh['a'=2,'b'=4] {'b'}``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
         "collective-broadcast")

_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.+?)\s+([a-z][\w\-]*)\((.*)$")
_ARRAY = re.compile(r"\b(pred|[su](?:4|8|16|32|64)|f(?:8\w*|16|32|64)|bf16|c64|c128)\[([\d,]*)\]")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_CALLEE = re.compile(r"\b(?:body|to_apply|calls|branch_computations)=\{?([%\w.\-, ]+)\}?")

_ITEMSIZE = {"pred": 1, "bf16": 2, "c64": 8, "c128": 16}


@dataclass
class CollectiveStats:
    """Per-device collective counts and bytes by kind, loop trip counts applied."""

    count: dict[str, int] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    by_group_size: dict[tuple[str, int], int] = field(default_factory=dict)

    def add(self, other: "CollectiveStats", times: int = 1) -> None:
        for kind, n in other.count.items():
            self.count[kind] = self.count.get(kind, 0) + n * times
        for kind, b in other.bytes.items():
            self.bytes[kind] = self.bytes.get(kind, 0) + b * times
        for key, n in other.by_group_size.items():
            self.by_group_size[key] = self.by_group_size.get(key, 0) + n * times

    @property
    def total_count(self) -> int:
        return sum(self.count.values())

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())


def _itemsize(dtype: str) -> int:
    if dtype in _ITEMSIZE:
        return _ITEMSIZE[dtype]
    return max(1, int(re.sub(r"\D", "", dtype.split("e")[0]) or 8) // 8)


def shape_bytes(type_text: str) -> int:
    """Bytes of an HLO result type (arrays and tuples of arrays)."""
    total = 0
    for dtype, dims in _ARRAY.findall(type_text):
        size = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
        total += size * _itemsize(dtype)
    return total


def group_size(attrs: str) -> int:
    """Devices per replica group of a collective, from any of XLA's printed forms."""
    if m := re.search(r"replica_groups=\{(\{[\d,]*\})", attrs):
        return len([x for x in m.group(1).strip("{}").split(",") if x])
    if m := re.search(r"replica_groups=\[([\d,]+)\]<=", attrs):
        return int(m.group(1).split(",")[-1])
    if m := re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", attrs):
        sizes = dict((k.strip("' "), int(v)) for k, v in
                     (p.split("=") for p in m.group(1).split(",")))
        return int(np.prod([sizes[a.strip("' ")] for a in m.group(2).split(",") if a.strip()]))
    if m := re.search(r"source_target_pairs=\{(.*?)\}\}", attrs):
        return len(m.group(1).split("},"))
    return 1


def collective_stats(hlo_text: str) -> CollectiveStats:
    """Collectives one device executes when the program runs once."""
    own: dict[str, CollectiveStats] = {}
    calls: dict[str, list[tuple[str, int]]] = {}
    entry = None
    current = None
    for line in hlo_text.splitlines():
        if not line.startswith((" ", "\t")) and line.rstrip().endswith("{"):
            m = _COMPUTATION.match(line)
            if m:
                current = m.group(1)
                own[current], calls[current] = CollectiveStats(), []
                if line.startswith("ENTRY"):
                    entry = current
            continue
        if current is None:
            continue
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        result_type, opcode, rest = m.groups()
        kind = opcode[:-6] if opcode.endswith("-start") else opcode
        if kind in KINDS:
            stats = own[current]
            stats.count[kind] = stats.count.get(kind, 0) + 1
            stats.bytes[kind] = stats.bytes.get(kind, 0) + _result_bytes(kind, opcode,
                                                                         result_type)
            key = (kind, group_size(rest))
            stats.by_group_size[key] = stats.by_group_size.get(key, 0) + 1
        if opcode in ("while", "call", "conditional", "async-start"):
            times = 1
            if opcode == "while":
                trip = _TRIP.search(rest)
                times = int(trip.group(1)) if trip else 1
            for callee_list in _CALLEE.findall(rest):
                for callee in callee_list.split(","):
                    calls[current].append((callee.strip().lstrip("%"), times))
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")

    memo: dict[str, CollectiveStats] = {}

    def total(name: str) -> CollectiveStats:
        if name not in memo:
            stats = CollectiveStats()
            stats.add(own.get(name, CollectiveStats()))
            for callee, times in calls.get(name, []):
                if callee in own:
                    stats.add(total(callee), times)
            memo[name] = stats
        return memo[name]

    return total(entry)


def _result_bytes(kind: str, opcode: str, result_type: str) -> int:
    if opcode.endswith("-start") and result_type.startswith("("):
        # async start results are (operands, outputs[, context]); count the outputs
        parts = _split_tuple(result_type)
        if len(parts) >= 2:
            return shape_bytes(parts[1])
    return shape_bytes(result_type)


def _split_tuple(text: str) -> list[str]:
    inner, depth, parts, start = text.strip()[1:-1], 0, [], 0
    for i, ch in enumerate(inner):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(inner[start:i])
            start = i + 1
    parts.append(inner[start:])
    return [p.strip() for p in parts]
