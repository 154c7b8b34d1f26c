"""Plan digests of the plan-quality rows: one searched plan per (model, mesh, hardware, budget),
its decisions digest and planning seconds, nothing compiled but what the planner compiles itself.

    python benchmarks/plan_digests.py [--models gpt,llama,moe,conv] [--meshes 2x4,4x2,8]
                                      [--hardware h100,h100-2node] [--out FILE]

A refactor that must not change behaviour prints the same digests before and after; two runs on
an idle and on a loaded machine must too. Budgets are the ones in
benchmarks/results/plan_quality.md (read from its table, so no hand plan is compiled here).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import sys
import time

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import autoshard  # noqa: E402
from benchmarks.plan_quality import abstract_args, load_model  # noqa: E402

TABLE = ROOT / "benchmarks" / "results" / "plan_quality.md"


def table_budgets(path: pathlib.Path) -> dict[tuple[str, str, str], float]:
    """(model, mesh, hardware) -> budget GiB of the budgeted rows of the plan-quality table."""
    budgets = {}
    row = re.compile(r"^\| (\w+) \| ([0-9x]+) \| ([\w-]+) \| ([0-9.]+) \| ")
    for line in path.read_text().splitlines():
        match = row.match(line)
        if match:
            budgets[match.group(1, 2, 3)] = float(match.group(4))
    return budgets


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="gpt,llama,moe,conv")
    parser.add_argument("--meshes", default="2x4,4x2,8")
    parser.add_argument("--hardware", default="h100,h100-2node")
    parser.add_argument("--out", default=None, help="also write the lines to this file")
    args = parser.parse_args()
    budgets = table_budgets(TABLE)
    lines = [f"# plan digests, autoshard from {pathlib.Path(autoshard.__file__).parent}"]
    print(lines[0], flush=True)
    for name in args.models.split(","):
        model = load_model(name, "small")
        example = abstract_args(model)
        for mesh_text in args.meshes.split(","):
            shape = tuple(int(x) for x in mesh_text.split("x"))
            mesh = jax.make_mesh(shape, ("data",) if len(shape) == 1 else ("data", "model"))
            for hw in args.hardware.split(","):
                for budget_gib in (None, budgets.get((name, mesh_text, hw))):
                    budget = None if budget_gib is None else int(budget_gib * 2**30)
                    start = time.perf_counter()
                    try:
                        step = autoshard.compile(model.train_step, *example, mesh=mesh,
                                                 hardware=hw, memory_budget=budget, cache=False)
                        digest = step.plan_digest[:16]
                    except Exception as err:  # reported, compared like a digest
                        digest = f"{type(err).__name__}: {str(err)[:60]}"
                    line = (f"{name:6} {mesh_text:4} {hw:10} budget={budget_gib} {digest} "
                            f"({time.perf_counter() - start:.1f} s)")
                    lines.append(line)
                    print(line, flush=True)
    if args.out:
        pathlib.Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
