"""The chunk benchmark (bench/bench_chunks.py) runs end to end on tiny data.

It is run by hand for numbers (256 MiB by default); here only that it works: exit 0, both
targets measured, every rate positive, ratios ours/reference present, and the human table.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def run_bench(*args: str, timeout: float = 180) -> str:
    # the script starts its own moto server and sets its own AWS env: never the caller's
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "AWS_", "STATEVAULT_"))}
    proc = subprocess.run([sys.executable, str(BENCH / "bench_chunks.py"), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=BENCH.parent, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"bench_chunks.py exited {proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_chunk_bench_runs_on_tiny_data(tmp_path):
    result = json.loads(run_bench("--mib", "4", "--json", "--dir", str(tmp_path)))
    assert result["mib"] >= 4 and result["records"] > 1000
    assert set(result["targets"]) == {"local", "s3"}
    for name, target in result["targets"].items():
        for side in ("ours", "reference"):
            assert target[side]["write_mib_s"] > 0 and target[side]["read_mib_s"] > 0, (name, side)
        assert target["ratio"]["write"] > 0 and target["ratio"]["read"] > 0
        info = target["info"]
        assert info["chunks"] >= 1 and info["chunks_new"] == info["chunks"]
        assert 0 < info["stored_bytes"] < result["mib"] * (1 << 20)  # compressed
    assert list(tmp_path.iterdir()) == []  # the work dir is cleaned up


def test_chunk_bench_prints_a_table_with_ratios():
    out = run_bench("--mib", "1", "--targets", "local")
    lines = out.splitlines()
    assert any(line.split()[:1] == ["local"] and "chunks" in line for line in lines), out
    assert any("file+fsync" in line for line in lines), out
    assert any(line.strip().startswith("ratio") for line in lines), out


def test_run_all_runs_the_chosen_benches_and_summarises_their_ratios():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "AWS_", "STATEVAULT_"))}
    proc = subprocess.run([sys.executable, str(BENCH / "run_all.py"), "--quick", "--only", "levels,redis"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=BENCH.parent,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "##### levels:" in out and "##### redis:" in out and "##### postgres:" not in out
    summary = out.split("##### summary", 1)[1].strip().splitlines()
    assert len(summary) == 1 and summary[0].startswith("redis") and "redis-cli --rdb" in summary[0], summary
    bad = subprocess.run([sys.executable, str(BENCH / "run_all.py"), "--only", "nope"], capture_output=True,
                         text=True, timeout=60, env=env, cwd=BENCH.parent)
    assert bad.returncode == 2 and "unknown bench nope" in bad.stderr
