#!/usr/bin/env python
"""What building the offline index adds to a Qdrant backup (issue 4: goal <= 10%).

Run by hand, never part of the test run:

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python bench/bench_offline_build.py \
        [--points 20000] [--dim 384] [--distance Cosine] [--repeat 3] [--dir DIR]

Fills a qdrant-client local-mode collection (path mode, on disk; seeded Gaussian vectors,
payload {"group", "title"}) once — or reuses DIR — then backs it up with
`backup.job.snapshot_source(repo, name, QdrantSource(kind="qdrant", path=..., offline_index=...))`
with the index off and on, alternating, each into a fresh file:// repository (no dedup between
runs), best of --repeat. Prints both times (wall, and CPU time of the process's threads), the
ratios on/off (goal <= 1.10x), the share of a backup spent inside the index builder's own calls
(measured within each run, so less moved by other processes' load), and a bare `scroll` of the
same collection for context.

Local mode loads the whole collection into memory when a client opens it; the bench keeps one
client open on the path (backup.sources.qdrant shares it with the backup), so the times are the
scroll + encode + write work a backup does against a server, not that load.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH_DIR.parent), str(BENCH_DIR)]

import numpy as np  # noqa: E402

from bench_offline_search import blas_summary, load_average, ms  # noqa: E402

COLLECTION = "bench_kb"
UPSERT_BATCH = 4096  # local mode commits once per upsert call: big calls fill faster


def fill_collection(path: Path, points: int, dim: int, distance: str, seed: int) -> float | None:
    """Create the local-mode collection unless it is there with the same size; seconds it took."""
    from qdrant_client import QdrantClient, models

    client = QdrantClient(path=str(path))
    try:
        if client.collection_exists(COLLECTION):
            info = client.get_collection(COLLECTION)
            params = info.config.params.vectors
            if info.points_count == points and params.size == dim and params.distance.value == distance:
                return None
            client.delete_collection(COLLECTION)
        started = time.perf_counter()
        client.create_collection(COLLECTION, vectors_config=models.VectorParams(
            size=dim, distance=models.Distance(distance)))
        rng = np.random.default_rng(seed)
        for start in range(0, points, UPSERT_BATCH):
            n = min(UPSERT_BATCH, points - start)
            vectors = rng.standard_normal((n, dim), dtype=np.float32)
            client.upsert(COLLECTION, points=[
                models.PointStruct(id=start + j, vector=row, payload={"group": (start + j) % 10,
                                                                      "title": f"document {start + j}"})
                for j, row in enumerate(vectors.tolist())])
        return time.perf_counter() - started
    finally:
        client.close()


def one_backup(work: Path, qdrant_path: Path, offline: bool, run: int) -> tuple[float, float, int]:
    """Wall and CPU seconds (this process, all threads: the upload pool compresses) of one
    snapshot_source run into a fresh repository, and the manifest's offline items."""
    from backup.job import snapshot_source
    from snapshots.repository import open_repository
    from snapshots.settings import QdrantSource

    repo_dir = work / f"repo-{run}-{int(offline)}"
    repo = open_repository(f"file://{repo_dir}", create=True)
    settings = QdrantSource(kind="qdrant", path=str(qdrant_path), collections=[COLLECTION], offline_index=offline)
    started, cpu_started = time.perf_counter(), time.process_time()
    manifest, _ = snapshot_source(repo, "kb", settings)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    shutil.rmtree(repo_dir, ignore_errors=True)
    return elapsed, cpu, len(manifest.offline_index)


class BuilderClock:
    """Times the offline index builder's own calls inside a backup (the CPU it adds on the backup's
    thread; compression of its chunks runs in the upload pool and is not in it)."""

    def __init__(self):
        from backup.offline_build import OfflineIndexBuilder

        self.seconds = 0.0
        cls = OfflineIndexBuilder
        for name in ("__init__", "add_page", "close"):
            setattr(cls, name, self._timed(getattr(cls, name)))

    def _timed(self, fn):
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started
        return wrapper


def bare_scroll(client, page_size: int = 512) -> float:
    started = time.perf_counter()
    offset = None
    while True:
        _, offset = client.scroll(COLLECTION, limit=page_size, offset=offset, with_payload=True, with_vectors=True)
        if offset is None:
            return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--points", type=int, default=20_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--distance", default="Cosine", choices=["Cosine", "Dot", "Euclid", "Manhattan"])
    ap.add_argument("--repeat", type=int, default=5, help="backups per setting (best is reported)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", type=Path, help="local-mode Qdrant dir to fill once and reuse (default: a temp dir)")
    args = ap.parse_args(argv)

    from backup.sources.qdrant import connect_qdrant

    print(blas_summary())
    work = Path(tempfile.mkdtemp(prefix="sv-bench-build-"))
    qdrant_path = args.dir or work / "qdrant"
    qdrant_path.mkdir(parents=True, exist_ok=True)
    try:
        fill_s = fill_collection(qdrant_path, args.points, args.dim, args.distance, args.seed)
        print(f"qdrant local mode {qdrant_path}: {args.points} x {args.dim} {args.distance} "
              + ("reused" if fill_s is None else f"filled in {fill_s:.1f} s"))
        started = time.perf_counter()
        handle = connect_qdrant(path=str(qdrant_path))  # loads the collection once; the backups share it
        print(f"local mode load (once, not in the times below): {time.perf_counter() - started:.1f} s")
        try:
            scroll_s = min(bare_scroll(handle.client) for _ in range(2))
            print(f"  bare scroll with vectors and payloads: {ms(scroll_s)}")
            clock = BuilderClock()
            shares = []
            times: dict[bool, list[float]] = {False: [], True: []}
            cpus: dict[bool, list[float]] = {False: [], True: []}
            offline_items = 0
            for run in range(args.repeat):
                for offline in ((False, True) if run % 2 == 0 else (True, False)):
                    clock.seconds = 0.0
                    elapsed, cpu, items = one_backup(work, qdrant_path, offline, run)
                    if offline:
                        shares.append(clock.seconds / elapsed)
                    times[offline].append(elapsed)
                    cpus[offline].append(cpu)
                    offline_items = max(offline_items, items if offline else 0)
                    print(f"  run {run}: offline_index={str(offline).lower():<5} {ms(elapsed)} wall  {ms(cpu)} CPU"
                          + (f"  (in the index builder {ms(clock.seconds).strip()})" if offline else ""))
        finally:
            handle.close()
        if offline_items == 0:
            raise SystemExit("the backups with offline_index = true listed no offline index items")
        off, on = min(times[False]), min(times[True])
        cpu_off, cpu_on = min(cpus[False]), min(cpus[True])
        print(f"offline index items in the manifest: {offline_items}; bare scroll {ms(scroll_s)}")
        print(f"load average at the end: {load_average()}")
        print(f"{'backup with offline index':<34} ours {ms(on)}   without {ms(off)}   ratio {on / off:5.2f}x"
              f"   (wall, best of {args.repeat}; goal <= 1.10x; overhead {(on / off - 1) * 100:+.1f}%)")
        print(f"{'backup with offline index (CPU)':<34} ours {ms(cpu_on)}   without {ms(cpu_off)}   "
              f"ratio {cpu_on / cpu_off:5.2f}x   (CPU time of all the process's threads)")
        print(f"time inside OfflineIndexBuilder: median {statistics.median(shares):.1%} of a backup with the index "
              f"(its chunks' compression runs in the upload pool, not counted here)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
