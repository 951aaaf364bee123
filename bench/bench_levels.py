#!/usr/bin/env python
"""zstd levels on each source kind's records: the measurement behind codec.DEFAULT_LEVELS.

Run by hand, never part of the test run (tests/unit/test_bench_scripts.py only checks that it
runs on tiny data):

    .venv/bin/python bench/bench_levels.py [--mib 16] [--levels 1,2,3,4,6] [--json]

For each kind, --mib MiB of records made by our own encoders from data shaped like the store
benches' (bench_postgres / bench_redis / bench_qdrant), cut into 1 MiB pieces (a chunk's
size), compressed one piece at a time on one thread, as the upload pool does:
- postgres: COPY text lines of ~200-byte text, a small jsonb object and a timestamp;
- redis: redis-jsonl-v2 string records of ~1 KB JSON values with an expiry (encode_record);
- qdrant: qdrant-points-jsonl-v1 records of 384-dim unit vectors and a ~200-byte payload
  (PointEncoder, server form).
Prints MB/s (uncompressed bytes per second) and the compression ratio per level; the kind's
default level is marked with *.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))

import compare  # noqa: E402 - also puts the repository root on sys.path
from compare import history_message, kb_payload, memory_row, random_text, zipf_text  # noqa: E402

PIECE = 1 << 20


def postgres_records(rng, nbytes: int) -> list[bytes]:
    text = zipf_text(rng)
    out, size, i = [], 0, 0
    while size < nbytes:
        o, n, u = int(rng.integers(0, len(text) - 300)), int(rng.integers(150, 250)), int(rng.integers(0, 5000))
        stamp = f"2026-01-{1 + i // 57600 % 28:02d} {i // 3600 % 24:02d}:{i // 60 % 60:02d}:{i % 60:02d}.{i % 1000:03d}"
        out.append(memory_row(i + 1, text[o:o + n], u, rng.random(), i % 50, stamp).encode())
        size += len(out[-1])
        i += 1
    return out


def redis_records(rng, nbytes: int) -> list[bytes]:
    from backup.sources.redis_records import encode_record

    text = random_text(rng, 2_000_000)
    out, size, i = [], 0, 0
    while size < nbytes:
        o = int(rng.integers(0, len(text) - 1200))
        value = history_message(i, text[o:o + int(rng.integers(700, 1100))])
        record, _ = encode_record(f"history:u{i}".encode(), "string", value.decode(),
                                  1795000000000 + int(rng.integers(3600_000, 48 * 3600_000)))
        out.append(record)
        size += len(record)
        i += 1
    return out


def qdrant_records(rng, nbytes: int) -> list[bytes]:
    import numpy as np

    from backup.sources.qdrant_records import PointEncoder
    from backup.sources.qdrant_config import VectorLayout

    text = random_text(rng, 1_000_000, b"abcdefghijklmnopqrstuvwxyz    ")
    encoder = PointEncoder(VectorLayout(unnamed=True, dense={"": (384, "Cosine")}, multi={}, sparse=()), local=False)
    out, size, i = [], 0, 0
    while size < nbytes:
        vectors = rng.standard_normal(size=(256, 384)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        points = []
        for row in vectors.tolist():
            o = int(rng.integers(0, len(text) - 300))
            points.append(SimpleNamespace(id=i, vector=row, payload=kb_payload(i, text[o:o + 200])))
            i += 1
        lines = encoder.encode(points).lines
        out += lines
        size += sum(map(len, lines))
    return out


KINDS = {"postgres": postgres_records, "redis": redis_records, "qdrant": qdrant_records}


def measure(data: bytes, level: int) -> dict:
    from snapshots import codec

    pieces = [data[i:i + PIECE] for i in range(0, len(data), PIECE)]
    started = time.perf_counter()
    stored = sum(len(codec.compress(p, level)) for p in pieces)
    seconds = time.perf_counter() - started
    return {"level": level, "mb_s": round(len(data) / seconds / 1e6, 1), "ratio": round(len(data) / stored, 3)}


def main(argv: list[str] | None = None) -> int:
    import numpy as np

    from snapshots.codec import DEFAULT_LEVELS

    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--mib", type=float, default=16)
    ap.add_argument("--levels", default="1,2,3,4,6")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")]
    results = {}
    if not args.json:
        compare.header("zstd levels per source kind", {"mib": args.mib, "levels": args.levels})
    for kind, make in KINDS.items():
        data = b"".join(make(np.random.default_rng(args.seed), int(args.mib * (1 << 20))))
        results[kind] = {"default": DEFAULT_LEVELS[kind], "bytes": len(data),
                         "levels": [measure(data, level) for level in levels]}
        if not args.json:
            cells = "  ".join(f"{'*' if r['level'] == DEFAULT_LEVELS[kind] else ' '}{r['level']}: "
                              f"{r['mb_s']:6.0f} MB/s {r['ratio']:.2f}x" for r in results[kind]["levels"])
            print(f"   {kind:9s} {cells}")
    if args.json:
        print(json.dumps({"bench": "levels", "params": vars(args), "kinds": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
