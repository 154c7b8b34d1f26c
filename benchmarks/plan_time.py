"""Planning seconds by phase against layer count (issue 28), plan cache off, compile only.

    python benchmarks/plan_time.py [--gpt-layers 6,24,48] [--llama] [--loaded]
                                   [--out benchmarks/results/plan_time.md]

Rows: a GPT-2-medium-shaped AdamW train step (d=1024, 16 heads, FF 4096, seq 1024, batch 16,
vocab 50,304) on (2, 4) at each layer count; with ``--llama``, a LLaMA-2-7B-shaped step (d=4096,
32 heads, 8 KV heads, SwiGLU 11,008, seq 2,048, 32 layers, bf16 parameters) on (2, 4) and (8,),
each without a budget and under ``BUDGET_SHARE`` of the unbudgeted plan's predicted peak. Arguments are
ShapeDtypeStructs: nothing is allocated or run. Each row's seconds are split by the planner's
progress phases (trace, lift, pins, build + solve, lower; under a budget, "lower" includes
the compiles that check the compiled peak, and a re-plan below it counts there too). With ``--loaded`` every row is planned a
second time beside two CPU-bound processes and both plan digests are written: they must match,
as no decision may depend on wall-clock time. The table goes to ``--out`` and, where
playwright and Debian's chromium are installed, a PNG bar chart beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import html
import os
import pathlib
import shutil
import subprocess
import sys
import time

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import autoshard  # noqa: E402
import autoshard.progress as progress_module  # noqa: E402
from benchmarks.plan_quality import abstract_args, configured  # noqa: E402

GPT2_MEDIUM = dict(VOCAB=50304, D=1024, HEADS=16, FF=4096, SEQ=1024, BATCH=16)
LLAMA2_7B = dict(VOCAB=32000, D=4096, HEADS=32, KV_HEADS=8, FF=11008, SEQ=2048, BATCH=8,
                 HEAD_DIM=128, LAYERS=32)
#: The budgeted LLaMA rows' budget: this share of the same row's unbudgeted predicted peak.
BUDGET_SHARE = 0.5
SHOWN = {"tracing": "trace", "lifting": "lift", "pins": "pins", "solving": "build + solve",
         "lowering": "lower"}
COLOURS = {"trace": "#4e79a7", "lift": "#f28e2b", "pins": "#76b7b2", "build + solve": "#e15759",
           "lower": "#59a14f"}


@contextlib.contextmanager
def phase_clock(marks: list):
    """Record (phase, monotonic seconds) as the planner enters each progress phase."""
    original = progress_module.PlanningProgress.phase

    def recording(self, name, detail=""):
        marks.append((name, time.monotonic()))
        return original(self, name, detail)

    progress_module.PlanningProgress.phase = recording
    try:
        yield
    finally:
        progress_module.PlanningProgress.phase = original


def plan_once(name, config, mesh, budget, bf16=False):
    model = configured(name, config)  # set here: the rows share one module
    args = abstract_args(model)
    if bf16:                          # bf16 parameters, and the optimizer state made from them
        params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jax.numpy.bfloat16),
                              args[0])
        args = (params, jax.eval_shape(model.tx.init, params), args[2])
    marks = [("tracing", time.monotonic())]
    with phase_clock(marks), open(os.devnull, "w") as quiet, \
            contextlib.redirect_stderr(quiet):
        step = autoshard.compile(model.train_step, *args, mesh=mesh, cache=False,
                                 memory_budget=budget, progress=True)
    end = time.monotonic()
    seconds = dict.fromkeys(SHOWN.values(), 0.0)
    for (name, at), (_, until) in zip(marks, [*marks[1:], ("end", end)]):
        key = SHOWN.get(name, "lower")     # "done": the plan record, after lowering
        seconds[key] += until - at
    return step, seconds, end - marks[0][1]


@contextlib.contextmanager
def cpu_load(processes: int):
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for _ in range(processes)]
    try:
        yield
    finally:
        for p in busy:
            p.kill()
            p.wait()


def rows(args):
    out = []
    mesh24 = jax.make_mesh((2, 4), ("data", "model"))
    for layers in [int(n) for n in args.gpt_layers.split(",") if n]:
        out.append((f"GPT-2-medium x{layers}", "gpt", dict(GPT2_MEDIUM, LAYERS=layers),
                    layers, mesh24, "2x4", None))
    if args.llama:
        mesh8 = jax.make_mesh((8,), ("data",))
        for mesh, text in ((mesh24, "2x4"), (mesh8, "8")):
            # unbudgeted, then under BUDGET_SHARE of the unbudgeted plan's predicted peak
            out.append(("LLaMA-2-7B shape", "llama", LLAMA2_7B, 32, mesh, text, None))
            out.append(("LLaMA-2-7B shape", "llama", LLAMA2_7B, 32, mesh, text, BUDGET_SHARE))
    return out


def chart(table: list[dict], path: pathlib.Path) -> bool:
    """A stacked bar per row (seconds by phase), as an SVG page screenshotted to ``path``."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return False
    if shutil.which("chromium") is None:
        return False
    width, bar, gap, left = 760, 26, 12, 190
    top = max(r["total"] for r in table) or 1.0
    scale = (width - left - 60) / top
    height = 60 + len(table) * (bar + gap)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             'font-family="sans-serif" font-size="12">',
             '<text x="10" y="20" font-size="14">planning seconds by phase '
             '(plan cache off, this machine)</text>']
    for i, name in enumerate(COLOURS):
        parts.append(f'<rect x="{left + i * 120}" y="30" width="12" height="12" '
                     f'fill="{COLOURS[name]}"/><text x="{left + i * 120 + 16}" y="41">'
                     f'{html.escape(name)}</text>')
    for i, r in enumerate(table):
        y = 55 + i * (bar + gap)
        parts.append(f'<text x="10" y="{y + 17}">{html.escape(r["label"])}</text>')
        x = left
        for name, colour in COLOURS.items():
            w = r["seconds"][name] * scale
            parts.append(f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{bar}" '
                         f'fill="{colour}"/>')
            x += w
        parts.append(f'<text x="{x + 6:.1f}" y="{y + 17}">{r["total"]:.1f} s</text>')
    parts.append("</svg>")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=shutil.which("chromium"), headless=True,
                                     args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": width, "height": height})
        page.set_content("<body style='margin:0;background:white'>" + "".join(parts))
        page.screenshot(path=str(path))
        browser.close()
    return True


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpt-layers", default="6,24,48")
    parser.add_argument("--llama", action="store_true")
    parser.add_argument("--loaded", action="store_true",
                        help="plan each row again beside two CPU-bound processes")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "plan_time.md"))
    args = parser.parse_args()
    table = []
    lines = ["| step | layers | mesh | budget | trace s | lift s | pins s | build + solve s "
             "| lower s | total s | nodes | plan outcome | digest | digest, loaded (s) |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|"]
    peaks = {}
    for label, name, config, layers, mesh, mesh_text, share in rows(args):
        bf16 = name == "llama"
        budget = None if share is None else int(share * peaks[(label, mesh_text)])
        step, seconds, total = plan_once(name, config, mesh, budget, bf16)
        if budget is None and step.plan.prediction is not None:
            peaks[(label, mesh_text)] = step.plan.prediction.peak_memory_bytes
        loaded = ""
        if args.loaded:
            with cpu_load(2):
                again, _, loaded_total = plan_once(name, config, mesh, budget, bf16)
            same = "same" if again.plan_digest == step.plan_digest else "DIFFERENT"
            loaded = f"{again.plan_digest[:12]} {same} ({loaded_total:.1f})"
        row = dict(label=f"{label} on {mesh_text}" + ("" if budget is None else ", budget"),
                   seconds=seconds, total=total)
        table.append(row)
        nodes = step.plan.solver.nodes if step.plan.solver is not None else ""
        outcome = step.plan.solver.outcome if step.plan.solver is not None else step.plan.method
        shown = "none" if budget is None else f"{budget / 2**30:.1f} GiB ({share:.0%} of none's)"
        line = (f"| {label} | {layers} | {mesh_text} | {shown} | "
                + " | ".join(f"{seconds[k]:.1f}" for k in COLOURS)
                + f" | {total:.1f} | {nodes} | {outcome} | {step.plan_digest[:12]} | {loaded} |")
        lines.append(line)
        print(line, flush=True)
    out = pathlib.Path(args.out)
    png = out.with_suffix(".png")
    drawn = chart(table, png)
    header = [f"# Planning time by phase ({time.strftime('%Y-%m-%d')}, "
              f"{os.cpu_count()} cores, jax {jax.__version__})", "",
              f"`python benchmarks/plan_time.py --gpt-layers {args.gpt_layers}"
              + (" --llama" if args.llama else "") + (" --loaded" if args.loaded else "")
              + "`", "", "Seconds from `autoshard.compile` with the plan cache off, split by "
              "the planner's progress phases; \"nodes\" are the solver's choices.", ""]
    out.write_text("\n".join(header + lines + ([""] + [f"![plan time]({png.name})"]
                                                if drawn else []) + [""]))
    print(f"wrote {out}" + (f" and {png}" if drawn else ""))


if __name__ == "__main__":
    main()
