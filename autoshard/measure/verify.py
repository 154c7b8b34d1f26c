"""``autoshard.verify``: hold the plan's predictions against the executable XLA compiled.

The cost model is only as good as its agreement with the compiled program. Collectives are read
from ``compiled.as_text()`` (loop trip counts applied, measure/hlo.py) and memory from
``compiled.memory_analysis()``: peak = arguments + results + temporaries - aliased (donated)
bytes, the total XLA's buffer assignment reserves on one device.

Counts are of ops after XLA's combiners, which merge independent collectives of one kind into
one op (every gradient all-reduce of a data-parallel step becomes one) but not a chain of them
(a reduction whose result feeds the next one's operand): the prediction counts combined ops as
``passes/latency.combined_ops`` does, so both columns count the same thing; bytes compare
directly. A
reduce-scatter the CPU backend lowers as an all-reduce that its readers slice is read back as
the reduce-scatter a GPU build runs. A plan made by a rule (``planner="data-parallel"``) has no
predictions: its compiled collectives and memory are shown with the predicted column empty,
so a hand plan can be set beside a searched one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from autoshard.measure.hlo import KINDS, MeasuredStep, hlo_stats, measured_step


@dataclass(frozen=True)
class Comparison:
    """One measure, predicted (None: the plan has no prediction) and compiled. ``ratio`` =
    predicted / compiled, None where there is no prediction."""

    name: str
    predicted: float | None
    compiled: float

    @property
    def ratio(self) -> float | None:
        if self.predicted is None:
            return None
        if self.compiled == 0:
            return None if self.predicted else 1.0
        return self.predicted / self.compiled

    @property
    def difference(self) -> float | None:
        """Relative difference |predicted - compiled| / compiled (None where ``ratio`` is)."""
        r = self.ratio
        return None if r is None else abs(r - 1.0)


COUNTS_NOTE = ("counts: ops after XLA's combiners, which merge independent collectives of "
               "one kind into one op, not a chain of them")


def comparison_lines(rows: list[tuple[str, float | None, float, float | None]]) -> list[str]:
    """The predicted-vs-compiled table, one ``(name, predicted, compiled, ratio)`` per row;
    an empty predicted cell where there is no prediction, "-" where there is no ratio."""
    lines = [f"{'measure':<28} {'predicted':>14} {'compiled':>14} {'ratio':>7}"]
    for name, predicted, compiled, ratio in rows:
        shown = "" if predicted is None else f"{predicted:,.0f}"
        lines.append(f"{name:<28} {shown:>14} {compiled:>14,.0f} "
                     f"{'-' if ratio is None else f'{ratio:.2f}':>7}")
    return lines


@dataclass(frozen=True)
class Verification:
    """Predicted versus compiled: collective counts and bytes by kind, and peak memory;
    ``predicted`` is False for a plan without predictions (a rule's)."""

    collective_counts: tuple[Comparison, ...]
    collective_bytes: tuple[Comparison, ...]
    total_collective_bytes: Comparison
    peak_memory: Comparison
    hlo_text: str
    predicted: bool = True

    @property
    def rows(self) -> tuple[Comparison, ...]:
        return (*self.collective_counts, *self.collective_bytes, self.total_collective_bytes,
                self.peak_memory)

    def summary(self) -> str:
        lines = comparison_lines([(c.name, c.predicted, c.compiled, c.ratio) for c in self.rows])
        if self.collective_counts and self.predicted:
            lines.append(COUNTS_NOTE)
        if not self.predicted:
            lines.append("no predictions: the plan was made by a rule, not the cost-model search")
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
    ShapeDtypeStructs) and compare the plan's predictions, where it has them, with the
    executable."""
    plan = sharded_fn.plan_for(*args)
    prediction = plan.prediction
    compiled = sharded_fn.lower(*args).compile()
    text = compiled.as_text()
    stats = hlo_stats(text)
    predicted = {} if prediction is None else dict(prediction.collectives)
    kinds = [k for k in KINDS if k in stats.count or k in predicted]

    def if_predicted(value):
        return None if prediction is None else value

    counts = tuple(Comparison(f"{k} count", if_predicted(predicted.get(k, (0, 0))[0]),
                              stats.ops.get(k, 0)) for k in kinds)
    nbytes = tuple(Comparison(f"{k} bytes", if_predicted(predicted.get(k, (0, 0))[1]),
                              stats.bytes.get(k, 0)) for k in kinds)
    total = Comparison("collective bytes", if_predicted(sum(v[1] for v in predicted.values())),
                       stats.total_bytes)
    memory = Comparison("peak memory bytes",
                        if_predicted(getattr(prediction, "peak_memory_bytes", 0)),
                        peak_memory(compiled))
    return Verification(counts, nbytes, total, memory, text, prediction is not None)
