"""Foundation benchmark: trace + lift + plan time and the compiled program's collectives and
memory, for GPT-2-sized train steps planned from ShapeDtypeStructs (nothing is allocated).

    python benchmarks/run.py [--layers 24] [--d-model 1024] [--seq 1024] [--batch 8]
                             [--mesh 2,4] [--no-compile]

Writes benchmarks/results/gpt2_medium_<planner>.md.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import optax  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import gpt as example  # noqa: E402

import autoshard  # noqa: E402
from autoshard.cost_model.hardware import get_hardware  # noqa: E402
from autoshard.measure.hlo import hlo_stats, measured_step  # noqa: E402
from autoshard.measure.verify import peak_memory  # noqa: E402


def abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--mesh", default="2,4")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--planner", default="search", choices=["search", "data-parallel"])
    args = parser.parse_args()

    shape = tuple(int(s) for s in args.mesh.split(","))
    mesh = jax.make_mesh(shape, ("data", "model")[: len(shape)])
    params = jax.eval_shape(lambda k: example.init_params(
        k, vocab=args.vocab, d_model=args.d_model, n_heads=args.heads, n_layers=args.layers,
        seq_len=args.seq), jax.random.key(0))
    optimizer = optax.adamw(1e-4)
    opt_state = jax.eval_shape(optimizer.init, params)
    batch = {"inputs": jax.ShapeDtypeStruct((args.batch, args.seq), "int32"),
             "targets": jax.ShapeDtypeStruct((args.batch, args.seq), "int32")}
    step_fn = example.make_train_step(optimizer, args.heads)

    step = autoshard.compile(step_fn, abstract(params), abstract(opt_state), batch, mesh=mesh,
                             planner=args.planner, cache=False)  # time the solve
    plan_s = step.planning_seconds
    graph = step.graph
    rows = [("model", f"GPT d={args.d_model} layers={args.layers} seq={args.seq} "
                      f"batch={args.batch} vocab={args.vocab}, AdamW"),
            ("mesh", str(autoshard.MeshSpec.from_jax(mesh))),
            ("graph nodes (incl. regions)", f"{graph.num_nodes():,}"),
            ("trace + lift + plan + lower (s)", f"{plan_s:.2f}"),
            ("plan method", step.plan.method)]
    if step.plan.prediction is not None:
        p, sv = step.plan.prediction, step.plan.solver
        rows += [("predicted step (ms, h100)", f"{p.step_seconds * 1e3:.2f}"),
                 ("predicted peak memory (GiB/device)", f"{p.peak_memory_bytes / 2**30:.2f}"),
                 ("solver", f"{sv.engine}, {sv.nodes} choices / {sv.strategies} strategies, "
                            f"{sv.seconds:.1f} s, status {sv.status}, gap {sv.gap}")]
    if not args.no_compile:
        start = time.perf_counter()
        compiled = step.lower(params, opt_state, batch).compile()
        rows.append(("XLA lower + compile (s)", f"{time.perf_counter() - start:.1f}"))
        stats = hlo_stats(compiled.as_text())
        measured = measured_step(stats, get_hardware("h100"))
        rows.append(("compiled roofline step on h100 (ms): matmul+collectives / all kernels",
                     f"{measured.step_seconds * 1e3:.2f} / {measured.full_step_seconds * 1e3:.2f}"))
        for kind in sorted(stats.count):
            rows.append((f"compiled {kind}", f"{stats.count[kind]} ops, "
                                             f"{stats.bytes[kind] / 2**20:.1f} MiB/device"))
        if step.plan.prediction is not None:
            predicted = sum(b for _, b in step.plan.prediction.collectives.values())
            rows.append(("collective bytes per device: predicted / compiled (MiB)",
                         f"{predicted / 2**20:.1f} / {stats.total_bytes / 2**20:.1f} "
                         f"(ratio {predicted / max(stats.total_bytes, 1):.2f})"))
            rows.append(("peak memory per device: predicted / compiled (GiB)",
                         f"{step.plan.prediction.peak_memory_bytes / 2**30:.2f} / "
                         f"{peak_memory(compiled) / 2**30:.2f}"))
        mem = compiled.memory_analysis()
        if mem is not None:
            peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                    + mem.temp_size_in_bytes - mem.alias_size_in_bytes)
            rows.append(("compiled memory: args / temps / peak (GiB/device)",
                         f"{mem.argument_size_in_bytes / 2**30:.2f} / "
                         f"{mem.temp_size_in_bytes / 2**30:.2f} / {peak / 2**30:.2f}"))
    table = "| measure | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    print(table)
    out = ROOT / "benchmarks" / "results" / f"gpt2_medium_{args.planner}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"# GPT-2-medium train step, planner={args.planner}\n\nCommand: `python benchmarks/run.py "
                   + " ".join(sys.argv[1:]) + "` on " + jax.devices()[0].device_kind
                   + f" ({len(jax.devices())} simulated devices), jax {jax.__version__}.\n\n"
                   + table + "\n")


if __name__ == "__main__":
    main()
