"""Annotated (Megatron-style logical annotations, as the Flax docs write them) against searched
plans of the NNX GPT example: predicted step time, peak memory, parameters whose specs differ.

    python benchmarks/nnx_annotations.py [--mesh 2,4] [--layers 2] [--d-model 128]
"""

import argparse
import importlib.util
import os
import pathlib
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("AUTOSHARD_CACHE", "0")

import jax  # noqa: E402
from flax import nnx  # noqa: E402

import autoshard  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("nnx_gpt", ROOT / "examples" / "nnx_gpt.py")
gpt = importlib.util.module_from_spec(spec)
sys.modules["nnx_gpt"] = gpt
spec.loader.exec_module(gpt)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--mesh", default="2,4")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    shape = tuple(int(s) for s in args.mesh.split(","))
    mesh = jax.make_mesh(shape, ("data", "model")[: len(shape)])
    cfg = gpt.Config(layers=args.layers, d_model=args.d_model)
    batch = gpt.make_batch(cfg, args.batch)
    plans = {}
    with nnx.logical_axis_rules(gpt.logical_rules(mesh)), nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: gpt.create(cfg))
        for mode in ("ignore", "hint", "require"):
            plans[mode] = autoshard.compile(gpt.train_step, *abstract, batch, mesh=mesh,
                                            annotations=mode).plan
    report = plans["hint"].annotation_report
    print(f"mesh {shape}, GPT {cfg}, batch {args.batch}, hardware {plans['hint'].hardware}\n")
    print("| plan | predicted step (ms) | predicted peak memory (MiB/device) |")
    print("|---|---|---|")
    for label, mode in (("annotations required (as annotated)", "require"),
                        ("annotations as hints (default)", "hint"),
                        ("annotations ignored", "ignore")):
        p = plans[mode].prediction
        print(f"| {label} | {p.step_seconds * 1e3:.4f} | {p.peak_memory_bytes / 2**20:.2f} |")
    print(f"\n{len(report.differences)} of {report.annotated} annotated arguments differ under "
          f"'hint'; annotated - searched = {report.cost_seconds * 1e3:+.4f} ms per step.\n")
    print("| argument | annotated | searched | alone (ms) |")
    print("|---|---|---|---|")
    for d in report.differences:
        if d.path.startswith("model"):
            print(f"| `{d.path}` | {d.annotated} | {d.searched} | {d.seconds * 1e3:+.5f} |")
    others = [d for d in report.differences if not d.path.startswith("model")]
    print(f"\n(+ {len(others)} optimizer-state leaves: annotated like their parameters, "
          "searched mostly split over every device, ZeRO-style)")


if __name__ == "__main__":
    main()
