"""The offline index benchmarks (bench/) run end to end on tiny data and print their ratio lines.

They are run by hand for numbers; here only that each script works: exit 0 and a comparison line
`... ratio N.NNx` for every measurement it promises.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"
RATIO = re.compile(r"ratio\s+\d+\.\d+x")


def run_bench(script: str, *args: str, timeout: float = 240) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=BENCH.parent, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"{script} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def ratio_lines(out: str, label: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith(label) and RATIO.search(line)]


def test_search_bench_runs_on_tiny_data(tmp_path):
    # --drop fadvise: evict only the bench's own file, never the whole machine's page cache
    out = run_bench("bench_offline_search.py", "--rows", "2000", "--dim", "16", "--queries", "4",
                    "--repeat", "2", "--dir", str(tmp_path), "--drop", "fadvise")
    assert "env: blas" in out or "env: threadpoolctl" in out
    for label in ("single query top-10", "batch of 4 (total)", "batch of 4 (per query)", "filtered 10% top-10",
                  "cold single query top-10", "cold vs warm single query"):
        assert ratio_lines(out, label), f"no ratio line for {label!r} in:\n{out}"
    assert "posix_fadvise" in out
    # the index was built in --dir and a second run reuses it
    assert (tmp_path / "bench_offline" / "vectors.npy").is_file()
    again = run_bench("bench_offline_search.py", "--rows", "2000", "--dim", "16", "--queries", "4",
                      "--repeat", "1", "--dir", str(tmp_path), "--no-cold")
    assert "index: reused" in again and ratio_lines(again, "single query top-10")


def test_serve_bench_runs_on_tiny_data():
    out = run_bench("bench_offline_serve.py", "--rows", "2000", "--dim", "16", "--seconds", "0.5",
                    "--max-requests", "50")
    for label in ("requests/s", "p50 latency", "p99 latency"):
        assert ratio_lines(out, label), f"no ratio line for {label!r} in:\n{out}"
    served = re.search(r"qdrant-client -> offline serve\s+(\d+) requests", out)
    assert served and 1 <= int(served.group(1)) <= 50


def test_build_bench_runs_on_tiny_data(tmp_path):
    out = run_bench("bench_offline_build.py", "--points", "300", "--dim", "8", "--repeat", "1",
                    "--dir", str(tmp_path / "qdrant"))
    assert ratio_lines(out, "backup with offline index "), out
    assert ratio_lines(out, "backup with offline index (CPU)"), out
    items = re.search(r"offline index items in the manifest: (\d+)", out)
    assert items and int(items.group(1)) == 2, out  # the unnamed vector's rows + the points
    share = re.search(r"time inside OfflineIndexBuilder: median (\d+\.\d)%", out)
    assert share and 0 < float(share.group(1)) < 100, out
