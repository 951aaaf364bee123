#!/usr/bin/env python
"""Every benchmark, one after another, then one summary of their ratio lines (`make bench`).

    .venv/bin/python bench/run_all.py [--quick] [--only postgres,redis,...] [--repeat N]

Each script runs as its own process with its defaults (the sizes the issues name); --quick
gives each the tiny sizes the test suite uses (a smoke run: seconds, not numbers to quote).
A full run takes 10-20 minutes on a 2-core machine, most of it filling the stores. The
offline-index benches run with OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE unset (bench/README.md).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent

# name -> (script, full-size arguments, quick arguments, takes --repeat)
BENCHES = {
    "chunks": ("bench_chunks.py", [], ["--mib", "4"], False),
    "levels": ("bench_levels.py", [], ["--mib", "0.5", "--levels", "1,2,3"], False),
    "postgres": ("bench_postgres.py", [], ["--rows", "2000"], True),
    "redis": ("bench_redis.py", [], ["--keys", "500"], True),
    "qdrant": ("bench_qdrant.py", ["--rest"], ["--points", "300", "--dim", "16", "--rest"], True),
    "rss": ("bench_rss.py", [], ["--rows", "1000", "--keys", "200", "--scale", "3"], False),
    "offline-search": ("bench_offline_search.py", [], ["--rows", "20000", "--dim", "64", "--no-cold"], False),
    "offline-serve": ("bench_offline_serve.py", [], ["--rows", "5000", "--dim", "32", "--seconds", "2"], False),
    "offline-build": ("bench_offline_build.py", [], ["--points", "300", "--dim", "16", "--repeat", "2"], False),
}


def summary_lines(output: str) -> list[str]:
    """The lines a bench prints for people to compare: `ratio ...` and the offline benches' `... ratio Rx`."""
    return [line.strip() for line in output.splitlines()
            if line.startswith("ratio ") or (" ratio " in line and "x" in line and not line.startswith(" "))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes: check the benches run, not numbers")
    ap.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(BENCHES)}")
    ap.add_argument("--repeat", type=int, default=None, help="--repeat for the store benches")
    args = ap.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(BENCHES)
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        ap.error(f"unknown bench {', '.join(unknown)} (known: {', '.join(BENCHES)})")
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    summary: list[str] = []
    failed: list[str] = []
    for name in names:
        script, full, quick, repeats = BENCHES[name]
        cmd = [sys.executable, str(BENCH / script), *(quick if args.quick else full)]
        if repeats and args.repeat:
            cmd += ["--repeat", str(args.repeat)]
        print(f"\n##### {name}: {' '.join(cmd[1:])}", flush=True)
        proc = subprocess.run(cmd, cwd=BENCH.parent, env=env, stdin=subprocess.DEVNULL, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        print(proc.stdout, end="", flush=True)
        if proc.returncode != 0:
            failed.append(f"{name} (exit {proc.returncode})")
        summary += [f"{name:15s} {line}" for line in summary_lines(proc.stdout)]
    print("\n##### summary")
    print("\n".join(summary) or "(no ratio lines)")
    if failed:
        print(f"failed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
