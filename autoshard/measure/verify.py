"""``autoshard.verify``: hold the plan's predictions against the executable XLA compiled.

The cost model is only as good as its agreement with the compiled program. Collectives are read
from ``compiled.as_text()`` (loop trip counts applied, measure/hlo.py) and memory from
``compiled.memory_analysis()``: peak = arguments + results + temporaries - aliased (donated)
bytes, the total XLA's buffer assignment reserves on one device.

Compiled counts are after XLA's combiners, which merge independent collectives into one op
(every gradient all-reduce of a data-parallel step becomes one), so they may be lower than the
predicted counts; bytes compare directly. A reduce-scatter the CPU backend lowers as an
all-reduce that its readers slice is read back as the reduce-scatter a GPU build runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from autoshard.measure.hlo import KINDS, MeasuredStep, hlo_stats, measured_step


@dataclass(frozen=True)
class Comparison:
    """One measure, predicted and compiled; ``ratio`` = predicted / compiled."""

    name: str
    predicted: float
    compiled: float

    @property
    def ratio(self) -> float | None:
        if self.compiled == 0:
            return None if self.predicted else 1.0
        return self.predicted / self.compiled

    @property
    def difference(self) -> float | None:
        """Relative difference |predicted - compiled| / compiled (None when compiled is 0)."""
        r = self.ratio
        return None if r is None else abs(r - 1.0)


@dataclass(frozen=True)
class Verification:
    """Predicted versus compiled: collective counts and bytes by kind, and peak memory."""

    collective_counts: tuple[Comparison, ...]
    collective_bytes: tuple[Comparison, ...]
    total_collective_bytes: Comparison
    peak_memory: Comparison
    hlo_text: str

    def summary(self) -> str:
        lines = [f"{'measure':<28} {'predicted':>14} {'compiled':>14} {'ratio':>7}"]
        rows = [*self.collective_counts, *self.collective_bytes, self.total_collective_bytes,
                self.peak_memory]
        for c in rows:
            ratio = "-" if c.ratio is None else f"{c.ratio:.2f}"
            lines.append(f"{c.name:<28} {c.predicted:>14,.0f} {c.compiled:>14,.0f} {ratio:>7}")
        return "\n".join(lines)


def peak_memory(compiled: Any) -> int:
    """Bytes one device reserves for the executable (arguments + results + temps - aliases)."""
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes)


def device_positions(mesh: Any) -> dict[int, int]:
    """Device id -> its row-major position in ``mesh`` (which decides its node on multi-node
    hardware profiles)."""
    return {d.id: i for i, d in enumerate(mesh.devices.flat)}


def compiled_roofline(compiled: Any, hw: Any, mesh: Any) -> MeasuredStep:
    """The plan-quality benchmark's step measure of an executable compiled for ``mesh``:
    matmul FLOPs and collectives read from its HLO, priced on ``hw``'s links."""
    return measured_step(hlo_stats(compiled.as_text()), hw, device_positions(mesh))


def verify(sharded_fn: Any, *args: Any) -> Verification:
    """Compile ``sharded_fn`` (an ``autoshard.compile`` result) for ``args`` (arrays or
    ShapeDtypeStructs) and compare the plan's predictions with the executable."""
    plan = sharded_fn.plan_for(*args)
    if plan.prediction is None:
        raise ValueError(f"the plan of {sharded_fn.__name__} was not made by the cost-model "
                         f"search ({plan.method}); it has no predictions to verify")
    compiled = sharded_fn.lower(*args).compile()
    text = compiled.as_text()
    stats = hlo_stats(text)
    predicted = dict(plan.prediction.collectives)
    kinds = [k for k in KINDS if k in stats.count or k in predicted]
    counts = tuple(Comparison(f"{k} count", predicted.get(k, (0, 0))[0], stats.count.get(k, 0))
                   for k in kinds)
    nbytes = tuple(Comparison(f"{k} bytes", predicted.get(k, (0, 0))[1], stats.bytes.get(k, 0))
                   for k in kinds)
    total = Comparison("collective bytes", sum(v[1] for v in predicted.values()),
                       stats.total_bytes)
    memory = Comparison("peak memory bytes", plan.prediction.peak_memory_bytes,
                        peak_memory(compiled))
    return Verification(counts, nbytes, total, memory, text)
