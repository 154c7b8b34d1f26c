"""Cost model: collective times, resharding steps and compute time equal hand-derived numbers."""

import pytest

from autoshard import PARTIAL, B, MeshSpec, S, ShardingSpec
from autoshard.cost_model.collectives import collective_time
from autoshard.cost_model.hardware import (A100, CPU, H100, H100_2NODE, TPU_V5E, Hardware, Link,
                                           axis_group_nodes, get_hardware)
from autoshard.cost_model.reshard import ReshardStep, reshard_steps, reshard_time
from autoshard.ir.errors import ArgumentError

GIB = 2.0 ** 30
MESH_1D = MeshSpec(("data",), (8,))
MESH_2D = MeshSpec(("data", "model"), (2, 4))


def spec(*sbp):
    return ShardingSpec(tuple(sbp))


def test_profiles_by_name():
    assert get_hardware("h100") is H100 and get_hardware(None) is H100
    assert {get_hardware(n).name for n in ("h100", "h100-2node", "a100", "tpu-v5e", "cpu")} == {
        "h100", "h100-2node", "a100", "tpu-v5e", "cpu"}
    with pytest.raises(ArgumentError, match="unknown hardware 'v100'"):
        get_hardware("v100")
    custom = Hardware("mine", {"float32": 1e12}, 1e11, 1e11, 1e9, Link(1e9, 1e-6),
                      Link(1e8, 1e-5), 4)
    assert get_hardware(custom) is custom and hash(custom)
    assert H100.matmul_rate("bfloat16") == pytest.approx(989e12 * 0.7)
    assert H100.matmul_rate("int8") == H100.matmul_rate("float32")
    assert A100.memory_bytes == 80e9 and TPU_V5E.memory_bytes == 16 * 2**30 and CPU


def test_which_axes_cross_nodes():
    # 4 devices per node, row-major: the first axis of (2, 4) and (4, 2) crosses nodes
    assert axis_group_nodes((2, 4), (0,), 4) == (1, 2)
    assert axis_group_nodes((2, 4), (1,), 4) == (4, 1)
    assert axis_group_nodes((4, 2), (0,), 4) == (2, 2)
    assert axis_group_nodes((4, 2), (1,), 4) == (2, 1)
    assert axis_group_nodes((8,), (0,), 4) == (4, 2)
    assert axis_group_nodes((8,), (0,), 8) == (8, 1)


def test_ring_collectives_inside_a_node():
    bw = 450e9 * 0.8
    assert collective_time(H100, MESH_1D, "all-reduce", GIB, (0,)) == pytest.approx(
        2 * (5e-6 + 7 / 8 * GIB / bw))
    for kind in ("all-gather", "reduce-scatter"):
        assert collective_time(H100, MESH_1D, kind, GIB, (0,)) == pytest.approx(
            5e-6 + 7 / 8 * GIB / bw)
    assert collective_time(H100, MESH_2D, "all-to-all", GIB, (1,)) == pytest.approx(
        5e-6 + 3 / 4 * GIB / bw)
    assert collective_time(H100, MESH_2D, "all-reduce", GIB, ()) == 0.0


def test_hierarchical_collectives_across_nodes():
    intra, inter = 450e9 * 0.8, 50e9 * 0.8
    # axis 0 of (2, 4) on two 4-GPU nodes: one GPU per node per group, all traffic on IB
    assert collective_time(H100_2NODE, MESH_2D, "all-reduce", GIB, (0,)) == pytest.approx(
        2 * (12e-6 + 1 / 2 * GIB / inter))
    # the whole mesh: IB carries 1/4 of the data, NVLink the rest
    assert collective_time(H100_2NODE, MESH_2D, "all-gather", GIB, (0, 1)) == pytest.approx(
        12e-6 + 1 / 2 * GIB / 4 / inter + 5e-6 + 3 / 4 * GIB / intra)
    # the model axis stays inside a node
    assert collective_time(H100_2NODE, MESH_2D, "all-reduce", GIB, (1,)) == pytest.approx(
        collective_time(H100, MESH_2D, "all-reduce", GIB, (1,)))


@pytest.mark.parametrize("src, dst, steps", [
    (spec(B, B), spec(S(0), S(1)), ()),                                          # slice: free
    (spec(S(0), B), spec(PARTIAL, B), ()),                                       # zero-fill: free
    (spec(PARTIAL, B), spec(B, B), (ReshardStep("all-reduce", (0,), 1.0),)),
    (spec(B, PARTIAL), spec(B, S(0)), (ReshardStep("reduce-scatter", (1,), 1.0),)),
    (spec(S(0), B), spec(S(1), B), (ReshardStep("all-to-all", (0,), 0.5),)),
    # XLA gathers the last tensor dim first (measured: tests/cost_model/test_reshard_xla.py)
    (spec(S(0), S(1)), spec(B, B), (ReshardStep("all-gather", (1,), 0.5),
                                    ReshardStep("all-gather", (0,), 1.0))),
    (spec(S(0), S(0)), spec(B, B), (ReshardStep("all-gather", (0, 1), 1.0),)),
    (spec(PARTIAL, PARTIAL), spec(S(0), B), (ReshardStep("reduce-scatter", (0,), 1.0),
                                             ReshardStep("all-reduce", (1,), 0.5))),
])
def test_boxing_table(src, dst, steps):
    assert reshard_steps(src, dst, MESH_2D) == steps


def test_reshard_time_is_the_sum_of_its_collectives():
    nbytes = 3 * 2**20
    src, dst = spec(PARTIAL, S(1)), spec(B, B)
    # all-reduce of the (B, S1) value over data, then all-gather of dim 1 over model
    want = (collective_time(H100, MESH_2D, "all-reduce", nbytes / 4, (0,))
            + collective_time(H100, MESH_2D, "all-gather", nbytes, (1,)))
    assert reshard_time(H100, MESH_2D, src, dst, nbytes) == pytest.approx(want, rel=1e-9)
    assert reshard_time(H100, MESH_2D, dst, src, nbytes) == 0.0
