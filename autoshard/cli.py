"""The ``autoshard`` command line.

    autoshard version             versions of autoshard and the jax stack it runs on
    autoshard collectives FILE    collectives in a compiled HLO text dump (as_text()),
                                  loop trip counts applied
    autoshard iopddl FILE [--timeout S]
                                  solve an IOPDDL contest instance with autoshard's solver,
                                  print {"solution": [...], "cost": ..., "feasible": ...}
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
    from autoshard.cost_model.hlo import hlo_stats

    with open(args.file) as f:
        stats = hlo_stats(f.read())
    print(json.dumps({"count": stats.count, "bytes": stats.bytes,
                      "total_count": stats.total_count, "total_bytes": stats.total_bytes},
                     indent=2, sort_keys=True))
    return 0


def _iopddl(args: argparse.Namespace) -> int:
    from autoshard.passes import iopddl

    return iopddl.main([args.file, *(["--timeout", str(args.timeout)] if args.timeout else [])])


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
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
