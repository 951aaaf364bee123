#!/usr/bin/env python
"""Chunk throughput of the repository writer and reader against plain I/O of the same bytes.

Run by hand, never part of the test run (tests/unit/test_bench_scripts.py only checks that it runs):

    .venv/bin/python bench/bench_chunks.py [--mib 256] [--concurrency 4] [--targets local,s3]
                                           [--repeat 1] [--seed 7] [--json]

Data: --mib MiB of JSON lines (chat-memory-like records of 200-2000 bytes whose text is drawn
from a vocabulary: random-ish, zstd compresses it about 3x), generated before any timing.

Ours: `repo.begin_snapshot` / `item.add` per record / `commit` into a fresh repository (record
digest, content-defined chunking at the repository's default sizes, blake3 chunk ids, zstd
level 3, `--concurrency` upload threads, manifest), then `repo.iter_records` back (read-ahead,
decompress, hash check, split into records).

Reference, same bytes cut at the same chunk boundaries, same concurrency:
  local   each chunk written to its own file with write + fsync, then read back
  s3      boto3 put_object / get_object of each chunk on one shared client
The S3 API is moto's server, started in this process (ThreadedMotoServer over HTTP), so both
sides share its CPU cost; treat the S3 numbers as relative, not as S3's speed.

Prints MiB/s (uncompressed bytes per second) for each and the ratios ours/reference.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import orjson  # noqa: E402

from snapshots.manifest import Manifest, utcnow  # noqa: E402
from snapshots.repository import Repository, open_repository  # noqa: E402

MIB = 1 << 20


# --------------------------------------------------------------------------- data

def make_records(mib: float, seed: int) -> list[bytes]:
    """JSON lines totalling at least `mib` MiB; deterministic for a seed."""
    rng = np.random.default_rng(seed)
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", dtype=np.uint8)
    vocab = [bytes(letters[rng.integers(0, 26, size=int(n))]).decode() for n in rng.integers(2, 11, size=4000)]
    corpus = " ".join(vocab[i] for i in rng.zipf(1.3, size=600_000) % len(vocab))  # ~4 MB of text
    target = int(mib * MIB)
    estimate = target // 900 + 64
    lengths = rng.integers(150, 1950, size=estimate)
    offsets = rng.integers(0, len(corpus) - 2000, size=estimate)
    roles = ("user", "assistant", "tool")
    records, total, i = [], 0, 0
    while total < target:
        if i == len(lengths):  # the estimate was short: draw more
            lengths = np.concatenate([lengths, rng.integers(150, 1950, size=estimate)])
            offsets = np.concatenate([offsets, rng.integers(0, len(corpus) - 2000, size=estimate)])
        off = int(offsets[i])
        rec = orjson.dumps({"id": i, "user": f"user-{i % 997}", "ts": 1_764_000_000 + i * 7, "role": roles[i % 3],
                            "text": corpus[off:off + int(lengths[i])]}) + b"\n"
        records.append(rec)
        total += len(rec)
        i += 1
    return records


# --------------------------------------------------------------------------- ours

def ours_write(repo: Repository, records: list[bytes]) -> tuple[float, Manifest, dict]:
    started = time.perf_counter()
    writer = repo.begin_snapshot("bench", "bench")
    with writer.item("memories", "table", "jsonl") as item:
        add = item.add
        for r in records:
            add(r)
    manifest = writer.commit(utcnow())
    return time.perf_counter() - started, manifest, writer.stats.as_dict()


def ours_read(repo: Repository, manifest: Manifest, expect: int) -> float:
    started = time.perf_counter()
    n = 0
    for r in repo.iter_records(manifest.items[0]):
        n += len(r)
    elapsed = time.perf_counter() - started
    if n != expect:
        raise SystemExit(f"read back {n} bytes, wrote {expect}")
    return elapsed


# --------------------------------------------------------------------------- references

def reference_chunks(records: list[bytes], manifest: Manifest) -> tuple[bytes, list[memoryview]]:
    """The same bytes cut where our chunker cut them (zero-copy views of one buffer)."""
    data = b"".join(records)
    view, chunks, at = memoryview(data), [], 0
    for ref in manifest.items[0].chunks:
        chunks.append(view[at:at + ref.size])
        at += ref.size
    assert at == len(data), (at, len(data))
    return data, chunks


def file_write(directory: Path, chunks: list[memoryview], concurrency: int) -> float:
    directory.mkdir(parents=True)

    def one(i: int) -> None:
        with open(directory / f"{i:08d}", "wb") as fh:
            fh.write(chunks[i])
            fh.flush()
            os.fsync(fh.fileno())

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(len(chunks))))
    return time.perf_counter() - started


def file_read(directory: Path, n: int, concurrency: int, expect: int) -> float:
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        total = sum(len(b) for b in pool.map(lambda i: (directory / f"{i:08d}").read_bytes(), range(n)))
    elapsed = time.perf_counter() - started
    assert total == expect
    return elapsed


def s3_write(client, bucket: str, chunks: list[memoryview], concurrency: int) -> float:
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda i: client.put_object(Bucket=bucket, Key=f"ref/{i:08d}", Body=bytes(chunks[i])),
                      range(len(chunks))))
    return time.perf_counter() - started


def s3_read(client, bucket: str, n: int, concurrency: int, expect: int) -> float:
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        total = sum(len(b) for b in pool.map(
            lambda i: client.get_object(Bucket=bucket, Key=f"ref/{i:08d}")["Body"].read(), range(n)))
    elapsed = time.perf_counter() - started
    assert total == expect
    return elapsed


# --------------------------------------------------------------------------- runs

def rates(nbytes: int, write_s: float, read_s: float) -> dict:
    return {"write_s": round(write_s, 3), "read_s": round(read_s, 3),
            "write_mib_s": round(nbytes / MIB / write_s, 1), "read_mib_s": round(nbytes / MIB / read_s, 1)}


def run_local(work: Path, records: list[bytes], nbytes: int, concurrency: int, repeat: int) -> dict:
    best: dict[str, tuple[float, float]] = {}
    info: dict = {}
    for run in range(repeat):
        repo_dir = work / f"repo-{run}"
        repo = open_repository(repo_dir.as_uri(), create=True)
        repo.upload_concurrency = concurrency
        w, manifest, stats = ours_write(repo, records)
        r = ours_read(repo, manifest, nbytes)
        data, chunks = reference_chunks(records, manifest)
        ref_dir = work / f"ref-{run}"
        rw = file_write(ref_dir, chunks, concurrency)
        rr = file_read(ref_dir, len(chunks), concurrency, nbytes)
        del data, chunks
        info = {"chunks": len(manifest.items[0].chunks), "stored_bytes": manifest.stored_bytes, **stats}
        for key, (a, b) in (("ours", (w, r)), ("reference", (rw, rr))):
            prev = best.get(key, (float("inf"), float("inf")))
            best[key] = (min(prev[0], a), min(prev[1], b))
        shutil.rmtree(repo_dir, ignore_errors=True)
        shutil.rmtree(ref_dir, ignore_errors=True)
    return _summarise(best, nbytes, info)


def run_s3(records: list[bytes], nbytes: int, concurrency: int, repeat: int) -> dict:
    import logging

    from backup.local_servers import S3Server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's per-request log lines
    best: dict[str, tuple[float, float]] = {}
    info: dict = {}
    with S3Server.start() as server:
        os.environ.update(server.env())  # our S3Store reads the standard AWS chain
        from botocore.config import Config
        import boto3

        client = boto3.session.Session().client("s3", endpoint_url=server.endpoint_url,
                                                config=Config(max_pool_connections=32))
        for run in range(repeat):
            ours_bucket, ref_bucket = f"bench-ours-{run}", f"bench-ref-{run}"
            server.create_bucket(ours_bucket)
            server.create_bucket(ref_bucket)
            repo = open_repository(f"s3://{ours_bucket}/repo", endpoint_url=server.endpoint_url, create=True)
            repo.upload_concurrency = concurrency
            w, manifest, stats = ours_write(repo, records)
            r = ours_read(repo, manifest, nbytes)
            data, chunks = reference_chunks(records, manifest)
            rw = s3_write(client, ref_bucket, chunks, concurrency)
            rr = s3_read(client, ref_bucket, len(chunks), concurrency, nbytes)
            del data, chunks
            info = {"chunks": len(manifest.items[0].chunks), "stored_bytes": manifest.stored_bytes, **stats}
            for key, (a, b) in (("ours", (w, r)), ("reference", (rw, rr))):
                prev = best.get(key, (float("inf"), float("inf")))
                best[key] = (min(prev[0], a), min(prev[1], b))
            for bucket in (ours_bucket, ref_bucket):  # moto keeps objects in memory: free them
                for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
                    keys = [{"Key": o["Key"]} for o in page.get("Contents", ())]
                    if keys:
                        client.delete_objects(Bucket=bucket, Delete={"Objects": keys})
    return _summarise(best, nbytes, info)


def _summarise(best: dict, nbytes: int, info: dict) -> dict:
    ours, ref = rates(nbytes, *best["ours"]), rates(nbytes, *best["reference"])
    return {"ours": ours, "reference": ref, "info": info,
            "ratio": {"write": round(ours["write_mib_s"] / ref["write_mib_s"], 2),
                      "read": round(ours["read_mib_s"] / ref["read_mib_s"], 2)}}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=float, default=256, help="MiB of records to write (default 256)")
    p.add_argument("--concurrency", type=int, default=4, help="upload / read threads, ours and reference (default 4)")
    p.add_argument("--targets", default="local,s3", help="comma-separated: local, s3 (default both)")
    p.add_argument("--repeat", type=int, default=1, help="runs per target; the best is reported")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--dir", help="work directory for the local target (default: a temp dir)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    args = p.parse_args(argv)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if not targets or set(targets) - {"local", "s3"}:
        p.error("--targets takes local and/or s3")

    started = time.perf_counter()
    records = make_records(args.mib, args.seed)
    nbytes = sum(len(r) for r in records)
    result = {"mib": round(nbytes / MIB, 1), "records": len(records), "concurrency": args.concurrency,
              "generate_s": round(time.perf_counter() - started, 2), "targets": {}}
    work = Path(tempfile.mkdtemp(prefix="bench-chunks-", dir=args.dir))
    try:
        if "local" in targets:
            result["targets"]["local"] = run_local(work, records, nbytes, args.concurrency, args.repeat)
        if "s3" in targets:
            result["targets"]["s3"] = run_s3(records, nbytes, args.concurrency, args.repeat)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"{result['mib']} MiB in {result['records']:,} JSON lines, concurrency {args.concurrency}, "
          f"best of {args.repeat}")
    print(f"{'target':8} {'side':11} {'write MiB/s':>12} {'read MiB/s':>11}   notes")
    for name, t in result["targets"].items():
        info = t["info"]
        ref_label = "file+fsync" if name == "local" else "boto3"
        print(f"{name:8} {'statevault':11} {t['ours']['write_mib_s']:12.1f} {t['ours']['read_mib_s']:11.1f}   "
              f"{info['chunks']} chunks, stored {info['stored_bytes'] / MIB:.1f} MiB "
              f"({nbytes / max(info['stored_bytes'], 1):.1f}x compression)")
        print(f"{'':8} {ref_label:11} {t['reference']['write_mib_s']:12.1f} {t['reference']['read_mib_s']:11.1f}   "
              "same bytes, same chunk boundaries, uncompressed")
        print(f"{'':8} {'ratio':11} {t['ratio']['write']:12.2f} {t['ratio']['read']:11.2f}   ours / reference")


if __name__ == "__main__":
    main()
