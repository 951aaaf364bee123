#!/usr/bin/env python
"""PostgreSQL: `statevault backup` vs `pg_dump -Fc`, restore with verification vs `pg_restore`.

Run by hand, never part of the test run (tests/unit/test_bench_stores.py only checks that it
runs on tiny data):

    .venv/bin/python bench/bench_postgres.py [--rows 1000000] [--repeat 1] [--json]

Starts a throw-away PostgreSQL (backup/local_servers.py) on a random port and loads one table
`public.memories (id bigserial primary key, body text ~200 bytes, meta jsonb, created_at
timestamptz)` of --rows rows, vacuumed and frozen before anything is timed.

- backup: ours is backup.job.snapshot_source into a fresh file:// repository in a temp dir
  (the whole path of `statevault backup`: consistent cut, schema, COPY, chunking, digest, zstd
  level 3, 4 upload threads, manifest), in this process. Reference: `pg_dump -Fc -t
  public.memories` to a file (its default gzip compression), a subprocess.
- restore: ours is restore.run.restore_snapshot into an empty database (the table created in
  a staging schema and loaded by two COPYs at once, being over 64 MiB; primary key, sequence,
  the move into place; then verification: the table read back, counted and digested).
  Reference: `pg_restore -d` of the dump into another empty database.
Also printed, not compared: an unchanged second backup (everything dedups) and the sizes.
Goals (issue 3): backup <= 0.40x, restore <= 1.3x. Best of --repeat runs, alternating.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare import (Comparison, dir_size, header, memory_row, note, report, store_bench_args, timed,  # noqa: E402
                     zipf_text)

TABLE = "public.memories"


def load_table(url: str, rows: int, seed: int) -> None:
    """--rows rows of ~200-byte text, a small jsonb object and a timestamp, through COPY."""
    import numpy as np
    import psycopg

    rng = np.random.default_rng(seed)
    corpus = zipf_text(rng)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE memories (id bigserial PRIMARY KEY, body text NOT NULL, "
                     "meta jsonb NOT NULL, created_at timestamptz NOT NULL)")
        block = 50_000
        with conn.cursor() as cur, cur.copy("COPY memories (id, body, meta, created_at) FROM STDIN") as copy:
            for lo in range(0, rows, block):
                n = min(block, rows - lo)
                offsets = rng.integers(0, len(corpus) - 300, size=n)
                lengths = rng.integers(150, 250, size=n)
                users = rng.integers(0, 5000, size=n)
                scores = rng.random(size=n)
                stamps = np.datetime_as_string(np.datetime64("2026-01-01T00:00:00", "ms")
                                               + (np.arange(lo, lo + n) * 1500 + rng.integers(0, 999, size=n)),
                                               unit="ms")
                copy.write("".join(
                    memory_row(lo + i + 1, corpus[o:o + ln], u, s, (lo + i) % 50, t)
                    for i, (o, ln, u, s, t) in enumerate(zip(offsets.tolist(), lengths.tolist(), users.tolist(),
                                                             scores.tolist(), stamps.tolist()))))
        conn.execute("SELECT setval('memories_id_seq', %s)", (rows,))
        conn.execute("VACUUM (FREEZE, ANALYZE) memories")
        conn.execute("CHECKPOINT")


def count_rows(url: str) -> int:
    import psycopg

    with psycopg.connect(url) as conn:
        return conn.execute(f"SELECT count(*) FROM {TABLE}").fetchone()[0]



def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    store_bench_args(ap, "--rows", 1_000_000)
    args = ap.parse_args(argv)

    from backup.job import snapshot_source
    from backup.local_servers import PostgresServer, find_pg_bin_dir
    from restore.run import restore_snapshot
    from snapshots.repository import open_repository
    from snapshots.settings import PostgresSource, RepositorySettings, Settings

    params = {"rows": args.rows, "repeat": args.repeat}
    if not args.json:
        header("PostgreSQL backup and restore", params)
    work = Path(tempfile.mkdtemp(prefix="statevault-bench-pg-"))
    try:
        with PostgresServer.start() as pg:
            bins = find_pg_bin_dir()
            src = pg.create_database("bench_src")
            t_load, _ = timed(lambda: load_table(src, args.rows, args.seed))
            if not args.json:
                note(f"loaded {args.rows:,} rows in {t_load:.1f} s ({pg.url.rsplit('@', 1)[-1]}, "
                     f"{bins.parent.name})")
            count_rows(src)  # warm the cache for both sides
            cfg = PostgresSource(kind="postgres", url=src, tables=[TABLE])
            backup = Comparison("backup", "pg_dump -Fc", 0.40)
            restore = Comparison("restore+verify", "pg_restore", 1.30)
            dump = work / "memories.dump"
            info: dict = {}
            repo_url = None
            for run in range(args.repeat):
                t, _ = timed(lambda: subprocess.run(
                    [str(bins / "pg_dump"), "-Fc", "-t", TABLE, "-f", str(dump), src], check=True))
                backup.theirs.append(t)
                repo_dir = work / f"repo{run}"
                repo = open_repository(f"file://{repo_dir}", create=True)
                t, (manifest, stats) = timed(lambda: snapshot_source(repo, "memory", cfg))
                backup.ours.append(t)
                if run:
                    shutil.rmtree(work / f"repo{run - 1}")
                repo_url = f"file://{repo_dir}"
                assert manifest.records == args.rows, manifest.records
            info["pg_dump -Fc size"] = f"{dump.stat().st_size / 2**20:.1f} MiB"
            info["our repository size"] = f"{dir_size(work / f'repo{args.repeat - 1}') / 2**20:.1f} MiB " \
                                          f"({stats['chunks']} chunks)"
            t_again, (_, again) = timed(lambda: snapshot_source(repo, "memory", cfg))
            info["unchanged second backup"] = f"{t_again:.2f} s, {again['bytes_uploaded']} bytes uploaded"

            settings = Settings(repository=RepositorySettings(url=repo_url), sources={"memory": cfg})
            for run in range(args.repeat):
                ref_db = pg.create_database(f"restore_ref_{run}")
                t, _ = timed(lambda: subprocess.run([str(bins / "pg_restore"), "-d", ref_db, str(dump)], check=True))
                restore.theirs.append(t)
                assert count_rows(ref_db) == args.rows
                pg.drop_database(f"restore_ref_{run}")
                ours_db = pg.create_database(f"restore_ours_{run}")
                t, result = timed(lambda: restore_snapshot(repo, settings, "memory", "latest", to_url=ours_db))
                restore.ours.append(t)
                assert result.ok and result.records_restored == args.rows
                assert count_rows(ours_db) == args.rows
                info.setdefault("our restore split", []).append(
                    f"load {result.restore_seconds:.2f} s + verify {result.verify_seconds:.2f} s")
                pg.drop_database(f"restore_ours_{run}")
            report("postgres", params, [backup, restore], info, args.json)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
