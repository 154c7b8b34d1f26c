"""Plans compiled by XLA's GPU backend: do the predictions hold there too?

Every other benchmark measures plans from executables compiled for the CPU devices this machine
simulates. A GPU build partitions the same sharded program but fuses, combines collectives and
assigns buffers its own way; this checks the plans against it, in three steps:

    python benchmarks/gpu_check.py export DIR       # here: plan, compile for CPU, export for cuda
    python benchmarks/gpu_check.py compile DIR OUT  # on a machine with one GPU and jax[cuda]
    python benchmarks/gpu_check.py report DIR OUT   # here: writes benchmarks/results/gpu_check.md

``export`` plans each configuration, records the plan's predictions and the CPU executable's
measures, and serializes the planned program with ``jax.export`` (needs ``flatbuffers``).
``compile`` needs no autoshard (only jax with CUDA): it compiles each sharded export for 8 GPUs
that jax mocks on the one it has (``jax_mock_gpu_topology`` 1x8x1: eight one-GPU processes, the
collectives planned but never run), keeping ``memory_analysis()`` and the HLO text, and times the
single-device steps on the real GPU. Shared autotuning waits for the mocked processes, so it is
off there, and autotuning with it (it picks kernels, not buffers or collectives).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
MOCK_TOPOLOGY = "1x8x1"
MOCK_XLA_FLAGS = "--xla_gpu_shard_autotuning=false --xla_gpu_autotune_level=0"

# name: (model, mesh shape or None for one device, hardware, budget GiB or None, planner)
CONFIGS = {
    "gpt2m_2x4": ("gpt2-medium", (2, 4), "h100", None, "search"),
    "gpt_2x4_h100": ("gpt", (2, 4), "h100", None, "search"),
    "gpt_2x4_h100_dp": ("gpt", (2, 4), "h100", None, "data parallel"),
    "gpt_2x4_h100_budget": ("gpt", (2, 4), "h100", 0.196, "search"),
    "moe_4x2_h100": ("moe", (4, 2), "h100", None, "search"),
    "llama_2x4_2node": ("llama", (2, 4), "h100-2node", None, "search"),
    "conv_4x2_2node_budget": ("conv", (4, 2), "h100-2node", 0.018, "search"),
    "gpt_1dev": ("gpt", None, "h100", None, "one device"),
    "gpt2m_1dev": ("gpt2-medium", None, "h100", None, "one device"),
}


# -- export (here) ------------------------------------------------------------------------------

def _model(name):
    """(step function, abstract arguments) of a plan-quality model or GPT-2-medium (as
    benchmarks/run.py plans it)."""
    import jax
    import optax
    if name == "gpt2-medium":
        sys.path.insert(0, str(ROOT / "examples"))
        import gpt as example
        params = jax.eval_shape(lambda k: example.init_params(
            k, vocab=50304, d_model=1024, n_heads=16, n_layers=24, seq_len=1024),
            jax.random.key(0))
        optimizer = optax.adamw(1e-4)
        batch = {"inputs": jax.ShapeDtypeStruct((8, 1024), "int32"),
                 "targets": jax.ShapeDtypeStruct((8, 1024), "int32")}
        return (example.make_train_step(optimizer, 16),
                (params, jax.eval_shape(optimizer.init, params), batch))
    import plan_quality as pq
    model = pq.load_model(name, "small")
    return model.train_step, pq.abstract_args(model)


def export(out: pathlib.Path, only: list[str] | None) -> None:
    if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + " --xla_force_host_platform_device_count=8").strip()
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import jax
    from jax.sharding import PartitionSpec as P

    import autoshard
    from autoshard.measure.hlo import hlo_stats
    from autoshard.measure.verify import peak_memory
    from tests.models import plans

    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    for name, (model, shape, hw, budget, planner) in CONFIGS.items():
        if only and name not in only:
            continue
        fn, args = _model(model)
        leaves, tree = jax.tree_util.tree_flatten(args)
        rec = dict(model=model, shape=shape, hw=hw, budget_gib=budget, planner=planner)
        start = time.perf_counter()
        if shape is None:
            # flat in and out: jax.export serializes no optax state classes
            program = jax.jit(lambda *xs: jax.tree_util.tree_leaves(
                fn(*jax.tree_util.tree_unflatten(tree, xs))))
        else:
            mesh = jax.make_mesh(shape, ("data", "model")[:len(shape)])
            if planner == "data parallel":
                specs = plans.data_parallel(mesh, *args)
                step = autoshard.compile(fn, *args, mesh=mesh, planner="data-parallel",
                                         in_specs=specs, out_specs=(specs[0], specs[1], P()))
            else:
                step = autoshard.compile(
                    fn, *args, mesh=mesh, hardware=hw, cache=False,
                    memory_budget=None if budget is None else int(budget * 2**30))
                p = step.plan.prediction
                rec.update(predicted_peak=p.peak_memory_bytes,
                           predicted_bytes=sum(b for _, b in p.collectives.values()))
            lowered = step._planned(args).lowered_plan
            program = jax.jit(lowered.fn, in_shardings=lowered.in_shardings,
                              out_shardings=lowered.out_shardings)
            compiled = program.lower(*leaves).compile()
            stats = hlo_stats(compiled.as_text())
            rec.update(cpu_peak=peak_memory(compiled), cpu_count=dict(stats.count),
                       cpu_bytes=stats.total_bytes, cpu_flops=sum(stats.matmul_flops.values()))
        exported = jax.export.export(program, platforms=["cuda"])(*leaves)
        (out / f"{name}.bin").write_bytes(exported.serialize())
        rec["export_s"] = round(time.perf_counter() - start, 1)
        meta[name] = rec
        meta_path.write_text(json.dumps(meta, indent=1))
        print(name, rec, flush=True)


# -- compile (on the GPU machine) ---------------------------------------------------------------

def compile_exports(src: pathlib.Path, out: pathlib.Path, mode: str | None) -> None:
    if mode is None:  # one process per mode: the mocked topology is fixed when jax starts
        for child in ("sharded", "one device"):
            env = dict(os.environ)
            if child == "sharded":
                env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + MOCK_XLA_FLAGS).strip()
            subprocess.run([sys.executable, __file__, "compile", str(src), str(out),
                            "--mode", child], env=env, check=False)
        return
    import jax
    import numpy as np
    if mode == "sharded":
        jax.config.update("jax_mock_gpu_topology", MOCK_TOPOLOGY)
    out.mkdir(parents=True, exist_ok=True)
    meta = json.loads((src / "meta.json").read_text())
    results_path = out / f"results_{mode.replace(' ', '_')}.json"
    results = {}
    print(mode, jax.__version__, jax.devices()[0].device_kind, jax.device_count(), "devices",
          flush=True)
    for name in sorted(meta, key=lambda n: meta[n]["model"] == "gpt2-medium"):
        rec = meta[name]
        if (rec["shape"] is None) != (mode == "one device"):
            continue
        try:
            exported = jax.export.deserialize((src / f"{name}.bin").read_bytes())
            avals = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in exported.in_avals]
            start = time.perf_counter()
            if rec["shape"] is None:
                program = jax.jit(exported.call)
            else:
                shape = tuple(rec["shape"])
                mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(shape),
                                         ("data", "model")[:len(shape)])
                program = jax.jit(exported.call, in_shardings=exported.in_shardings_jax(mesh),
                                  out_shardings=exported.out_shardings_jax(mesh))
            compiled = program.lower(*avals).compile()
            m = compiled.memory_analysis()
            r = dict(compile_s=round(time.perf_counter() - start, 1),
                     device_kind=jax.devices()[0].device_kind,
                     peak=m.argument_size_in_bytes + m.output_size_in_bytes
                     + m.temp_size_in_bytes - m.alias_size_in_bytes)
            (out / f"{name}.hlo").write_text(compiled.as_text())
            if rec["shape"] is None:
                rng = np.random.default_rng(0)
                # positive floats (AdamW's second moments), zero ints (token ids, step counts)
                inputs = [jax.device_put(
                    rng.uniform(0, 0.02, a.shape).astype(a.dtype)
                    if np.issubdtype(a.dtype, np.floating) else np.zeros(a.shape, a.dtype))
                    for a in avals]
                for _ in range(3):
                    jax.block_until_ready(compiled(*inputs))
                times = []
                for _ in range(10):
                    start = time.perf_counter()
                    jax.block_until_ready(compiled(*inputs))
                    times.append(time.perf_counter() - start)
                r["step_ms"] = sorted(times)[len(times) // 2] * 1e3
            results[name] = r
        except Exception as err:  # keep going: one configuration's failure is a finding
            results[name] = dict(error=f"{type(err).__name__}: {err}"[:2000])
        print(name, results[name], flush=True)
        results_path.write_text(json.dumps(results, indent=1))


# -- report (here) ------------------------------------------------------------------------------

def report(src: pathlib.Path, gpu: pathlib.Path) -> None:
    sys.path.insert(0, str(ROOT))
    from autoshard.cost_model.hardware import get_hardware
    from autoshard.measure.hlo import hlo_stats, measured_step

    meta = json.loads((src / "meta.json").read_text())
    results = {}
    for path in sorted(gpu.glob("results_*.json")):
        results.update(json.loads(path.read_text()))
    mib, gib = 2**20, 2**30
    sharded = ["| configuration | planner | predicted / CPU / GPU peak GiB | predicted / GPU peak "
               "| predicted / CPU / GPU collective MiB | CPU / GPU collective ops | CPU / GPU "
               "matmul GFLOP |", "|---|---|---|---|---|---|---|"]
    single = ["| step | GPU ms (median of 10) | roofline ms on h100 from the GPU executable: "
              "matmul / all kernels | all kernels / GPU |", "|---|---|---|---|"]
    for name, rec in meta.items():
        r = results.get(name)
        if r is None or "error" in r:
            (single if rec["shape"] is None else sharded).append(
                f"| {name} | {(r or {}).get('error', 'not compiled')[:100]} |")
            continue
        stats = hlo_stats((gpu / f"{name}.hlo").read_text())
        if rec["shape"] is None:
            roof = measured_step(stats, get_hardware("h100"))
            single.append(f"| {name} | {r['step_ms']:.2f} | {roof.step_seconds * 1e3:.2f} / "
                          f"{roof.full_step_seconds * 1e3:.2f} | "
                          f"{roof.full_step_seconds * 1e3 / r['step_ms']:.2f} |")
            continue
        pred = rec.get("predicted_peak")
        ops = lambda count: " ".join(f"{k} {v}" for k, v in sorted(count.items()))  # noqa: E731
        if pred is None:
            predicted_peak = ratio = predicted_bytes = "-"
        else:
            predicted_peak, ratio = f"{pred / gib:.3f}", f"{pred / r['peak']:.3f}"
            predicted_bytes = f"{rec['predicted_bytes'] / mib:.1f}"
        gpu_flops = sum(stats.matmul_flops.values())
        sharded.append(
            f"| {name} | {rec['planner']} | {predicted_peak} / {rec['cpu_peak'] / gib:.3f} / "
            f"{r['peak'] / gib:.3f} | {ratio} | {predicted_bytes} / {rec['cpu_bytes'] / mib:.1f} "
            f"/ {stats.total_bytes / mib:.1f} | {ops(rec['cpu_count'])} / {ops(stats.count)} | "
            f"{rec['cpu_flops'] / 1e9:.2f} / {gpu_flops / 1e9:.2f} |")
    kind = next((r for r in results.values() if "device_kind" in r), {}).get("device_kind", "")
    text = "\n".join([
        "# Plans compiled by XLA's GPU backend", "",
        "Commands: `python benchmarks/gpu_check.py export DIR` on this machine, "
        f"`python benchmarks/gpu_check.py compile DIR OUT` on a machine with one {kind} and "
        "jax with CUDA, then `python benchmarks/gpu_check.py report DIR OUT` here (module "
        "docstring). Sharded programs: compiled for "
        f"8 mocked GPUs ({MOCK_TOPOLOGY}); peaks from `memory_analysis()`, collectives and "
        "matmul FLOPs from the HLO text (measure/hlo.py, the same parser as for the CPU "
        "executables).", "", *sharded, "",
        "One-device steps, run on the GPU (fp32, jax's default precision):", "", *single, ""])
    path = ROOT / "benchmarks" / "results" / "gpu_check.md"
    path.write_text(text)
    print(text)


def main() -> None:
    import argparse
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("export")
    p.add_argument("dir", type=pathlib.Path)
    p.add_argument("--only", help="comma-separated configuration names")
    p = sub.add_parser("compile")
    p.add_argument("dir", type=pathlib.Path)
    p.add_argument("out", type=pathlib.Path)
    p.add_argument("--mode", choices=["sharded", "one device"])
    p = sub.add_parser("report")
    p.add_argument("dir", type=pathlib.Path)
    p.add_argument("out", type=pathlib.Path)
    args = parser.parse_args()
    if args.command == "export":
        export(args.dir, args.only.split(",") if args.only else None)
    elif args.command == "compile":
        compile_exports(args.dir, args.out, args.mode)
    else:
        report(args.dir, args.out)


if __name__ == "__main__":
    main()
