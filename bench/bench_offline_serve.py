#!/usr/bin/env python
"""`offline serve` requests per second with qdrant-client, beside the in-process search (issue 4).

Run by hand, never part of the test run:

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python bench/bench_offline_serve.py \
        [--rows 100000] [--dim 384] [--seconds 10] [--max-requests 20000] [--dir DIR]

Builds the same synthetic collection as bench_offline_search.py (or reuses --dir), starts
`run_server` (uvicorn) in a subprocess on a free port of 127.0.0.1, and with one
`QdrantClient(url=...)` sends `query_points` (top-10, payloads on, a different query each time)
one after another for at most --seconds and --max-requests. The reference is the same loop
calling `OfflineCollection.search` in this process, so the ratio is the cost of HTTP + JSON +
qdrant-client's models. Prints requests/s and p50/p99 latency of both, and their ratios.
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path[:0] = [str(REPO), str(BENCH_DIR)]

import numpy as np  # noqa: E402

from bench_offline_search import COLLECTION, blas_summary, ensure_index, ms  # noqa: E402
from snapshots.offline.search import OfflineCollection  # noqa: E402

START_TIMEOUT = 60.0
SERVER_CODE = ("import sys; from snapshots.offline.serve import run_server; "
               "run_server(sys.argv[1], '127.0.0.1', int(sys.argv[2]), log_level='warning')")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(index_dir: Path, log_path: Path) -> tuple[subprocess.Popen, int]:
    """The server subprocess once /healthz answers; a few tries in case the port was taken meanwhile."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    for _ in range(3):
        port = free_port()
        with open(log_path, "ab") as log:
            proc = subprocess.Popen([sys.executable, "-c", SERVER_CODE, str(index_dir), str(port)], cwd=REPO,
                                    env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as resp:
                    if resp.status == 200:
                        return proc, port
            except OSError:
                time.sleep(0.1)
        stop_server(proc)
    raise SystemExit(f"offline serve did not start; its log:\n{log_path.read_text(errors='replace')[-4000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def measure(call, queries: list, seconds: float, max_requests: int) -> np.ndarray:
    """Latencies (s) of sequential calls, a different query each, bounded in time and count."""
    latencies = []
    deadline = time.perf_counter() + seconds
    i = 0
    while i < max_requests:
        started = time.perf_counter()
        call(queries[i % len(queries)])
        now = time.perf_counter()
        latencies.append(now - started)
        i += 1
        if now >= deadline:
            break
    return np.array(latencies)


def report(label: str, lat: np.ndarray) -> tuple[float, float, float]:
    rps = len(lat) / lat.sum()
    p50, p99 = np.percentile(lat, 50), np.percentile(lat, 99)
    print(f"  {label:<30} {len(lat):6d} requests  {rps:8.1f} req/s   p50 {ms(p50)}   p99 {ms(p99)}")
    return rps, p50, p99


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--seconds", type=float, default=10.0, help="time bound of each measured loop")
    ap.add_argument("--max-requests", type=int, default=20_000, help="count bound of each measured loop")
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", type=Path, help="index root to build in and reuse between runs (default: a temp dir)")
    args = ap.parse_args(argv)

    from qdrant_client import QdrantClient

    print(blas_summary())
    temp = Path(tempfile.mkdtemp(prefix="sv-bench-serve-"))
    root = args.dir or temp / "index"
    root.mkdir(parents=True, exist_ok=True)
    proc = None
    try:
        coll_dir, build_s = ensure_index(root, args.rows, args.dim, args.seed, "Cosine")
        print(f"index: {'reused' if build_s is None else f'built in {build_s:.1f} s'} {coll_dir} "
              f"({args.rows} x {args.dim} Cosine)")
        rng = np.random.default_rng(args.seed + 2)
        queries = [q.tolist() for q in rng.standard_normal((64, args.dim)).astype(np.float32)]
        k = args.top_k

        proc, port = start_server(root, temp / "server.log")
        print(f"server: offline serve (uvicorn) pid {proc.pid} on 127.0.0.1:{port}; one client, sequential requests")
        client = QdrantClient(url=f"http://127.0.0.1:{port}", prefer_grpc=False, timeout=60)
        coll = OfflineCollection.open(coll_dir)

        def over_http(q):
            return client.query_points(COLLECTION, query=q, limit=k, with_payload=True).points

        def in_process(q):
            return coll.search(q, top_k=k, with_payload=True)

        for q in queries[:8]:  # warm-up: payloads loaded, matrix paged in, connections open
            got, want = [p.id for p in over_http(q)], [p["id"] for p in in_process(q)]
            if got != want:
                raise SystemExit(f"mismatch: server answered {got}, in-process search {want}")

        http_lat = measure(over_http, queries, args.seconds, args.max_requests)
        local_lat = measure(in_process, queries, args.seconds, args.max_requests)
        client.close()
        http = report("qdrant-client -> offline serve", http_lat)
        local = report("in-process search (reference)", local_lat)
        print(f"{'requests/s':<34} ours {http[0]:9.1f}/s   in-process {local[0]:9.1f}/s   ratio {http[0] / local[0]:5.2f}x")
        print(f"{'p50 latency':<34} ours {ms(http[1])}   in-process {ms(local[1])}   ratio {http[1] / local[1]:5.2f}x"
              f"   (HTTP overhead {ms(http[1] - local[1]).strip()})")
        print(f"{'p99 latency':<34} ours {ms(http[2])}   in-process {ms(local[2])}   ratio {http[2] / local[2]:5.2f}x")
    finally:
        if proc is not None:
            stop_server(proc)
        shutil.rmtree(temp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
