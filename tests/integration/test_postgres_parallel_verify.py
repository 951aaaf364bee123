"""A big table's restore verification reads it back in page ranges, one server process each,
under one exported snapshot (restore.targets.postgres_parallel), on the session's real server."""
from __future__ import annotations

import pytest

import restore.targets.postgres_parallel as parallel
from backup.sources.postgres_schema import connect, find_table
from restore.run import restore_snapshot
from restore.targets.postgres import PostgresTarget
from restore.verify import digest_concurrently
from snapshots.codec import digest_records
from snapshots.errors import SourceError
from snapshots.repository import open_repository
from snapshots.settings import Settings
from tests.integration.test_postgres_store import backup, execute, populate, scalar


def test_page_ranges_cover_the_table_once():
    assert parallel.page_ranges(10, 2) == [(0, 5), (5, None)]
    assert parallel.page_ranges(7, 3) == [(0, 2), (2, 4), (4, None)]
    assert parallel.page_ranges(0, 2) == [(0, 0), (0, None)]  # an empty table: the open range reads it all


@pytest.fixture
def any_size(monkeypatch):
    """Split every table, however small."""
    monkeypatch.setattr(parallel, "MIN_BYTES", 0)


def _plans(url, manifest):
    target = PostgresTarget(url)
    return target, target.plan(manifest, only=[], into=None, mode="replace")


def test_ranges_add_up_to_the_snapshot_and_ignore_later_writes(pg_url, file_repo_url, any_size):
    execute(pg_url, "CREATE TABLE big (id int PRIMARY KEY, body text);"
                    "INSERT INTO big SELECT g, repeat(md5(g::text), 20) FROM generate_series(1, 3000) g")
    repo = open_repository(file_repo_url, create=True)
    manifest, _ = backup(repo, pg_url)
    item = manifest.item("public.big")
    assert scalar(pg_url, "SELECT pg_relation_size('big') / 8192") > 10  # several pages per range

    target, [plan] = _plans(pg_url, manifest)
    try:
        streams = target.read_back_parts(plan, 3)
        assert len(streams) == 3
        # the snapshot is taken: rows written now are not read, in any range
        execute(pg_url, "INSERT INTO big VALUES (0, 'late'); DELETE FROM big WHERE id <= 1000")
        counts = []

        def counted(stream):
            rows = list(stream)
            counts.append(len(rows))
            return iter(rows)

        assert digest_concurrently([counted(s) for s in streams]) == (item.records, item.digest)
        assert sorted(counts)[0] > 0 and sum(counts) == 3000  # each range read its own part
        assert digest_records(target.read_back(plan, ordered=False)) != (item.records, item.digest)  # now
    finally:
        target.close()
    # every connection of the ranges is closed
    assert scalar(pg_url, "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'statevault verify'") == 0


def test_a_restore_verifies_through_the_ranges(pg_url, target_url_for_parallel, file_repo_url, any_size, monkeypatch):
    populate(pg_url)
    repo = open_repository(file_repo_url, create=True)
    backup(repo, pg_url)
    used = []
    real = parallel.parallel_reads

    def spy(*args, **kw):
        streams = real(*args, **kw)
        used.append(None if streams is None else len(streams))
        return streams

    monkeypatch.setattr("restore.targets.postgres.parallel_reads", spy)
    cfg = Settings(sources={"memory": {"kind": "postgres", "url": pg_url}})
    result = restore_snapshot(repo, cfg, "memory", "latest", to_url=target_url_for_parallel, jobs=3)
    assert result.ok and used == [3] * 4  # --jobs reaches the verification
    assert [c.actual_records for c in result.checks] == [c.expected_records for c in result.checks]

    # a damaged restore is still caught: one range differs
    execute(target_url_for_parallel, "UPDATE notes SET value = 42 WHERE key = 'a'")
    target, plans = _plans(target_url_for_parallel, repo.resolve("latest", source="memory"))
    try:
        plan = next(p for p in plans if p.target == "public.notes")
        assert digest_concurrently(target.read_back_parts(plan)) != (plan.item.records, plan.item.digest)
    finally:
        target.close()


def test_small_tables_use_one_copy(pg_url, file_repo_url):
    execute(pg_url, "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 10)")
    repo = open_repository(file_repo_url, create=True)
    manifest, _ = backup(repo, pg_url)
    target, [plan] = _plans(pg_url, manifest)
    try:
        assert target.read_back_parts(plan) is None  # under MIN_BYTES: run.py reads it with one COPY
    finally:
        target.close()


@pytest.fixture
def target_url_for_parallel(pg_database):
    return pg_database("svparallel")


def test_a_refused_extra_connection_falls_back_to_one_copy(pg_url, file_repo_url, any_size):
    """A server at max_connections refuses the second range's connection: verification goes on
    over the one connection instead of failing a restore whose data is already in."""
    execute(pg_url, "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 10)")
    opened = []

    def refusing():
        if opened:
            raise SourceError("connect: FATAL: sorry, too many clients already", retryable=True)
        opened.append(connect(pg_url, "statevault verify"))
        return opened[-1]

    conn = connect(pg_url, "test")
    try:
        oid = find_table(conn, "public", "t")[0]
        assert parallel.parallel_reads(conn, refusing, oid, lambda c, where: iter(())) is None
        assert opened and opened[0].closed  # the one it got is closed again
    finally:
        conn.close()
