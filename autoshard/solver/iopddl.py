"""``autoshard iopddl FILE [--timeout S]``: solve one IOPDDL contest instance in contest mode.

Prints JSON ``{"solution": [...], "cost": ..., "feasible": ..., "seconds": ..., ...}``. The
timeout covers everything from start to output (loading a 65k-node instance takes a few seconds
in Python), so the solver gets what is left after loading, less a margin for mapping the answer
back, checking it and printing it. Also runnable as ``python -m autoshard.solver.iopddl``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from autoshard.ir.errors import PlanInfeasibleError
from autoshard.solver.solve import load_iopddl, solve

#: Seconds kept back from the timeout for expansion, evaluation and output, plus a fraction.
MARGIN_S = 1.0
MARGIN_FRACTION = 0.04


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="autoshard iopddl",
                                               description=__doc__.splitlines()[0])
    parser.add_argument("file", help="an IOPDDL problem, .json or .json.gz")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds for the whole run, loading included (default 60)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="CP-SAT workers (default 2)")
    parser.add_argument("--deterministic", action="store_true",
                        help="deterministic time limits (same answer every run) instead of "
                             "wall-clock ones; the wall time then only roughly matches --timeout")
    parser.add_argument("--verbose", action="store_true", help="progress on stderr")
    return parser


def run(args: argparse.Namespace) -> int:
    start = time.monotonic()
    problem = load_iopddl(args.file)
    left = args.timeout - (time.monotonic() - start)
    budget = max(0.5, left - MARGIN_S - MARGIN_FRACTION * args.timeout)
    progress = (lambda msg: print(msg, file=sys.stderr, flush=True)) if args.verbose else None
    try:
        sol = solve(problem, time_limit=budget, deterministic=args.deterministic,
                    seed=args.seed, workers=args.workers, progress=progress)
    except PlanInfeasibleError as e:
        print(json.dumps({"solution": None, "cost": None, "feasible": False, "error": str(e),
                          "seconds": round(time.monotonic() - start, 3)}))
        return 1
    print(json.dumps({"solution": sol.choice, "cost": sol.cost, "feasible": sol.feasible,
                      "lower_bound": sol.lower_bound, "gap": sol.gap, "status": sol.status,
                      "peak_usage": sol.peak_usage, "usage_limit": problem.usage_limit,
                      "seconds": round(time.monotonic() - start, 3), "stats": sol.stats}))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
