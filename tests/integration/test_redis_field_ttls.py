"""Per-field hash TTLs (HEXPIRE: Valkey 9, Redis 7.4+) are not kept: a backup says so in the
snapshot and the log instead of dropping them silently. Against a real Valkey 9."""
from __future__ import annotations

import logging

import redis

from snapshots.repository import open_repository
from tests.integration.redis_helpers import SMALL_CHUNKS, backup


def test_hash_field_ttls_are_reported_not_silently_dropped(valkey_server, redis_server, fresh_redis_url,
                                                           file_repo_url, caplog):
    url = fresh_redis_url(valkey_server)
    c = redis.Redis.from_url(url)
    c.hset("session:u1", mapping={"token": "t", "name": "n"})
    c.hset("session:u2", mapping={"token": "t"})
    c.hset("profile:u1", mapping={"name": "n"})
    c.execute_command("HPEXPIRE", "session:u1", 3_600_000, "FIELDS", 1, "token")
    c.execute_command("HPEXPIRE", "session:u2", 3_600_000, "FIELDS", 1, "token")
    repo = open_repository(file_repo_url, create=True, config=SMALL_CHUNKS)
    with caplog.at_level(logging.WARNING, logger="statevault.backup.redis"):
        manifest, _ = backup(repo, url)
    assert manifest.source_info["hash_field_ttls_not_kept"] == 2
    assert "2 key(s) of db" in caplog.text and "field TTLs are not kept" in caplog.text
    assert manifest.records == 3  # the fields themselves are backed up

    # a server without field TTLs: nothing to report
    plain = fresh_redis_url(redis_server)
    redis.Redis.from_url(plain).hset("h", mapping={"a": "1"})
    manifest, _ = backup(repo, plain, source="plain")
    assert "hash_field_ttls_not_kept" not in manifest.source_info
