"""The `statevault` command as an operator runs it: backup, list, restore modes, verify, drill.

Real PostgreSQL and Redis servers (throw-away, from the fixtures), a file:// repository.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
import redis

from backup.local_servers import free_port


def run(cfg: Path, *args: str, check_rc: int | None = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "cli.app", "-c", str(cfg), *args], capture_output=True, text=True,
                          cwd=cfg.parent, timeout=300, env={**os.environ, "COLUMNS": "200"})
    if check_rc is not None:
        assert proc.returncode == check_rc, f"rc={proc.returncode}\nstdout:{proc.stdout}\nstderr:{proc.stderr}"
    return proc


def jrun(cfg: Path, *args: str, check_rc: int | None = 0):
    proc = run(cfg, *args, "--json", check_rc=check_rc)
    return json.loads(proc.stdout), proc


@pytest.fixture
def agent_state(pg_url, redis_url, tmp_path):
    with psycopg.connect(pg_url) as conn:
        conn.execute("CREATE TABLE memories (id bigserial PRIMARY KEY, user_id text NOT NULL, content text, "
                     "meta jsonb, created_at timestamptz DEFAULT now())")
        conn.execute("INSERT INTO memories (user_id, content, meta) SELECT 'u' || (g % 20), 'memory ' || g, "
                     "jsonb_build_object('n', g) FROM generate_series(1, 500) g")
    r = redis.Redis.from_url(redis_url)
    for u in range(50):
        r.set(f"history:u{u}", json.dumps([{"role": "user", "content": f"hello {u}"}]), ex=86400)
        r.rpush(f"history:u{u}:turns", *[f"turn {i}" for i in range(5)])
    r.set("other:key", "not history")
    cfg = tmp_path / "statevault.toml"
    cfg.write_text(f'''
[repository]
url = "file://{tmp_path / 'repo'}"

[sources.memory]
kind = "postgres"
url = "{pg_url}"

[sources.history]
kind = "redis"
url = "{redis_url}"
patterns = ["history:*"]
''')
    yield cfg, pg_url, r
    r.close()


def pg_dump_rows(url: str) -> list[tuple]:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT id, user_id, content, meta::text FROM memories ORDER BY id").fetchall()


def redis_state(r: redis.Redis) -> dict:
    out = {}
    for k in sorted(r.scan_iter("*")):
        t = r.type(k).decode()
        out[k] = (t, r.get(k) if t == "string" else r.lrange(k, 0, -1))
    return out


def test_backup_restore_verify_and_modes(agent_state):
    cfg, pg_url, r = agent_state
    result, _ = jrun(cfg, "backup", "--tag", "e2e")
    assert result["ok"] and {s["source"] for s in result["sources"]} == {"memory", "history"}
    counts = {s["source"]: s["records"] for s in result["sources"]}
    assert counts == {"memory": 500, "history": 100}
    listing, _ = jrun(cfg, "snapshots", "list")
    assert len(listing["snapshots"]) == 2 and all("e2e" in s["tags"] for s in listing["snapshots"])

    # drift detection: in sync, then not
    verify, _ = jrun(cfg, "verify", "latest", "--source", "memory")
    assert verify["in_sync"]
    original_rows = pg_dump_rows(pg_url)
    with psycopg.connect(pg_url) as conn:
        conn.execute("UPDATE memories SET content = 'CORRUPTED' WHERE id % 10 = 0")
    drift, _ = jrun(cfg, "verify", "latest", "--source", "memory", check_rc=3)
    assert not drift["in_sync"]

    # onto live data without a mode: exit 2, nothing touched
    corrupted_rows = pg_dump_rows(pg_url)
    proc = run(cfg, "restore", "latest", "--source", "memory", check_rc=2)
    assert "--mode" in proc.stderr
    assert pg_dump_rows(pg_url) == corrupted_rows

    # dry run writes nothing but shows the plan
    plan, _ = jrun(cfg, "restore", "latest", "--source", "memory", "--mode", "replace", "--dry-run")
    assert plan["dry_run"] and plan["plan"][0]["records"] == 500
    assert pg_dump_rows(pg_url) == corrupted_rows

    # replace: pre-restore snapshot first, then verified restore
    restored, _ = jrun(cfg, "restore", "latest", "--source", "memory", "--mode", "replace", "--yes")
    assert restored["verified"] and restored["pre_restore_snapshot"]
    assert pg_dump_rows(pg_url) == original_rows
    # `latest` still means the newest backup, not the pre-restore state
    again, _ = jrun(cfg, "verify", "latest", "--source", "memory")
    assert again["in_sync"] and again["snapshot_id"] != restored["pre_restore_snapshot"]
    # and the restore can be undone exactly
    undo, _ = jrun(cfg, "restore", restored["pre_restore_snapshot"], "--source", "memory", "--mode", "replace", "--yes")
    assert undo["verified"]
    assert pg_dump_rows(pg_url) == corrupted_rows


def test_redis_flush_and_partial_restore(agent_state):
    cfg, _, r = agent_state
    jrun(cfg, "backup", "history")
    before = redis_state(r)
    r.flushdb()
    restored, _ = jrun(cfg, "restore", "latest", "--source", "history")
    assert restored["verified"] and restored["records_restored"] == 100
    after = redis_state(r)
    assert after == {k: v for k, v in before.items() if k.startswith(b"history:")}
    assert 0 < r.ttl("history:u1") <= 86400

    # one user's conversation lost and another user's changed: restore only u42
    r.delete("history:u42")
    r.set("history:u7", "changed since the backup")
    partial, _ = jrun(cfg, "restore", "latest", "--source", "history", "--only", "history:u42")
    assert partial["verified"] and partial["records_restored"] == 1
    assert r.get("history:u42") == before[b"history:u42"][1]
    assert r.get("history:u7") == b"changed since the backup"   # untouched


def test_one_source_down_does_not_stop_the_others(agent_state, tmp_path):
    cfg, _, _ = agent_state
    cfg.write_text(cfg.read_text() + f'''
[sources.down]
kind = "redis"
url = "redis://127.0.0.1:{free_port()}/0"
''')
    env_attempts = cfg.read_text() + "\n[daemon]\nretry_attempts = 1\n"
    cfg.write_text(env_attempts)
    result, proc = jrun(cfg, "backup", check_rc=1)
    by = {s["source"]: s for s in result["sources"]}
    assert by["memory"]["ok"] and by["history"]["ok"] and not by["down"]["ok"]
    assert by["down"]["error"]["retryable"] is True


def test_drill_passes_and_cleans_up(agent_state):
    cfg, pg_url, r = agent_state
    jrun(cfg, "backup")
    live_rows, live_redis = pg_dump_rows(pg_url), redis_state(r)
    report, _ = jrun(cfg, "drill", "--report", str(cfg.parent / "reports"))
    assert report["ok"], report
    for s in report["sources"]:
        assert s["ok"] and s["cleaned_up"] and s["rto_seconds"] is not None and s["rpo_seconds"] >= 0
    assert pg_dump_rows(pg_url) == live_rows and redis_state(r) == live_redis
    with psycopg.connect(pg_url) as conn:
        dbs = [row[0] for row in conn.execute("SELECT datname FROM pg_database WHERE datname LIKE 'statevault_drill_%'")]
    assert dbs == []
    assert list((cfg.parent / "reports").glob("drill-*.html"))
    history, _ = jrun(cfg, "drill", "history")
    assert history and history[-1]["status"] == "pass"


def test_verify_reports_a_dropped_table_as_drift(agent_state):
    cfg, pg_url, _ = agent_state
    jrun(cfg, "backup", "memory")
    with psycopg.connect(pg_url) as conn:
        conn.execute("DROP TABLE memories")
    drift, _ = jrun(cfg, "verify", "latest", "--source", "memory", check_rc=3)
    item = drift["items"][0]
    assert not drift["in_sync"] and item["actual"]["records"] == 0 and item["expected"]["records"] == 500


def test_forget_keeps_the_newest_drill_verified_snapshot(agent_state):
    cfg, _, _ = agent_state
    first, _ = jrun(cfg, "backup", "history")
    drilled = first["sources"][0]["snapshot_id"]
    report, _ = jrun(cfg, "drill", "--source", "history", "--report", str(cfg.parent / "reports"))
    assert report["ok"] and report["sources"][0]["snapshot_id"] == drilled
    later = [jrun(cfg, "backup", "history")[0]["sources"][0]["snapshot_id"] for _ in range(2)]
    result, _ = jrun(cfg, "snapshots", "forget", "--source", "history", "--keep-last", "1")
    decision = result["sources"]["history"]
    kept = {k["id"]: k["reasons"] for k in decision["keep"]}
    assert set(kept) == {later[-1], drilled}
    assert "newest verified snapshot" in kept[drilled]
    assert [r["id"] for r in decision["remove"]] == [later[0]]
    listing, _ = jrun(cfg, "snapshots", "list", "--source", "history")
    assert {s["id"] for s in listing["snapshots"]} == {later[-1], drilled}
