"""A big new table is built in a staging schema by several COPYs at once and moved into place
whole (restore.targets.postgres_load, PostgresTarget._build_staged), on the session's real
server. The size threshold is lowered so that small tables take that path."""
from __future__ import annotations

import logging
import time

import psycopg
import pytest

from restore.targets import postgres_load
from restore.targets.base import RestoreOptions
from restore.targets.postgres import PostgresTarget
from snapshots.codec import digest_records
from restore.run import restore_snapshot
from snapshots.errors import IncompatibleTargetError, SourceError, StatevaultError, UsageError
from snapshots.repository import open_repository
from snapshots.settings import Settings
from tests.integration.test_postgres_store import backup, execute, scalar, table_bytes
from tests.servers import unique_name

JOBS = 3
COPYING = ("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'statevault restore' "
           "AND datname = current_database() AND query LIKE 'COPY%FROM STDIN%' AND state = 'active'")
STAGING = "SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'statevault%'"


@pytest.fixture
def any_size(monkeypatch):
    monkeypatch.setattr(postgres_load, "MIN_BYTES", 0)


@pytest.fixture
def snapshot(pg_url, file_repo_url):
    """agents.big (20k rows, a bigserial, an index) on the source; (repo, manifest)."""
    execute(pg_url, "CREATE SCHEMA agents; CREATE TABLE agents.big (id bigserial PRIMARY KEY, body text NOT NULL, "
                    "n int); CREATE INDEX big_n ON agents.big (n);"
                    "INSERT INTO agents.big (body, n) SELECT repeat(md5(g::text), 3), g % 97 "
                    "FROM generate_series(1, 20000) g")
    repo = open_repository(file_repo_url, create=True)
    manifest, _ = backup(repo, pg_url)
    return repo, manifest


def _plan(url, manifest):
    target = PostgresTarget(url)
    [plan] = target.plan(manifest, only=[], into=None, mode="new")
    assert plan.details["method"] == "create"
    return target, plan


def test_the_table_appears_whole_after_loading_over_several_connections(pg_url, target_url_for_load, snapshot,
                                                                        any_size):
    repo, manifest = snapshot
    url = target_url_for_load
    seen = {}

    def watched(records):
        for n, record in enumerate(records):
            if n == 15000:  # most batches are in: every loader is in its COPY, nothing is in place
                deadline = time.monotonic() + 20
                while scalar(url, COPYING) < JOBS and time.monotonic() < deadline:
                    time.sleep(0.05)
                seen["copying"] = scalar(url, COPYING)
                seen["in place"] = scalar(url, "SELECT to_regclass('agents.big') IS NOT NULL")
                seen["staged rows"] = scalar(url, "SELECT sum(n_tup_ins) FROM pg_stat_all_tables "
                                                  "WHERE schemaname LIKE 'statevault_staging_%'")
            yield record

    target, plan = _plan(url, manifest)
    try:
        target.restore(plan, watched(repo.iter_records(plan.item)), RestoreOptions(jobs=JOBS))
        target.finish([plan], RestoreOptions())
        assert digest_records(target.read_back(plan)) == (plan.item.records, plan.item.digest)
    finally:
        target.close()
    assert seen["copying"] == JOBS and not seen["in place"]
    assert table_bytes(url, "agents.big") == table_bytes(pg_url, "agents.big")
    assert scalar(url, STAGING) == 0 and scalar(url, COPYING) == 0
    assert scalar(url, "SELECT count(*) FROM pg_indexes WHERE schemaname = 'agents' AND tablename = 'big'") == 2
    # the owned sequence moved with its table and continues after the snapshot's last id
    assert scalar(url, "SELECT pg_get_serial_sequence('agents.big', 'id')") == "agents.big_id_seq"
    assert scalar(url, "INSERT INTO agents.big (body) VALUES ('new') RETURNING id") == 20001
    assert scalar(url, "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'statevault restore'") == 0


def _failing_records(records):
    for n, record in enumerate(records):
        if n == 12000:
            raise OSError("the repository went away")
        yield record


def _bad_row(records):
    for n, record in enumerate(records):
        yield b"not a number\tx\t1\n" if n == 12000 else record


@pytest.mark.parametrize("feed, error", [(_failing_records, OSError), (_bad_row, SourceError)],
                         ids=["reading the snapshot fails", "a loader's COPY fails"])
def test_a_failed_load_leaves_nothing_behind(pg_url, target_url_for_load, snapshot, any_size, feed, error):
    repo, manifest = snapshot
    url = target_url_for_load
    target, plan = _plan(url, manifest)
    try:
        with pytest.raises(error) as caught:
            target.restore(plan, feed(repo.iter_records(plan.item)), RestoreOptions(jobs=JOBS))
        if error is SourceError:
            assert "agents.big" in str(caught.value) and "invalid input syntax" in str(caught.value)
        # every loader's COPY ended: some parts may have committed into the staging schema, which is gone
        assert scalar(url, COPYING) == 0 and scalar(url, STAGING) == 0
        assert scalar(url, "SELECT to_regclass('agents.big') IS NULL")
        # the schema it created for the table was committed before the load: the runner's undo drops it
        assert scalar(url, "SELECT count(*) FROM pg_namespace WHERE nspname = 'agents'") == 1
        assert "agents" in target.undo([plan])
        assert scalar(url, "SELECT count(*) FROM pg_namespace WHERE nspname = 'agents'") == 0
    finally:
        target.close()
    assert scalar(url, "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'statevault restore'") == 0


def test_a_refused_extra_connection_loads_over_one(pg_url, target_url_for_load, snapshot, any_size, monkeypatch,
                                                   caplog):
    """A server at max_connections refuses the loaders' connections: the main one loads alone."""
    repo, manifest = snapshot
    target, plan = _plan(target_url_for_load, manifest)  # the main connection is open from here on

    def refusing(url, application_name):
        raise SourceError("connect: FATAL: sorry, too many clients already", retryable=True)

    monkeypatch.setattr("restore.targets.postgres.connect", refusing)
    try:
        with caplog.at_level(logging.WARNING, logger="statevault.restore.postgres"):
            target.restore(plan, repo.iter_records(plan.item), RestoreOptions())
        assert digest_records(target.read_back(plan)) == (plan.item.records, plan.item.digest)
    finally:
        target.close()
    assert "loading agents.big over 1 connection(s)" in caplog.text
    assert table_bytes(target_url_for_load, "agents.big") == table_bytes(pg_url, "agents.big")


@pytest.mark.parametrize("size, jobs", [("small", 2), ("big", 1)], ids=["under MIN_BYTES", "--jobs 1"])
def test_a_table_loads_in_place_in_one_transaction(target_url_for_load, snapshot, monkeypatch, size, jobs):
    """Under MIN_BYTES, or with one job, nothing is staged: no schema is created and committed
    before the load."""
    if size == "big":
        monkeypatch.setattr(postgres_load, "MIN_BYTES", 0)
    repo, manifest = snapshot
    target, plan = _plan(target_url_for_load, manifest)
    try:
        with pytest.raises(StatevaultError):
            target.restore(plan, _bad_row(repo.iter_records(plan.item)), RestoreOptions(jobs=jobs))
    finally:
        target.close()
    # rolled back as one: not even the schema the table needed was left
    assert scalar(target_url_for_load, "SELECT count(*) FROM pg_namespace WHERE nspname = 'agents'") == 0


def test_jobs_must_be_at_least_one(snapshot, file_repo_url, target_url_for_load):
    repo, _ = snapshot
    cfg = Settings(sources={"memory": {"kind": "postgres", "url": target_url_for_load}})
    with pytest.raises(UsageError, match="--jobs 0"):
        restore_snapshot(repo, cfg, "memory", "latest", to_url=target_url_for_load, jobs=0)


def test_a_role_that_may_not_create_schemas_loads_in_place(pg_url, target_url_for_load, file_repo_url, any_size,
                                                          pg_server, request):
    """The staging schema needs CREATE on the database; a role with CREATE on `public` only
    restores a big table as a small one, in place, in one transaction."""
    execute(pg_url, "CREATE TABLE notes (id int PRIMARY KEY, body text);"
                    "INSERT INTO notes SELECT g, md5(g::text) FROM generate_series(1, 5000) g")
    repo = open_repository(file_repo_url, create=True)
    manifest, _ = backup(repo, pg_url)
    url = target_url_for_load
    restorer = unique_name("restorer")
    execute(pg_server.url, f"CREATE ROLE {restorer}")
    request.addfinalizer(lambda: (execute(url, f"DROP OWNED BY {restorer}"),
                                  execute(pg_server.url, f"DROP ROLE {restorer}")))
    execute(url, f"GRANT CREATE ON SCHEMA public TO {restorer}")
    as_restorer = url + ("&" if "?" in url else "?") + f"options=-c%20role%3D{restorer}"
    assert not scalar(as_restorer, "SELECT has_database_privilege(current_database(), 'CREATE')")

    target = PostgresTarget(as_restorer)
    try:
        [plan] = target.plan(manifest, only=[], into=None, mode="new")
        target.restore(plan, repo.iter_records(plan.item), RestoreOptions())
        assert digest_records(target.read_back(plan)) == (plan.item.records, plan.item.digest)
    finally:
        target.close()
    assert scalar(url, "SELECT tableowner FROM pg_tables WHERE tablename = 'notes'") == restorer
    assert table_bytes(url, "notes") == table_bytes(pg_url, "notes")

    # a swap has no such fallback: refused by the plan (exit 2), before the pre-restore snapshot
    target = PostgresTarget(as_restorer)
    try:
        with pytest.raises(IncompatibleTargetError, match="may not create schemas") as refused:
            target.plan(manifest, only=[], into=None, mode="swap")
        assert refused.value.exit_code == 2 and "GRANT CREATE ON DATABASE" in refused.value.hint
    finally:
        target.close()


@pytest.fixture
def target_url_for_load(pg_database):
    return pg_database("svload")


def test_a_big_table_restored_into_another_name_beside_the_live_one(pg_url, snapshot, any_size):
    """--into a new name in the same database: the staged build keeps the renamed indexes and
    sequence, so the move into place collides with nothing of the live table."""
    repo, manifest = snapshot
    target = PostgresTarget(pg_url)
    try:
        [plan] = target.plan(manifest, only=[], into="agents.big_copy", mode="new")
        target.restore(plan, repo.iter_records(plan.item), RestoreOptions(jobs=JOBS))
        target.finish([plan], RestoreOptions())
        assert digest_records(target.read_back(plan)) == (plan.item.records, plan.item.digest)
    finally:
        target.close()
    assert table_bytes(pg_url, "agents.big_copy") == table_bytes(pg_url, "agents.big")
    indexes = "SELECT array_agg(indexname ORDER BY indexname) FROM pg_indexes WHERE tablename = %s"
    with psycopg.connect(pg_url, autocommit=True) as conn:
        assert conn.execute(indexes, ("big",)).fetchone()[0] == ["big_n", "big_pkey"]
        assert conn.execute(indexes, ("big_copy",)).fetchone()[0] == ["big_copy_n", "big_copy_pkey"]
    assert scalar(pg_url, "SELECT pg_get_serial_sequence('agents.big_copy', 'id')") == "agents.big_copy_id_seq"
    assert scalar(pg_url, STAGING) == 0
