"""Issue 32's cases, each planned and compiled by the autoshard found at ROOT (default: this
checkout), printed as JSON lines: predicted and compiled step (``compiled_roofline`` on h100),
collective counts (predicted ops, compiled instructions, compiled ops after the combiners'
model), and for the initializer the bytes each device holds.

    python benchmarks/optimality_cases.py [ROOT] [case ...]

To compare with an earlier commit: ``git worktree add /tmp/before REV`` and pass /tmp/before.
Cases: depthwise (a depthwise-separable net, batch 1, 64x64, 256 channels, (4,)), gpt (the test
GPT, 2 layers, (2, 4)), chain (per-parameter RMS all-reduces, each feeding the next, (2, 4)),
adafactor (the test GPT with optax.adafactor, (4,)), init (two 2048x2048 arrays from a key,
(4,)). Results: benchmarks/results/optimality_cases.md.
"""

import importlib.util
import json
import math
import os
import pathlib
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
HERE = pathlib.Path(__file__).resolve().parents[1]
ROOT = sys.argv[1] if len(sys.argv) > 1 else str(HERE)
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import autoshard  # noqa: E402
from autoshard.cost_model.hardware import get_hardware  # noqa: E402
from autoshard.measure.hlo import hlo_stats  # noqa: E402
from autoshard.measure.verify import compiled_roofline  # noqa: E402

H100 = get_hardware("h100")


def report(case: str, step, args, mesh) -> None:
    compiled = step.lower(*args).compile()
    stats = hlo_stats(compiled.as_text())
    prediction = step.plan.prediction
    print(json.dumps({
        "case": case, "root": ROOT,
        "predicted_us": prediction.step_seconds * 1e6 if prediction else None,
        "compiled_us": compiled_roofline(compiled, H100, mesh).step_seconds * 1e6,
        "predicted_ops": {k: v[0] for k, v in prediction.collectives.items()}
        if prediction else {},
        "compiled_instructions": dict(stats.count),
        "compiled_ops": dict(getattr(stats, "ops", {}) or {})}), flush=True)


def from_this_checkout(name: str, path: str):
    """A test module of this checkout (the cases), whatever autoshard ROOT holds."""
    spec = importlib.util.spec_from_file_location(name, HERE / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def depthwise() -> None:
    model = from_this_checkout("depthwise", "tests/models/depthwise.py")
    model.BATCH, model.SIZE, model.CHANNELS = 1, 64, 256
    params = jax.eval_shape(model.init, jax.random.key(0))
    args = (params, jax.eval_shape(model.tx.init, params),
            jax.eval_shape(model.batch, jax.random.key(1)))
    mesh = jax.make_mesh((4,), ("data",), devices=jax.devices()[:4])
    step = autoshard.compile(model.train_step, *args, mesh=mesh, cache=False)
    report("depthwise b1 64x64 c256 (4,)", step, args, mesh)


def gpt_step(optimizer: str, tx, mesh_shape, names, **options) -> None:
    from tests.models import gpt

    def train_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(gpt.loss)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    params = gpt.init(jax.random.key(0), layers=2)
    args = (params, tx.init(params), gpt.batch(jax.random.key(1)))
    mesh = jax.make_mesh(mesh_shape, names, devices=jax.devices()[:math.prod(mesh_shape)])
    step = autoshard.compile(train_step, *args, mesh=mesh, cache=False, **options)
    report(f"test gpt 2 layers, {optimizer}, {mesh_shape}", step, args, mesh)


def chain() -> None:
    params = {f"w{i}": jnp.full((512, 512), 0.002) for i in range(4)}
    x = jnp.ones((16, 512))
    split = {name: P(("data", "model")) for name in params}
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    chained_step = from_this_checkout("test_verify", "tests/measure/test_verify.py").chained_step
    step = autoshard.compile(chained_step, params, x, mesh=mesh, cache=False,
                             in_specs=(split, P()), out_specs=split)
    report("chained RMS all-reduces (2, 4)", step, (params, x), mesh)


def init() -> None:
    def make(key):
        k1, k2 = jax.random.split(key)
        return {"w1": jax.random.normal(k1, (2048, 2048)) * 0.02,
                "w2": jax.random.normal(k2, (2048, 2048)) * 0.02}

    mesh = jax.make_mesh((4,), ("data",), devices=jax.devices()[:4])
    step = autoshard.compile(make, jax.random.key(0), mesh=mesh, cache=False)
    out = step(jax.random.key(0))
    print(json.dumps({"case": "init 2 x 2048x2048 (4,)", "root": ROOT,
                      "bytes_per_device": sum(v.addressable_shards[0].data.nbytes
                                              for v in out.values()),
                      "specs": {k: str(v.sharding.spec) for k, v in out.items()}}), flush=True)


CASES = {
    "depthwise": depthwise,
    "gpt": lambda: gpt_step("adamw", optax.adamw(1e-3), (2, 4), ("data", "model"),
                            solver_time_limit=5),
    "chain": chain,
    "adafactor": lambda: gpt_step("adafactor", optax.adafactor(1e-3), (4,), ("data",)),
    "init": init,
}

if __name__ == "__main__":
    for name in sys.argv[2:] or list(CASES):
        CASES[name]()
