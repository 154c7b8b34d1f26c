"""Viewer benchmark: dump the 24-layer GPT-2-medium plan (planned from ShapeDtypeStructs, as
benchmarks/run.py does) and measure plan.json / index.html sizes, the time ``explain`` adds to
planning, and the page's load time in headless Chromium until it is interactive (the op graph
open, a node's panel shown).

    python benchmarks/dump_size.py [--layers 24] [--out /tmp/gpt2_medium_dump]

Writes benchmarks/results/dump_gpt2_medium.md and benchmarks/results/viewer_gpt2_medium.png.
Needs Debian's chromium and ``pip install playwright`` for the page timing.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import sys
import time

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("AUTOSHARD_CACHE", "0")

import jax  # noqa: E402
import optax  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import gpt as example  # noqa: E402

import autoshard  # noqa: E402
from autoshard.passes import chosen_plan  # noqa: E402

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]


def page_timing(directory: pathlib.Path, screenshot: pathlib.Path) -> dict:
    """Seconds from navigation to the first tab drawn, to the op graph's first layer open and
    a node's panel shown; console errors and requests seen."""
    from playwright.sync_api import sync_playwright

    errors, requests = [], []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=shutil.which("chromium"), headless=True,
                                     args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: requests.append(r.url))
        start = time.perf_counter()
        page.goto(f"file://{directory.resolve()}/index.html")
        page.wait_for_selector("body[data-ready='1']")
        ready = time.perf_counter() - start
        start = time.perf_counter()
        page.click("[data-tab=graph]")
        page.click('#tree > .group[data-group="blocks[3]"] > .head')
        page.click("#tree > .group.open .group > .head >> nth=0")
        page.click("#tree .group.open .group.open .group > .head >> nth=0")
        page.click("#tree .node >> nth=0")
        page.wait_for_selector("#panel-strategy")
        click = time.perf_counter() - start
        page.screenshot(path=str(screenshot))
        browser.close()
    return {"ready": ready, "click": click, "errors": errors, "requests": requests}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--out", default="/tmp/gpt2_medium_dump")
    args = parser.parse_args()

    mesh = jax.make_mesh((2, 4), ("data", "model"))
    params = jax.eval_shape(lambda k: example.init_params(
        k, vocab=50304, d_model=1024, n_heads=16, n_layers=args.layers, seq_len=1024),
        jax.random.key(0))
    optimizer = optax.adamw(1e-4)
    opt_state = jax.eval_shape(optimizer.init, params)
    batch = {"inputs": jax.ShapeDtypeStruct((8, 1024), "int32"),
             "targets": jax.ShapeDtypeStruct((8, 1024), "int32")}
    explain_seconds = []
    explain = chosen_plan.explain

    def timed_explain(*a, **k):
        start = time.perf_counter()
        out = explain(*a, **k)
        explain_seconds.append(time.perf_counter() - start)
        return out

    chosen_plan.explain = timed_explain
    step = autoshard.compile(example.make_train_step(optimizer, 16), params, opt_state, batch,
                             mesh=mesh, cache=False)  # time the solve, not a cache hit
    chosen_plan.explain = explain
    out = pathlib.Path(args.out)
    start = time.perf_counter()
    autoshard.dump(step, out)
    dump_s = time.perf_counter() - start
    start = time.perf_counter()
    loaded = autoshard.load_plan(out)
    load_s = time.perf_counter() - start
    results = ROOT / "benchmarks" / "results"
    shot = results / "viewer_gpt2_medium.png"
    timing = page_timing(out, shot)
    mib = 2.0 ** 20
    rows = [("model", f"GPT-2-medium, {args.layers} layers, AdamW, mesh (data=2, model=4)"),
            ("ops in the plan (nodes, loop bodies included)", f"{len(loaded.nodes):,}"),
            ("arguments", f"{len(loaded.inputs):,}"),
            ("trace + lift + plan + lower (s)", f"{step.planning_seconds:.2f}"),
            ("of which explain (per-op costs and alternatives) (s)",
             f"{sum(explain_seconds):.2f}"),
            ("autoshard.dump (s)", f"{dump_s:.2f}"),
            ("autoshard.load_plan (s)", f"{load_s:.2f}"),
            ("plan.json (MiB)", f"{(out / 'plan.json').stat().st_size / mib:.2f}"),
            ("index.html, plan inlined (MiB)", f"{(out / 'index.html').stat().st_size / mib:.2f}"),
            ("Chromium: navigation to first tab drawn (s)", f"{timing['ready']:.2f}"),
            ("Chromium: open op graph, expand a layer, click an op, panel shown (s)",
             f"{timing['click']:.2f}"),
            ("console errors / requests besides the page", f"{len(timing['errors'])} / "
             f"{len([u for u in timing['requests'] if not u.endswith('index.html')])}")]
    table = "| measure | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    print(table)
    (results / "dump_gpt2_medium.md").write_text(
        "# Plan dump of the GPT-2-medium train step\n\nCommand: `python benchmarks/dump_size.py "
        + " ".join(sys.argv[1:]) + f"` ({len(jax.devices())} simulated CPU devices, jax "
        f"{jax.__version__}, headless Debian chromium). Screenshot: "
        f"`benchmarks/results/{shot.name}`.\n\n" + table + "\n")


if __name__ == "__main__":
    main()
