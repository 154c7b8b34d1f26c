"""Test set-up: 8 simulated CPU devices, set before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# every test solves its plan (tests/test_plan_cache.py turns the cache on where it tests it)
os.environ["AUTOSHARD_CACHE"] = "0"

import jax  # noqa: E402
import pytest  # noqa: E402

MESH_SHAPES = [(8,), (2, 4), (4, 2)]


def make_mesh(shape):
    """Meshes as users make them (jax.make_mesh: Explicit axes): 1-D is ("data",), 2-D is
    ("data", "model")."""
    names = ("data",) if len(shape) == 1 else ("data", "model")
    return jax.make_mesh(shape, names)


@pytest.fixture(params=MESH_SHAPES, ids=lambda s: "x".join(map(str, s)))
def mesh(request):
    return make_mesh(request.param)
