#!/usr/bin/env python
"""Qdrant: `statevault backup` (with and without the offline index) vs a bare scroll.

Run by hand, never part of the test run (tests/unit/test_bench_stores.py only checks that it
runs on tiny data):

    .venv/bin/python bench/bench_qdrant.py [--points 20000] [--dim 384] [--repeat 1] [--json]

Qdrant runs in qdrant-client's local mode on a temp dir (no server binary is needed): one
collection `kb` of --points points (integer ids, one unnamed Cosine vector of --dim float32s,
a payload of ~200 bytes of text plus a few fields), upserted in batches before timing.

- reference: a bare scroll: open QdrantClient(path=...), scroll every point with vectors and
  payloads in pages of the source's page size (backup.sources.qdrant.PAGE_SIZE), close.
- ours: backup.job.snapshot_source into a fresh file:// repository in a temp dir, with
  offline_index off (the points as JSON lines with base64 float32 vectors, local-mode
  canonical vectors, chunking, digest, zstd) and on (plus the normalised float32 matrix and the
  points file of the offline index, from the same pages). In this process. It reads local
  mode from the collection itself (backup/sources/qdrant_local.py: one sort of the ids where
  local mode's scroll sorts them all for every page).
- ours through scroll: the backup (offline index off) with that direct read switched off
  (backup.sources.qdrant.LOCAL_DIRECT_READ), so it scrolls exactly as the reference does, the
  way a Qdrant server is read: what the encoder and writer add to a scroll, on their own.
Both sides include opening the local-mode client, which loads the collection from disk.
Goal (issue 3): <= 1.15x for the backup (the other variants are reported beside it).
Best of --repeat runs, alternating.

With --rest, also over Qdrant's REST API, the path a backup of a Qdrant *server* takes (no
Qdrant server can be installed on the development machine): the collection's offline index,
from a first backup, is served by `statevault offline serve` (uvicorn, a subprocess on
127.0.0.1), which answers get_collection and scroll as Qdrant does, and both sides run against
it with QdrantClient(url=...): the bare scroll, and the backup (offline index off). The
server's own cost is the same for both; it is not Qdrant's (Rust), so the ratio is an
estimate of the server-mode ratio, not a measurement of it.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare import (Comparison, dir_size, header, kb_payload, note, random_text, report,  # noqa: E402
                     store_bench_args, timed)

COLLECTION = "kb"


def fill(path: Path, points: int, dim: int, seed: int) -> None:
    import numpy as np
    from qdrant_client import QdrantClient, models

    rng = np.random.default_rng(seed)
    text = random_text(rng, 1_000_000, b"abcdefghijklmnopqrstuvwxyz    ")
    client = QdrantClient(path=str(path))
    try:
        client.create_collection(COLLECTION, vectors_config=models.VectorParams(size=dim,
                                                                                distance=models.Distance.COSINE))
        batch = 500
        for lo in range(0, points, batch):
            n = min(batch, points - lo)
            vectors = rng.standard_normal(size=(n, dim)).astype(np.float32)
            offsets = rng.integers(0, len(text) - 300, size=n).tolist()
            client.upsert(COLLECTION, points=models.Batch(
                ids=list(range(lo, lo + n)), vectors=vectors.tolist(),
                payloads=[kb_payload(lo + i, text[o:o + 200]) for i, o in enumerate(offsets)]), wait=True)
    finally:
        client.close()


def bare_scroll(path: Path | str, page_size: int) -> int:
    """Every point with vectors and payloads; `path` is a local-mode directory or a server URL."""
    from qdrant_client import QdrantClient

    client = (QdrantClient(url=path, check_compatibility=False) if isinstance(path, str)
              else QdrantClient(path=str(path)))
    try:
        seen, offset = 0, None
        while True:
            page, offset = client.scroll(COLLECTION, limit=page_size, offset=offset, with_payload=True,
                                         with_vectors=True)
            seen += len(page)
            if offset is None:
                return seen
    finally:
        client.close()


def rest_comparison(work: Path, store: Path, repeat: int, info: dict):
    """The backup against the bare scroll over REST (see the module docstring)."""
    from bench_offline_serve import start_server, stop_server

    from backup.job import snapshot_source
    from backup.sources.qdrant import PAGE_SIZE
    from snapshots.offline.pull import pull_offline_index
    from snapshots.repository import open_repository
    from snapshots.settings import QdrantSource

    repo = open_repository(f"file://{work / 'repo-index'}", create=True)
    manifest, _ = snapshot_source(repo, "knowledge", QdrantSource(kind="qdrant", path=str(store),
                                                                  collections=[COLLECTION], offline_index=True))
    pull_offline_index(repo, manifest, work / "offline")
    proc, port = start_server(work / "offline", work / "serve.log")
    url = f"http://127.0.0.1:{port}"
    rest = Comparison("backup over REST", "bare scroll over REST", 1.15)
    try:
        cfg = QdrantSource(kind="qdrant", url=url, collections=[COLLECTION], offline_index=False)
        for run in range(repeat):
            t, seen = timed(lambda: bare_scroll(url, PAGE_SIZE))
            assert seen == manifest.records, seen
            rest.theirs.append(t)
            target = open_repository(f"file://{work / f'repo-rest-{run}'}", create=True)
            t, (over_rest, _) = timed(lambda: snapshot_source(target, "knowledge", cfg))
            rest.ours.append(t)
            # the same records as the local-mode backup: the REST path encodes the same bytes
            assert over_rest.items[0].digest == manifest.items[0].digest
            shutil.rmtree(work / f"repo-rest-{run}")
        info["REST server"] = f"statevault offline serve on {url} (stands in for a Qdrant server)"
    finally:
        stop_server(proc)
    return rest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    store_bench_args(ap, "--points", 20_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--rest", action="store_true", help="also compare over the REST API (offline serve)")
    args = ap.parse_args(argv)

    import backup.sources.qdrant as qdrant_source
    from backup.job import snapshot_source
    from backup.sources.qdrant import PAGE_SIZE
    from snapshots.repository import open_repository
    from snapshots.settings import QdrantSource

    params = {"points": args.points, "dim": args.dim, "repeat": args.repeat}
    if not args.json:
        header("Qdrant backup (local mode)", params)
    work = Path(tempfile.mkdtemp(prefix="statevault-bench-qdrant-"))
    try:
        store = work / "qdrant"
        t_fill, _ = timed(lambda: fill(store, args.points, args.dim, args.seed))
        if not args.json:
            note(f"upserted {args.points:,} points in {t_fill:.1f} s ({dir_size(store) / 2**20:.1f} MiB on disk)")
        plain = Comparison("backup", "bare scroll", 1.15)
        offline = Comparison("backup+offline index", "bare scroll", 1.15)
        scrolled = Comparison("backup through scroll", "bare scroll", None)  # the fallback path: no goal
        info: dict = {}
        digests = set()
        for run in range(args.repeat):
            for side, offline_index, direct in ((plain, False, True), (offline, True, True), (scrolled, False, False)):
                t, seen = timed(lambda: bare_scroll(store, PAGE_SIZE))
                assert seen == args.points, seen
                side.theirs.append(t)
                cfg = QdrantSource(kind="qdrant", path=str(store), collections=[COLLECTION],
                                   offline_index=offline_index)
                repo_dir = work / f"repo-{run}-{offline_index}-{direct}"
                repo = open_repository(f"file://{repo_dir}", create=True)
                qdrant_source.LOCAL_DIRECT_READ = direct
                try:
                    t, (manifest, stats) = timed(lambda: snapshot_source(repo, "knowledge", cfg))
                finally:
                    qdrant_source.LOCAL_DIRECT_READ = True
                side.ours.append(t)
                assert manifest.records == args.points, manifest.records
                digests.add(manifest.items[0].digest)  # both read paths: the same records
                if direct:
                    info[f"repository size ({'with' if offline_index else 'without'} offline index)"] = (
                        f"{dir_size(repo_dir) / 2**20:.1f} MiB ({stats['chunks']} chunks)")
                shutil.rmtree(repo_dir)
        assert len(digests) == 1, digests
        comparisons = [plain, offline, scrolled]
        if args.rest:
            comparisons.append(rest_comparison(work, store, args.repeat, info))
        report("qdrant", params, comparisons, info, args.json)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
