"""Pipeline rows: a GPT train step on two simulated 4-GPU H100 nodes ("h100-2node": the mesh's
first axis crosses the nodes over InfiniBand), pipelined over that axis, against the hand plans
(data parallel, FSDP, Megatron TP inside a node + data parallel across nodes), autoshard's
plan without a pipeline, and pipeline="auto".

    python benchmarks/pipeline.py [--layers 8] [--d-model 1024] [--batch 32] [--seq 512]

Measures. Hand plans and autoshard's plan: the compiled executable's roofline, as in
plan_quality.py (matmul FLOPs and collectives read from the HLO, priced on the profile;
memory_analysis peak). Pipelined plans: the same conventions applied to the schedule, since a
roofline of the HLO cannot see which tick waits for which: each chunk's matmul FLOPs (from its
lifted graph, one device's share of a microbatch) at the profile's matmul rate, backward 2x
forward (the forward's residuals are kept; 3x with recompute=True), a collective-permute of
the crossing activation over the inter-node link per transfer, placed by the schedule
simulator; plus the collectives outside the tick loop read from the compiled HLO (a stage
gathering its parameters' ZeRO pieces and reduce-scattering its gradients inside the node, the
gradient pieces across the nodes).
Peak memory is the compiled program's (PipelinedFunction.roofline does all of this).
pipeline="auto" is measured the same way; its note gives what it weighed (AutoDecision).
Writes benchmarks/results/pipeline.md; plan_quality.py --pipeline writes the same rows into
benchmarks/results/plan_quality.md.
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import sys
import time

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import optax  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import autoshard  # noqa: E402
from autoshard.cost_model.hardware import get_hardware  # noqa: E402
from benchmarks.plan_quality import abstract_args, hand_plans, load_model, measure  # noqa: E402

HW = "h100-2node"


def pipelined_train_step(model):
    tx = model.tx

    def train_step(params, opt_state, batch):
        loss, grads = autoshard.value_and_grad(model.loss)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return train_step


def measure_pipelined(step, args):
    """Roofline of a pipelined step (module docstring; PipelinedFunction.roofline)."""
    r = step.roofline(*args)
    return dict(step_ms=r.step_seconds * 1e3, bubble=r.bubble_fraction,
                peak_gib=r.peak_bytes / 2**30, microbatches=step.pipeline_plan.microbatches)


def pipeline_rows(layers: int, d_model: int, batch: int, seq: int) -> list:
    """(label, measures, note) rows for one GPT configuration on HW (module docstring)."""
    jax.clear_caches()  # JAX reuses traces of the model's functions, made with other constants
    model = load_model("gpt", "medium")
    model.LAYERS, model.D, model.FF = layers, d_model, 4 * d_model
    model.BATCH, model.SEQ = batch, seq
    hw = get_hardware(HW)
    args = abstract_args(model)
    rows = []
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    for label, in_specs in hand_plans("gpt", model, mesh, args).items():
        step = autoshard.compile(model.train_step, *args, mesh=mesh, planner="data-parallel",
                                 in_specs=in_specs, out_specs=(in_specs[0], in_specs[1], P()))
        rows.append((label, measure(step, args, hw, mesh), ""))
        print(label, rows[-1][1], flush=True)
    start = time.perf_counter()
    step = autoshard.compile(model.train_step, *args, mesh=mesh, hardware=hw, cache=False)
    rows.append(("autoshard, no pipeline", measure(step, args, hw, mesh),
                 f"planned in {time.perf_counter() - start:.1f} s"))
    print(rows[-1], flush=True)
    pipe_mesh = jax.make_mesh((2, 4), ("stage", "data"))
    train_step = pipelined_train_step(model)
    for pipe in (autoshard.Pipeline(2, None, "1f1b"), autoshard.Pipeline(2, None, "gpipe"),
                 autoshard.Pipeline(2, None, "interleaved", virtual_stages=2)):
        start = time.perf_counter()
        step = autoshard.compile(train_step, *args, mesh=pipe_mesh, hardware=hw, pipeline=pipe)
        plan_s = time.perf_counter() - start
        result = measure_pipelined(step, args)
        label = f"pipeline {pipe.schedule} x{pipe.virtual_stages} (M={result['microbatches']})"
        rows.append((label, result, f"planned in {plan_s:.1f} s; simulated "
                     f"{step.pipeline_plan.total_seconds * 1e3:.3f} ms; inside a stage: "
                     f"{step.pipeline_plan.intra_stage}"))
        print(rows[-1], flush=True)
    start = time.perf_counter()
    auto = autoshard.compile(train_step, *args, mesh=mesh, hardware=hw, pipeline="auto",
                             cache=False)
    d = auto.auto_decision
    plan_s = time.perf_counter() - start
    if d.pipelined:
        result = measure_pipelined(auto, args)
        chose = (f"chose the pipeline ({d.pipeline.stages} stages, {d.pipeline.schedule}, "
                 f"M={result['microbatches']})")
    else:
        result, chose = measure(auto, args, hw, mesh), "chose no pipeline"
    flat_predicted = ("a rule, no prediction" if math.isnan(d.flat_predicted)
                      else f"{d.flat_predicted * 1e3:.3f}")
    rows.append(("pipeline='auto'", result,
                 f"{chose}: measured {d.pipelined_measured * 1e3:.3f} ms pipelined vs "
                 f"{d.flat_measured * 1e3:.3f} ms not (predicted {d.pipelined_predicted * 1e3:.3f}"
                 f" vs {flat_predicted}){_other_stage_counts(d)}; planned and measured in "
                 f"{plan_s:.1f} s"))
    print(rows[-1], flush=True)
    return rows


def _other_stage_counts(d) -> str:
    """What pipeline="auto" made of the stage counts other than the mesh's first axis."""
    own = d.schedules[0][0] if d.schedules else None
    measured = [f"{n} stages {s} measured {t * 1e3:.3f} ms" for n, s, _, _, _, t in d.schedules
                if n != own]
    skipped = [f"{n} stages {s} predicted {t * 1e3:.3f} ms, not compiled"
               for n, s, _, _, t in d.unmeasured]
    return f"; other stage counts: {', '.join(measured + skipped)}" if measured + skipped else ""


def table_lines(rows, layers: int, d_model: int, batch: int, seq: int, command: str) -> list:
    """A markdown section: the configuration, the command that reproduces it, the rows and,
    per row, its step time against the best non-pipelined plan's."""
    flat = [r["step_ms"] for label, r, _ in rows
            if "step_ms" in r and not label.startswith("pipeline")]
    best = min(flat) if flat else None
    lines = [f"GPT train step with AdamW: {layers} layers, d={d_model}, seq {seq}, batch "
             f"{batch}; mesh (2, 4) on {HW}, the first axis across the nodes. Command: "
             f"`{command}`. How each row is measured: the module docstring of "
             "benchmarks/pipeline.py.", "",
             "| plan | step ms (matmul + collectives) | vs best non-pipelined | peak GiB / device "
             "| bubble | notes |", "|---|---|---|---|---|---|"]
    for label, r, note in rows:
        step = f"{r['step_ms']:.3f}" if "step_ms" in r else ""
        ratio = f"{r['step_ms'] / best:.3f}" if "step_ms" in r and best else ""
        peak = f"{r['peak_gib']:.3f}" if "peak_gib" in r else ""
        bubble = f"{r['bubble']:.1%}" if "bubble" in r else ""
        lines.append(f"| {label} | {step} | {ratio} | {peak} | {bubble} | {note} |")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/pipeline.md"))
    ns = parser.parse_args()
    rows = pipeline_rows(ns.layers, ns.d_model, ns.batch, ns.seq)
    command = (f"python benchmarks/pipeline.py --layers {ns.layers} --d-model {ns.d_model} "
               f"--batch {ns.batch} --seq {ns.seq}")
    lines = ["# Pipeline on two 4-GPU nodes (h100-2node)", "",
             *table_lines(rows, ns.layers, ns.d_model, ns.batch, ns.seq, command)]
    pathlib.Path(ns.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {ns.out}")


if __name__ == "__main__":
    main()
