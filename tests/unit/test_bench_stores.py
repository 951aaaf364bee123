"""The store benchmarks (bench/bench_{postgres,redis,qdrant,rss}.py) run end to end on tiny data.

They are run by hand for numbers; here only that each works: exit 0, the reference measured
beside ours, a printed ratio line per comparison, and the same numbers as JSON. Each script
starts its own throw-away servers on random ports (backup/local_servers.py).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
RATIO = re.compile(r"^ratio (?P<name>[^:]+): ours (?P<ours>[\d.]+) (?:s|MiB) / (?P<ref>.+?) [\d.]+ (?:s|MiB) = "
                   r"(?P<ratio>[\d.]+)x \((?:goal <= (?P<goal>[\d.]+)x: (?:met|MISSED)|no goal: reported)\)$")


def run_bench(script: str, *args: str, timeout: float = 300) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "STATEVAULT_"))}
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=BENCH.parent, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"{script} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return proc.stdout


def ratios(out: str) -> dict[str, dict[str, str]]:
    return {m["name"]: m.groupdict() for m in map(RATIO.match, out.splitlines()) if m}


@pytest.mark.parametrize("script, args, expected", [
    ("bench_postgres.py", ["--rows", "2000"], {"backup": "pg_dump -Fc", "restore+verify": "pg_restore"}),
    ("bench_redis.py", ["--keys", "500"], {"backup": "redis-cli --rdb"}),
    ("bench_qdrant.py", ["--points", "300", "--dim", "16"],
     {"backup": "bare scroll", "backup+offline index": "bare scroll", "backup through scroll": "bare scroll"}),
    ("bench_qdrant.py", ["--points", "300", "--dim", "16", "--rest"],
     {"backup": "bare scroll", "backup+offline index": "bare scroll", "backup through scroll": "bare scroll",
      "backup over REST": "bare scroll over REST"}),
    ("bench_rss.py", ["--rows", "1000", "--keys", "200", "--scale", "3"],
     {"rss growth postgres": "1x data", "rss growth redis": "1x data"}),
])
def test_store_bench_prints_a_ratio_per_comparison(script, args, expected):
    out = run_bench(script, *args)
    found = ratios(out)
    assert {name: r["ref"] for name, r in found.items()} == expected, out
    for r in found.values():
        assert float(r["ours"]) > 0 and float(r["ratio"]) > 0
        # the goals; the backup forced through scroll (Qdrant's fallback path) is only reported
        assert (r["goal"] is None) == (r["name"] == "backup through scroll"), r
    assert "load average" in out
    if script == "bench_redis.py":  # the restore is timed too (RTO, no goal)
        assert re.search(r"restore \+ verify into an empty DB: [\d.]+ s \(write", out), out
        # each side's CPU (client + server): both sides cost some, so both are above zero
        cpu = re.search(r"cpu seconds, medians \(client \+ server\): ours ([\d.]+), redis-cli --rdb ([\d.]+)", out)
        assert cpu and float(cpu[1]) > 0 and float(cpu[2]) > 0, out


def test_store_bench_json_output_has_the_same_comparisons():
    result = json.loads(run_bench("bench_postgres.py", "--rows", "1500", "--json").strip().splitlines()[-1])
    assert result["params"]["rows"] == 1500
    names = [c["name"] for c in result["comparisons"]]
    assert names == ["backup", "restore+verify"]
    for c in result["comparisons"]:
        assert len(c["ours"]) == len(c["theirs"]) == 1
        assert c["ratio"] == pytest.approx(c["ours_s"] / c["reference_s"], rel=1e-3)
        assert c["median_ratio"] == pytest.approx(c["ours"][0] / c["theirs"][0], rel=1e-3)  # one run
        assert c["met"] == (c["ratio"] <= c["goal"])


def test_levels_bench_measures_every_kind_at_every_level_and_marks_the_default():
    from snapshots.codec import DEFAULT_LEVELS

    result = json.loads(run_bench("bench_levels.py", "--mib", "0.5", "--levels", "1,3", "--json").strip().splitlines()[-1])
    assert set(result["kinds"]) == set(DEFAULT_LEVELS)
    for kind, r in result["kinds"].items():
        assert r["default"] == DEFAULT_LEVELS[kind]
        assert r["bytes"] >= 512 << 10
        assert [x["level"] for x in r["levels"]] == [1, 3]
        assert all(x["mb_s"] > 0 and x["ratio"] > 1.2 for x in r["levels"]), r  # the records compress
    human = run_bench("bench_levels.py", "--mib", "0.25", "--levels", "2")
    assert re.search(r"^\s+redis\s+\*2:", human, re.M), human
