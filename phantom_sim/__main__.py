"""``python -m phantom_sim --seeds N --seed S --steps K [--workers W] [--buggify NAME]``.

Runs N histories with seeds S, S+1, ... and prints per-invariant counts, the
faults injected by kind and, for each failing seed, its violations, its faults
and the command that replays it. Exit status 1 if any history failed.

String hashing is randomised per process unless PYTHONHASHSEED is set, and
the cores iterate over sets of node and shard ids: so that a seed replays
identically in any process, this entry point re-executes itself with
PYTHONHASHSEED=0 when it is not already set.
"""

from __future__ import annotations

import argparse
import os
import sys

from . import buggify


def main(argv: list[str] | None = None) -> int:
    if os.environ.get("PYTHONHASHSEED") != "0":
        os.environ["PYTHONHASHSEED"] = "0"
        os.execv(sys.executable, [sys.executable, "-m", "phantom_sim", *(sys.argv[1:] if argv is None else argv)])
    from .run import close_pools, default_workers, report, run_many

    parser = argparse.ArgumentParser(prog="python -m phantom_sim", description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=100, help="number of histories (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    parser.add_argument("--steps", type=int, default=10, help="faults per history (default 10)")
    parser.add_argument("--workers", type=int, default=default_workers(), help="worker processes")
    parser.add_argument("--buggify", action="append", default=[], choices=sorted(buggify.VARIANTS),
                        help="switch on a deliberately broken variant (to see the simulator catch it)")
    parser.add_argument("--verbose", action="store_true", help="print every failing seed's crashes too")
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.steps < 1:
        parser.error("--seeds and --steps must be at least 1")
    try:
        summary = run_many(range(args.seed, args.seed + args.seeds), args.steps,
                           workers=min(args.workers, args.seeds), variants=args.buggify, progress=sys.stderr)
    finally:
        close_pools()
    report(summary, args.steps, args.buggify)
    if args.verbose:
        for o in summary.failed[:5]:
            print(f"seed {o.seed} process exits:", *o.crashes[:20], sep="\n  ")
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())
