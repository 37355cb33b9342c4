"""`python -m bench [throughput|precision|pollcost|forecast|workloads ...] [--quick]` — all of them by default.

Each benchmark prints its table, writes bench/results/<name>.json and <name>.png.
"""

from __future__ import annotations

import argparse
import sys
import time

NAMES = ("throughput", "precision", "pollcost", "forecast", "workloads")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "benchmarks",
        nargs="*",
        choices=[*NAMES, []],
        metavar="BENCHMARK",
        help=f"which to run: {', '.join(NAMES)} (default: all)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=(
            "smaller runs (throughput: 1,000 jobs, SQLite, with and without uvloop; workloads: 2,000 jobs, "
            "SQLite); results go to *-quick.json"
        ),
    )
    args = parser.parse_args(argv)
    chosen = args.benchmarks or list(NAMES)
    for name in chosen:
        if name not in NAMES:
            parser.error(f"unknown benchmark {name!r}; choose from {', '.join(NAMES)}")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib is needed for the plots: pip install -e '.[bench]'", file=sys.stderr)
        return 2
    started = time.monotonic()
    for name in chosen:
        t0 = time.monotonic()
        print(f"== {name}{' (quick)' if args.quick else ''}", flush=True)
        module = __import__(f"bench.{name}", fromlist=["run"])
        module.run(quick=args.quick, log=lambda text: print(text, flush=True))
        print(f"== {name} took {time.monotonic() - t0:.0f} s\n", flush=True)
    print(f"bench: {', '.join(chosen)} in {time.monotonic() - started:.0f} s; results in bench/results/", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
