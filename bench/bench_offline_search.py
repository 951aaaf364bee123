#!/usr/bin/env python
"""Offline vector index search vs the memory-bandwidth floor, measured in the same run (issue 4).

Run by hand, never part of the test run (tests/unit/test_bench_offline.py only checks that it
runs on tiny data):

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python bench/bench_offline_search.py \
        [--rows 1000000] [--dim 384] [--queries 32] [--repeat 5] [--dir DIR]

It writes a synthetic collection (seeded Gaussian rows, Cosine, payload {"group": i % 10}) with
`write_offline_collection`, streamed in blocks, into a temp dir (or DIR, reused when it already
holds the same rows/dim/seed), then prints, each beside its reference and their ratio:

- floor: a bare numpy pass over the same memory-mapped matrix (`matrix @ q` whole and in blocks,
  and a blocked column sum), warm, best of N; the fastest of them is "the floor";
- ours: `OfflineCollection.search(q, top_k=10)`, one query, warm, best of N (goal <= 1.3x floor);
- a batch of --queries queries through `search_batch`: total and per query, vs one floor pass;
- a filtered query (10% of the points match) for information;
- cold vs warm: the page cache of the .npy file is dropped (`/proc/sys/vm/drop_caches`, else
  `posix_fadvise(DONTNEED)`; the output says which worked and how much of the file stayed
  resident, measured with mincore) before a fresh collection's first search and a cold floor.

Every comparison line reads `... ours X ms  reference Y ms  ratio R.RRx`. BLAS in use is printed
first: OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE, when set, can force a slow kernel (see README).
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import mmap
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from snapshots.offline.layout import read_meta, write_offline_collection  # noqa: E402
from snapshots.offline.search import OfflineCollection  # noqa: E402
from snapshots.offline.topk import BLOCK_BYTES  # noqa: E402

COLLECTION = "bench_offline"
BUILD_BLOCK_ROWS = 16384
GROUPS = 10  # payload "group" = i % 10: a filter on one group keeps 10% of the points
FILTER = {"must": [{"key": "group", "match": {"value": 0}}]}


# ---- environment -------------------------------------------------------------------------

def blas_summary() -> str:
    """Which BLAS and kernel numpy runs (threadpoolctl when installed, else OpenBLAS via ctypes)."""
    lines = []
    env = {k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS",
                                      "OMP_NUM_THREADS") if k in os.environ}
    lines.append(f"numpy {np.__version__}; env {env or 'no OPENBLAS_*/OMP_* set'}")
    lines.append(f"machine: {os.cpu_count()} CPUs, load average {load_average()} at start "
                 "(other processes on the machine skew every number)")
    try:
        from threadpoolctl import threadpool_info

        for info in threadpool_info():
            lines.append(f"threadpoolctl: {info.get('internal_api')} {info.get('version')} "
                         f"kernel={info.get('architecture')} threads={info.get('num_threads')}")
    except ImportError:
        lines.append(_openblas_via_ctypes())
    if "OPENBLAS_CORETYPE" in os.environ or "OPENBLAS_L2_SIZE" in os.environ:
        lines.append("WARNING: OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE are set and may force a slow kernel; "
                     "to benchmark run: env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE ...")
    return "\n".join("env: " + line for line in lines)


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _openblas_via_ctypes() -> str:
    try:
        cfg = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        built = f"{cfg.get('name')} {cfg.get('version')}"
    except Exception:  # noqa: BLE001 - show_config's shape differs across numpy versions
        built = "unknown build"
    libs = set()
    with open("/proc/self/maps") as maps:
        for line in maps:
            path = line.split()[-1] if len(line.split()) >= 6 else ""
            if "openblas" in os.path.basename(path).lower():
                libs.add(path)
    for path in sorted(libs):
        lib = ctypes.CDLL(path)
        for suffix in ("", "64_", "_64"):
            for prefix in ("openblas", "scipy_openblas"):
                try:
                    corename = getattr(lib, f"{prefix}_get_corename{suffix}")
                    nthreads = getattr(lib, f"{prefix}_get_num_threads{suffix}")
                except AttributeError:
                    continue
                corename.restype = ctypes.c_char_p
                return (f"blas {built}, running kernel={corename().decode()} threads={nthreads()} "
                        f"({os.path.basename(path)})")
    return f"blas {built} (kernel unknown: threadpoolctl not installed, no OpenBLAS symbols found)"


# ---- page cache --------------------------------------------------------------------------

def resident_fraction(path: Path) -> float:
    """Share of the file's pages in the page cache (mincore on a fresh read-only mapping)."""
    size = path.stat().st_size
    if size == 0:
        return 0.0
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    page = mmap.PAGESIZE
    pages = (size + page - 1) // page
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            return float("nan")
        try:
            vec = ctypes.create_string_buffer(pages)
            if libc.mincore(addr, size, vec) != 0:
                return float("nan")
            return np.count_nonzero(np.frombuffer(vec.raw, dtype=np.uint8) & 1) / pages
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)


def drop_file_cache(path: Path, how: str = "auto") -> str:
    """Evict the file from the page cache; return the method used. Nothing may map the file.

    "auto" drops the whole page cache when the kernel lets us (root), else falls back to
    posix_fadvise on this file alone; "fadvise" only ever touches this file (used by the test).
    """
    os.sync()
    method = "posix_fadvise(POSIX_FADV_DONTNEED) on the .npy file"
    if how == "auto":
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("1\n")
            return "echo 1 > /proc/sys/vm/drop_caches"
        except OSError as exc:
            method += f" (drop_caches refused: {exc.strerror})"
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return method


# ---- data --------------------------------------------------------------------------------

def synthetic_points(rows: int, dim: int, seed: int):
    """Points streamed a block at a time: only one block of vectors exists at once."""
    rng = np.random.default_rng(seed)
    for start in range(0, rows, BUILD_BLOCK_ROWS):
        block = rng.standard_normal((min(BUILD_BLOCK_ROWS, rows - start), dim), dtype=np.float32)
        for j, row in enumerate(block):
            i = start + j
            yield {"id": i, "vector": row, "payload": {"group": i % GROUPS}}


def ensure_index(root: Path, rows: int, dim: int, seed: int, distance: str) -> tuple[Path, float | None]:
    """The collection dir, built unless `root` already holds the same one; (dir, build seconds)."""
    params = {"rows": rows, "dim": dim, "seed": seed, "distance": distance}
    coll_dir = root / COLLECTION
    try:
        if read_meta(coll_dir).get("bench") == params:
            return coll_dir, None
    except Exception:  # noqa: BLE001 - missing or stale: build it
        pass
    need = rows * dim * 4 + rows * 40
    free = shutil.disk_usage(root).free
    if free < need * 1.2:
        raise SystemExit(f"not enough disk under {root}: need ~{need / 1e9:.2f} GB, {free / 1e9:.2f} GB free")
    meta = {"collection": COLLECTION, "snapshot_id": "bench", "snapshot_time": "1970-01-01T00:00:00Z",
            "source": "bench", "vectors": {"": {"size": dim, "distance": distance}}, "bench": params}
    started = time.perf_counter()
    write_offline_collection(root, meta, synthetic_points(rows, dim, seed))
    return coll_dir, time.perf_counter() - started


# ---- timing ------------------------------------------------------------------------------

def floor_passes(matrix: np.ndarray, q: np.ndarray) -> dict:
    """Bare numpy passes over the memory-mapped matrix: each reads every byte once."""
    step = max(1024, BLOCK_BYTES // (4 * matrix.shape[1]))

    def gemv_whole():
        return matrix @ q

    def gemv_blocks():
        for s in range(0, len(matrix), step):
            matrix[s:s + step] @ q

    def column_sum():
        for s in range(0, len(matrix), step):
            np.add.reduce(matrix[s:s + step], axis=0)

    return {"matrix @ q": gemv_whole, "blocked matrix @ q": gemv_blocks, "blocked sum(axis=0)": column_sum}


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:9.2f} ms"


def line(label: str, ours: float, ref: float, ref_label: str, extra: str = "") -> str:
    return f"{label:<34} ours {ms(ours)}   {ref_label} {ms(ref)}   ratio {ours / ref:5.2f}x{extra}"


# ---- the bench ---------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--queries", type=int, default=32, help="batch size for search_batch")
    ap.add_argument("--repeat", type=int, default=10, help="timed rounds (best is reported)")
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--distance", default="Cosine", choices=["Cosine", "Dot", "Euclid", "Manhattan"])
    ap.add_argument("--dir", type=Path, help="index root to build in and reuse between runs (default: a temp dir)")
    ap.add_argument("--no-cold", action="store_true", help="skip the cold (page cache dropped) runs")
    ap.add_argument("--drop", choices=["auto", "fadvise"], default="auto",
                    help="auto: drop_caches (whole machine) when allowed, else fadvise; fadvise: this file only")
    args = ap.parse_args(argv)

    print(blas_summary())
    temp = None
    root = args.dir
    if root is None:
        temp = root = Path(tempfile.mkdtemp(prefix="sv-bench-offline-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        coll_dir, build_s = ensure_index(root, args.rows, args.dim, args.seed, args.distance)
        npy = coll_dir / read_meta(coll_dir)["vectors"][""]["file"]
        gb = npy.stat().st_size / 1e9
        if build_s is None:
            print(f"index: reused {coll_dir} ({args.rows} x {args.dim}, {gb:.2f} GB matrix)")
        else:
            print(f"index: built {coll_dir} ({args.rows} x {args.dim} {args.distance}, {gb:.2f} GB matrix) "
                  f"in {build_s:.1f} s ({args.rows / build_s:,.0f} points/s)")
        run(args, coll_dir, npy)
        print(f"load average at the end: {load_average()}")
    finally:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)
    return 0


def run(args, coll_dir: Path, npy: Path) -> None:
    rng = np.random.default_rng(args.seed + 1)
    queries = rng.standard_normal((max(args.queries, args.repeat + 1), args.dim)).astype(np.float32)
    warm_single = run_warm(args, coll_dir, npy, queries)
    if not args.no_cold:
        gc.collect()  # run_warm's mappings of the matrix are gone: mapped pages cannot be evicted
        run_cold(args, coll_dir, npy, queries, warm_single)


def run_warm(args, coll_dir: Path, npy: Path, queries: np.ndarray) -> float:
    """The warm measurements, interleaved round by round so that they share the machine's load."""
    qlist = [q.tolist() for q in queries]
    k, n = args.top_k, args.repeat
    gb = npy.stat().st_size / 1e9
    coll = OfflineCollection.open(coll_dir)
    matrix = coll.matrix("")
    print(f"warm runs: best of {n} rounds (all contenders in each round) after one warm-up; "
          f"matrix {npy.name} {resident_fraction(npy):.0%} resident")
    batch = qlist[:args.queries]
    turn = iter(range(10**9))  # a different query each run
    contenders = {f"floor {label}": fn for label, fn in floor_passes(matrix, queries[0]).items()}
    contenders["single"] = lambda: coll.search(qlist[next(turn) % len(qlist)], top_k=k)
    contenders["batch"] = lambda: coll.search_batch(batch, top_k=k)
    contenders["filtered"] = lambda: coll.search(qlist[next(turn) % len(qlist)], top_k=k, filter=FILTER)

    started = time.perf_counter()
    hits = coll.search(qlist[0], top_k=k, filter=FILTER)
    mask_first = time.perf_counter() - started
    selected = coll.count(filter=FILTER) / max(1, coll.points_count)
    times = timed_rounds(contenders, n)

    floors = {label: t for label, t in times.items() if label.startswith("floor ")}
    for label, t in floors.items():
        print(f"  {label:<32} {ms(min(t))} (median {ms(statistics.median(t))}, {gb / min(t):5.1f} GB/s)")
    floor_label = min(floors, key=lambda lb: min(floors[lb]))
    floor = min(floors[floor_label])
    print(f"  floor = {floor_label[6:]}: {ms(floor)}")
    single = min(times["single"])
    print(line(f"single query top-{k}", single, floor, "floor",
               f"   (goal <= 1.30x; medians {ms(statistics.median(times['single'])).strip()} vs "
               f"{ms(statistics.median(floors[floor_label])).strip()})"))
    best = min(times["batch"])
    print(line(f"batch of {len(batch)} (total)", best, floor, "floor"))
    print(line(f"batch of {len(batch)} (per query)", best / len(batch), floor, "floor"))
    print(line(f"filtered {selected:.0%} top-{k} (mask cached)", min(times["filtered"]), floor, "floor",
               f"   (first call with mask build {ms(mask_first).strip()}, {len(hits)} hits)"))
    return single


def timed_rounds(contenders: dict, rounds: int) -> dict[str, list[float]]:
    """Seconds of each contender per round, after one untimed warm-up call of each."""
    for fn in contenders.values():
        fn()
    times: dict[str, list[float]] = {label: [] for label in contenders}
    for _ in range(rounds):
        for label, fn in contenders.items():
            started = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - started)
    return times


def run_cold(args, coll_dir: Path, npy: Path, queries: np.ndarray, warm_single: float) -> None:
    """Two rounds of: drop the cache, a fresh collection's first search; drop again, a bare pass."""
    q, k = queries[0].tolist(), args.top_k
    gb = npy.stat().st_size / 1e9
    cold_ours, cold_floor = [], []
    for _ in range(2):
        fresh = OfflineCollection.open(coll_dir)
        fresh.retrieve([0], with_payload=False)  # loads ids and payloads (points.jsonl), not the matrix
        method = drop_file_cache(npy, args.drop)
        before = resident_fraction(npy)
        started = time.perf_counter()
        fresh.search(q, top_k=k)
        cold_ours.append(time.perf_counter() - started)
        print(f"  cold: cache dropped by {method}; resident before {before:.1%}, "
              f"after the search {resident_fraction(npy):.0%}")
        del fresh
        gc.collect()
        drop_file_cache(npy, args.drop)
        mat = np.load(npy, mmap_mode="r")
        started = time.perf_counter()
        mat @ queries[0]
        cold_floor.append(time.perf_counter() - started)
        del mat
        gc.collect()
    cold_best, cold_floor_best = min(cold_ours), min(cold_floor)
    print(line(f"cold single query top-{k}", cold_best, cold_floor_best, "cold floor (matrix @ q)",
               f"   ({gb / cold_best:.2f} GB/s from disk)"))
    print(line("cold vs warm single query", cold_best, warm_single, "warm"))


if __name__ == "__main__":
    sys.exit(main())
