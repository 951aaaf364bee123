"""Runbook scenarios 8 (a failed check), 9 (a stuck lease), 10 (a failed drill) and "before an
incident", run as docs/runbook.md writes them.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg

from tests.e2e import runbook_harness as rh


def _chunk_of(sv: rh.Runbook, snapshot_id: str) -> str:
    return sv.setup("snapshots", "show", snapshot_id, "--json").json["items"][0]["chunks"][0]["id"]


def test_failed_check_forget_prune_backup(agent_env):
    sv, repo = agent_env.sv, agent_env.repo
    ids = {s["source"]: s["snapshot_id"] for s in sv.setup("backup", "memory", "history", "--json").json["sources"]}
    broken, chunk = ids["history"], _chunk_of(sv, ids["history"])
    path = rh.corrupt_chunk(repo, chunk)          # bit rot in the store

    res = sv.run("statevault snapshots check")   # structure only: the chunk is there
    assert "no problems found" in res.stdout
    res = sv.run("statevault snapshots check --read-data", rc=3)
    assert f"damaged chunk {chunk} breaks snapshots: {broken}" in res.stdout
    assert f"broken snapshots: {broken}" in res.stderr and ids["memory"] not in res.output
    report = sv.run("statevault snapshots check --read-data --json", rc=3).json
    assert report["broken_snapshots"] == [broken] and report["problems"][0]["problem"] == "damaged"

    manifest = repo / "snapshots" / f"{broken}.json"
    res = sv.run("statevault snapshots forget <broken-snapshot-id> --dry-run", broken_snapshot_id=broken)
    assert "1 snapshots would be removed" in res.stdout and manifest.exists()
    sv.run("statevault snapshots forget <broken-snapshot-id>", broken_snapshot_id=broken)
    assert not manifest.exists() and (repo / "snapshots" / f"{ids['memory']}.json").exists()

    res = sv.run("statevault snapshots prune --grace 0h --dry-run")
    assert "1 unreferenced, would delete 1" in res.stdout and path.exists()
    res = sv.run("statevault snapshots prune --grace 0h")
    assert "deleted 1" in res.stdout and not path.exists()

    res = sv.run("statevault backup history")
    assert "ok" in res.stdout
    assert path.exists()                          # the same data: the same chunk, uploaded fresh
    res = sv.run("statevault snapshots check --read-data")
    assert "no problems found" in res.stdout


HOLDER = """
import sys, time
from snapshots.leases import acquire_lease
from snapshots.repository import open_repository
repo = open_repository(sys.argv[1])
acquire_lease(repo.store, "repository", exclusive=True, purpose="prune", ttl=float(sys.argv[2]))
print("held", flush=True)
time.sleep(600)
"""


def test_stuck_lease_expires_by_itself(agent_env):
    sv = agent_env.sv
    sv.setup("init")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, agent_env.repo.as_uri(), "6"], stdout=subprocess.PIPE,
                              text=True, cwd=rh.ROOT, env={**os.environ, "PYTHONPATH": str(rh.ROOT)})
    assert holder.stdout.readline().strip() == "held"
    os.kill(holder.pid, signal.SIGKILL)           # a prune that died holding the lease
    holder.wait()

    res = sv.run("statevault backup history", rc=4)
    assert "repository is locked" in res.stderr and f":{holder.pid} for 'prune'" in res.stderr
    res = sv.run("statevault locks list")
    assert f":{holder.pid}" in res.stdout and "exclusive" in res.stdout and "live" in res.stdout
    leases = sv.run("statevault locks list --json").json
    assert len(leases) == 1 and leases[0]["owner"].endswith(f":{holder.pid}") and not leases[0]["expired"]

    wait = (datetime.fromisoformat(leases[0]["expires"]) - datetime.now(timezone.utc)).total_seconds()
    time.sleep(max(wait, 0) + 0.3)               # no unlock: the lease expires by itself
    sv.run("statevault backup history")
    leases = sv.run("statevault locks list --json").json
    assert all(lease["expired"] for lease in leases)


def _scratch_databases(url: str) -> list[str]:
    with psycopg.connect(url) as conn:
        return [r[0] for r in conn.execute("SELECT datname FROM pg_database WHERE datname LIKE 'statevault_drill_%'")]


def test_failed_drill_report_keep_scratch_and_pass_again(agent_env, tmp_path):
    sv, url = agent_env.sv, agent_env.pg_url
    backup = sv.run("statevault backup --json").json
    assert backup["ok"] and len(backup["sources"]) == 3
    memory = next(s["snapshot_id"] for s in backup["sources"] if s["source"] == "memory")
    live = (rh.pg_rows(url), rh.redis_state(agent_env.redis_url))
    chunk = _chunk_of(sv, memory)
    path = agent_env.repo / "data" / chunk[:2] / chunk
    good_bytes = path.read_bytes()
    rh.corrupt_chunk(agent_env.repo, chunk)
    reports = tmp_path / "reports"

    res = sv.run("statevault drill --source memory --report $DIR --json", dir=reports, rc=3).json
    entry = res["sources"][0]
    assert res["status"] == "verification_failed" and entry["status"] == "verification_failed"
    assert "public.memories" in entry["error"] and chunk in entry["error"] and entry["cleaned_up"]
    markdown = Path(res["report_files"][0]).read_text()
    assert "VERIFICATION_FAILED" in markdown and "public.memories" in markdown
    assert Path(res["report_files"][1]).read_text().startswith("<!doctype html>")
    assert _scratch_databases(url) == []

    res = sv.run("statevault drill history")
    history = sv.run("statevault drill history --json").json
    assert history[-1]["status"] == "verification_failed" and history[-1]["id"] in res.stdout
    assert "verification_failed" in res.stdout

    res = sv.run("statevault drill --source memory --keep-scratch --report $DIR", dir=reports, rc=3)
    kept = _scratch_databases(url)
    assert len(kept) == 1                       # left for inspection, as asked, and named
    assert "scratch kept for memory: " in res.stdout and kept[0] in res.stdout
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE "{kept[0]}" WITH (FORCE)')

    path.write_bytes(good_bytes)                # repaired (scenario 8 shows how)
    res = sv.run("statevault drill --report $DIR", dir=reports)
    rows = [line for line in res.stdout.splitlines() if line.startswith("│")]
    assert len(rows) == 3 and all(" pass " in row for row in rows)
    assert (rh.pg_rows(url), rh.redis_state(agent_env.redis_url)) == live   # drills never touch live data
    assert _scratch_databases(url) == []


def test_before_an_incident(agent_env, tmp_path):
    sv, url = agent_env.sv, agent_env.pg_url
    backup = sv.setup("backup", "memory", "history", "--json").json
    first = next(s["snapshot_id"] for s in backup["sources"] if s["source"] == "memory")
    res = sv.run("statevault verify latest --source memory")
    assert "same" in res.stdout
    assert sv.run("statevault verify latest --source history --json").json["in_sync"] is True
    with psycopg.connect(url) as conn:
        conn.execute("UPDATE memories SET content = 'silently changed' WHERE id = 3")
    res = sv.run("statevault verify latest --source memory", rc=3)
    assert "drifted" in res.stdout and "public.memories" in res.stderr

    day = datetime(2026, 11, 1, 2, tzinfo=timezone.utc)
    times = [day + timedelta(days=i) for i in range(20)] + [datetime(2026, 11, 20, 14, tzinfo=timezone.utc)]
    times_file = tmp_path / "times.json"
    times_file.write_text(json.dumps([t.isoformat() for t in times]))
    res = sv.run("statevault retention explain --times <times-file> --keep-daily 7 --keep-weekly 4",
                 times_file=times_file)
    assert "keep 9, remove 12" in res.stdout
    decision = sv.run("statevault retention explain --times <times-file> --keep-daily 7 --keep-weekly 4 --json",
                      times_file=times_file).json
    kept_days = sorted(int(k["time"][8:10]) for k in decision["keep"])
    assert kept_days == [1, 8, 14, 15, 16, 17, 18, 19, 20]   # 7 days, plus the newest of 2 older ISO weeks

    second = sv.setup("backup", "memory", "--json").json["sources"][0]["snapshot_id"]
    manifests = sorted(p.name for p in (agent_env.repo / "snapshots").iterdir())
    res = sv.run("statevault snapshots forget --dry-run")    # memory keeps 1 (keep_last = 1 in the config)
    assert "1 snapshots would be removed" in res.stdout
    plan = sv.run("statevault snapshots forget --source memory --dry-run --json").json
    assert plan["dry_run"] and [r["id"] for r in plan["sources"]["memory"]["remove"]] == [first]
    assert [k["id"] for k in plan["sources"]["memory"]["keep"]] == [second]
    assert sorted(p.name for p in (agent_env.repo / "snapshots").iterdir()) == manifests

    res = sv.run("statevault snapshots check --read-data-subset 5%")
    assert "no problems found" in res.stdout and " 1 read " in res.stdout
