"""A restore that fails after it started writing leaves no half-written target behind.

PostgreSQL restores run in transactions (a failure rolls back). Redis and Qdrant have no
transaction across a whole restore, so a failed restore undoes what it wrote:
- Redis, mode new: the keys it wrote are removed (their scope was empty when planned);
- Qdrant: a collection it created (mode new, or a swap's staging copy) is dropped;
- mode replace: the live data was already overwritten; the error names the pre-restore
  snapshot and the command that puts it back, and that command does.
The failure: a damaged chunk three quarters into the snapshot, found only when read.
"""
from __future__ import annotations

import pytest
import redis

from restore.run import restore_snapshot
from snapshots.errors import CorruptChunkError, StatevaultError
from snapshots.repository import open_repository
from snapshots.settings import Settings
from tests.damage import damage_late_chunk
from tests.integration.redis_helpers import SMALL_CHUNKS, assert_same_state, backup, typed_dump


@pytest.fixture
def repo(file_repo_url):
    return open_repository(file_repo_url, create=True, config=SMALL_CHUNKS)


def _keyspace(c, n: int, text: str = "message") -> None:
    for i in range(n):
        c.set(f"history:u{i}", f"{text} {i} " * 20, px=3_600_000)
        c.rpush(f"turns:u{i}", *[f"{text} turn {j}" for j in range(5)])


def _settings(url: str) -> Settings:
    return Settings(sources={"history": {"kind": "redis", "url": url, "patterns": ["history:*", "*"]}})


def test_redis_new_restore_that_fails_midway_removes_the_keys_it_wrote(redis_url, fresh_redis_url, repo,
                                                                        file_repo_url):
    _keyspace(redis.Redis.from_url(redis_url), 2000)  # 4000 records: write batches go out before the damage
    manifest, _ = backup(repo, redis_url, patterns=["history:*", "*"], source="history")
    damage_late_chunk(file_repo_url, manifest.items[0])
    target = fresh_redis_url()
    redis.Redis.from_url(target).set("unrelated", "kept")  # in item "*"'s scope, outside `only`
    before = typed_dump(target)
    with pytest.raises(CorruptChunkError) as caught:
        restore_snapshot(repo, _settings(redis_url), "history", manifest.id, to_url=target, only=["history:*"])
    assert typed_dump(target) == before
    assert "key(s) it had written were removed; the target is as the plan found it" in caught.value.message
    assert "restore an older one" in caught.value.hint


def test_redis_replace_that_fails_midway_names_the_snapshot_that_undoes_it(redis_url, repo, file_repo_url):
    c = redis.Redis.from_url(redis_url)
    _keyspace(c, 2000)
    manifest, _ = backup(repo, redis_url, patterns=["history:*", "*"], source="history")
    damage_late_chunk(file_repo_url, manifest.items[0])
    _keyspace(c, 2000, text="changed")
    live = typed_dump(redis_url)
    with pytest.raises(CorruptChunkError) as caught:
        restore_snapshot(repo, _settings(redis_url), "history", manifest.id, mode="replace")
    assert typed_dump(redis_url) != live  # replace had overwritten keys when the damage was found
    pre = caught.value.message.split("pre-restore snapshot ")[1].split(")")[0]
    assert f"statevault restore {pre} --source history --mode replace" in caught.value.hint
    result = restore_snapshot(repo, _settings(redis_url), "history", pre, mode="replace")
    assert result.ok
    assert_same_state(live, typed_dump(redis_url))


def test_postgres_new_restore_that_fails_on_a_later_table_drops_what_it_created(pg_database, repo, file_repo_url):
    """Each table is restored in its own transaction: the failing one rolls back by itself, and
    what the ones committed before it created (the tables, and the schema, enum type and
    shared sequence they brought) is dropped, so the database is as the plan found it."""
    import psycopg

    source, target = pg_database("svsource"), pg_database("svtarget")
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA mem; CREATE TYPE mem.mood AS ENUM ('calm', 'busy'); "
                     "CREATE SEQUENCE mem.shared_ids")
        for table in ("a_first", "b_second"):
            conn.execute(f"CREATE TABLE mem.{table} (id bigint PRIMARY KEY DEFAULT nextval('mem.shared_ids'), "
                         f"mood mem.mood NOT NULL DEFAULT 'calm', body text)")
            conn.execute(f"INSERT INTO mem.{table} (body) SELECT repeat('{table} fact ' || g, 8) "
                         f"FROM generate_series(1, 3000) g")
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("CREATE TABLE unrelated (id int)")
    before = _catalog(target)
    cfg = Settings(sources={"memory": {"kind": "postgres", "url": source}})
    from backup.job import snapshot_source

    manifest, _ = snapshot_source(repo, "memory", cfg.sources["memory"])
    assert [i.name for i in manifest.items] == ["mem.a_first", "mem.b_second"]
    damage_late_chunk(file_repo_url, manifest.item("mem.b_second"))
    with pytest.raises(CorruptChunkError) as caught:
        restore_snapshot(repo, cfg, "memory", manifest.id, to_url=target)
    message = caught.value.message
    assert "the table(s) it had created were dropped: mem.a_first" in message
    assert "so were the sequence(s) it had created: mem.shared_ids" in message
    assert "so were the type(s) it had created: mem.mood" in message and "schema(s) it had created: mem" in message
    assert _catalog(target) == before


def _catalog(url: str) -> list:
    """Every schema, type, table and sequence outside the system catalogs."""
    import psycopg

    with psycopg.connect(url) as conn:
        return conn.execute("""
            SELECT 'schema', nspname FROM pg_namespace WHERE nspname NOT LIKE 'pg\\_%' AND nspname <> 'information_schema'
            UNION ALL SELECT 'type', typname FROM pg_type t JOIN pg_namespace n ON n.oid = typnamespace
                      WHERE nspname NOT IN ('pg_catalog', 'information_schema') AND nspname NOT LIKE 'pg\\_toast%'
            UNION ALL SELECT 'rel ' || relkind::text, relname FROM pg_class c JOIN pg_namespace n ON n.oid = relnamespace
                      WHERE nspname NOT IN ('pg_catalog', 'information_schema') AND nspname NOT LIKE 'pg\\_toast%'
            ORDER BY 1, 2""").fetchall()


def test_postgres_undo_keeps_what_something_else_came_to_use(pg_database):
    """An enum type the restore created but another table uses by the time of the undo stays,
    and the undo says it could not finish (restore.run reports "undoing it failed too")."""
    import psycopg
    from psycopg import sql

    from restore.targets.postgres_live import Created

    url = pg_database("svtarget")
    with psycopg.connect(url, autocommit=True) as conn:
        created, plan = Created(), object()
        with conn.transaction():
            conn.execute("CREATE TYPE tone AS ENUM ('warm')")
            created.add("TYPE", sql.Identifier("public", "tone"), "public.tone")
            conn.execute("CREATE TABLE restored (t tone)")
            created.add("TABLE", sql.Identifier("public", "restored"), "public.restored")
        created.commit(plan)
        conn.execute("CREATE TABLE theirs (t tone)")
        with pytest.raises(StatevaultError) as caught:
            created.drop(conn, [plan])
        assert caught.value.message == ("the table(s) it had created were dropped: public.restored; "
                                        "but type public.tone stayed: something else uses it now")
        left = conn.execute("SELECT relname FROM pg_class WHERE relname IN ('restored', 'theirs')").fetchall()
        assert left == [("theirs",)]
        assert created.drop(conn, [plan]) is None


def test_redis_write_the_server_refuses_fails_the_restore_and_is_undone(redis_url, fresh_redis_url, repo,
                                                                          monkeypatch):
    """Write requests are pipelined (a batch goes out before the previous one's replies are
    read): an error reply still fails the restore, with the server's message, and mode new's
    undo still removes every key written before and after it."""
    import restore.targets.redis as redis_target
    from snapshots.errors import StatevaultError

    _keyspace(redis.Redis.from_url(redis_url), 2000)
    manifest, _ = backup(repo, redis_url, patterns=["history:*", "*"], source="history")
    real_execute, calls = redis_target._KeyWriter._execute, []

    def execute(self, commands):
        if commands:
            calls.append(1)
            if len(calls) == 1:  # the first write batch: one command the server refuses
                commands[-1] = redis_target._pack([("SET", "history:bad", "v", "NOSUCHOPTION")])
        return real_execute(self, commands)

    monkeypatch.setattr(redis_target._KeyWriter, "_execute", execute)
    target = fresh_redis_url()
    with pytest.raises(StatevaultError) as caught:
        restore_snapshot(repo, _settings(redis_url), "history", manifest.id, to_url=target)
    assert "syntax error" in caught.value.message.lower() and "were removed" in caught.value.message
    assert len(calls) == 2  # the batch after the refused one had gone out, and no other
    assert redis.Redis.from_url(target).dbsize() == 0
