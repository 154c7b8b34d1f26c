"""Pipeline schedules and the simulator (no XLA): op orders, tick tables, bubble fractions.

Bubble fractions, equal stages, backward = 2 x forward (f + b = 3 per microbatch and stage):
- GPipe and 1F1B: the last microbatch's forward reaches the last stage after S-1 forward slots
  and its backward returns after S-1 backward slots, so the step is (M + S - 1)(f + b) and the
  idle share (S - 1)/(M + S - 1) (Huang et al., 2019; Narayanan et al., 2021).
- Interleaved with V chunks per device: the same argument in chunk slots of (f + b)/V, while the
  work per device stays M(f + b): step = M(f + b) + (S - 1)(f + b)/V, idle share
  (S - 1)/(V M + S - 1).
"""

import pytest

from autoshard.cost_model.pipeline_simulator import simulate
from autoshard.ir.pipeline_schedule import device_orders, tick_table


def bubble(schedule, stages, microbatches, virtual=1):
    chunks = stages * virtual
    return simulate(schedule, stages, microbatches, virtual, [1.0 / virtual] * chunks,
                    [2.0 / virtual] * chunks)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("stages,microbatches", [(4, 8), (2, 3), (4, 1), (8, 16)])
def test_gpipe_and_1f1b_bubble(schedule, stages, microbatches):
    sim = bubble(schedule, stages, microbatches)
    assert sim.bubble_fraction == pytest.approx((stages - 1) / (microbatches + stages - 1))
    assert sim.step_seconds == pytest.approx(3.0 * (microbatches + stages - 1))


@pytest.mark.parametrize("stages,microbatches,virtual", [(4, 8, 2), (2, 4, 3), (4, 16, 4)])
def test_interleaved_bubble(stages, microbatches, virtual):
    sim = bubble("interleaved", stages, microbatches, virtual)
    expected = (stages - 1) / (virtual * microbatches + stages - 1)
    assert sim.bubble_fraction == pytest.approx(expected)
    assert sim.bubble_fraction < bubble("1f1b", stages, microbatches).bubble_fraction


def test_1f1b_keeps_fewer_microbatches_in_flight_than_gpipe():
    gpipe, one = bubble("gpipe", 4, 8), bubble("1f1b", 4, 8)
    assert gpipe.in_flight == (8, 8, 8, 8)
    assert one.in_flight == (4, 3, 2, 1)


@pytest.mark.parametrize("schedule,stages,microbatches,virtual",
                         [("gpipe", 4, 3, 1), ("1f1b", 3, 5, 1), ("interleaved", 2, 4, 2)])
def test_tick_table_runs_every_op_once_after_its_inputs(schedule, stages, microbatches, virtual):
    table = tick_table(schedule, stages, microbatches, virtual)
    when = {}
    for t, row in enumerate(table):
        for d, op in enumerate(row):
            if op is not None:
                assert op.chunk % stages == d
                assert op not in when
                when[op] = t
    chunks = stages * virtual
    assert len(when) == 2 * chunks * microbatches
    for op, t in when.items():
        if op.kind == "F" and op.chunk > 0:
            assert when[type(op)("F", op.microbatch, op.chunk - 1)] < t
        if op.kind == "B":
            assert when[type(op)("F", op.microbatch, op.chunk)] < t
            if op.chunk < chunks - 1:
                assert when[type(op)("B", op.microbatch, op.chunk + 1)] < t


def test_bad_schedules_are_refused():
    with pytest.raises(ValueError, match="multiple of the stages"):
        device_orders("interleaved", 4, 6, 2)
    with pytest.raises(ValueError, match="needs schedule='interleaved'"):
        device_orders("1f1b", 4, 8, 2)
    with pytest.raises(ValueError, match="one of"):
        device_orders("zero-bubble", 4, 8)


@pytest.mark.parametrize("schedule,virtual,most", [("1f1b", 1, 4), ("gpipe", 1, 8),
                                                   ("interleaved", 2, 11)])
def test_residual_slots_are_reused_once_their_backward_ran(schedule, virtual, most):
    # 1F1B on 4 stages holds at most 4 microbatches in flight per device (stage 0), GPipe all
    # 8; interleaved holds at most 11 of its 16 (chunk, microbatch) pairs at once. Interval
    # colouring is optimal, so the slot count is that most-in-flight count.
    from autoshard.runtime.pipeline import residual_slots
    table = tick_table(schedule, 4, 8, virtual)
    slots = residual_slots(table)
    assert slots.max() + 1 == most
    for d in range(4):
        live = {}
        for t, row in enumerate(table):
            op = row[d]
            if op is None:
                continue
            if op.kind == "F":
                assert slots[t, d] not in live.values()      # never overwrites a live slot
                live[(op.chunk, op.microbatch)] = slots[t, d]
            else:
                assert live.pop((op.chunk, op.microbatch)) == slots[t, d]
