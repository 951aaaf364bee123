"""Regressions: a PostgreSQL `tables` selection that matches nothing fails the source instead of
committing an empty "successful" snapshot; `verify` of a partial (pre-restore) snapshot reads the
live store with the snapshot's own scope (Redis `only`, PostgreSQL and Qdrant items).

The CLI runs in-process (tests/cli_runner.py) against the throw-away servers of conftest.
"""
from __future__ import annotations

import json
from pathlib import Path

import psycopg
import pytest
import redis

from backup.sources.postgres import PostgresSource
from snapshots.errors import NotFoundError
from snapshots.settings import PostgresSource as PostgresSettings
from tests.cli_runner import run_cli


def write_config(path: Path, repo: Path, sources: str) -> Path:
    path.write_text(f'[repository]\nurl = "{repo.as_uri()}"\n\n{sources}')
    return path


def cli(capsys, cfg: Path, *args: str, rc: int = 0):
    code, out, err = run_cli(capsys, "-c", str(cfg), *args, "--json")
    assert code == rc, f"rc={code}\nstdout:{out}\nstderr:{err}"
    return json.loads(out)


def snapshot_ids(capsys, cfg: Path, source: str) -> list[str]:
    return [s["id"] for s in cli(capsys, cfg, "snapshots", "list", "--source", source)["snapshots"]]


def pg_exec(url: str, statements: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(statements)


# ---- bug 1: a `tables` selection that matches nothing ---------------------------------------

def pg_settings(url: str, **kw) -> PostgresSettings:
    return PostgresSettings(kind="postgres", url=url, **kw)


def test_exact_table_selector_that_matches_nothing_fails_the_backup(pg_url, tmp_path, capsys):
    pg_exec(pg_url, "CREATE TABLE memories (id int PRIMARY KEY, body text);"
                    "INSERT INTO memories SELECT g, 'm' || g FROM generate_series(1, 10) g")
    cfg = write_config(tmp_path / "statevault.toml", tmp_path / "repo",
                       f'[sources.memory]\nkind = "postgres"\nurl = "{pg_url}"\ntables = ["public.memoriez"]\n')
    result = cli(capsys, cfg, "backup", "memory", rc=1)
    [src] = result["sources"]
    assert not src["ok"] and src["snapshot_id"] is None
    err = src["error"]
    assert "public.memoriez" in err["message"] and "public.memories" in err["message"]  # names the typo and what exists
    assert "tables" in err["hint"]
    assert snapshot_ids(capsys, cfg, "memory") == []  # nothing became `latest`
    code, _, _ = run_cli(capsys, "-c", str(cfg), "verify", "latest", "--source", "memory")
    assert code == 2  # no snapshot to verify against (not a trivial pass)


def test_selection_rules(pg_url):
    pg_exec(pg_url, "CREATE SCHEMA agent; CREATE TABLE memories (id int PRIMARY KEY); CREATE TABLE notes (k text)")
    # a glob that matches nothing beside selectors that match: fine
    with PostgresSource(pg_settings(pg_url, tables=["public.memories", "archive.*"])).open() as cut:
        assert [i.name for i in cut.items()] == ["public.memories"]
    # an exact name that is not a table: an error even beside selectors that match
    with pytest.raises(NotFoundError) as err:
        with PostgresSource(pg_settings(pg_url, tables=["public.memories", "notez"])).open():
            pass
    assert "notez" in err.value.message and "public.notes" in err.value.message
    # globs that together match nothing: nothing to back up is an error
    with pytest.raises(NotFoundError) as err:
        with PostgresSource(pg_settings(pg_url, tables=["agent.*"])).open():
            pass
    assert "agent.*" in err.value.message and "tables" in err.value.hint
    # everything matched is excluded: the same
    with pytest.raises(NotFoundError) as err:
        with PostgresSource(pg_settings(pg_url, tables=["public.*"], exclude=["*"])).open():
            pass
    assert "exclude" in err.value.message
    # a partitioned parent or a view named exactly: said so (their data is not an item)
    pg_exec(pg_url, "CREATE TABLE log (id int, at date) PARTITION BY RANGE (at);"
                    "CREATE TABLE log_2026 PARTITION OF log FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');"
                    "CREATE VIEW recent AS SELECT * FROM memories")
    with pytest.raises(NotFoundError) as err:
        with PostgresSource(pg_settings(pg_url, tables=["public.log", "public.recent"])).open():
            pass
    assert "'public.log' is a partitioned table" in err.value.message
    assert "'public.recent' is a view" in err.value.message
    with PostgresSource(pg_settings(pg_url, tables=["public.log_*"])).open() as cut:
        assert [i.name for i in cut.items()] == ["public.log_2026"]
    # `only` still overrides the config's selection (a pre-restore snapshot of any table)
    with PostgresSource(pg_settings(pg_url, tables=["agent.*"])).open(only=["notes"]) as cut:
        assert [i.name for i in cut.items()] == ["public.notes"]


def test_default_selection_on_a_database_without_tables_fails(pg_url):
    with pytest.raises(NotFoundError) as err:
        with PostgresSource(pg_settings(pg_url)).open():
            pass
    assert "no user tables" in err.value.message


# ---- bug 2: verify of a partial snapshot --------------------------------------------------

def test_verify_partial_redis_snapshot_uses_its_only_scope(redis_url, tmp_path, capsys):
    r = redis.Redis.from_url(redis_url)
    for u in range(200):
        r.set(f"history:u{u}", json.dumps([{"role": "user", "content": f"hello {u}"}]))
    r.rpush("history:u2:turns", "a", "b")  # matches the pattern, not the `only` selector
    r.set("other:key", "not history")
    cfg = write_config(tmp_path / "statevault.toml", tmp_path / "repo",
                       f'[sources.history]\nkind = "redis"\nurl = "{redis_url}"\npatterns = ["history:*"]\n')
    cli(capsys, cfg, "backup", "history")
    r.set("history:u2", "changed")
    restored = cli(capsys, cfg, "restore", "latest", "--source", "history", "--only", "history:u2",
                   "--mode", "replace", "--yes")
    pre = restored["pre_restore_snapshot"]
    shown = cli(capsys, cfg, "snapshots", "show", pre, "--source", "history")
    [item] = shown["items"]
    assert item["records"] == 1 and item["schema"]["only"] == ["history:u2"]
    cli(capsys, cfg, "restore", pre, "--source", "history", "--mode", "replace", "--yes")
    assert r.get("history:u2") == b"changed"
    verified = cli(capsys, cfg, "verify", pre, "--source", "history")
    assert verified["in_sync"], verified
    [check] = verified["items"]
    assert check["actual"]["records"] == 1
    # drift inside the scope is still found; outside it is not the snapshot's business
    r.set("history:u7", "elsewhere")
    assert cli(capsys, cfg, "verify", pre, "--source", "history")["in_sync"]
    r.set("history:u2", "changed again")
    drift = cli(capsys, cfg, "verify", pre, "--source", "history", rc=3)
    assert not drift["in_sync"]
    r.close()


def test_verify_partial_postgres_snapshot(pg_url, tmp_path, capsys):
    pg_exec(pg_url, "CREATE TABLE memories (id int PRIMARY KEY, body text);"
                    "CREATE TABLE notes (k text PRIMARY KEY, v text);"
                    "INSERT INTO memories SELECT g, 'm' || g FROM generate_series(1, 50) g;"
                    "INSERT INTO notes SELECT 'k' || g, 'v' || g FROM generate_series(1, 20) g")
    cfg = write_config(tmp_path / "statevault.toml", tmp_path / "repo",
                       f'[sources.memory]\nkind = "postgres"\nurl = "{pg_url}"\n')
    cli(capsys, cfg, "backup", "memory")
    pg_exec(pg_url, "UPDATE notes SET v = 'changed' WHERE k = 'k3'")
    restored = cli(capsys, cfg, "restore", "latest", "--source", "memory", "--only", "public.notes",
                   "--mode", "replace", "--yes")
    pre = restored["pre_restore_snapshot"]
    assert [i["name"] for i in cli(capsys, cfg, "snapshots", "show", pre, "--source", "memory")["items"]] \
        == ["public.notes"]
    drift = cli(capsys, cfg, "verify", pre, "--source", "memory", rc=3)  # live notes are the backup's again
    assert [c["item"] for c in drift["items"]] == ["public.notes"]
    cli(capsys, cfg, "restore", pre, "--source", "memory", "--mode", "replace", "--yes")
    verified = cli(capsys, cfg, "verify", pre, "--source", "memory")
    assert verified["in_sync"] and [c["item"] for c in verified["items"]] == ["public.notes"]
    # a table outside the configured selection: its pre-restore snapshot verifies the same way
    pg_exec(pg_url, "CREATE TABLE scratch (id int PRIMARY KEY); INSERT INTO scratch VALUES (1), (2)")
    cfg.write_text(cfg.read_text() + 'tables = ["public.memories"]\n')
    assert cli(capsys, cfg, "verify", pre, "--source", "memory")["in_sync"]


@pytest.mark.parametrize("offline_index", [False, True])
def test_verify_partial_qdrant_snapshot(qdrant_path, tmp_path, capsys, offline_index):
    from qdrant_client import QdrantClient, models

    def points(n: int, salt: float = 0.0) -> list:
        return [models.PointStruct(id=i, vector=[float(i), 1.0 + salt, 2.0, 3.0], payload={"n": i})
                for i in range(n)]

    client = QdrantClient(path=str(qdrant_path))
    for name, n in (("faq", 30), ("product_kb", 20)):
        client.create_collection(name, vectors_config=models.VectorParams(size=4, distance=models.Distance.DOT))
        client.upsert(name, points(n))
    client.close()
    cfg = write_config(tmp_path / "statevault.toml", tmp_path / "repo",
                       f'[sources.knowledge]\nkind = "qdrant"\npath = "{qdrant_path}"\n'
                       f'offline_index = {str(offline_index).lower()}\n')
    cli(capsys, cfg, "backup", "knowledge")
    client = QdrantClient(path=str(qdrant_path))
    client.upsert("faq", points(5, salt=0.5))
    client.close()
    restored = cli(capsys, cfg, "restore", "latest", "--source", "knowledge", "--only", "faq",
                   "--mode", "replace", "--yes")
    pre = restored["pre_restore_snapshot"]
    cli(capsys, cfg, "restore", pre, "--source", "knowledge", "--mode", "replace", "--yes")
    verified = cli(capsys, cfg, "verify", pre, "--source", "knowledge")
    assert verified["in_sync"] and "faq" in [c["item"] for c in verified["items"]]
    assert "product_kb" not in [c["item"] for c in verified["items"]]
