"""Reading compiled programs: the GPU-equivalent collectives of a CPU-compiled executable."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from autoshard.cost_model.collectives import group_collective_latency, group_collective_time
from autoshard.cost_model.hardware import H100
from autoshard.measure.hlo import (Collective, HloStats, device_groups, hlo_stats,
                                      measured_step)


def _compiled(fn, in_specs, out_specs, *shapes):
    mesh = jax.make_mesh((8,), ("data",))
    s = lambda spec: NamedSharding(mesh, spec)  # noqa: E731
    args = [jax.ShapeDtypeStruct(shape, jnp.float32) for shape in shapes]
    return jax.jit(fn, in_shardings=tuple(map(s, in_specs)),
                   out_shardings=tuple(map(s, out_specs))).lower(*args).compile().as_text()


def test_sliced_all_reduce_counts_as_reduce_scatter_after_the_last_matmul():
    """CPU lowers a reduce-scatter as all-reduce + dynamic-slice; a GPU build (and so the
    measure) runs a reduce-scatter of the same input, combinable since no matmul follows."""
    text = _compiled(lambda x, w: ((x @ w).T @ x,), (P("data"), P()), (P("data"),),
                     (64, 32), (32, 32))
    stats = hlo_stats(text)
    assert "all-reduce(" in text and "reduce-scatter(" not in text
    assert stats.count == {"reduce-scatter": 1}
    assert stats.bytes == {"reduce-scatter": 32 * 32 * 4}
    (c, times), = stats.collectives
    assert c.combinable == "tail" and c.group_size == 8 and times == 1


def test_an_all_reduce_read_whole_stays_an_all_reduce():
    text = _compiled(lambda x, w: ((x @ w).T @ x,), (P("data"), P()), (P(),),
                     (64, 32), (32, 32))
    stats = hlo_stats(text)
    assert stats.count == {"all-reduce": 1} and stats.bytes == {"all-reduce": 32 * 32 * 4}


def test_combinable_collectives_pay_one_latency():
    ring = ((0, 1, 2, 3, 4, 5, 6, 7),)
    stats = HloStats(collectives=[(Collective("all-gather", 1 << 20, ring, "head"), 1)] * 3
                     + [(Collective("all-gather", 1 << 20, ring, ""), 1)] * 2)
    step = measured_step(stats, H100)
    one = group_collective_time(H100, "all-gather", 1 << 20, 8, 1)
    latency = group_collective_latency(H100, "all-gather", 8, 1)
    assert latency == pytest.approx(5e-6)
    assert step.collective_seconds["all-gather"] == pytest.approx(5 * one - 2 * latency)


def test_device_groups_of_a_sub_axis():
    # XLA prints a collective over part of a mesh axis as 'name':(pre)size: the axis viewed
    # as [pre, size, rest], the groups running along its size part
    mesh = "replica_groups=mesh['axis_0'=2,'axis_1'=4] "
    assert device_groups(mesh + "{'axis_1'}, dimensions={0}") == (
        (0, 1, 2, 3), (4, 5, 6, 7))
    assert device_groups(mesh + "{'axis_1':(2)2}, dimensions={0}") == (
        (0, 1), (2, 3), (4, 5), (6, 7))
    assert device_groups(mesh + "{'axis_1':(1)2}, dimensions={0}") == (
        (0, 2), (1, 3), (4, 6), (5, 7))
    assert device_groups(mesh + "{'axis_0','axis_1':(1)2}, dimensions={0}") == (
        (0, 2, 4, 6), (1, 3, 5, 7))


def test_a_compiled_all_to_all_over_half_an_axis_is_read():
    # (data, model) -> (model, data) on a 2-D value: the partitioner runs an all-to-all over
    # half of "model" (2 devices), printed with a sub-axis, then a permute
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    src, dst = NamedSharding(mesh, P("data", "model")), NamedSharding(mesh, P("model", "data"))
    f = jax.jit(lambda x: jax.lax.with_sharding_constraint(x * 2.0, dst), in_shardings=src)
    stats = hlo_stats(f.lower(jax.ShapeDtypeStruct((64, 128), jnp.float32)).compile().as_text())
    sizes = {len(c.groups[0]) for c, _ in stats.collectives if c.kind == "all-to-all"}
    assert sizes == {2}


# A GPU build's program (shapes and attributes as XLA's GPU backend prints them): the matmul is a
# cuBLAS call and the convolutions cuDNN calls, which print the forward convolution's labels.
GPU_PROGRAM = """HloModule gpu_library_calls

ENTRY %main (x: f32[64,32], w: f32[32,16], img: f32[8,16,16,4], k: f32[8,3,3,4], dy: f32[8,8,8,8]) -> f32[64,16] {
  %x = f32[64,32]{1,0} parameter(0)
  %w = f32[32,16]{1,0} parameter(1)
  %img = f32[8,16,16,4]{3,2,1,0} parameter(2)
  %k = f32[8,3,3,4]{3,2,1,0} parameter(3)
  %dy = f32[8,8,8,8]{3,2,1,0} parameter(4)
  %gemm = (f32[64,16]{1,0}, s8[1024]{0}) custom-call(%x, %w), custom_call_target="__cublas$lt$matmul", backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_batch_dimensions":[],"lhs_contracting_dimensions":["1"],"rhs_batch_dimensions":[],"rhs_contracting_dimensions":["0"]}}}
  %fwd = (f32[8,8,8,8]{3,2,1,0}, u8[0]{0}) custom-call(%img, %k), window={size=3x3 stride=2x2 pad=0_1x0_1}, dim_labels=b01f_o01i->b01f, custom_call_target="__cudnn$convForward"
  %dx = (f32[8,16,16,4]{3,2,1,0}, u8[0]{0}) custom-call(%dy, %k), window={size=3x3 stride=2x2 pad=0_1x0_1}, dim_labels=b01f_o01i->b01f, custom_call_target="__cudnn$convBackwardInput"
  %dk = (f32[8,3,3,4]{3,2,1,0}, u8[0]{0}) custom-call(%img, %dy), window={size=3x3 stride=2x2 pad=0_1x0_1}, dim_labels=b01f_o01i->b01f, custom_call_target="__cudnn$convBackwardFilter"
  ROOT %out = f32[64,16]{1,0} get-tuple-element(%gemm), index=0
}
"""
# the forward convolution: 8x8x8 outputs of 8 features, each 3x3x4 multiply-adds
CONV_FLOPS = 2 * (8 * 8 * 8 * 8) * (3 * 3 * 4)


def test_gpu_library_calls_count_as_the_matmuls_they_replace():
    """cuBLAS and cuDNN custom-calls are matmul kernels; each cuDNN backward pass does its
    forward convolution's FLOPs."""
    stats = hlo_stats(GPU_PROGRAM)
    assert stats.matmul_flops == {"f32": 2 * 64 * 16 * 32 + 3 * CONV_FLOPS}
    assert sorted(f for _, f, _, _ in stats.kernels if f) == sorted(
        [2 * 64 * 16 * 32] + [CONV_FLOPS] * 3)


def test_a_strided_convolution_gradient_costs_three_forward_passes():
    """CPU prints the input gradient of a stride-2 convolution as a convolution over a
    zero-dilated gradient; counted over its values it is the forward pass's FLOPs, as a GPU
    build's cuDNN call (above) does, and the cost model counts it the same way."""
    def loss(img, k):
        y = jax.lax.conv_general_dilated(img, k, (2, 2), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.sum(y * y)

    img = jax.ShapeDtypeStruct((8, 16, 16, 4), jnp.float32)
    k = jax.ShapeDtypeStruct((3, 3, 4, 8), jnp.float32)
    text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(img, k).compile().as_text()
    assert "lhs_dilate=2x2" in text
    assert hlo_stats(text).matmul_flops == {"f32": 3 * CONV_FLOPS}

    from autoshard.cost_model.compute import node_flops
    from autoshard.passes.lift import lift
    from autoshard.passes.trace import trace
    graph = lift(trace(jax.grad(loss, argnums=(0, 1)), (img, k)))
    convs = [n for n in graph.nodes if n.op == "conv_general_dilated"]
    assert sorted(map(node_flops, convs)) == [CONV_FLOPS] * 3
