"""The ``autoshard`` command line.

    autoshard version             versions of autoshard and the jax stack it runs on
    autoshard collectives FILE    collectives in a compiled HLO text dump (as_text()),
                                  loop trip counts applied
    autoshard iopddl FILE [--timeout S]
                                  solve an IOPDDL contest instance with autoshard's solver,
                                  print {"solution": [...], "cost": ..., "feasible": ...}
    autoshard view DIR [--port P] [--no-browser]
                                  serve a plan dump (autoshard.dump) on 127.0.0.1, print the URL
    autoshard summary DIR         print a dumped plan's text summary
    autoshard diff DIR_A DIR_B    list what differs between two dumped plans (specs and costs);
                                  exit status 1 when they differ, as diff(1) does
"""

from __future__ import annotations

import argparse
import json
import sys


def _version(_: argparse.Namespace) -> int:
    import jax
    import jaxlib

    import autoshard

    print(f"autoshard {autoshard.__version__} (jax {jax.__version__}, jaxlib {jaxlib.__version__})")
    return 0


def _collectives(args: argparse.Namespace) -> int:
    from autoshard.measure.hlo import hlo_stats

    with open(args.file) as f:
        stats = hlo_stats(f.read())
    print(json.dumps({"count": stats.count, "bytes": stats.bytes,
                      "total_count": stats.total_count, "total_bytes": stats.total_bytes},
                     indent=2, sort_keys=True))
    return 0


def _iopddl(args: argparse.Namespace) -> int:
    from autoshard.solver import iopddl

    return iopddl.main([args.file, *(["--timeout", str(args.timeout)] if args.timeout else [])])


def _load(directory: str):
    from autoshard.dump import load_plan
    from autoshard.ir.errors import PlanError

    try:
        return load_plan(directory)
    except PlanError as err:
        print(f"autoshard: {err}", file=sys.stderr)
        return None


def _view(args: argparse.Namespace) -> int:
    import functools
    import http.server
    import pathlib
    import webbrowser

    from autoshard.dump import PAGE_FILE

    if _load(args.dir) is None:
        return 2
    directory = pathlib.Path(args.dir).resolve()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *_):       # the URL printed below is all a user needs
            pass

    handler = functools.partial(Quiet, directory=str(directory))
    with http.server.ThreadingHTTPServer(("127.0.0.1", args.port), handler) as server:
        url = f"http://127.0.0.1:{server.server_address[1]}/{PAGE_FILE}"
        print(f"serving the plan in {directory} at {url} (Ctrl-C to stop)", flush=True)
        if not args.no_browser:
            webbrowser.open(url)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
    return 0


def _summary(args: argparse.Namespace) -> int:
    plan = _load(args.dir)
    if plan is None:
        return 2
    print(plan.summary())
    return 0


def _diff(args: argparse.Namespace) -> int:
    from autoshard.dump import diff_plans

    a, b = _load(args.dir_a), _load(args.dir_b)
    if a is None or b is None:
        return 2
    lines = diff_plans(a, b)
    print("\n".join(lines) if lines else "the plans agree")
    return 1 if lines else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="autoshard", description="Automatic sharding for JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("version", help="print versions").set_defaults(run=_version)
    p = sub.add_parser("collectives", help="count collectives in an HLO text dump")
    p.add_argument("file", help="a file holding compiled.as_text()")
    p.set_defaults(run=_collectives)
    p = sub.add_parser("iopddl", help="solve an IOPDDL contest instance")
    p.add_argument("file", help="a .json or .json.gz instance")
    p.add_argument("--timeout", type=float, default=None, help="seconds, loading included")
    p.set_defaults(run=_iopddl)
    p = sub.add_parser("view", help="serve a plan dump's viewer on 127.0.0.1")
    p.add_argument("dir", help="a directory written by autoshard.dump")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    p.add_argument("--no-browser", action="store_true", help="only print the URL")
    p.set_defaults(run=_view)
    p = sub.add_parser("summary", help="print a plan dump's text summary")
    p.add_argument("dir", help="a directory written by autoshard.dump")
    p.set_defaults(run=_summary)
    p = sub.add_parser("diff", help="what differs between two plan dumps")
    p.add_argument("dir_a")
    p.add_argument("dir_b")
    p.set_defaults(run=_diff)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
