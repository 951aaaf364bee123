"""The README's first command, `make demo` = `statevault demo`, end to end on small data.

It starts its own throw-away PostgreSQL, Redis and Qdrant (local mode), breaks them and
restores them; here it runs as a subprocess and its own JSON summary is asserted: every
restore verified, the drill passed, degraded search answered, in under two minutes. The
repository it leaves behind is then explored with the commands it prints.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_BIN = Path(sys.executable).parent / "statevault"
STATEVAULT = [str(_BIN)] if _BIN.exists() else [sys.executable, "-m", "cli.app"]


def statevault(*args: str, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STATEVAULT_", "AWS_"))}
    env.update(PYTHONPATH=str(ROOT), COLUMNS="200")
    return subprocess.run([*STATEVAULT, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_demo_small_verifies_every_restore_in_under_two_minutes(tmp_path):
    demo_dir = tmp_path / "statevault-demo"
    started = time.monotonic()
    proc = statevault("demo", "--small", "--json", "--dir", str(demo_dir), cwd=tmp_path)
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, f"demo exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    summary = json.loads(proc.stdout)

    assert summary["ok"] is True
    assert elapsed < 120, f"the demo took {elapsed:.0f}s"
    restores = {r["source"]: r for r in summary["restores"]}
    assert set(restores) == {"knowledge", "history", "memory"}
    assert all(r["verified"] and r["records"] > 0 for r in restores.values())
    assert restores["memory"]["pre_restore_snapshot"]          # replaced live data: undoable
    assert summary["drill"]["status"] == "pass" and summary["drill"]["ok"] is True
    assert {s["source"] for s in summary["drill"]["sources"]} == {"knowledge", "history", "memory"}
    assert all(s["cleaned_up"] for s in summary["drill"]["sources"])
    assert len(summary["degraded_search"]) >= 1 and all(h["title"] for h in summary["degraded_search"])
    assert all(step["ok"] for step in summary["steps"])
    assert any("disaster" in step["name"] for step in summary["steps"])

    # what it leaves behind is a working repository, explorable with the commands it prints
    config = Path(summary["config"])
    assert config.is_file() and (demo_dir / "repo" / "config.json").is_file()
    listing = statevault("-c", str(config), "snapshots", "list", "--json", cwd=tmp_path)
    assert listing.returncode == 0, listing.stderr
    assert {s["source"] for s in json.loads(listing.stdout)["snapshots"]} == {"knowledge", "history", "memory"}
    check = statevault("-c", str(config), "snapshots", "check", "--read-data", cwd=tmp_path)
    assert check.returncode == 0 and "no problems found" in check.stdout, check.stdout + check.stderr
    history = statevault("-c", str(config), "drill", "history", "--json", cwd=tmp_path)
    assert history.returncode == 0 and json.loads(history.stdout)[-1]["status"] == "pass"
