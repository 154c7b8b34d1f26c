"""SBP specs: conversion to and from PartitionSpec, printed form, validation errors."""

import pytest
from jax.sharding import PartitionSpec as P

from autoshard import PARTIAL, B, MeshSpec, S, ShardingError, ShardingSpec
from autoshard.ir.sharding import as_sharding_spec

MESH = MeshSpec(("data", "model"), (2, 4))


@pytest.mark.parametrize("pspec, sbp", [
    (P(), (B, B)),
    (P("data"), (S(0), B)),
    (P(None, "model"), (B, S(1))),
    (P("model", "data"), (S(1), S(0))),
    (P(("data", "model")), (S(0), S(0))),
])
def test_partition_spec_round_trip(pspec, sbp):
    spec = ShardingSpec.from_partition_spec(pspec, MESH)
    assert spec.sbp == sbp
    assert spec.to_partition_spec(MESH) == pspec
    assert ShardingSpec.parse(str(spec)) == spec


def test_several_axes_on_one_dim_keep_their_order():
    mesh_order = ShardingSpec.from_partition_spec(P(("data", "model")), MESH)
    reversed_order = ShardingSpec.from_partition_spec(P(("model", "data")), MESH)
    assert mesh_order.sbp == reversed_order.sbp == (S(0), S(0))
    assert mesh_order != reversed_order
    assert reversed_order.dim_axes(0) == (1, 0)
    assert reversed_order.to_partition_spec(MESH) == P(("model", "data"))
    assert str(reversed_order) == "(S0, S0 | order=1,0)"
    assert ShardingSpec.parse(str(reversed_order)) == reversed_order
    # the canonical (mesh) order is stored as no order at all, so equal layouts hash equal
    assert ShardingSpec((S(0), S(0)), (0, 1)) == mesh_order
    assert hash(ShardingSpec((S(0), S(0)), (0, 1))) == hash(mesh_order)


def test_printed_forms():
    spec = ShardingSpec((S(0), PARTIAL))
    assert str(spec) == "(S0, P)"
    assert spec.format(MESH) == "data:S0 model:P"
    assert ShardingSpec.parse("S0,P") == spec
    assert ShardingSpec.parse("(S(1), B)") == ShardingSpec((S(1), B))


def test_partial_has_no_partition_spec():
    spec = ShardingSpec((S(0), PARTIAL))
    with pytest.raises(ShardingError, match="partial-sum"):
        spec.to_partition_spec(MESH, 2)
    assert spec.to_partition_spec(MESH, 2, partial="replicate") == P("data")
    assert spec.partial_axes == (1,)


def test_shard_shape_and_fraction():
    spec = ShardingSpec.from_partition_spec(P(("data", "model"), None), MESH)
    assert spec.shard_shape((16, 3), MESH) == (2, 3)
    assert spec.shard_fraction(MESH) == 1 / 8
    assert ShardingSpec((B, PARTIAL)).shard_fraction(MESH) == 1.0


def test_validate_names_value_axis_and_dim():
    spec = ShardingSpec.from_partition_spec(P(None, "model"), MESH)
    spec.validate((3, 8), MESH, what="argument params['w']")
    with pytest.raises(ShardingError) as err:
        spec.validate((8, 6), MESH, what="argument params['w']")
    text = str(err.value)
    assert "params['w']" in text and "'model' (size 4)" in text and "dim 1 (size 6)" in text
    with pytest.raises(ShardingError, match="rank 1"):
        spec.validate((8,), MESH, what="x")


@pytest.mark.parametrize("pspec, message", [
    (P("expert"), "mesh axis 'expert' does not exist; this mesh has axes 'data', 'model'"),
    (P("data", "data"), "appears twice"),
    (P(P.UNCONSTRAINED), "UNCONSTRAINED"),
    (P(None, None, "data"), "rank 2"),
])
def test_bad_partition_specs(pspec, message):
    with pytest.raises(ShardingError, match=message):
        ShardingSpec.from_partition_spec(pspec, MESH, 2, what="x")


def test_user_forms_accepted_by_hints():
    assert as_sharding_spec(None, MESH, 2, what="x") == ShardingSpec.replicated(2)
    assert as_sharding_spec("model", MESH, 2, what="x") == ShardingSpec((B, S(0)))
    assert as_sharding_spec("(S1, S0)", MESH, 2, what="x") == ShardingSpec((S(1), S(0)))
    with pytest.raises(ShardingError, match="neither a mesh axis name nor an SBP spec"):
        as_sharding_spec("expert", MESH, 2, what="x")
    with pytest.raises(ShardingError, match="3 axes|3 SBP"):
        as_sharding_spec(ShardingSpec((B, B, B)), MESH, 2, what="x")


def test_mesh_spec():
    assert MESH.size("data", "model") == 8 and MESH.num_devices == 8
    assert str(MESH) == "(data=2, model=4)"
    with pytest.raises(ShardingError, match="distinct"):
        MeshSpec(("a", "a"), (2, 2))
    with pytest.raises(ShardingError, match="does not exist"):
        MESH.index("stage")
