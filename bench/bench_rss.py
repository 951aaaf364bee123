#!/usr/bin/env python
"""Peak memory of a PostgreSQL and a Redis backup at 1x and 10x the data.

Run by hand, never part of the test run (tests/unit/test_bench_stores.py only checks that it
runs on tiny data):

    .venv/bin/python bench/bench_rss.py [--rows 100000] [--keys 20000] [--scale 10] [--json]

Starts a throw-away PostgreSQL and Redis 7 (backup/local_servers.py), loads 1x data (--rows rows
of bench_postgres.py's table; --keys keys of bench_redis.py's keyspace) and --scale x data into
separate databases, then runs each backup (backup.job.snapshot_source into a fresh file://
repository) in a fresh Python process of its own and reads that process's peak resident set
size (VmHWM in /proc/self/status) when the backup is done. The child also reports its RSS after
the imports, before the backup starts, so the backup's own share is visible.

Goal (issue 3): the peak at --scale x is at most 1.2x the peak at 1x, and below 300 MB.
Streaming means memory depends on chunk and batch sizes, not on the data size.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare import Comparison, header, peak_rss_mib, report  # noqa: E402

LIMIT_MIB = 300


def child(kind: str, url: str, repo_dir: str) -> None:
    """Run one backup in this (fresh) process; print JSON with its peak RSS."""
    from backup.job import snapshot_source
    from snapshots.repository import open_repository
    from snapshots.settings import PostgresSource, RedisSource

    if kind == "postgres":
        cfg = PostgresSource(kind="postgres", url=url, tables=["public.memories"])
    else:
        cfg = RedisSource(kind="redis", url=url, patterns=["*"])
    repo = open_repository(f"file://{repo_dir}", create=True)
    before = peak_rss_mib("VmRSS")
    started = time.perf_counter()
    manifest, _ = snapshot_source(repo, kind, cfg)
    print(json.dumps({"records": manifest.records, "seconds": time.perf_counter() - started,
                      "rss_before_mib": before, "peak_rss_mib": peak_rss_mib()}))


def measure(kind: str, url: str, work: Path) -> dict:
    repo_dir = work / f"repo-{kind}"
    proc = subprocess.run([sys.executable, __file__, "--child", kind, url, str(repo_dir)], capture_output=True,
                          text=True, check=False)
    shutil.rmtree(repo_dir, ignore_errors=True)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} backup child failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--rows", type=int, default=100_000, help="PostgreSQL rows at 1x")
    ap.add_argument("--keys", type=int, default=20_000, help="Redis keys at 1x")
    ap.add_argument("--scale", type=int, default=10)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", nargs=3, metavar=("KIND", "URL", "REPO_DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(*args.child)
        return 0

    from bench_postgres import load_table
    from bench_redis import fill

    from backup.local_servers import PostgresServer, RedisServer

    params = {"rows": args.rows, "keys": args.keys, "scale": args.scale}
    if not args.json:
        header("Peak RSS of a backup at 1x and 10x data", params)
    work = Path(tempfile.mkdtemp(prefix="statevault-bench-rss-"))
    comparisons, info = [], {}
    try:
        with PostgresServer.start() as pg, RedisServer.start("redis7") as redis_server:
            targets = {}
            for scale in (1, args.scale):
                url = pg.create_database(f"rss_{scale}")
                load_table(url, args.rows * scale, args.seed)
                targets[("postgres", scale)] = url
                fill(redis_server.db_url(scale), args.keys * scale, args.seed)
                targets[("redis", scale)] = redis_server.db_url(scale)
            for kind in ("postgres", "redis"):
                small = measure(kind, targets[(kind, 1)], work)
                big = measure(kind, targets[(kind, args.scale)], work)
                for scale, m in ((1, small), (args.scale, big)):
                    info[f"{kind} {scale}x"] = (f"{m['records']:,} records in {m['seconds']:.1f} s, peak RSS "
                                                f"{m['peak_rss_mib']:.0f} MiB (after imports "
                                                f"{m['rss_before_mib']:.0f} MiB)")
                growth = Comparison(f"rss growth {kind}", "1x data", 1.2, unit="MiB")
                growth.ours.append(big["peak_rss_mib"])
                growth.theirs.append(small["peak_rss_mib"])
                comparisons.append(growth)
                info[f"{kind} peak below {LIMIT_MIB} MB"] = big["peak_rss_mib"] * 2**20 < LIMIT_MIB * 10**6
        report("rss", params, comparisons, info, args.json)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
