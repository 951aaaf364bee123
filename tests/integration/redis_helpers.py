"""Helpers for the Redis source/target tests: an independent view of a DB through redis-py,
test data covering every type, and the backup/restore flow the orchestrator runs.

`run_restore` mirrors restore/run.py: plan, stream the snapshot's records (through
plan.record_filter and the target's written_records) into restore, then compare the digest of
the records restore wrote (those AND written_filter) with the digest of the target's read-back.
"""
from __future__ import annotations

import math

import redis

from backup.sources.redis import RedisSource
from restore.targets.base import RestoreOptions
from snapshots.codec import digest_records
from snapshots.manifest import RepoConfig, utcnow
from snapshots.settings import RedisSource as RedisSourceSettings

TOL_MS = 2000
SMALL_CHUNKS = RepoConfig(id="t", created_at=utcnow(), chunk_avg_size=16 << 10, chunk_min_size=4 << 10,
                          chunk_max_size=64 << 10)


def client_for(url: str) -> redis.Redis:
    c = redis.Redis.from_url(url, protocol=2)
    c.set_response_callback("XRANGE", lambda r, **kw: r)  # keep repeated stream fields
    return c


def expiry_ms(c: redis.Redis, key) -> int | None:
    """Exact with PEXPIRETIME (Redis 7+, Valkey); TIME + PTTL (+-1 ms) on 6.2."""
    try:
        x = c.execute_command("PEXPIRETIME", key)
        return None if x < 0 else x
    except redis.ResponseError:
        pass
    pttl = c.pttl(key)
    if pttl < 0:
        return None
    sec, usec = c.time()
    return sec * 1000 + usec // 1000 + pttl


def typed_dump(url: str) -> dict:
    """Every key of the DB as (type, value, absolute expiry ms or None), via redis-py."""
    c = client_for(url)
    out = {}
    for key in c.scan_iter(count=1000):
        kind = c.type(key).decode()
        if kind == "string":
            value = c.get(key)
        elif kind == "list":
            value = c.lrange(key, 0, -1)
        elif kind == "hash":
            value = c.hgetall(key)
        elif kind == "set":
            value = c.smembers(key)
        elif kind == "zset":
            value = c.zrange(key, 0, -1, withscores=True)
        else:
            value = (c.xrange(key), c.xinfo_stream(key)["last-generated-id"], stream_groups(c, key))
        out[key] = (kind, value, expiry_ms(c, key))
    c.close()
    return out


def stream_groups(c: redis.Redis, key) -> list:
    """Each group's name, last-delivered id, consumer names and pending entries (id, consumer,
    delivery count) of messages still in the stream (idle times restart at a restore)."""
    ids = {entry[0] for entry in c.xrange(key)}
    groups = []
    for g in c.xinfo_groups(key):
        consumers = sorted(x["name"] for x in c.xinfo_consumers(key, g["name"]))
        pending = [(p["message_id"], p["consumer"], p["times_delivered"])
                   for p in c.xpending_range(key, g["name"], "-", "+", 100_000) if p["message_id"] in ids]
        groups.append((g["name"], g["last-delivered-id"], consumers, pending))
    return sorted(groups)


def assert_same_state(expected: dict, actual: dict) -> None:
    """Same keys, types and values; expiries equal within TOL_MS."""
    assert sorted(expected) == sorted(actual)
    for key, (kind, value, x) in expected.items():
        akind, avalue, ax = actual[key]
        assert (akind, avalue) == (kind, value), key
        if x is None:
            assert ax is None, key
        else:
            assert ax is not None and abs(ax - x) <= TOL_MS, (key, x, ax)


def fill(url: str) -> None:
    """Every type, binary-unsafe keys and values, float scores with +/-inf, TTLs on some."""
    c = redis.Redis.from_url(url)
    c.set("str:plain", "hello wörld")
    c.set(b"bin:\xff\xfe", b"\x00\x80\xff binary")
    c.set("str:ttl", "soon", px=3_600_000)
    c.set('str:"quoted\\key","t":"x"', "tricky key")
    c.rpush("list:l", "a", "b", "a", b"\xc3")
    c.rpush("list:big", *[f"m{i}" for i in range(130)])
    c.hset("hash:h", mapping={"b": "2", "a": "1", b"\xff": b"\xfe"})
    c.hset("hash:big", mapping={f"f{i:03d}": str(i) for i in range(120)})
    c.sadd("set:s", "z", "y", b"\x80")
    c.sadd("set:big", *[f"m{i}" for i in range(120)])
    c.zadd("zset:z", {"inf": math.inf, "ninf": -math.inf, "tenth": 0.1, "third": 1 / 3, "big": 1e300,
                      "tie-b": 2, "tie-a": 2, "neg": -2.5})
    c.zadd("zset:big", {f"m{i}": i / 7 for i in range(130)})
    c.execute_command("XADD", "stream:s", "1-1", "f", "v", "f", "dup")
    c.xadd("stream:s", {"g": b"\xff"}, id="2-5")
    c.xgroup_create("stream:s", "readers", id="1-1")
    c.xgroup_create("stream:s", "late", id="$")
    for i in range(120):
        c.xadd("stream:big", {"n": str(i)}, id=f"{i + 1}-0")
    # consumer-group state: pending entries with delivery counts, an idle consumer, a binary
    # consumer name, and a pending entry whose message was deleted (not kept: nothing can recreate it)
    c.xgroup_create("stream:big", "workers", id="0")
    c.xreadgroup("workers", "alice", {"stream:big": ">"}, count=80)
    c.xack("stream:big", "workers", *[f"{i}-0" for i in range(1, 11)])
    c.xclaim("stream:big", "workers", "bob", 0, [f"{i}-0" for i in range(11, 16)])
    c.execute_command("XCLAIM", "stream:big", "workers", "bob", 0, "12-0", "RETRYCOUNT", 7)
    c.execute_command("XGROUP", "CREATECONSUMER", "stream:big", "workers", "carol")
    c.execute_command("XGROUP", "CREATECONSUMER", "stream:s", "readers", b"\xffbin")
    c.xdel("stream:big", "20-0")
    c.xadd("stream:empty", {"a": "1"}, id="9-9")
    c.xdel("stream:empty", "9-9")
    for key, ms in [("zset:z", 7_200_000), ("hash:h", 5_000_000), ("list:big", 5_000_000),
                    ("stream:s", 5_000_000), ("set:big", 4_000_000)]:
        c.pexpire(key, ms)
    c.close()


def backup(repo, url, *, patterns=("*",), only=None, source="agents"):
    src = RedisSource(RedisSourceSettings(kind="redis", url=url, patterns=list(patterns)))
    with src.open(only=only) as cut:
        writer = repo.begin_snapshot(source, "redis", source_info=cut.source_info)
        for item in cut.items():
            cut.backup_item(item, writer)
        manifest = writer.commit(cut.cut_time, extra_info=cut.source_info)
    return manifest, writer.stats


def run_restore(target, repo, manifest, *, only=(), mode="new", ttl="keep"):
    """plan -> restore -> (plan, expected (count, digest), read-back (count, digest)) per item."""
    options = RestoreOptions(mode=mode, ttl=ttl)
    results = []
    for plan in target.plan(manifest, only=list(only), into=None, mode=mode, ttl=ttl):
        def records():
            chosen = (r for r in repo.iter_records(plan.item) if plan.record_filter is None or plan.record_filter(r))
            cut = target.written_records(plan, options)
            return chosen if cut is None else cut(chosen)

        target.restore(plan, records(), options)
        keep = target.written_filter(plan, options)
        expected = digest_records(target.canonical(plan.item, r) for r in records() if keep is None or keep(r))
        got = digest_records(target.canonical(plan.item, r) for r in target.read_back(plan))
        results.append((plan, expected, got))
    return results
