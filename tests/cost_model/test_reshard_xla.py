"""reshard_steps against the compiler: each transition is compiled (jax's SPMD partitioner, CPU)
and the collectives XLA emits must be the predicted ones, kind by kind, in count and bytes.

Includes transitions where OneFlow's per-axis boxing table was right and ones where XLA does
something else (slices then permutes, slices before an all-to-all, gathers the last dim first,
replicates and slices); see the module docstring of ``autoshard/cost_model/reshard.py``.
"""

import math

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from autoshard import MeshSpec, ShardingSpec
from autoshard.measure.hlo import hlo_stats
from autoshard.cost_model.reshard import reshard_steps

SHAPE_3D, SHAPE_2D = (32, 64, 128), (64, 128)


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)


def predicted(src: ShardingSpec, dst: ShardingSpec, spec: MeshSpec, shape) -> dict:
    nbytes = 4 * math.prod(shape)
    out: dict[str, list[float]] = {}
    for step in reshard_steps(src, dst, spec, len(shape)):
        count, moved = out.get(step.kind, (0, 0.0))
        out[step.kind] = (count + 1, moved + step.factor * nbytes)
    return out


def compiled(text: str) -> dict:
    stats = hlo_stats(text)
    return {k: (stats.count[k], stats.bytes[k]) for k in stats.count if stats.count[k]}


def assert_same(want: dict, got: dict) -> None:
    assert set(want) == set(got), (want, got)
    for kind, (count, moved) in want.items():
        assert got[kind][0] == count, (kind, want, got)
        assert got[kind][1] == pytest.approx(moved, rel=0.1), (kind, want, got)


TRANSITIONS = [
    # the boxing table was right
    ("(S0, B)", "(B, B)", SHAPE_3D),                  # all-gather
    ("(B, S1)", "(B, S2)", SHAPE_3D),                 # all-to-all
    ("(S0, S1)", "(S0, S2)", SHAPE_3D),               # all-to-all over model
    ("(S0, S0)", "(B, B)", SHAPE_3D),                 # one all-gather over both axes
    ("(S0, S2)", "(S0, S0)", SHAPE_3D),               # all-to-all of model onto dim 0
    ("(B, B)", "(S0, S1)", SHAPE_3D),                 # slice: free
    ("(S1, B)", "(S2, B)", SHAPE_2D + (16,)),
    # XLA differs from the table
    ("(B, S0)", "(S0, S0)", SHAPE_3D),                # new axis major: slice + permute
    ("(S0, B)", "(B, S0)", SHAPE_3D),                 # permute, not all-gather
    ("(S0, B)", "(S1, S0)", SHAPE_3D),                # permute, not all-to-all
    ("(B, S0)", "(S1, S1)", SHAPE_3D),                # slice first: all-to-all of 1/8
    ("(S0, S0)", "(S0, S0 | order=1,0)", SHAPE_3D),   # reorder: permute
    ("(S0, S2)", "(S0, S0 | order=1,0)", SHAPE_3D),   # all-to-all + permute
    ("(S0, S0)", "(S1, S2)", SHAPE_3D),               # full rematerialization
    ("(S2, S2 | order=1,0)", "(S1, B)", SHAPE_3D),    # full rematerialization
    ("(S0, S1)", "(B, B)", SHAPE_3D),                 # last dim gathered first
    ("(S0, S1)", "(B, S0)", SHAPE_3D),                # all-gather + all-to-all of 1/4
    ("(S1, S0)", "(B, B)", SHAPE_2D),
    ("(S0, S0 | order=1,0)", "(S0, B)", SHAPE_2D),    # permute + all-gather
]


@pytest.mark.parametrize("src, dst, shape", TRANSITIONS,
                         ids=[f"{s}->{d}" for s, d, _ in TRANSITIONS])
def test_reshard_matches_xla(mesh, src, dst, shape):
    spec = MeshSpec.from_jax(mesh)
    src, dst = ShardingSpec.parse(src), ShardingSpec.parse(dst)
    out = NamedSharding(mesh, dst.to_partition_spec(spec, len(shape)))
    fn = jax.jit(lambda v: jax.lax.with_sharding_constraint(v * 1.0 + 0, out),
                 in_shardings=NamedSharding(mesh, src.to_partition_spec(spec, len(shape))),
                 out_shardings=out)
    text = fn.lower(jax.ShapeDtypeStruct(shape, jnp.float32)).compile().as_text()
    assert_same(predicted(src, dst, spec, shape), compiled(text))


# partial sums: a [64, 256] @ b [256, 128] with the contracting dim split, then a constraint
PARTIALS = [
    ("(B, P)", ("model",), "(B, B)"),                 # all-reduce
    ("(B, P)", ("model",), "(S0, B)"),                # rows sliced before the all-reduce
    ("(B, P)", ("model",), "(S0, S1)"),               # sliced, then reduce-scatter of 1/2
    ("(B, P)", ("model",), "(S0, S0)"),               # reduce-scatter leaves any piece
    ("(P, B)", ("data",), "(B, S0)"),                 # all-reduce of 1/4
]


@pytest.mark.parametrize("src, contracting, dst", PARTIALS,
                         ids=[f"{s}->{d}" for s, _, d in PARTIALS])
def test_partial_sums_match_xla(mesh, src, contracting, dst):
    spec = MeshSpec.from_jax(mesh)
    src, dst = ShardingSpec.parse(src), ShardingSpec.parse(dst)
    out = NamedSharding(mesh, dst.to_partition_spec(spec, 2))
    split = PartitionSpec(None, contracting), PartitionSpec(contracting, None)
    fn = jax.jit(lambda a, b: jax.lax.with_sharding_constraint(a @ b, out),
                 in_shardings=tuple(NamedSharding(mesh, p) for p in split), out_shardings=out)
    text = fn.lower(jax.ShapeDtypeStruct((64, 256), jnp.float32),
                    jax.ShapeDtypeStruct((256, 128), jnp.float32)).compile().as_text()
    assert_same(predicted(src, dst, spec, (64, 128)), compiled(text))
