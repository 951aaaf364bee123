#!/usr/bin/env python
"""`offline serve` requests per second with qdrant-client, beside the in-process search (issue 4).

Run by hand, never part of the test run:

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python bench/bench_offline_serve.py \
        [--rows 100000] [--dim 384] [--seconds 10] [--max-requests 20000] [--dir DIR]

Builds the same synthetic collection as bench_offline_search.py (or reuses --dir), starts
`run_server` (uvicorn) in a subprocess on a free port of 127.0.0.1, and with one
`QdrantClient(url=...)` sends `query_points` (top-10, payloads on, a different query each time)
one after another for about --seconds in all and at most --max-requests. The reference is the
same `OfflineCollection.search` call in this process; a plain httpx POST of the same request is
timed too, to split the overhead between the server and qdrant-client's models, and so is a
`GET /healthz`, the HTTP round trip alone. They take turns in phases of about half a second, so
that they see the same machine load. The ratio is the cost of HTTP + JSON + qdrant-client.
Prints requests/s and p50/p99 latency of each, and the ratios.
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import os
import shutil
import signal
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

from bench_offline_search import COLLECTION, blas_summary, ensure_index, load_average, ms  # noqa: E402
from snapshots.offline.search import OfflineCollection  # noqa: E402

START_TIMEOUT = 60.0
PHASE_SECONDS = 0.5
PHASE_PAUSE = 0.3
SERVER_CODE = ("import sys; from snapshots.offline.serve import run_server; "
               "run_server(sys.argv[1], '127.0.0.1', int(sys.argv[2]), log_level='warning')")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the server child: get SIGTERM when the bench dies, so no server outlives a killed bench."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        pass


def start_server(index_dir: Path, log_path: Path) -> tuple[subprocess.Popen, int]:
    """The server subprocess once /healthz answers; a few tries in case the port was taken meanwhile."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    for _ in range(3):
        port = free_port()
        with open(log_path, "ab") as log:
            proc = subprocess.Popen([sys.executable, "-c", SERVER_CODE, str(index_dir), str(port)], cwd=REPO,
                                    env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    preexec_fn=_die_with_parent)
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


def measure(calls: dict, queries: list, seconds: float, max_requests: int) -> dict[str, np.ndarray]:
    """Latencies (s) of each call, a different query each time, about `seconds` in all and at most
    `max_requests` per call. The calls take turns in phases of about PHASE_SECONDS, so that all
    see the same machine load, with a pause between phases: OpenBLAS worker threads spin for a
    while after a call, and the other process's spinning threads would otherwise steal the CPUs."""
    rounds = max(1, round(seconds / (PHASE_SECONDS * len(calls))))
    phase = seconds / (rounds * len(calls))
    latencies: dict[str, list[float]] = {label: [] for label in calls}
    for _ in range(rounds):
        for label, call in calls.items():
            done = latencies[label]
            time.sleep(PHASE_PAUSE)
            phase_end = time.perf_counter() + phase
            while len(done) < max_requests:
                started = time.perf_counter()
                call(queries[len(done) % len(queries)])
                now = time.perf_counter()
                done.append(now - started)
                if now >= phase_end:
                    break
    return {label: np.array(lat) for label, lat in latencies.items()}


def report(label: str, lat: np.ndarray) -> tuple[float, float, float]:
    rps = len(lat) / lat.sum()
    p50, p99 = np.percentile(lat, 50), np.percentile(lat, 99)
    print(f"  {label:<30} {len(lat):6d} requests  {rps:8.1f} req/s   p50 {ms(p50)}   p99 {ms(p99)}")
    return rps, p50, p99


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--seconds", type=float, default=10.0, help="time bound of the measured loop")
    ap.add_argument("--max-requests", type=int, default=20_000, help="count bound per contender")
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", type=Path, help="index root to build in and reuse between runs (default: a temp dir)")
    args = ap.parse_args(argv)

    import httpx
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

        raw = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)

        def raw_http(q):  # the same request without qdrant-client's models: splits the overhead
            resp = raw.post(f"/collections/{COLLECTION}/points/query",
                            json={"query": q, "limit": k, "with_payload": True})
            resp.raise_for_status()
            return resp.json()["result"]["points"]

        def round_trip(q):  # the HTTP stack alone: no body, no search
            raw.get("/healthz").raise_for_status()

        for q in queries[:8]:  # warm-up: payloads loaded, matrix paged in, connections open
            got, want = [p.id for p in over_http(q)], [p["id"] for p in in_process(q)]
            if got != want:
                raise SystemExit(f"mismatch: server answered {got}, in-process search {want}")

        lat = measure({"http": over_http, "raw": raw_http, "local": in_process, "rtt": round_trip}, queries,
                      args.seconds, args.max_requests)
        client.close()
        raw.close()
        http = report("qdrant-client -> offline serve", lat["http"])
        bare = report("plain httpx POST (no models)", lat["raw"])
        local = report("in-process search (reference)", lat["local"])
        rtt = report("GET /healthz (HTTP round trip)", lat["rtt"])
        print(f"{'requests/s':<34} ours {http[0]:9.1f}/s   in-process {local[0]:9.1f}/s   "
              f"ratio {http[0] / local[0]:5.2f}x")
        print(f"{'p50 latency':<34} ours {ms(http[1])}   in-process {ms(local[1])}   ratio {http[1] / local[1]:5.2f}x"
              f"   (HTTP overhead {ms(http[1] - local[1]).strip()})")
        print(f"{'p50 latency, plain httpx':<34} ours {ms(bare[1])}   in-process {ms(local[1])}   "
              f"ratio {bare[1] / local[1]:5.2f}x   (qdrant-client adds {ms(http[1] - bare[1]).strip()}; "
              f"a bare round trip is {ms(rtt[1]).strip()})")
        print(f"{'p99 latency':<34} ours {ms(http[2])}   in-process {ms(local[2])}   ratio {http[2] / local[2]:5.2f}x")
        print(f"load average at the end: {load_average()}")
    finally:
        if proc is not None:
            stop_server(proc)
        shutil.rmtree(temp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
