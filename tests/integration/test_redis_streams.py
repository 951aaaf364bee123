"""Stream consumer-group state (redis-jsonl-v2): consumers and pending entries come back, with
the same owners and delivery counts, and v1 snapshots still restore and verify as v1."""
from __future__ import annotations

import functools

import orjson
import redis

import backup.sources.redis as redis_source
from backup.sources.redis_reader import KeyReader
from backup.sources.redis_records import FORMAT, FORMAT_V1, canonical, record_key
from restore.targets.redis import RedisTarget
from tests.integration.redis_helpers import assert_same_state, backup, fill, run_restore, stream_groups, typed_dump
from tests.integration.test_redis_store import repo, small_parts  # noqa: F401  (the Redis tests' fixtures)


def _stream_records(repo, manifest, key: bytes) -> list[dict]:
    return [orjson.loads(r) for r in repo.iter_records(manifest.items[0]) if record_key(r) == key]


def test_consumers_and_pending_entries_round_trip(redis_url, fresh_redis_url, repo, small_parts):
    fill(redis_url)
    c = redis.Redis.from_url(redis_url, protocol=2)
    before = typed_dump(redis_url)
    manifest, _ = backup(repo, redis_url)
    assert manifest.items[0].format == FORMAT
    assert manifest.source_info["dropped_pending_entries"] == 1  # 20-0: its message was deleted

    parts = _stream_records(repo, manifest, b"stream:big")
    # 119 entries in parts of 50, then 69 pending entries (80 read, 10 acked, 1 deleted) in parts of 50
    assert [r["p"] for r in parts] == [0, 1, 2, 3, 4]
    assert [len(r["v"].get("entries", ())) for r in parts] == [50, 50, 19, 0, 0]
    assert parts[0]["v"]["groups"] == [["workers", "80-0", ["alice", "bob", "carol"]]]
    pending = parts[3]["v"]["pending"] + parts[4]["v"]["pending"]
    assert len(pending) == 69 and len(parts[3]["v"]["pending"]) == 50
    assert pending[:3] == [["workers", "11-0", "bob", 2], ["workers", "12-0", "bob", 7], ["workers", "13-0", "bob", 2]]
    assert ["workers", "21-0", "alice", 1] in pending and not any(p[1] == "20-0" for p in pending)
    [small] = _stream_records(repo, manifest, b"stream:s")
    assert "p" not in small and small["v"]["groups"] == [["late", "2-5", []],
                                                         ["readers", "1-1", [{"b64": "/2Jpbg=="}]]]

    target_url = fresh_redis_url()
    [(plan, expected, got)] = run_restore(RedisTarget(target_url), repo, manifest)
    assert expected == got == (manifest.items[0].records, manifest.items[0].digest)
    assert_same_state(before, typed_dump(target_url))
    t = redis.Redis.from_url(target_url, protocol=2)
    assert t.xinfo_groups("stream:big")[0]["pending"] == 69  # the source still counts the deleted one
    assert c.xinfo_groups("stream:big")[0]["pending"] == 70
    # the restored group works: entries can be acknowledged, and delivery goes on after 80-0
    assert t.xack("stream:big", "workers", "21-0") == 1
    [[_, delivered]] = t.xreadgroup("workers", "dave", {"stream:big": ">"}, count=1)
    assert delivered[0][0] == b"81-0"


def test_a_stream_whose_only_pending_entries_were_deleted_has_no_parts(redis_url, fresh_redis_url, repo):
    c = redis.Redis.from_url(redis_url)
    c.xadd("q", {"a": "1"}, id="1-0")
    c.xadd("q", {"a": "2"}, id="2-0")
    c.xgroup_create("q", "g", id="0")
    c.xreadgroup("g", "w", {"q": ">"}, count=1)
    c.xdel("q", "1-0")
    manifest, _ = backup(repo, redis_url)
    [record] = _stream_records(repo, manifest, b"q")
    assert "p" not in record and record["v"]["groups"] == [["g", "1-0", ["w"]]]
    target_url = fresh_redis_url()
    [(_, expected, got)] = run_restore(RedisTarget(target_url), repo, manifest)
    assert expected == got
    assert stream_groups(redis.Redis.from_url(target_url, protocol=2), "q") == [(b"g", b"1-0", [b"w"], [])]


def test_v1_snapshots_restore_and_verify_in_v1_form(redis_url, fresh_redis_url, repo, monkeypatch):
    """A snapshot taken before consumer state was kept: groups without consumers, no pending
    parts. It restores, and its verification reads the target back without them too."""
    fill(redis_url)
    with monkeypatch.context() as m:  # what the previous release wrote
        m.setattr(redis_source, "FORMAT", FORMAT_V1)
        m.setattr(redis_source, "KeyReader", functools.partial(KeyReader, group_state=False))
        manifest, _ = backup(repo, redis_url)
    item = manifest.items[0]
    assert item.format == FORMAT_V1
    [big] = _stream_records(repo, manifest, b"stream:big")
    assert "p" not in big and big["v"]["groups"] == [["workers", "80-0"]]

    target_url = fresh_redis_url()
    [(plan, expected, got)] = run_restore(RedisTarget(target_url), repo, manifest)
    assert expected == got == (item.records, item.digest)
    t = redis.Redis.from_url(target_url, protocol=2)
    assert t.xinfo_groups("stream:big")[0]["consumers"] == 0 and t.xinfo_groups("stream:big")[0]["pending"] == 0


def _counters(url: str, key: str) -> tuple:
    c = redis.Redis.from_url(url, protocol=2)
    info = c.xinfo_stream(key)
    groups = [(g["name"], g["entries-read"], g["lag"]) for g in c.xinfo_groups(key)]
    return info["entries-added"], info["max-deleted-entry-id"], sorted(groups)


def test_stream_counters_come_back_so_consumer_lag_is_the_same(redis_url, fresh_redis_url, redis6_server, repo):
    """Redis 7 keeps entries-added, max-deleted-entry-id and each group's entries-read, from
    which XINFO GROUPS computes lag; XSETID and XGROUP CREATE take them back. A 6.2 target has
    none: the same snapshot restores there without them."""
    c = redis.Redis.from_url(redis_url)
    for i in range(10):
        c.xadd("jobs", {"n": str(i)}, id=f"{i + 1}-0")
    c.xgroup_create("jobs", "workers", id="0")
    c.xreadgroup("workers", "w1", {"jobs": ">"}, count=4)  # entries-read 4, lag 6
    c.xgroup_create("jobs", "audit", id="$")                # entries-read unknown (null) on 7.0
    c.xadd("trimmed", {"a": "1"}, id="1-0")
    c.xadd("trimmed", {"a": "2"}, id="2-0")
    c.xdel("trimmed", "2-0")                                # max-deleted-entry-id 2-0, entries-added 2
    c.set("other", "x")
    manifest, _ = backup(repo, redis_url)
    assert manifest.source_info["stream_counters"] == 2
    jobs = [r for r in repo.iter_records(manifest.items[0]) if record_key(r) == b"jobs"]
    assert len(jobs) == 2  # entries and groups, then the pending part: the counters go with part 0
    assert jobs[0].endswith(b',"x":null,"sx":[10,"0-0",[["audit",null],["workers",4]]]}\n')  # 7.0: "$" reads null
    assert b'"sx"' not in jobs[1] and b'"sx"' not in canonical(jobs[0])

    target_url = fresh_redis_url()
    target = RedisTarget(target_url)
    try:
        [(plan, expected, got)] = run_restore(target, repo, manifest)
        assert expected == got
        for key in ("jobs", "trimmed"):
            assert _counters(target_url, key) == _counters(redis_url, key)
        records = list(repo.iter_records(plan.item))
        assert target.verify_ttls(plan, iter(records))["passed"]
        redis.Redis.from_url(target_url).execute_command("XSETID", "jobs", "10-0", "ENTRIESADDED", 12)
        report = target.verify_ttls(plan, iter(records))
    finally:
        target.close()
    assert not report["passed"] and report["counters_differ"]["count"] == 1
    assert report["counters_differ"]["examples"][0]["key"] == "jobs"

    old_url = fresh_redis_url(redis6_server)
    old = RedisTarget(old_url)
    try:
        [(plan, expected, got)] = run_restore(old, repo, manifest)
        assert expected == got and old.verify_ttls(plan, repo.iter_records(plan.item))["passed"]
    finally:
        old.close()
    assert redis.Redis.from_url(old_url).xlen("jobs") == 10
