"""What XLA actually did: collectives and matmul FLOPs in a compiled executable's HLO text.

The cost model is only as good as its agreement with the compiled program, so plans are
measured from ``compiled.as_text()`` (the per-device SPMD program). Work inside a ``while`` body
runs once per iteration: counts, bytes and FLOPs are multiplied by the loop's
``known_trip_count`` (nested loops multiply); computations reached through ``call``, fusions
and ``conditional`` are followed (a conditional's branches count as if each ran once, an upper
bound). Async pairs are counted at their ``-start`` op. Matmul FLOPs are those of ``dot`` and
``convolution`` ops and, in a GPU build's program, of the cuBLAS and cuDNN calls that replace
them (benchmarks/gpu_check.py reads GPU executables with this parser).

Bytes follow ``cost_model.collectives``' convention, per device: the result for all-gather,
all-reduce, all-to-all and permute, the *input* (result x group size) for reduce-scatter.
Device groups are parsed from all three forms XLA prints: explicit ``{{0,1},{2,3}}``, iota
``[2,4]<=[8]`` / ``[4,2]<=[2,4]T(1,0)`` and mesh ``mesh['a'=2,'b'=4] {'b'}``.

Two things a GPU build does that the CPU backend the tests compile on does not, applied here so
the measure is a GPU's:
* reduce-scatter: XLA's CPU backend lowers it as an all-reduce whose result every reader
  slices by partition id; the GPU pipeline's ReduceScatterCreator turns that pattern back into
  a reduce-scatter. Such all-reduce results (or tuple elements of a combined all-reduce) are
  counted as reduce-scatters of the same input.
* combining: the GPU combiner passes merge collectives that do not depend on each other. A
  collective no matmul precedes (it moves state, e.g. FSDP's parameter gathers) or none
  follows (it reduces gradients for the optimizer) is marked ``combinable``. Walking the
  program in order, each joins the open op of its kind, device group and side unless it
  depends on a member of that op, where a new op opens (a chain of reductions, each feeding
  the next, makes one op per link); ``measured_step`` charges one start-up latency per op and
  ``HloStats.ops`` counts them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

from autoshard.cost_model.collectives import group_collective_latency, group_collective_time

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
         "collective-broadcast")

_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([a-z][\w\-]*)\((.*)$")
_ARRAY = re.compile(r"\b(pred|[su](?:4|8|16|32|64)|f(?:8\w*|16|32|64)|bf16|c64|c128)\[([\d,]*)\]")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_CALLEE = re.compile(
    r"\b(?:body|to_apply|calls|branch_computations|true_computation|false_computation)="
    r"\{?([%\w.\-, ]+)\}?")
_ITEMSIZE = {"pred": 1, "bf16": 2, "c64": 8, "c128": 16}


@dataclass(frozen=True)
class Collective:
    """One collective op: kind, result bytes per device, the device groups it runs over."""

    kind: str
    nbytes: int
    groups: tuple[tuple[int, ...], ...]
    combinable: str = ""   # "head" (no matmul before it), "tail" (none after it) or ""
    op: int = 0            # which combined op of its kind, group and side it joins (from 1)

    @property
    def group_size(self) -> int:
        return len(self.groups[0]) if self.groups else 1


@dataclass
class HloStats:
    """Per-device totals for one run of the program, loop trip counts applied.

    ``kernels``: (dtype, matmul FLOPs, bytes read and written, runs) of every kernel the
    program launches — each instruction of the entry computation and of loop bodies (a fusion
    is one kernel, with the FLOPs of the dots fused into it); layout-only ops are skipped."""

    count: dict[str, float] = field(default_factory=dict)
    bytes: dict[str, float] = field(default_factory=dict)
    by_group_size: dict[tuple[str, int], float] = field(default_factory=dict)
    collectives: list[tuple[Collective, float]] = field(default_factory=list)
    matmul_flops: dict[str, float] = field(default_factory=dict)
    kernels: list[tuple[str, float, float, float]] = field(default_factory=list)
    #: ops per kind after a GPU build's combiners (module docstring); ``count`` is per
    #: instruction of this program
    ops: dict[str, float] = field(default_factory=dict)

    def add(self, other: "HloStats", times: float = 1) -> None:
        for mine, theirs in ((self.count, other.count), (self.bytes, other.bytes),
                             (self.ops, other.ops),
                             (self.by_group_size, other.by_group_size),
                             (self.matmul_flops, other.matmul_flops)):
            for key, value in theirs.items():
                mine[key] = mine.get(key, 0) + value * times
        self.collectives.extend((c, n * times) for c, n in other.collectives)
        self.kernels.extend((d, f, b, n * times) for d, f, b, n in other.kernels)

    @property
    def total_count(self) -> float:
        return sum(self.count.values())

    @property
    def total_bytes(self) -> float:
        return sum(self.bytes.values())



def _itemsize(dtype: str) -> int:
    if dtype in _ITEMSIZE:
        return _ITEMSIZE[dtype]
    return max(1, int(re.sub(r"\D", "", dtype.split("e")[0]) or 8) // 8)


def _arrays(type_text: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(dtype, tuple(int(d) for d in dims.split(",") if d))
            for dtype, dims in _ARRAY.findall(type_text)]


def shape_bytes(type_text: str) -> int:
    """Bytes of an HLO result type (arrays and tuples of arrays)."""
    return sum(math.prod(shape) * _itemsize(dtype) for dtype, shape in _arrays(type_text))


def _iota_groups(spec: str, transpose: str | None, device_ids: str | None = None
                 ) -> tuple[tuple[int, ...], ...]:
    """``[G,S]<=[dims]T(perm)``: iota over ``dims``, transposed, reshaped to G groups of S."""
    out_shape = [int(x) for x in spec.split(",")]
    dims, _, perm = (transpose or "").partition("T")
    reshape = [int(x) for x in dims.strip("[]").split(",")] if dims else [math.prod(out_shape)]
    ids = np.arange(math.prod(reshape)).reshape(reshape)
    if perm:
        ids = ids.transpose([int(x) for x in perm.strip("()").split(",")])
    flat = ids.reshape(-1)
    if device_ids is not None:
        flat = np.asarray(device_ids)[flat]
    groups = flat.reshape(out_shape[0], -1) if len(out_shape) > 1 else flat.reshape(1, -1)
    return tuple(tuple(int(d) for d in g) for g in groups)


def device_groups(attrs: str) -> tuple[tuple[int, ...], ...]:
    """The device groups of a collective, from any of XLA's printed forms."""
    if m := re.search(r"replica_groups=\{((?:\{[\d,]*\},?)*)\}", attrs):
        return tuple(tuple(int(x) for x in g.split(",") if x)
                     for g in re.findall(r"\{([\d,]*)\}", m.group(1)))
    if m := re.search(r"replica_groups=\[([\d,]+)\]<=(\[[\d,]+\](?:T\([\d,]+\))?)", attrs):
        return _iota_groups(m.group(1), m.group(2))
    if m := re.search(r"replica_groups=mesh\[([^\]]*)\]([^{]*)\{([^}]*)\}", attrs):
        names = [k.strip("' ") for k, _ in (p.split("=") for p in m.group(1).split(","))]
        sizes = [int(v) for _, v in (p.split("=") for p in m.group(1).split(","))]
        ids = np.arange(math.prod(sizes))
        if d := re.search(r"device_ids=\(\[([\d,]+)\](T\([\d,]+\))?\)", m.group(2)):
            ids = np.asarray(_iota_groups(d.group(1), f"[{d.group(1)}]{d.group(2) or ''}")
                             ).reshape(-1)
        # a group axis may be a sub-axis, 'name':(pre)size: axis ``name`` viewed as
        # [pre, size, rest] (row-major), the groups run along its ``size`` part
        chosen = [(name, int(pre) if pre else None, int(size) if size else None) for name, pre,
                  size in re.findall(r"'([^']+)'(?::\((\d+)\)(\d+))?", m.group(3))]
        subs = {name: (pre, size) for name, pre, size in chosen if pre is not None}
        shape, where = [], {}
        for name, n in zip(names, sizes):
            if name in subs:
                pre, size = subs[name]
                where[name] = len(shape) + 1
                shape += [pre, size, n // (pre * size)]
            else:
                where[name] = len(shape)
                shape.append(n)
        grid = ids.reshape(shape)
        axes = [where[name] for name, _, _ in chosen]
        moved = np.moveaxis(grid, axes, list(range(-len(axes), 0)))
        size = math.prod(shape[a] for a in axes)
        return tuple(tuple(int(x) for x in g) for g in moved.reshape(-1, size))
    if m := re.search(r"source_target_pairs=\{(.*?)\}\}", attrs):
        pairs = re.findall(r"\{(\d+),(\d+)", m.group(0))
        return tuple((int(a), int(b)) for a, b in pairs)
    return ()


def group_size(attrs: str) -> int:
    groups = device_groups(attrs)
    return len(groups[0]) if groups else 1


def _operands(rest: str) -> list[str]:
    return re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0])


def _dot_flops(result: str, rest: str, shapes: dict[str, str]) -> tuple[str, float]:
    operands = _operands(rest)
    contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
    return _dot_count(result, shapes.get(operands[0], "") if operands else "",
                      contracting.group(1).split(",") if contracting else [])


def _dot_count(out_type: str, lhs_type: str, contracting: list[str]) -> tuple[str, float]:
    """2 x output elements x the lhs's contracted elements."""
    out, lhs = _arrays(out_type), _arrays(lhs_type)
    if not out or not lhs:
        return "", 0.0
    k = math.prod(lhs[0][1][int(d)] for d in contracting if d)
    return lhs[0][0], 2.0 * math.prod(out[0][1]) * k


_LIBRARY_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_GEMM_CONTRACTING = re.compile(r'"lhs_contracting_dimensions":\[([^\]]*)\]')


def _library_call_flops(result: str, rest: str, shapes: dict[str, str]) -> tuple[str, float]:
    """A GPU build runs most matmuls and convolutions as library calls (custom-calls to cuBLAS
    and cuDNN), not ``dot``/``convolution`` ops; their FLOPs are those of the op they replace.
    The result is a tuple (output, workspace): the output is its first array."""
    target = _LIBRARY_TARGET.search(rest)
    if target is None:
        return "", 0.0
    name = target.group(1)
    operand_types = [shapes.get(o, "") for o in _operands(rest)] + ["", ""]
    if name.startswith("__cudnn$conv"):
        # cuDNN calls print the forward convolution's dim_labels; a backward pass costs what its
        # forward does: the forward output is the input gradient's first operand (dy) and the
        # filter gradient's second, and the filter is the filter gradient's own result
        out, filt = result, operand_types[1]
        if name == "__cudnn$convBackwardInput":
            out = operand_types[0]
        elif name == "__cudnn$convBackwardFilter":
            out, filt = filt, result
        return _conv_count(out, filt, rest)
    contracting = _GEMM_CONTRACTING.search(rest)
    if contracting is None or not ("gemm" in name or "matmul" in name):
        return "", 0.0
    return _dot_count(result, operand_types[0],
                      [d.strip().strip('"') for d in contracting.group(1).split(",")])


def _conv_flops(result: str, rest: str, shapes: dict[str, str]) -> tuple[str, float]:
    operands = _operands(rest)
    return _conv_count(result, shapes.get(operands[1], "") if len(operands) > 1 else "", rest)


def _conv_count(out_type: str, filter_type: str, rest: str) -> tuple[str, float]:
    """2 x output elements x (filter elements / output features), over the input dilation: a
    strided convolution's input gradient is printed as a convolution over the gradient with
    zeros inserted (``lhs_dilate``), and of a window's taps only one in the dilation lands on a
    value; the library call a GPU build runs does the forward's FLOPs, which this gives."""
    out, rhs = _arrays(out_type), _arrays(filter_type)
    labels = re.search(r"dim_labels=\w+_(\w+)->", rest)
    if not out or not rhs or not labels:
        return "", 0.0
    out_features = rhs[0][1][labels.group(1).index("o")]
    dilation = re.search(r"\blhs_dilate=([\dx]+)", rest)
    skipped = math.prod(int(d) for d in dilation.group(1).split("x")) if dilation else 1
    return rhs[0][0], 2.0 * math.prod(out[0][1]) * math.prod(rhs[0][1]) / out_features / skipped


_NOT_KERNELS = {"parameter", "constant", "bitcast", "get-tuple-element", "tuple", "while",
                "call", "conditional", "partition-id", "replica-id", "after-all", "copy-start",
                "copy-done", "async-start", "async-done", "async-update", "opt-barrier",
                "optimization-barrier", "custom-call"}


def hlo_stats(hlo_text: str) -> HloStats:
    """Collectives, matmul FLOPs and kernels one device executes when the program runs once."""
    own: dict[str, HloStats] = {}
    calls: dict[str, list[tuple[str, int]]] = {}
    kernels: dict[str, list[tuple[str, float, float, str | None]]] = {}
    fused: set[str] = set()
    shapes: dict[str, str] = {}
    # per computation: (name, opcode, operands, callees, attributes) in program order, for
    # the dataflow questions above; where each collective went in its computation's list
    # (counts and bytes are tallied after _gpu_collectives rewrites them)
    program: dict[str, list[tuple[str, str, list[str], list[str], str]]] = {}
    placed: dict[str, list[tuple[int, str]]] = {}
    slicing: set[str] = set()
    entry = current = None
    for line in hlo_text.splitlines():
        if not line.startswith((" ", "\t")) and line.rstrip().endswith("{"):
            m = _COMPUTATION.match(line)
            if m:
                current = m.group(1)
                own[current], calls[current], kernels[current] = HloStats(), [], []
                program[current], placed[current] = [], []
                if line.startswith("ENTRY"):
                    entry = current
            continue
        if current is None:
            continue
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        name, result_type, opcode, rest = m.groups()
        shapes[name] = result_type
        stats = own[current]
        operand_names = re.findall(r"%([\w.\-]+)", rest.split("),", 1)[0])
        if opcode == "dynamic-slice":
            slicing.add(current)
        kind = opcode[:-6] if opcode.endswith(("-start", "-done")) else opcode
        dtype, flops = "", 0.0
        if kind in KINDS:
            if opcode.endswith("-done"):
                if operand_names:
                    program[current].append((name, "copy", operand_names[:1], [], ""))
                continue
            nbytes = _result_bytes(opcode, result_type)
            groups = device_groups(rest)
            if kind == "reduce-scatter" and groups:
                nbytes *= len(groups[0])
            placed[current].append((len(stats.collectives), name))
            stats.collectives.append((Collective(kind, nbytes, groups), 1))
            program[current].append((name, opcode, operand_names, [], rest))
            continue
        if opcode in ("dot", "convolution", "custom-call"):
            dtype, flops = {"dot": _dot_flops, "convolution": _conv_flops,
                            "custom-call": _library_call_flops}[opcode](result_type, rest, shapes)
            if flops:
                stats.matmul_flops[dtype] = stats.matmul_flops.get(dtype, 0) + flops
        callees = [c.strip().lstrip("%") for group in _CALLEE.findall(rest)
                   for c in group.split(",")] if opcode in (
            "while", "call", "conditional", "async-start", "fusion") else []
        program[current].append((name, opcode, operand_names, callees, rest))
        if opcode == "fusion":
            fused.update(callees)
        elif callees:
            trip = _TRIP.search(rest) if opcode == "while" else None
            times = int(trip.group(1)) if trip else 1
            calls[current].extend((c, times) for c in callees)
        if opcode not in _NOT_KERNELS or flops:
            operands = re.findall(r"%([\w.\-]+)", rest.split("),", 1)[0])
            nbytes = shape_bytes(result_type) + sum(shape_bytes(shapes.get(o, ""))
                                                    for o in operands)
            kernels[current].append((dtype, flops, float(nbytes),
                                     callees[0] if opcode == "fusion" and callees else None))
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    for comp, instructions in program.items():
        if placed[comp]:
            _gpu_collectives(own[comp], instructions, placed[comp], shapes, slicing,
                             lambda c: bool(_flops_by_dtype(c, own, kernels)))

    memo: dict[str, HloStats] = {}

    def total(name: str) -> HloStats:
        if name not in memo:
            stats = HloStats()
            stats.add(own.get(name, HloStats()))
            for dtype, flops, nbytes, callee in kernels.get(name, []):
                if callee is not None:
                    by_dtype = _flops_by_dtype(callee, own, kernels)
                    for d, f in by_dtype.items():
                        stats.matmul_flops[d] = stats.matmul_flops.get(d, 0.0) + f
                    dtype = max(by_dtype, key=by_dtype.get) if by_dtype else ""
                    flops = sum(by_dtype.values())
                stats.kernels.append((dtype, flops, nbytes, 1))
            for callee, times in calls.get(name, []):
                if callee in own and callee != name and callee not in fused:
                    stats.add(total(callee), times)
            memo[name] = stats
        return memo[name]

    return total(entry)


def _gpu_collectives(stats: HloStats, instructions, placed, shapes, slicing, has_matmul) -> None:
    """Rewrite one computation's collectives as a GPU build runs them (module docstring):
    mark the combinable ones and split all-reduces that every reader slices into
    reduce-scatters."""
    users: dict[str, list[tuple[str, str, list[str], list[str], str]]] = {}
    for inst in instructions:
        for operand in inst[2]:
            users.setdefault(operand, []).append(inst)

    def is_matmul(inst) -> bool:
        _, opcode, _, callees, _ = inst
        if opcode in ("dot", "convolution", "while", "call", "conditional", "custom-call"):
            return True
        return opcode == "fusion" and any(has_matmul(c) for c in callees)

    after_matmul: set[str] = set()
    for inst in instructions:
        if is_matmul(inst) or any(o in after_matmul for o in inst[2]):
            after_matmul.add(inst[0])
    before_matmul: set[str] = set()
    for inst in reversed(instructions):
        if is_matmul(inst) or any(u[0] in before_matmul for u in users.get(inst[0], [])):
            before_matmul.add(inst[0])

    def sliced(value: str, nbytes: int, n: int) -> bool:
        readers = users.get(value, [])
        return bool(readers) and all(
            u[1] == "dynamic-slice" or (u[1] == "fusion" and any(c in slicing for c in u[3])
                                        and shape_bytes(shapes.get(u[0], "")) * n <= nbytes)
            for u in readers)

    rewritten: dict[int, list[Collective]] = {}
    for index, name in placed:
        c, _ = stats.collectives[index]
        tag = ("head" if name not in after_matmul else
               "tail" if name not in before_matmul else "")
        out = [Collective(c.kind, c.nbytes, c.groups, tag)]
        if c.kind == "all-reduce" and c.group_size > 1:
            elements = _split_tuple(shapes[name]) if shapes[name].startswith("(") else None
            if elements is None:
                parts = [(name, shape_bytes(shapes[name]))]
            else:
                gtes = {int(m.group(1)): u[0] for u in users.get(name, [])
                        if u[1] == "get-tuple-element"
                        and (m := re.search(r"index=(\d+)", u[4]))}
                parts = [(gtes.get(i), shape_bytes(t)) for i, t in enumerate(elements)]
            scattered = sum(b for v, b in parts if v is not None and sliced(v, b, c.group_size))
            if scattered:
                out = [Collective("reduce-scatter", scattered, c.groups, tag)]
                if c.nbytes - scattered > 0:
                    out.append(Collective("all-reduce", c.nbytes - scattered, c.groups, tag))
        rewritten[index] = out
    _combine(instructions, placed, rewritten)
    stats.collectives = [(new, n) for index, (c, n) in enumerate(stats.collectives)
                         for new in rewritten.get(index, [c])]
    stats.count, stats.bytes, stats.by_group_size, stats.ops = {}, {}, {}, {}
    seen_ops: set = set()
    for c, n in stats.collectives:
        stats.count[c.kind] = stats.count.get(c.kind, 0) + n
        key = (c.kind, c.groups, c.combinable, c.op)
        if not c.combinable or key not in seen_ops:
            seen_ops.add(key)
            stats.ops[c.kind] = stats.ops.get(c.kind, 0) + n
        stats.bytes[c.kind] = stats.bytes.get(c.kind, 0) + c.nbytes * n
        key = (c.kind, c.group_size)
        stats.by_group_size[key] = stats.by_group_size.get(key, 0) + n


def _combine(instructions, placed, rewritten: dict[int, list[Collective]]) -> None:
    """Number the combined op each combinable collective of ``rewritten`` joins, as a GPU
    build's combiners do (module docstring): ``reach[name][key]`` is the newest op of class
    ``key`` that instruction ``name`` depends on."""
    at = {name: index for index, name in placed}
    opened: dict[tuple, int] = {}
    reach: dict[str, dict[tuple, int]] = {}
    for name, _, operands, _, _ in instructions:
        upstream: dict[tuple, int] = {}
        for operand in operands:
            for key, op in reach.get(operand, {}).items():
                upstream[key] = max(upstream.get(key, 0), op)
        index = at.get(name)
        if index is not None:
            joined = []
            for c in rewritten[index]:
                if c.combinable:
                    key = (c.kind, c.groups, c.combinable)
                    op = opened.get(key, 0)
                    if op == 0 or upstream.get(key, 0) >= op:
                        op = opened[key] = op + 1
                    c = Collective(c.kind, c.nbytes, c.groups, c.combinable, op)
                joined.append(c)
            rewritten[index] = joined
            for c in joined:
                if c.combinable:
                    key = (c.kind, c.groups, c.combinable)
                    upstream[key] = max(upstream.get(key, 0), c.op)
        reach[name] = upstream


def _flops_by_dtype(name: str, own: dict, kernels: dict) -> dict[str, float]:
    """Matmul FLOPs inside a fused computation by dtype (fusions may nest)."""
    flops = dict(own[name].matmul_flops) if name in own else {}
    for k in kernels.get(name, []):
        if k[3] is not None:
            for d, f in _flops_by_dtype(k[3], own, kernels).items():
                flops[d] = flops.get(d, 0.0) + f
    return flops


def _result_bytes(opcode: str, result_type: str) -> int:
    if opcode.endswith("-start") and result_type.startswith("("):
        # async start results are (operands, outputs[, context]); count the outputs
        parts = _split_tuple(result_type)
        if len(parts) >= 2:
            return shape_bytes(parts[1])
    return shape_bytes(result_type)


def _split_tuple(text: str) -> list[str]:
    inner, depth, parts, start = text.strip()[1:-1], 0, [], 0
    for i, ch in enumerate(inner):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(inner[start:i])
            start = i + 1
    parts.append(inner[start:])
    return [p.strip() for p in parts]


@dataclass(frozen=True)
class MeasuredStep:
    """A compiled program's roofline step time on a hardware profile: matmul FLOPs at the
    achievable matmul rate plus every collective over the links its device groups use."""

    compute_seconds: float
    collective_seconds: dict[str, float]
    kernel_seconds: float = 0.0

    @property
    def step_seconds(self) -> float:
        """Matmul FLOPs + collectives: the measure the plan-quality benchmark ranks by."""
        return self.compute_seconds + sum(self.collective_seconds.values())

    @property
    def full_step_seconds(self) -> float:
        """Every kernel's roofline (FLOPs or HBM bytes, whichever binds) + collectives."""
        return self.kernel_seconds + sum(self.collective_seconds.values())


def measured_step(stats: HloStats, hw, device_positions: dict[int, int] | None = None
                  ) -> MeasuredStep:
    """Price ``stats`` (``hlo_stats`` of a compiled program) on ``hw``. ``device_positions``
    maps a device id to its position in the mesh (row-major), which decides its node; by
    default ids are positions."""
    per_node = hw.devices_per_node
    compute = sum(flops / hw.matmul_rate(_DTYPE_NAMES.get(dtype, "float32"))
                  for dtype, flops in stats.matmul_flops.items())
    seconds: dict[str, float] = {}
    combined: set = set()
    for c, times in stats.collectives:
        group = c.groups[0] if c.groups else (0,)
        if c.kind == "collective-permute":
            nodes = {(device_positions or {}).get(d, d) // per_node for pair in c.groups
                     for d in pair}
            n_in, n_out = (1, 2) if len(nodes) > 1 else (2, 1)
        else:
            worst = max(c.groups or (group,), key=lambda g: len(
                {(device_positions or {}).get(d, d) // per_node for d in g}))
            n_out = len({(device_positions or {}).get(d, d) // per_node for d in worst})
            n_in = max(len(worst) // n_out, 1)
        t = group_collective_time(hw, c.kind, c.nbytes, n_in, n_out) * times
        if c.combinable:
            # one latency per combined op (module docstring)
            latency = group_collective_latency(hw, c.kind, n_in, n_out)
            t -= latency * times
            key = (c.kind, c.groups, c.combinable, c.op)
            if key not in combined:
                combined.add(key)
                t += latency
        seconds[c.kind] = seconds.get(c.kind, 0.0) + t
    kernel = sum(runs * max(flops / hw.matmul_rate(_DTYPE_NAMES.get(dtype, "float32")),
                            nbytes / hw.memory_rate)
                 for dtype, flops, nbytes, runs in stats.kernels)
    return MeasuredStep(compute, seconds, kernel)


_DTYPE_NAMES = {"bf16": "bfloat16", "f16": "float16", "f32": "float32", "f64": "float64"}
