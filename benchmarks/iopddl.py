"""IOPDDL contest benchmark: every instance in ../shared/iopddl at its contest timeout.

    python benchmarks/iopddl.py [--timeout-scale 1.0] [--only B,G,V] [--dir PATH] [--out FILE]

Each instance runs as ``python -m autoshard.solver.iopddl FILE --timeout T`` in a fresh process
(so loading counts against the timeout, as in the contest); the answer is then checked here with
``evaluate``. Writes benchmarks/results/iopddl.md: cost, feasible, seconds, best known, XLA's
cost where published, cost / best known and their geometric mean.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import platform
import re
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from autoshard.solver.solve import evaluate, load_iopddl  # noqa: E402

DEFAULT_DIR = ROOT.parent / "shared" / "iopddl"


def _number(cell: str) -> int | None:
    digits = re.sub(r"[^0-9]", "", cell.split("(")[0])
    return int(digits) if digits else None


def read_table(readme: pathlib.Path) -> dict[str, dict]:
    """Timeouts, best-known and XLA costs from the instances' README tables."""
    info: dict[str, dict] = {}
    for line in readme.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not re.fullmatch(r"[A-Z]", cells[0]):
            continue
        row = info.setdefault(cells[0], {})
        if cells[-1].endswith(" s"):
            row["timeout"] = float(cells[-1][:-2])
        else:
            row["best"] = _number(cells[1])
            row["xla"] = _number(cells[2]) if len(cells) > 2 else None
    return info


def run_one(path: pathlib.Path, timeout: float) -> dict:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "autoshard.solver.iopddl", str(path),
                           "--timeout", str(timeout)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout * 2 + 60)
    wall = time.monotonic() - start
    try:
        out = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"error": (proc.stderr or proc.stdout)[-500:], "wall": wall}
    out["wall"] = wall
    if out.get("solution") is not None:
        ev = evaluate(load_iopddl(path), out["solution"])
        out["checked_cost"], out["checked_feasible"] = ev.cost, ev.feasible and ev.forbidden == 0
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout-scale", type=float, default=1.0)
    parser.add_argument("--only", default="", help="comma-separated instance letters")
    parser.add_argument("--dir", type=pathlib.Path, default=DEFAULT_DIR)
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "benchmarks" / "results" /
                        "iopddl.md")
    args = parser.parse_args()
    info = read_table(args.dir / "README.md")
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    rows, ratios = [], []
    for letter in sorted(info):
        path = args.dir / f"asplos-2025-iopddl-{letter}.json.gz"
        if (only and letter not in only) or not path.exists() or "timeout" not in info[letter]:
            continue
        timeout = info[letter]["timeout"] * args.timeout_scale
        res = run_one(path, timeout)
        best, xla = info[letter].get("best"), info[letter].get("xla")
        cost = res.get("checked_cost")
        ok = bool(res.get("checked_feasible"))
        ratio = cost / best if ok and best else None
        if ratio is not None:
            ratios.append(ratio)
        rows.append((letter, cost, ok, res["wall"], timeout, best, xla, ratio,
                     res.get("lower_bound"), res.get("stats", {}).get("nodes_after"),
                     res.get("stats", {}).get("engine"), res.get("error")))
        print(f"{letter}: cost {cost} feasible {ok} {res['wall']:.1f}s / {timeout:.0f}s "
              f"ratio {ratio}", flush=True)
        _write(args, rows, ratios)
    return 0


def _fmt(x) -> str:
    return "" if x is None else f"{x:,.0f}"


def _write(args, rows, ratios) -> None:
    geo = math.exp(sum(map(math.log, ratios)) / len(ratios)) if ratios else float("nan")
    lines = [
        "# IOPDDL contest instances",
        "",
        f"`python benchmarks/iopddl.py --timeout-scale {args.timeout_scale:g}"
        f"{' --only ' + args.only if args.only else ''}` on {platform.node() or 'this machine'} "
        f"({platform.processor() or platform.machine()}, 2 CPU cores; CP-SAT with 2 workers, "
        f"contest mode: wall-clock limits, loading included in the timeout). Costs are "
        f"re-checked with `evaluate`.",
        "",
        "| instance | cost | feasible | seconds / timeout | best known | XLA | cost / best "
        "| lower bound | core nodes | engine |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for (letter, cost, ok, wall, timeout, best, xla, ratio, lb, core, engine, err) in rows:
        lines.append(f"| {letter} | {_fmt(cost)} | {'yes' if ok else 'NO'} | {wall:.1f} / "
                     f"{timeout:.0f} | {_fmt(best)} | {_fmt(xla)} | "
                     f"{'' if ratio is None else f'{ratio:.4f}'} | {_fmt(lb)} | "
                     f"{'' if core is None else core} | {engine or err or ''} |")
    beat_xla = [r for r in rows if r[6] and r[1] is not None and r[2] and r[1] <= r[6]]
    with_xla = [r for r in rows if r[6]]
    lines += ["", f"Geometric mean of cost / best known over {len(ratios)} feasible instances: "
              f"**{geo:.4f}**.", "",
              f"Feasible within the timeout: {sum(1 for r in rows if r[2] and r[3] <= r[4])} "
              f"of {len(rows)}. At or below XLA's published cost: {len(beat_xla)} of "
              f"{len(with_xla)}.", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
