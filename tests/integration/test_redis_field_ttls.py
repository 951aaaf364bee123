"""Hash fields with their own TTL (HEXPIRE: Valkey 9, Redis 7.4+) are backed up and restored
under each --ttl mode, through the restore orchestrator, against real Valkey 9 and Redis 7
servers."""
from __future__ import annotations

import pytest
import redis

import backup.sources.redis as redis_source
from backup.sources.redis_records import FORMAT, field_expiries, record_key
from restore.run import restore_snapshot
from restore.targets.redis import RedisTarget
from snapshots.errors import IncompatibleTargetError
from snapshots.repository import open_repository
from snapshots.settings import Settings
from tests.integration.redis_helpers import SMALL_CHUNKS, TOL_MS, backup, run_restore

HOUR = 3_600_000


def _settings(url: str) -> Settings:
    return Settings(sources={"agents": {"kind": "redis", "url": url}})


def _field_times(c: redis.Redis, key: str, fields: list[str]) -> dict[str, int]:
    return dict(zip(fields, c.execute_command("HPEXPIRETIME", key, "FIELDS", len(fields), *fields)))


def _fill(url: str) -> redis.Redis:
    """Hashes with field TTLs: some fields, every field, a binary field, a hash split in
    parts (PART_SIZE is patched to 4), one with a key TTL too; and a hash and a string without."""
    c = redis.Redis.from_url(url)
    c.hset("session:u1", mapping={"token": "t1", "name": "ann", "csrf": "c1"})
    c.execute_command("HPEXPIRE", "session:u1", 2 * HOUR, "FIELDS", 2, "token", "csrf")
    c.hset("session:u2", mapping={"token": "t2"})
    c.execute_command("HPEXPIRE", "session:u2", 3 * HOUR, "FIELDS", 1, "token")
    c.pexpire("session:u2", 5 * HOUR)
    c.hset("session:bin", mapping={b"\xff": b"\x00", "ok": "1"})
    c.execute_command("HPEXPIRE", "session:bin", HOUR, "FIELDS", 1, b"\xff")
    c.hset("cache:big", mapping={f"f{i:02d}": str(i) for i in range(11)})
    for i, field in enumerate(["f01", "f05", "f09"]):
        c.execute_command("HPEXPIRE", "cache:big", (i + 1) * HOUR, "FIELDS", 1, field)
    c.hset("profile:u1", mapping={"name": "ann"})
    c.set("history:u1", "hello")
    return c


def _all_field_times(c: redis.Redis) -> dict:
    out = {}
    for key in c.scan_iter(count=1000):
        if c.type(key) == b"hash":
            fields = sorted(c.hkeys(key))
            out[key] = (c.hgetall(key), _field_times(c, key, fields))
    return out


@pytest.fixture()
def small_parts(monkeypatch):
    monkeypatch.setattr(redis_source, "PART_SIZE", 4)


def test_field_ttls_are_backed_up_and_restored_exactly_under_keep(valkey_server, fresh_redis_url, file_repo_url,
                                                                   small_parts):
    src_url, dst_url = fresh_redis_url(valkey_server), fresh_redis_url(valkey_server)
    src = _fill(src_url)
    repo = open_repository(file_repo_url, create=True, config=SMALL_CHUNKS)
    manifest, _ = backup(repo, src_url)
    assert manifest.items[0].format == FORMAT
    assert manifest.source_info["hash_field_ttls"] == 4  # session:u1, u2, bin and cache:big
    stored = {record_key(r): field_expiries(r) for r in repo.iter_records(manifest.items[0])}
    assert stored[b"profile:u1"] is None and stored[b"history:u1"] is None
    assert [f for f, _ in stored[b"session:u1"]] == ["csrf", "token"]  # the record's field order

    result = restore_snapshot(repo, _settings(src_url), "agents", manifest.id, to_url=dst_url)
    assert result.ok
    dst = redis.Redis.from_url(dst_url)
    before, after = _all_field_times(src), _all_field_times(dst)
    assert before == after  # values and every field's absolute expiry, to the millisecond
    assert abs(dst.pexpiretime("session:u2") - src.pexpiretime("session:u2")) <= TOL_MS


def test_reset_restarts_field_ttls_from_the_restore_and_none_drops_them(valkey_server, fresh_redis_url,
                                                                         file_repo_url):
    src_url = fresh_redis_url(valkey_server)
    _fill(src_url)
    repo = open_repository(file_repo_url, create=True, config=SMALL_CHUNKS)
    manifest, _ = backup(repo, src_url)
    cut_ms = int(manifest.cut_time.timestamp() * 1000)
    remaining = {f: t - cut_ms for f, t in _field_times(redis.Redis.from_url(src_url), "session:u1",
                                                          ["token", "csrf", "name"]).items() if t > 0}

    reset_url = fresh_redis_url(valkey_server)
    assert restore_snapshot(repo, _settings(src_url), "agents", manifest.id, to_url=reset_url, ttl="reset").ok
    dst = redis.Redis.from_url(reset_url)
    now = dst.time()
    now_ms = now[0] * 1000 + now[1] // 1000
    got = _field_times(dst, "session:u1", ["token", "csrf", "name"])
    assert got["name"] == -1
    for field, ttl in remaining.items():
        assert abs(got[field] - now_ms - ttl) <= 5 * TOL_MS, (field, got[field] - now_ms, ttl)

    none_url = fresh_redis_url(valkey_server)
    assert restore_snapshot(repo, _settings(src_url), "agents", manifest.id, to_url=none_url, ttl="none").ok
    plain = redis.Redis.from_url(none_url)
    assert all(t == -1 for _, times in _all_field_times(plain).values() for t in times.values())
    assert plain.hgetall("session:u1") == {b"token": b"t1", b"name": b"ann", b"csrf": b"c1"}


def test_keep_leaves_out_fields_that_expire_before_the_cutoff_and_still_verifies(valkey_server, fresh_redis_url,
                                                                                file_repo_url, small_parts):
    src_url, dst_url = fresh_redis_url(valkey_server), fresh_redis_url(valkey_server)
    c = _fill(src_url)
    # inside the default 300 s cutoff margin: f00 of the split hash (its parts shift on the
    # target), one of session:u1's fields, and the only field of a third hash
    c.execute_command("HPEXPIRE", "cache:big", 60_000, "FIELDS", 1, "f00")
    c.execute_command("HPEXPIRE", "session:u1", 60_000, "FIELDS", 1, "name")
    c.hset("session:gone", mapping={"token": "x"})
    c.execute_command("HPEXPIRE", "session:gone", 60_000, "FIELDS", 1, "token")
    repo = open_repository(file_repo_url, create=True, config=SMALL_CHUNKS)
    manifest, _ = backup(repo, src_url)

    result = restore_snapshot(repo, _settings(src_url), "agents", manifest.id, to_url=dst_url)
    assert result.ok  # the expected digest is of the hashes without those fields
    [plan] = result.plans
    assert any("3 hash field(s) not restored" in n and "1 hash(es) had no other field" in n for n in plan["notes"])
    dst = redis.Redis.from_url(dst_url)
    assert not dst.exists("session:gone")
    assert sorted(dst.hkeys("cache:big")) == [f"f{i:02d}".encode() for i in range(1, 11)]
    assert dst.hgetall("session:u1") == {b"token": b"t1", b"csrf": b"c1"}
    src_times = _field_times(c, "cache:big", ["f01", "f05", "f09"])
    assert _field_times(dst, "cache:big", ["f01", "f05", "f09"]) == src_times


def test_a_target_without_field_ttls_is_refused_before_writing_unless_ttl_none(valkey_server, redis_server,
                                                                             fresh_redis_url, file_repo_url):
    src_url, old_url = fresh_redis_url(valkey_server), fresh_redis_url(redis_server)  # Redis 7.0: no HEXPIRE
    _fill(src_url)
    repo = open_repository(file_repo_url, create=True, config=SMALL_CHUNKS)
    manifest, _ = backup(repo, src_url)
    for ttl in ("keep", "reset"):
        with pytest.raises(IncompatibleTargetError) as caught:
            restore_snapshot(repo, _settings(src_url), "agents", manifest.id, to_url=old_url, ttl=ttl)
        assert "cannot hold field TTLs" in caught.value.message and "--ttl none" in caught.value.hint
        assert caught.value.exit_code == 2
        assert redis.Redis.from_url(old_url).dbsize() == 0
    assert restore_snapshot(repo, _settings(src_url), "agents", manifest.id, to_url=old_url, ttl="none").ok
    assert redis.Redis.from_url(old_url).hgetall("session:u2") == {b"token": b"t2"}


def test_the_ttl_check_names_a_field_whose_expiry_differs(valkey_server, fresh_redis_url, file_repo_url):
    src_url, dst_url = fresh_redis_url(valkey_server), fresh_redis_url(valkey_server)
    _fill(src_url)
    repo = open_repository(file_repo_url, create=True, config=SMALL_CHUNKS)
    manifest, _ = backup(repo, src_url)
    target = RedisTarget(dst_url)
    try:
        [(plan, expected, got)] = run_restore(target, repo, manifest)
        assert expected == got
        records = list(repo.iter_records(plan.item))
        assert target.verify_ttls(plan, iter(records))["passed"]
        redis.Redis.from_url(dst_url).execute_command("HPEXPIRE", "session:u1", 9 * HOUR, "FIELDS", 1, "csrf")
        report = target.verify_ttls(plan, iter(records))
    finally:
        target.close()
    assert not report["passed"] and report["ttl_differs"]["count"] == 1
    [example] = report["ttl_differs"]["examples"]
    assert example["key"] == "session:u1" and example["detail"].startswith("field csrf: expiry")


def test_a_server_without_field_ttls_costs_no_field_lookups(redis_server, fresh_redis_url, file_repo_url):
    url = fresh_redis_url(redis_server)
    redis.Redis.from_url(url).hset("h", mapping={"a": "1"})
    repo = open_repository(file_repo_url, create=True, config=SMALL_CHUNKS)
    manifest, _ = backup(repo, url)
    assert "hash_field_ttls" not in manifest.source_info
    assert manifest.items[0].format == FORMAT and manifest.records == 1


def test_a_hash_scanned_in_several_pages_keeps_its_field_ttls(valkey_server, fresh_redis_url, file_repo_url,
                                                              small_parts):
    """Past 512 fields (Valkey 9) a hash is a hashtable, and HSCAN (COUNT = part size, 4 here) pages
    through it: its field expiries are asked for on their own, a part's worth at a time."""
    src_url, dst_url = fresh_redis_url(valkey_server), fresh_redis_url(valkey_server)
    c = redis.Redis.from_url(src_url)
    c.hset("big", mapping={f"f{i:03d}": str(i) for i in range(700)})
    for i in range(0, 700, 97):
        c.execute_command("HPEXPIRE", "big", (i + 10) * 60_000, "FIELDS", 1, f"f{i:03d}")  # past the cutoff
    repo = open_repository(file_repo_url, create=True, config=SMALL_CHUNKS)
    manifest, _ = backup(repo, src_url)
    assert manifest.source_info["hash_field_ttls"] == 1
    stored = [pair for r in repo.iter_records(manifest.items[0]) for pair in field_expiries(r) or ()]
    fields = [f"f{i:03d}" for i in range(0, 700, 97)]
    assert [f for f, _ in stored] == fields
    assert [t for _, t in stored] == c.execute_command("HPEXPIRETIME", "big", "FIELDS", len(fields), *fields)
    assert restore_snapshot(repo, _settings(src_url), "agents", manifest.id, to_url=dst_url).ok
    assert _field_times(redis.Redis.from_url(dst_url), "big", fields) == _field_times(c, "big", fields)
