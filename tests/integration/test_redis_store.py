"""Redis source and target against real servers: Redis 7 (per-test DB), Redis 6.2 and Valkey 9.

`run_restore` (redis_helpers) runs the orchestrator's flow: plan, restore, and the digest of
what restore wrote against the digest of the target's read-back.
"""
from __future__ import annotations

import time

import orjson
import pytest
import redis

import backup.sources.redis as redis_source
from backup.sources.redis import RedisSource
from backup.sources.redis_keys import KeyMatcher
from backup.sources.redis_records import FORMAT, display_key, record_head, record_key
from restore.targets.redis import RedisTarget
from snapshots.codec import digest_records
from snapshots.errors import SourceError, TargetNotEmptyError, UsageError
from snapshots.repository import open_repository
from snapshots.settings import RedisSource as RedisSourceSettings
from tests.integration.redis_helpers import (SMALL_CHUNKS, TOL_MS, assert_same_state, backup, fill, run_restore,
                                             typed_dump)
from tests.servers import free_port


@pytest.fixture
def repo(file_repo_url):
    return open_repository(file_repo_url, create=True, config=SMALL_CHUNKS)


@pytest.fixture
def small_parts(monkeypatch):
    """Split collections past 50 elements so the multi-record path runs on small data."""
    monkeypatch.setattr(redis_source, "PART_SIZE", 50)


@pytest.fixture
def own_db(request, fresh_redis_url):
    """A flushed DB on a session server, flushed again afterwards (that DB only)."""
    def take(server):
        url = fresh_redis_url(request.getfixturevalue(server) if isinstance(server, str) else server)
        request.addfinalizer(lambda: redis.Redis.from_url(url).flushdb())
        return url
    return take


# ---- key selection ------------------------------------------------------------------------

def test_glob_matcher_agrees_with_redis_scan_match(redis_url):
    keys = [b"history:u42", b"history:u421", b"history:u42:1", b"h?st", b"hist", b"a*b", b"axb", b"[x]",
            b"x", b"b", b"-", b"\\", b"\xff", b"user:9", b"user:a", b"caf\xc3\xa9"]
    patterns = ["history:u42", "history:u42*", "h?st", "h\\?st", "a\\*b", "[a-c]", "[^a-c]", "[c-a]", "\\[x\\]",
                "user:[0-9]", "user:[^0-9]", "*", "[\\-]", "*\\\\*", "caf?*", "[]"]
    c = redis.Redis.from_url(redis_url)
    for k in keys:
        c.set(k, 1)
    for p in patterns:
        server = set(c.scan_iter(match=p, count=1000))
        ours = {k for k in keys if KeyMatcher([p])(k)} if any(ch in p for ch in "*?[\\") else {k for k in keys if k == p.encode()}
        assert ours == server, p


def test_scan_pages_lists_every_key_once_over_many_pipelined_pages(redis_url, monkeypatch):
    """The next SCAN is sent before a page is handed over: every page still comes, in cursor
    order, until cursor 0; an abandoned listing costs its connection, not the client's next
    command (replies left in flight are never read as another command's)."""
    from backup.sources import redis_keys
    from backup.sources.redis_client import connect

    monkeypatch.setattr(redis_keys, "SCAN_COUNT", 37)
    c = redis.Redis.from_url(redis_url)
    keys = {b"k:%d" % i for i in range(2000)} | {b"other:%d" % i for i in range(50)}
    c.mset({k: b"v" for k in keys})
    client = connect(redis_url)
    pages = list(redis_keys.scan_pages(client, b"k:*"))
    assert len(pages) > 2000 // 37  # many round trips, each page at most ~COUNT names
    listed = [k for page in pages for k in page]
    assert set(listed) == {k for k in keys if k.startswith(b"k:")}
    assert list(redis_keys.sorted_unique_pages(redis_keys.scan_pages(client, b"*"))) == sorted(keys)
    gen = redis_keys.scan_pages(client, b"*")
    next(gen)   # a SCAN is in flight now
    gen.close()
    assert client.execute_command("GET", b"k:1") == b"v"
    assert client.execute_command("DBSIZE") == len(keys)


def test_pipelined_replies_survive_any_cut_of_the_byte_stream(redis_url, monkeypatch):
    """Replies are received a RECV_SIZE at a time and fed to hiredis a FEED_SIZE at a time;
    what is received but not fed waits for the next request's replies. With both sizes tiny
    and prime, replies are cut at every kind of place (inside a bulk, between requests), and
    every request still gets exactly its own replies, in order."""
    from backup.sources import redis_client

    c = redis.Redis.from_url(redis_url)
    values = {b"s:%03d" % i: b"v" * (i * 7 % 300) for i in range(200)}
    c.mset(values)
    c.rpush(b"l", *[b"e%d" % i for i in range(50)])
    keys = sorted(values)
    for recv_size, feed_size in [(13, 5), (997, 61), (1 << 20, 64 << 10)]:
        monkeypatch.setattr(redis_client._HiredisReplies, "RECV_SIZE", recv_size)
        monkeypatch.setattr(redis_client._HiredisReplies, "FEED_SIZE", feed_size)
        client = redis_client.connect(redis_url)
        with redis_client.ReplyPipe(client) as pipe:
            tickets = [(pipe.send(redis_client._pack([("MGET", *keys[i:i + 40])]), 1), keys[i:i + 40])
                       for i in range(0, len(keys), 40)]
            lrange = pipe.send(redis_client._pack([("LRANGE", b"l", 0, -1), ("TYPE", b"l"), ("GET", b"l")]), 3)
            for ticket, asked in reversed(tickets):  # later tickets first: earlier replies are kept
                assert pipe.recv(ticket) == [[values[k] for k in asked]]
            elements, kind, wrong = pipe.recv(lrange)
            assert elements == [b"e%d" % i for i in range(50)] and kind == b"list"
            assert isinstance(wrong, redis.ResponseError)
        assert redis_client.execute_packed(client, redis_client._pack([("GET", b"s:001")]), 1) == [values[b"s:001"]]
        client.close()


# ---- backup + restore --------------------------------------------------------------------

def test_round_trip_every_type_on_redis7(redis_url, fresh_redis_url, repo, small_parts):
    fill(redis_url)
    before = typed_dump(redis_url)
    manifest, _ = backup(repo, redis_url)
    item = manifest.items[0]
    assert (item.name, item.kind, item.format) == ("*", "keys", FORMAT)
    assert item.records > len(before)  # big collections were split into parts
    assert manifest.source_info["server"] == "redis" and manifest.source_info["scan_finished_at"]
    records = list(repo.iter_records(item))
    assert [record_key(r) for r in records] == sorted(record_key(r) for r in records)
    assert sum(1 for r in records if record_key(r) == b"list:big") == 3

    redis.Redis.from_url(redis_url).flushdb()
    target = RedisTarget(redis_url)
    [(plan, expected, got)] = run_restore(target, repo, manifest)
    assert expected == got == (item.records, item.digest)
    assert plan.details["expired"] == 0
    assert_same_state(before, typed_dump(redis_url))
    assert target.verify_ttls(plan, repo.iter_records(item))["passed"]
    report = target.diff(plan, repo.iter_records(item))
    assert report["passed"] and report["ok"] == len(before)
    target.close()


@pytest.mark.parametrize("source_server, target_server", [
    ("redis_server", "redis6_server"), ("redis_server", "valkey_server"),
    ("valkey_server", "redis_server"), ("redis6_server", "redis_server"),
])
def test_cross_version_restore(source_server, target_server, own_db, repo, small_parts):
    src, dst = own_db(source_server), own_db(target_server)
    fill(src)
    before = typed_dump(src)
    manifest, _ = backup(repo, src)
    [(plan, expected, got)] = run_restore(RedisTarget(dst), repo, manifest)
    assert expected == got == (manifest.items[0].records, manifest.items[0].digest)
    assert_same_state(before, typed_dump(dst))


def test_a_key_matching_two_patterns_belongs_to_the_first(redis_url, repo):
    c = redis.Redis.from_url(redis_url)
    c.set("history:u1", "a")
    c.set("session:1", "b")
    manifest, _ = backup(repo, redis_url, patterns=["history:*", "*"])
    keys = {i.name: [record_key(r) for r in repo.iter_records(i)] for i in manifest.items}
    assert keys == {"history:*": [b"history:u1"], "*": [b"session:1"]}


def _users(c, users=50, messages=5, ttl_ms=30 * 86_400_000):
    for u in range(users):
        c.rpush(f"history:u{u}", *[f"u{u} message {m}" for m in range(messages)])
        c.pexpire(f"history:u{u}", ttl_ms)
        c.hset(f"history:u{u}:meta", mapping={"name": f"user {u}", "turns": messages})


def test_partial_replace_restores_one_user_and_leaves_the_others(redis_url, repo):
    c = redis.Redis.from_url(redis_url)
    _users(c)
    c.set("config:model", "gpt")
    snapshot_u42 = {k: v for k, v in typed_dump(redis_url).items() if k.startswith(b"history:u42")}
    manifest, _ = backup(repo, redis_url, patterns=["history:*", "*"])

    # life goes on: u42's history is corrupted, others change too
    c.rpush("history:u42", "bad turn")
    c.hset("history:u42:meta", "turns", 999)
    c.set("history:u42:scratch", "created after the snapshot")
    c.rpush("history:u7", "new turn of u7")
    c.delete("history:u3")
    c.set("config:model", "changed")
    others_before = {k: v for k, v in typed_dump(redis_url).items() if not k.startswith(b"history:u42")}

    only = ["history:u42", "history:u42:*"]
    target = RedisTarget(redis_url)
    with pytest.raises(TargetNotEmptyError):
        target.plan(manifest, only=only, into=None, mode="new")
    results = run_restore(target, repo, manifest, only=only, mode="replace")
    assert [p.target for p, _, _ in results] == ["history:*"]  # "*" cannot hold history: keys
    [(plan, expected, got)] = results
    assert plan.backup_selector == only and plan.live_records == 3
    assert expected == got and expected[0] == 2
    assert plan.details["deleted_extra"] == 1
    after = typed_dump(redis_url)
    assert {k: v for k, v in after.items() if k.startswith(b"history:u42")}.keys() == snapshot_u42.keys()
    assert_same_state(snapshot_u42, {k: v for k, v in after.items() if k.startswith(b"history:u42")})
    assert {k: v for k, v in after.items() if not k.startswith(b"history:u42")} == others_before


def test_mode_new_onto_existing_keys_is_refused_and_changes_nothing(redis_url, fresh_redis_url, repo):
    c = redis.Redis.from_url(redis_url)
    _users(c, users=5)
    manifest, _ = backup(repo, redis_url)
    other = fresh_redis_url()
    o = redis.Redis.from_url(other)
    o.set("history:u2", "live data")
    o.set("unrelated", "x")
    before = typed_dump(other)
    with pytest.raises(TargetNotEmptyError) as caught:
        RedisTarget(other).plan(manifest, only=[], into=None, mode="new")
    assert "2 key(s)" in caught.value.message and "'history:u2'" in caught.value.message
    assert typed_dump(other) == before
    # a partial restore whose scope is still empty on the target is fine
    [(plan, expected, got)] = run_restore(RedisTarget(other), repo, manifest, only=["history:u4*"])
    assert expected == got and expected[0] == 2
    assert o.get("history:u2") == b"live data"


def test_swap_and_into_are_usage_errors(redis_url, repo):
    redis.Redis.from_url(redis_url).set("k", "v")
    manifest, _ = backup(repo, redis_url)
    target = RedisTarget(redis_url)
    with pytest.raises(UsageError, match="atomic switch") as caught:
        target.plan(manifest, only=[], into=None, mode="swap")
    assert "replace" in caught.value.hint
    with pytest.raises(UsageError, match="--into"):
        target.plan(manifest, only=[], into="other", mode="replace")
    assert target.supports_swap is False


def test_ttl_keep_skips_keys_expiring_before_the_cutoff_and_reports_them(redis_url, fresh_redis_url, repo):
    c = redis.Redis.from_url(redis_url)
    c.set("long", "a", px=3_600_000)
    c.set("minute", "b", px=60_000)      # inside the default 300 s margin
    c.set("brief", "c", px=400)
    c.set("forever", "d")
    manifest, _ = backup(repo, redis_url)
    snap = {record_key(r): record_head(r)[3] for r in repo.iter_records(manifest.items[0])}
    time.sleep(0.5)                       # "brief" has expired since the backup

    dst = fresh_redis_url()
    [(plan, expected, got)] = run_restore(RedisTarget(dst, expiry_margin_s=0), repo, manifest)
    assert expected == got and expected[0] == 3
    assert plan.details["expired"] == 1 and plan.details["expired_examples"] == ["brief"]
    d = redis.Redis.from_url(dst)
    assert d.execute_command("PEXPIRETIME", "long") == snap[b"long"]
    assert d.execute_command("PEXPIRETIME", "minute") == snap[b"minute"]
    assert d.pttl("forever") == -1 and not d.exists("brief")

    dst2 = fresh_redis_url()
    target = RedisTarget(dst2)            # default margin: "minute" would expire mid-verification
    [(plan, expected, got)] = run_restore(target, repo, manifest)
    assert expected == got and expected[0] == 2
    assert sorted(plan.details["expired_examples"]) == ["brief", "minute"]
    report = target.verify_ttls(plan, repo.iter_records(manifest.items[0]))
    assert report["passed"] and report["skipped_expired"] == 2 and report["ok"] == 2


def test_ttl_reset_reapplies_the_length_and_none_persists(redis_url, fresh_redis_url, repo):
    c = redis.Redis.from_url(redis_url)
    c.set("session", "a", px=3_600_000)
    c.set("forever", "b")
    manifest, _ = backup(repo, redis_url)
    length = record_head(next(r for r in repo.iter_records(manifest.items[0]) if b"session" in r))[3] \
        - int(manifest.cut_time.timestamp() * 1000)
    time.sleep(3)                         # with keep, the remaining TTL would now be 3 s shorter

    reset_url = fresh_redis_url()
    target = RedisTarget(reset_url)
    [(plan, expected, got)] = run_restore(target, repo, manifest, ttl="reset")
    assert expected == got and plan.details["expired"] == 0
    remaining = redis.Redis.from_url(reset_url).pttl("session")
    assert length - TOL_MS <= remaining <= length  # keep would have left about length - 3000
    assert redis.Redis.from_url(reset_url).pttl("forever") == -1
    assert target.verify_ttls(plan, repo.iter_records(manifest.items[0]))["passed"]

    none_url = fresh_redis_url()
    target = RedisTarget(none_url)
    [(plan, expected, got)] = run_restore(target, repo, manifest, ttl="none")
    assert expected == got and expected[0] == 2
    assert redis.Redis.from_url(none_url).pttl("session") == -1
    assert target.verify_ttls(plan, repo.iter_records(manifest.items[0]))["passed"]


@pytest.mark.parametrize("ttl, target_server", [("keep", "redis_server"), ("reset", "redis_server"),
                                                ("none", "redis_server"), ("keep", "redis6_server"),
                                                ("reset", "redis6_server")])
def test_a_restore_checks_ttls_from_its_read_back_without_a_second_lookup(redis_url, fresh_redis_url, repo,
                                                                          small_parts, monkeypatch, ttl,
                                                                          target_server, request):
    """The orchestrator's TTL check compares the expiries the verification's read-back already
    fetched (one TYPE per key on the target: the read-back's) with those of the records it
    wrote, and still catches a wrong one; on 6.2 too, where the read-back's expiries come from
    PTTL bracketed by TIME."""
    from restore.run import restore_snapshot
    from snapshots.settings import Settings

    c = redis.Redis.from_url(redis_url)
    for i in range(300):
        c.set(f"s:{i}", f"v{i}", px=3_600_000 + i)
        c.rpush(f"l:{i}", *[f"e{j}" for j in range(60 if i % 50 == 0 else 3)])  # some split in parts
        if i % 3:
            c.pexpire(f"l:{i}", 7_200_000)
    manifest, _ = backup(repo, redis_url, source="history")
    cfg = Settings(sources={"history": {"kind": "redis", "url": redis_url}})
    server = request.getfixturevalue(target_server)
    dst = fresh_redis_url(server)
    redis.Redis.from_url(dst).config_resetstat()  # command counts are per server, not per DB
    result = restore_snapshot(repo, cfg, "history", manifest.id, to_url=dst, ttl=ttl)
    assert result.ok and result.records_restored > 600
    stats = redis.Redis.from_url(dst).info("commandstats")
    assert stats["cmdstat_type"]["calls"] == 600  # the read-back's only: no lookup round

    wrong = fresh_redis_url(server)
    read_back = RedisTarget.read_back

    def drifting(self, plan, ordered=True):  # a key's expiry changes after the restore wrote it
        redis.Redis.from_url(wrong).pexpire("s:7", 60_000)
        return read_back(self, plan, ordered)

    monkeypatch.setattr(RedisTarget, "read_back", drifting)
    from snapshots.errors import VerificationError
    with pytest.raises(VerificationError) as caught:
        restore_snapshot(repo, cfg, "history", manifest.id, to_url=wrong, ttl=ttl)
    [check] = caught.value.report["checks"]
    assert check["diff"]["ttl"]["ttl_differs"]["examples"][0]["key"] == "s:7"
    assert check["diff"]["ttl"]["ttl_differs"]["count"] == 1


def test_diff_classifies_every_kind_of_difference(redis_url, fresh_redis_url, repo):
    c = redis.Redis.from_url(redis_url)
    for k in ("gone", "changed", "retyped", "ttl", "same"):
        c.set(k, "v", px=3_600_000)
    manifest, _ = backup(repo, redis_url)
    dst = fresh_redis_url()
    target = RedisTarget(dst)
    [(plan, expected, got)] = run_restore(target, repo, manifest)
    assert expected == got
    d = redis.Redis.from_url(dst)
    d.delete("gone")
    d.set("changed", "other", keepttl=True)
    d.delete("retyped")
    d.rpush("retyped", "v")
    d.pexpire("ttl", 60_000)
    d.set("extra", "x")
    report = target.diff(plan, repo.iter_records(manifest.items[0]))
    found = {cat: [e["key"] for e in report[cat]["examples"]]
             for cat in ("missing", "extra", "type_differs", "value_differs", "ttl_differs")}
    assert found == {"missing": ["gone"], "extra": ["extra"], "type_differs": ["retyped"],
                     "value_differs": ["changed"], "ttl_differs": ["ttl"]}
    assert report["ok"] == 1 and not report["passed"]
    quick = target.verify_ttls(plan, repo.iter_records(manifest.items[0]))
    assert (quick["missing"]["count"], quick["type_differs"]["count"], quick["ttl_differs"]["count"]) == (1, 1, 1)


def test_unchanged_keyspace_dedups_and_a_few_users_cost_a_few_chunks(redis_url, repo):
    c = redis.Redis.from_url(redis_url)
    pipe = c.pipeline(transaction=False)
    for u in range(400):
        for m in range(25):
            pipe.set(f"history:u{u:03d}:{m:03d}", f"user {u} turn {m}: " + "lorem ipsum " * 20, px=30 * 86_400_000)
    pipe.execute()
    first, stats1 = backup(repo, redis_url)
    second, stats2 = backup(repo, redis_url)
    assert second.items[0].digest == first.items[0].digest
    assert stats2.bytes_uploaded <= 0.01 * stats1.bytes_uploaded

    for u in (17, 230):                   # 2 users append 50 turns each: 1% of the keys
        for m in range(25, 75):
            c.set(f"history:u{u:03d}:{m:03d}", f"user {u} turn {m}: " + "dolor sit " * 20, px=30 * 86_400_000)
    third, stats3 = backup(repo, redis_url)
    assert third.items[0].records == first.items[0].records + 100
    assert 0 < stats3.bytes_uploaded <= 0.05 * stats1.bytes_uploaded


def test_unreachable_server_is_a_retryable_source_error():
    url = f"redis://127.0.0.1:{free_port()}/0"
    with pytest.raises(SourceError) as caught:
        with RedisSource(RedisSourceSettings(kind="redis", url=url)).open():
            pass
    assert caught.value.retryable
    with pytest.raises(SourceError) as caught:
        RedisTarget(url).connection()
    assert caught.value.retryable


def test_record_key_is_json_safe_for_binary_keys(redis_url, repo):
    redis.Redis.from_url(redis_url).set(b"\xff\xfe", "v")
    manifest, _ = backup(repo, redis_url)
    [record] = list(repo.iter_records(manifest.items[0]))
    key = RedisTarget(redis_url).record_key(manifest.items[0], record)
    assert key == display_key(b"\xff\xfe") == "b64://4="
    orjson.dumps(key)


def test_redis6_expiries_are_exact_so_unchanged_keys_dedup(own_db, repo):
    url = own_db("redis6_server")
    c = redis.Redis.from_url(url)
    pipe = c.pipeline(transaction=False)
    for i in range(3000):
        pipe.set(f"history:u{i:05d}", "x" * 50, px=86_400_000 + i)
    pipe.execute()
    first, _ = backup(repo, url)
    time.sleep(0.05)
    second, stats = backup(repo, url)
    item1, item2 = first.items[0], second.items[0]
    # the full records, "x" included, are byte-identical: absolute expiries computed from PTTL are exact
    assert digest_records(repo.iter_records(item1)) == digest_records(repo.iter_records(item2))
    assert [c.id for c in item1.chunks] == [c.id for c in item2.chunks]
    assert stats.bytes_uploaded == 0


def test_redis6_expiries_stay_exact_when_big_ttl_groups_keep_spanning_a_millisecond(own_db):
    """On a busy host a group of 100 PTTLs can cross a millisecond boundary on every retry:
    the group is then asked in halves until the TIMEs around a part agree. Simulated here by
    moving the first TIME of any group of more than 5 keys back a second, on every ask."""
    from backup.sources.redis_client import connect, server_info
    from backup.sources.redis_reader import KeyReader

    url = own_db("redis6_server")
    c = redis.Redis.from_url(url)
    at = int(time.time() * 1000) + 86_400_000
    keys = [b"k:%03d" % i for i in range(40)]
    for i, k in enumerate(keys):
        c.set(k, "v", pxat=at + i)

    def busy(group, reply):
        if len(group) > 5:
            reply = list(reply)
            reply[0] = [b"%d" % (int(reply[0][0]) - 1), reply[0][1]]
        return reply

    class BusyHost(KeyReader):
        def _exact_expiries(self, group, reply):
            return super()._exact_expiries(group, busy(group, reply))

        def _pttl_group(self, group):
            return busy(group, super()._pttl_group(group))

    client = connect(url)
    info = server_info(client, url)
    assert not info.has_pexpiretime
    records = list(BusyHost(client, info).read(keys))
    assert [orjson.loads(r)["x"] for r, _ in records] == [at + i for i in range(40)]


def test_full_replace_makes_the_keyspace_equal_to_the_snapshot(redis_url, repo, small_parts):
    fill(redis_url)
    before = typed_dump(redis_url)
    manifest, _ = backup(repo, redis_url)
    c = redis.Redis.from_url(redis_url)
    c.rpush("list:big", "appended")
    c.delete("hash:h")
    c.set("zset:z", "now a string")
    c.set("new:key", "not in the snapshot")
    c.xadd("stream:s", {"late": "1"})
    target = RedisTarget(redis_url)
    [(plan, expected, got)] = run_restore(target, repo, manifest, mode="replace")
    assert plan.action == "replace" and plan.live_records == len(before) - 1 + 1  # hash:h gone, new:key
    assert expected == got == (manifest.items[0].records, manifest.items[0].digest)
    assert plan.details["deleted_extra"] == 1
    assert_same_state(before, typed_dump(redis_url))


def test_server_dying_mid_backup_is_a_retryable_source_error(tmp_path):
    from tests.servers import RedisServer

    server = RedisServer.start("redis7", base_dir=tmp_path)
    try:
        redis.Redis.from_url(server.url).mset({f"k{i}": "v" for i in range(2000)})
        src = RedisSource(RedisSourceSettings(kind="redis", url=server.url))
        with pytest.raises(SourceError) as caught:
            with src.open() as cut:
                records = cut.records(cut.items()[0])
                server.kill()
                list(records)
        assert caught.value.retryable
    finally:
        server.stop()


def test_undoing_a_partial_restore_from_its_pre_restore_snapshot_touches_only_that_scope(redis_url, repo):
    """A snapshot taken with `only` (as the orchestrator's pre-restore snapshot is) restores,
    even in full and in replace mode, only within its selectors: other keys are not extras."""
    from backup.sources import open_source
    from restore.targets import open_target

    c = redis.Redis.from_url(redis_url)
    _users(c, users=10)
    settings = RedisSourceSettings(kind="redis", url=redis_url, patterns=["history:*", "*"])
    assert isinstance(open_source(settings), RedisSource)
    pre, _ = backup(repo, redis_url, patterns=["history:*", "*"], only=["history:u4", "history:u4:*"])
    assert [i.records for i in pre.items] == [2, 0] and pre.items[0].schema["only"] == ["history:u4", "history:u4:*"]
    c.rpush("history:u4", "restored turn")
    c.rpush("history:u5", "unrelated turn")
    c.set("history:u4:extra", "x")
    others = {k: v for k, v in typed_dump(redis_url).items() if not k.startswith(b"history:u4")}

    target = open_target(settings)
    results = run_restore(target, repo, pre, mode="replace")
    assert all(expected == got for _, expected, got in results)
    assert results[0][0].backup_selector == ["history:u4", "history:u4:*"]
    assert c.lrange("history:u4", 0, -1) == [f"u4 message {m}".encode() for m in range(5)]
    assert not c.exists("history:u4:extra")
    assert {k: v for k, v in typed_dump(redis_url).items() if not k.startswith(b"history:u4")} == others


# ---- keys changing while they are read -----------------------------------------------------

@pytest.mark.parametrize("server", ["redis_server", "redis6_server"])
def test_keys_changing_between_type_and_value_requests_are_read_as_they_end_up(server, own_db):
    """Per batch the reader asks TYPE + expiry of every key, then the values. Writes injected
    between the two (through a second connection, at exactly that point) give each key's
    final state, or no record when it is gone: never an error, a wrong type or a duplicate."""
    from backup.sources.redis_client import connect, server_info
    from backup.sources.redis_reader import KeyReader

    url = own_db(server)
    writer = redis.Redis.from_url(url)
    writer.set("a:string-gone", "x")
    writer.rpush("b:list-gone", "1", "2")
    writer.rpush("c:list-to-string", "1")
    writer.hset("d:hash-gone", "f", "v")
    writer.set("e:string-to-list", "old")
    writer.set("f:plain", "same", px=3_600_000)
    keys = sorted(k.encode() for k in ("a:string-gone", "b:list-gone", "c:list-to-string", "d:hash-gone",
                                      "e:string-to-list", "f:plain", "g:appears"))
    injected = []

    class Racing(KeyReader):
        def _types_reply(self, *a):  # TYPE and expiries answered; values not asked for yet
            out = super()._types_reply(*a)
            if not injected:
                injected.append(True)
                writer.delete("a:string-gone", "b:list-gone", "c:list-to-string", "d:hash-gone", "e:string-to-list")
                writer.set("c:list-to-string", "now a string")
                writer.rpush("e:string-to-list", "now a list")
                writer.set("g:appears", "too late")  # TYPE said none: not in this cut
            return out

    client = connect(url)
    try:
        records = [orjson.loads(r) for r, _ in Racing(client, server_info(client, url)).read(keys)]
    finally:
        client.close()
    assert injected
    assert [(r["k"], r["t"], r["v"]) for r in records] == [
        ("c:list-to-string", "string", "now a string"),  # LRANGE answered WRONGTYPE: read again
        ("e:string-to-list", "list", ["now a list"]),     # MGET answered nil: read again
        ("f:plain", "string", "same"),
    ]
    assert records[-1]["x"] is not None and records[0]["x"] is None
