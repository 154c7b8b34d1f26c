"""Plan quality: autoshard against the hand plans a JAX user writes, every plan measured from its
own compiled executable the same way.

    python benchmarks/plan_quality.py [--models gpt,llama,moe,conv] [--meshes 2x4,4x2,8]
                                      [--hardware h100,h100-2node] [--size small|medium]
                                      [--pipeline 1024x512,2048x256 | none] [--pipeline-only]

For each model (the test suite's GPT, LLaMA-style, MoE and conv train steps with AdamW, scaled
up, planned from ShapeDtypeStructs), mesh and hardware profile: the hand plans (data parallel,
FSDP/ZeRO-3, Megatron TP+DP, expert parallel for the MoE; pinned with in_specs/out_specs and
propagated by XLA as under jax.jit) and autoshard's plans (the default searched plan, and
``planner="measured"``: the fastest executable among the searched plan and the data-parallel and
fully-sharded rules' that fits), without a budget and with a budget halfway between the leanest
hand plan's peak memory and the data-parallel plan's. Measured per plan: roofline step time
(matmul FLOPs and collectives read from the compiled HLO, loop trip counts applied, priced on
the profile's links; measure/hlo.py), collective bytes, peak memory (memory_analysis),
planning time.
Writes benchmarks/results/plan_quality.md.

Pipeline rows (``--pipeline``, one section per GPT configuration d_model x seq, 8 layers, batch
32): on "h100-2node" with stages spanning the two nodes, the pipelined step (each schedule and
pipeline="auto") against the hand plans (Megatron TP inside a node + data parallel across
nodes among them) and autoshard's plan without a pipeline; rows and measures from
benchmarks/pipeline.py. ``--pipeline-only`` runs just those and replaces that section of the
existing table.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pathlib
import sys
import tempfile
import time
import traceback

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import autoshard  # noqa: E402
from autoshard.cost_model.hardware import get_hardware  # noqa: E402
from autoshard.measure.hlo import hlo_stats, measured_step  # noqa: E402
from autoshard.measure.verify import device_positions, peak_memory  # noqa: E402
from tests.models import plans  # noqa: E402

# Sizes the test models are scaled to (module constants the model functions read at call time).
SIZES = {
    "small": {"gpt": dict(VOCAB=4096, D=512, HEADS=8, FF=2048, LAYERS=2, SEQ=256, BATCH=16),
              "llama": dict(VOCAB=4096, D=512, HEADS=8, KV_HEADS=4, FF=1536, LAYERS=2, SEQ=256,
                            BATCH=16, HEAD_DIM=64),
              "moe": dict(VOCAB=4096, D=512, HEADS=8, FF=1024, EXPERTS=8, SEQ=256, BATCH=16,
                          CAPACITY=1024),
              "conv": dict(BATCH=64, SIZE=32, C_IN=8, C1=128, C2=256, CLASSES=64)},
    "medium": {"gpt": dict(VOCAB=8192, D=1024, HEADS=16, FF=4096, LAYERS=4, SEQ=512, BATCH=16),
               "llama": dict(VOCAB=8192, D=1024, HEADS=16, KV_HEADS=8, FF=2816, LAYERS=4,
                             SEQ=512, BATCH=16, HEAD_DIM=64),
               "moe": dict(VOCAB=8192, D=1024, HEADS=16, FF=2048, EXPERTS=8, SEQ=512, BATCH=16,
                           CAPACITY=2048),
               "conv": dict(BATCH=128, SIZE=64, C_IN=8, C1=256, C2=512, CLASSES=128)},
}


def configured(name: str, config: dict):
    """The test model ``name`` with its module constants (sizes) set from ``config``."""
    module = importlib.import_module(f"tests.models.{name}")
    for key, value in config.items():
        setattr(module, key, value)
    return module


def load_model(name: str, size: str):
    return configured(name, SIZES[size][name])


def abstract_args(model):
    kp, kb = jax.random.split(jax.random.key(0))
    params = jax.eval_shape(lambda k: model.init(k) if not hasattr(model, "LAYERS") else
                            _init_layers(model, k), kp)
    opt = jax.eval_shape(model.tx.init, params)
    batch = jax.eval_shape(model.batch, kb)
    return params, opt, batch


def _init_layers(model, key):
    try:
        return model.init(key, layers=model.LAYERS)
    except TypeError:
        return model.init(key)


def hand_plans(name, model, mesh, args):
    params, opt, batch = args
    out = {"data parallel": plans.data_parallel(mesh, params, opt, batch),
           "FSDP/ZeRO-3": plans.fsdp(mesh, params, opt, batch),
           "Megatron TP+DP": plans.megatron(mesh, model, params, opt, batch)}
    if name == "moe":
        ep = plans.batch_axes(mesh)
        specs = model.expert_parallel_specs(params, ep)
        specs = {k: (v if k.startswith("experts") else P()) for k, v in specs.items()}
        out["expert parallel"] = (specs, plans.mirror_opt_specs(opt, specs, params),
                                  plans.batch_specs(batch, ep))
    return out


_COMPILED: dict = {}


def measure(step, args, hw, mesh, key=None):
    """Roofline of ``step``'s executable on ``hw``; a hand plan's executable does not depend on
    the hardware profile or budget, so it is compiled once per ``key``."""
    cached = _COMPILED.get(key) if key is not None else None
    if cached is None:
        start = time.perf_counter()
        compiled = step.lower(*args).compile()
        cached = (hlo_stats(compiled.as_text()), peak_memory(compiled),
                  time.perf_counter() - start)
        if key is not None:
            _COMPILED[key] = cached
    stats, peak, compile_s = cached
    roofline = measured_step(stats, hw, device_positions(mesh))
    return dict(step_ms=roofline.step_seconds * 1e3,
                compute_ms=roofline.compute_seconds * 1e3,
                full_ms=roofline.full_step_seconds * 1e3,
                comm_mib=stats.total_bytes / 2**20,
                peak_gib=peak / 2**30, compile_s=compile_s)


MEASURED = "autoshard, planner='measured'"
AUTOSHARD_ROWS = ("autoshard", MEASURED)


def run_case(name, model, shape, hw_name, budget_fraction, rows, dp_peak_cache):
    names = ("data",) if len(shape) == 1 else ("data", "model")
    mesh = jax.make_mesh(shape, names)
    hw = get_hardware(hw_name)
    args = abstract_args(model)
    results = {}
    for label, in_specs in hand_plans(name, model, mesh, args).items():
        try:
            step = autoshard.compile(model.train_step, *args, mesh=mesh, planner="data-parallel",
                                     in_specs=in_specs, out_specs=(in_specs[0], in_specs[1], P()))
            results[label] = dict(measure(step, args, hw, mesh, key=(name, shape, label)),
                                  plan_s=step.planning_seconds)
        except Exception as err:  # a hand plan that does not apply to this model/mesh
            results[label] = dict(error=f"{type(err).__name__}: {str(err)[:80]}")
    key = (name, shape)
    peaks = [r["peak_gib"] for r in results.values() if "peak_gib" in r]
    dp_peak = results.get("data parallel", {}).get("peak_gib")
    dp_peak_cache.setdefault(key, (dp_peak, min(peaks) if peaks else None))
    budget = None
    if budget_fraction is not None and all(dp_peak_cache[key]):
        # between the leanest hand plan's peak and data parallel's: data parallel does not fit,
        # the leanest hand plan does
        dp, leanest = dp_peak_cache[key]
        budget = int((leanest + budget_fraction * (dp - leanest)) * 2**30)
    # the plan cache is a fresh directory (main): the search solves here and stores its plan,
    # and planner="measured" reuses it, so its plan s is the rules and the measuring
    for label, planner in (("autoshard", "search"), (MEASURED, "measured")):
        try:
            start = time.perf_counter()
            step = autoshard.compile(model.train_step, *args, mesh=mesh, hardware=hw,
                                     memory_budget=budget, planner=planner, cache=True)
            plan_s = time.perf_counter() - start
            prediction = step.plan.prediction
            results[label] = dict(measure(step, args, hw, mesh), plan_s=plan_s)
            if prediction is not None:
                results[label].update(predicted_ms=prediction.step_seconds * 1e3,
                                      predicted_gib=prediction.peak_memory_bytes / 2**30)
            if step.candidates:
                results[label]["chose"] = step.plan.method
        except Exception as err:
            traceback.print_exc()
            results[label] = dict(error=f"{type(err).__name__}: {str(err)[:120]}")
    budget_gib = None if budget is None else budget / 2**30
    fits = {k: v for k, v in results.items() if "error" not in v and k not in AUTOSHARD_ROWS
            and (budget_gib is None or v["peak_gib"] <= budget_gib)}
    best = min(fits, key=lambda k: fits[k]["step_ms"]) if fits else None
    for label, r in results.items():
        rows.append(dict(model=name, mesh="x".join(map(str, shape)), hw=hw_name,
                         budget=budget_gib, plan=label, best_hand=best, **r))
    for label in AUTOSHARD_ROWS:
        auto = results.get(label, {})
        if "error" in auto:
            continue
        ratio = auto["step_ms"] / fits[best]["step_ms"] if best else None
        fit = budget_gib is None or auto["peak_gib"] <= budget_gib
        print(f"{name:6} {shape!s:7} {hw_name:10} budget={budget_gib and round(budget_gib, 3)}: "
              f"{label} {auto['step_ms']:.3f} ms ({'fits' if fit else 'OVER BUDGET'}), best "
              f"hand {best} {fits[best]['step_ms'] if best else float('nan'):.3f} ms, ratio "
              f"{ratio if ratio is None else round(ratio, 3)}", flush=True)


def write_table(rows, path, argv):
    lines = ["# Plan quality: autoshard vs hand plans", "",
             f"Command: `python benchmarks/plan_quality.py {' '.join(argv)}`; jax "
             f"{jax.__version__}; every plan measured from its own compiled executable "
             "(step ms: roofline from HLO matmul FLOPs + collectives on the profile's links, "
             "priced as a GPU build runs them: combinable collectives pay one latency, sliced "
             "all-reduces are reduce-scatters; all-kernel ms: every kernel's FLOP-or-HBM "
             "roofline + the same collectives; peak = memory_analysis args + outputs + temps - "
             "aliases). Ranked by step ms; the budget lies halfway between the leanest hand "
             "plan's peak and data parallel's.", "",
             "| model | mesh | hardware | budget GiB | plan | step ms | vs best hand | "
             "all-kernel ms | collective MiB | peak GiB | fits | plan s | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        budget = "-" if r["budget"] is None else f"{r['budget']:.3f}"
        if "error" in r:
            lines.append(f"| {r['model']} | {r['mesh']} | {r['hw']} | {budget} | {r['plan']} | "
                         f"- | - | - | - | - | - | - | {r['error']} |")
            continue
        best = next((x for x in rows if x["model"] == r["model"] and x["mesh"] == r["mesh"]
                     and x["hw"] == r["hw"] and x["budget"] == r["budget"]
                     and x["plan"] == r["best_hand"]), None)
        ratio = f"{r['step_ms'] / best['step_ms']:.3f}" if best else "no hand plan fits"
        fits = "yes" if r["budget"] is None or r["peak_gib"] <= r["budget"] else "no"
        note = (f"predicted {r['predicted_ms']:.3f} ms, {r['predicted_gib']:.3f} GiB "
                f"({r['predicted_gib'] / r['peak_gib']:.2f}x the compiled peak)"
                if "predicted_ms" in r else "")
        if "chose" in r:
            note = f"kept the {r['chose']}" + (f" ({note})" if note else "")
        lines.append(f"| {r['model']} | {r['mesh']} | {r['hw']} | {budget} | {r['plan']} | "
                     f"{r['step_ms']:.3f} | {ratio} | {r['full_ms']:.3f} | {r['comm_mib']:.1f} | "
                     f"{r['peak_gib']:.3f} | {fits} | {r['plan_s']:.2f} | {note} |")
    path.write_text("\n".join(lines) + "\n")


PIPELINE_HEADING = "## Pipeline rows (h100-2node, stages across the nodes)"


def pipeline_section(configs: str) -> list[str]:
    from benchmarks.pipeline import pipeline_rows, table_lines  # imports this module
    lines = [PIPELINE_HEADING, ""]
    for config in configs.split(","):
        d_model, seq = (int(x) for x in config.split("x"))
        rows = pipeline_rows(8, d_model, 32, seq)
        command = (f"python benchmarks/plan_quality.py --pipeline-only --pipeline "
                   f"{d_model}x{seq}")
        lines += [f"### d={d_model}, seq {seq}", "",
                  *table_lines(rows, 8, d_model, 32, seq, command), ""]
    return lines


def replace_pipeline_section(path: pathlib.Path, section: list[str]) -> None:
    """Keep the plan-quality table, put ``section`` in place of the old pipeline section
    (configurations not rerun keep their old subsections)."""
    text = path.read_text() if path.exists() else "# Plan quality: autoshard vs hand plans\n"
    head, _, old = text.partition(PIPELINE_HEADING)
    kept = {}
    for part in old.split("\n### ")[1:]:
        kept[part.split("\n", 1)[0]] = "### " + part.rstrip("\n")
    new = {}
    for part in "\n".join(section[2:]).split("\n### "):
        part = part if part.startswith("### ") else "### " + part
        if part.strip() != "###":
            new[part.split("\n", 1)[0][4:]] = part.rstrip("\n")
    kept.update(new)
    body = "\n\n".join(kept.values())
    path.write_text(head.rstrip("\n") + "\n\n" + PIPELINE_HEADING + "\n\n" + body + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="gpt,llama,moe,conv")
    parser.add_argument("--meshes", default="2x4,4x2,8")
    parser.add_argument("--hardware", default="h100,h100-2node")
    parser.add_argument("--size", default="small", choices=sorted(SIZES))
    parser.add_argument("--no-budget-runs", action="store_true")
    parser.add_argument("--pipeline", default="1024x512,2048x256",
                        help="GPT configurations d_model x seq for the pipeline rows, or none "
                             "(keep the rows the table has)")
    parser.add_argument("--pipeline-only", action="store_true",
                        help="run only the pipeline rows; keep the rest of the table")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" /
                                             "plan_quality.md"))
    args = parser.parse_args()
    # a fresh plan cache: nothing solved before this run is reused (run_case)
    os.environ["AUTOSHARD_CACHE_DIR"] = tempfile.mkdtemp(prefix="autoshard-plan-quality-")
    out = pathlib.Path(args.out)
    section = [] if args.pipeline == "none" else None
    if args.pipeline_only:
        replace_pipeline_section(out, pipeline_section(args.pipeline))
        print(f"wrote {out}")
        return
    rows, dp_peaks = [], {}
    old = out.read_text() if out.exists() else ""

    def write():   # after every case, so that a stopped run leaves the rows it measured
        write_table(rows, out, sys.argv[1:])
        if PIPELINE_HEADING in old:    # kept until replaced below
            out.write_text(out.read_text() + "\n" + old[old.index(PIPELINE_HEADING):])

    for name in args.models.split(","):
        model = load_model(name, args.size)
        for mesh_text in args.meshes.split(","):
            shape = tuple(int(x) for x in mesh_text.split("x"))
            for hw_name in args.hardware.split(","):
                for fraction in (None,) if args.no_budget_runs else (None, 0.5):
                    run_case(name, model, shape, hw_name, fraction, rows, dp_peaks)
                    write()
    if section is None:
        replace_pipeline_section(out, pipeline_section(args.pipeline))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
