"""Runbook scenarios 3 (one user's conversation), 4 (memory corrupted at a known time),
5 (whole Redis lost), 6 (new server, new name) and 7 (undoing a restore), run as
docs/runbook.md writes them against throw-away PostgreSQL and Redis.
"""
from __future__ import annotations

import time
from datetime import datetime, timezone

import psycopg
import redis

from tests.e2e import runbook_harness as rh
from tests.servers import unique_name

TOLERANCE_MS = 3000


def test_one_users_conversation_lost(agent_env):
    sv, url = agent_env.sv, agent_env.redis_url
    sv.setup("backup", "history")
    before, expiries = rh.redis_state(url), rh.redis_expiry_times(url)
    r = redis.Redis.from_url(url)
    r.delete("history:u42")                      # the incident
    r.set("history:u7", "changed since the backup")

    res = sv.run("statevault restore latest --source history --only history:u42 --dry-run")
    assert "dry run: nothing was written" in res.stdout and not r.exists("history:u42")
    res = sv.run("statevault restore latest --source history --only history:u42")
    assert "verified history:* -> history:*: 1 records" in res.stdout
    assert r.get("history:u42") == before[b"history:u42"][1]
    assert r.pexpiretime("history:u42") == expiries[b"history:u42"] > 0     # --ttl keep: the same expiry
    assert r.get("history:u7") == b"changed since the backup"                 # other users untouched

    r.set("history:u42", "the wrong conversation")
    res = sv.run("statevault restore latest --source history --only history:u42", rc=2)
    assert "--mode replace" in res.stderr and r.get("history:u42") == b"the wrong conversation"
    res = sv.run("statevault restore latest --source history --only history:u42 --mode replace --yes")
    assert "pre-restore snapshot:" in res.stdout and "1 records" in res.stdout
    assert r.get("history:u42") == before[b"history:u42"][1]
    assert r.get("history:u7") == b"changed since the backup"
    r.close()


def _corrupt_memories(url: str) -> None:
    with psycopg.connect(url) as conn:
        conn.execute("UPDATE memories SET content = 'CORRUPTED BY BAD DEPLOY' WHERE id % 7 = 0")
        conn.execute("DELETE FROM memories WHERE id % 11 = 0")


def test_memory_corrupted_at_a_known_time(agent_env):
    sv, url = agent_env.sv, agent_env.pg_url
    good = sv.setup("backup", "memory", "--json").json["sources"][0]["snapshot_id"]
    good_rows = rh.pg_rows(url)
    time.sleep(1.1)
    incident = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")   # after `good`, before `bad`
    time.sleep(1.1)
    _corrupt_memories(url)                         # the bad deploy ...
    bad = sv.setup("backup", "memory", "--json").json["sources"][0]["snapshot_id"]   # ... already backed up

    res = sv.run("statevault snapshots list --source memory")
    assert good in res.stdout and bad in res.stdout
    listing = sv.run("statevault snapshots list --source memory --json").json
    assert [s["id"] for s in listing["snapshots"]] == [good, bad]

    damaged = rh.pg_rows(url)
    res = sv.run("statevault restore --at <time> --source memory --mode replace --dry-run", time=incident)
    assert f"snapshot {good}" in res.stdout and "dry run: nothing was written" in res.stdout
    assert rh.pg_rows(url) == damaged
    res = sv.run("statevault restore --at <time> --source memory --mode replace --yes", time=incident)
    assert f"restore of memory snapshot {good}" in res.stdout and "pre-restore snapshot:" in res.stdout
    assert "verified public.memories -> public.memories: 300 records" in res.stdout
    assert rh.pg_rows(url) == good_rows

    _corrupt_memories(url)
    res = sv.run("statevault restore --at <time> --source memory --only public.memories --mode swap --yes --json",
                 time=incident).json
    assert res["snapshot_id"] == good and res["verified"] and res["plan"][0]["action"] == "swap"
    assert rh.pg_rows(url) == good_rows
    res = sv.run("statevault verify <snapshot-id> --source memory", snapshot_id=good)
    assert "same" in res.stdout


def test_whole_redis_lost(agent_env):
    sv, url = agent_env.sv, agent_env.redis_url
    sv.setup("backup", "history")
    before, expiries, ttls = rh.redis_state(url), rh.redis_expiry_times(url), rh.redis_pttls(url)
    r = redis.Redis.from_url(url)
    r.flushdb()                                    # the incident

    res = sv.run("statevault restore latest --source history --dry-run")
    assert "dry run: nothing was written" in res.stdout and r.dbsize() == 0
    res = sv.run("statevault restore latest --source history")
    assert "verified history:* -> history:*: 61 records" in res.stdout
    assert rh.redis_state(url) == before and not r.exists("session:u42")   # only the source's patterns
    after = rh.redis_expiry_times(url)
    assert after == expiries and any(x > 0 for x in after.values())   # the same absolute expiries
    assert after[b"history:u42:events"] == -1                        # had none, has none
    res = sv.run("statevault verify latest --source history")
    assert "same" in res.stdout

    r.flushdb()
    started = r.time()
    sv.run("statevault restore latest --source history --ttl reset")
    ended = r.time()
    assert rh.redis_state(url) == before
    # each key's TTL at the backup, counted from a moment during the restore
    lo, hi = (s * 1000 + us // 1000 for s, us in (started, ended))
    assert all(lo + ttls[k] - TOLERANCE_MS <= r.pexpiretime(k) <= hi + ttls[k] + TOLERANCE_MS
               for k in ttls if ttls[k] > 0)
    r.flushdb()
    res = sv.run("statevault restore latest --source history --ttl none --json").json
    assert res["verified"] and res["records_restored"] == 61
    assert rh.redis_state(url) == before
    assert set(rh.redis_pttls(url).values()) == {-1}   # persisted: no key expires
    r.close()


def test_restore_to_a_new_server_and_under_a_new_name(agent_env, pg_server, fresh_redis_url):
    sv = agent_env.sv
    sv.setup("backup", "memory", "history")
    live_rows, live_keys = rh.pg_rows(agent_env.pg_url), rh.redis_state(agent_env.redis_url)
    name = unique_name("svtest", "runbook_new_server")
    new_pg = pg_server.create_database(name)
    try:
        res = sv.run("statevault restore latest --source memory --to <new-postgres-url>", new_postgres_url=new_pg)
        assert "verified public.memories -> public.memories: 300 records" in res.stdout
        assert rh.pg_rows(new_pg) == live_rows
    finally:
        pg_server.drop_database(name)
    new_redis = fresh_redis_url()
    res = sv.run("statevault restore latest --source history --to <new-redis-url>", new_redis_url=new_redis)
    assert "verified history:* -> history:*: 61 records" in res.stdout
    assert rh.redis_state(new_redis) == live_keys

    res = sv.run("statevault restore latest --source memory --only public.memories --into public.memories_restored")
    assert "verified public.memories -> public.memories_restored: 300 records" in res.stdout
    assert rh.pg_rows(agent_env.pg_url, "memories_restored") == live_rows
    assert rh.pg_rows(agent_env.pg_url) == live_rows and rh.redis_state(agent_env.redis_url) == live_keys


def test_undo_a_restore(agent_env):
    sv, url = agent_env.sv, agent_env.pg_url
    sv.setup("backup", "memory")
    backed_up = rh.pg_rows(url)
    with psycopg.connect(url) as conn:   # memories written after the backup, which the restore would lose
        conn.execute("INSERT INTO memories (user_id, kind, content) VALUES ('u42', 'fact', 'prefers email')")
        conn.execute("UPDATE memories SET content = 'edited after the backup' WHERE id = 5")
    newer = rh.pg_rows(url)

    res = sv.run("statevault restore latest --source memory --mode replace --yes --json").json
    pre = res["pre_restore_snapshot"]
    assert res["verified"] and pre and rh.pg_rows(url) == backed_up
    listing = sv.run("statevault snapshots list --source memory").stdout
    assert pre in listing and "pre-restore" in listing

    res = sv.run("statevault restore <pre-restore-id> --source memory --mode replace --yes", pre_restore_id=pre)
    assert f"restore of memory snapshot {pre}" in res.stdout and "verified" in res.stdout
    assert rh.pg_rows(url) == newer
    res = sv.run("statevault verify <pre-restore-id> --source memory", pre_restore_id=pre)
    assert "same" in res.stdout
