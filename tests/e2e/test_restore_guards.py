"""Restores that could have gone to the live store by mistake, and what an operator is told after
a failed one: each case as an operator runs it (the `statevault` command in a temp dir), against
a throw-away Redis whose DB 0 stands for the live keyspace.

- `--to-path` names a Qdrant local store: given for a Redis or PostgreSQL source it is refused,
  where it used to be dropped (the restore then went to the configured, live server).
- A Redis URL whose DB index is not a number (`/l` for `/1`) is refused, in `--to` and in the
  config: redis-py reads it as DB 0.
- A `--to` URL of another kind is refused with exit 2, not a driver error.
- The undo command printed after `replace --to` names the same `--to`; the pre-restore snapshot
  records where it was taken.
- `--json` is no confirmation: replace/swap still need `--yes`.
- A manifest whose digest no longer matches its records: the restore stops inside its write,
  undoes a `new` restore, and after a `replace` names the pre-restore snapshot and the undo.
- With `--json`, usage errors caught by argument parsing are one JSON document too.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis

from tests.e2e.test_bad_input import statevault, write_config


@pytest.fixture
def two_dbs(redis_server, fresh_redis_url):
    """(live URL, other URL, a client per DB): two fresh DBs of one throw-away server."""
    live, other = fresh_redis_url(redis_server), fresh_redis_url(redis_server)
    with redis.Redis.from_url(live) as a, redis.Redis.from_url(other) as b:
        yield live, other, a, b


def backed_up(tmp_path: Path, live_url: str, client) -> str:
    """Ten keys in the live DB, a config naming it, and a first backup; the snapshot id."""
    for i in range(10):
        client.set(f"history:u{i}", f"message {i}")
    write_config(tmp_path / "statevault.toml", f'''
[repository]
url = "file://./repo"

[sources.history]
kind = "redis"
url = "{live_url}"
patterns = ["history:*"]
''')
    result = statevault(tmp_path, "backup", "history", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["sources"][0]["snapshot_id"]


def test_to_path_on_a_redis_source_is_refused_and_the_live_keys_stay(tmp_path, two_dbs):
    live, _, client, _ = two_dbs
    backed_up(tmp_path, live, client)
    client.set("history:u5", "LIVE")
    result = statevault(tmp_path, "restore", "latest", "--source", "history", "--only", "history:u5",
                        "--to-path", str(tmp_path / "elsewhere"), "--mode", "replace", "--yes")
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "--to-path is for Qdrant" in result.stderr
    assert client.get("history:u5") == b"LIVE"
    assert not (tmp_path / "elsewhere").exists()


@pytest.mark.parametrize("bad_db", ["l", "abc"])
def test_a_redis_url_whose_db_is_not_a_number_is_refused(tmp_path, two_dbs, bad_db):
    live, _, client, _ = two_dbs
    backed_up(tmp_path, live, client)
    client.set("history:u7", "LIVE")
    host = live.rsplit("/", 1)[0]
    result = statevault(tmp_path, "restore", "latest", "--source", "history", "--only", "history:u7",
                        "--to", f"{host}/{bad_db}", "--mode", "replace", "--yes")
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert f"DB index '{bad_db}' is not a number" in result.stderr
    assert client.get("history:u7") == b"LIVE"

    # the same URL in the config is a config error naming the key
    body = (tmp_path / "statevault.toml").read_text().replace(live, f"{host}/{bad_db}")
    write_config(tmp_path / "statevault.toml", body)
    listed = statevault(tmp_path, "snapshots", "list")
    assert listed.returncode == 2 and "sources.history" in listed.stderr, listed.stderr


def test_a_to_url_of_another_kind_exits_2(tmp_path, two_dbs):
    live, _, client, _ = two_dbs
    backed_up(tmp_path, live, client)
    result = statevault(tmp_path, "restore", "latest", "--source", "history",
                        "--to", "postgresql://u@127.0.0.1:1/db", "--dry-run")
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "is not a redis URL" in result.stderr


def test_undo_of_a_replace_onto_another_server_goes_back_to_that_server(tmp_path, two_dbs):
    live, other, client, other_client = two_dbs
    backed_up(tmp_path, live, client)
    other_client.set("history:u9", "ON-THE-OTHER-DB")
    client.set("history:u9", "LIVE")
    result = statevault(tmp_path, "restore", "latest", "--source", "history", "--only", "history:u9",
                        "--to", other, "--mode", "replace", "--yes", "--json")
    assert result.returncode == 0, result.stderr
    done = json.loads(result.stdout)
    assert done["undo_command"] == (f"statevault restore {done['pre_restore_snapshot']} --source history "
                                    f"--to {other} --mode replace")
    assert other_client.get("history:u9") == b"message 9"
    shown = json.loads(statevault(tmp_path, "snapshots", "show", done["pre_restore_snapshot"], "--json").stdout)
    assert shown["source_info"]["location"] == other

    undo = statevault(tmp_path, *done["undo_command"].split()[1:], "--yes")
    assert undo.returncode == 0, undo.stderr
    assert other_client.get("history:u9") == b"ON-THE-OTHER-DB"
    assert client.get("history:u9") == b"LIVE"  # the live DB was never touched


def test_json_is_no_confirmation_for_replace(tmp_path, two_dbs):
    live, _, client, _ = two_dbs
    backed_up(tmp_path, live, client)
    client.set("history:u5", "LIVE")
    result = statevault(tmp_path, "restore", "latest", "--source", "history", "--only", "history:u5",
                        "--mode", "replace", "--json")
    assert result.returncode == 2, (result.stdout, result.stderr)
    error = json.loads(result.stdout)
    assert error["error"] == "UsageError" and "pass --yes" in error["message"]
    assert client.get("history:u5") == b"LIVE"


def _tamper_digest(tmp_path: Path, snapshot_id: str) -> None:
    path = tmp_path / "repo" / "snapshots" / f"{snapshot_id}.json"
    manifest = json.loads(path.read_text())
    manifest["items"][0]["digest"] = "0" * len(manifest["items"][0]["digest"])
    path.write_text(json.dumps(manifest))


def test_a_manifest_digest_that_lies_stops_a_new_restore_and_undoes_it(tmp_path, two_dbs):
    live, other, client, other_client = two_dbs
    sid = backed_up(tmp_path, live, client)
    _tamper_digest(tmp_path, sid)
    result = statevault(tmp_path, "restore", sid, "--source", "history", "--to", other)
    assert result.returncode == 3, (result.stdout, result.stderr)
    assert "does not match its manifest: content digest" in result.stderr
    assert "records read" not in result.stderr  # the counts agree: only the digest is named
    assert other_client.dbsize() == 0  # the keys it wrote are gone again


def test_a_manifest_digest_that_lies_after_replace_names_the_pre_restore_snapshot(tmp_path, two_dbs):
    live, _, client, _ = two_dbs
    sid = backed_up(tmp_path, live, client)
    _tamper_digest(tmp_path, sid)
    client.set("history:u1", "LIVE EDIT")
    result = statevault(tmp_path, "restore", sid, "--source", "history", "--mode", "replace", "--yes", "--json")
    assert result.returncode == 3, (result.stdout, result.stderr)
    report = json.loads(result.stdout)
    assert report["error"] == "VerificationError" and "does not match its manifest" in report["message"]
    pre = report["pre_restore_snapshot"]
    assert pre and report["undo_command"] == f"statevault restore {pre} --source history --mode replace"
    assert pre in report["hint"]
    undo = statevault(tmp_path, "restore", pre, "--source", "history", "--mode", "replace", "--yes")
    assert undo.returncode == 0, undo.stderr
    assert client.get("history:u1") == b"LIVE EDIT"


@pytest.mark.parametrize("args, needle", [
    (["restore", "latest", "--json"], "source"),                       # a missing option
    (["restore", "latest", "--source", "history", "--jobs", "many", "--json"], "--jobs"),  # a bad value
    (["snapshots", "list", "--json", "--bogus"], "--bogus"),           # an unknown option
])
def test_usage_errors_with_json_are_one_json_document(tmp_path, args, needle):
    write_config(tmp_path / "statevault.toml", '[repository]\nurl = "file://./repo"\n')
    result = statevault(tmp_path, *args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    error = json.loads(result.stdout)
    assert error["error"] == "UsageError" and error["exit_code"] == 2 and needle in error["message"]


@pytest.mark.parametrize("tag", ["pre-restore", "a,b", ""])
def test_backup_refuses_tags_that_restores_own_or_retention_cannot_name(tmp_path, two_dbs, tag):
    live, _, client, _ = two_dbs
    backed_up(tmp_path, live, client)
    result = statevault(tmp_path, "backup", "history", "--tag", tag, "--json")
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert json.loads(result.stdout)["message"].startswith("--tag tag")
    listed = json.loads(statevault(tmp_path, "snapshots", "list", "--json").stdout)["snapshots"]
    assert len(listed) == 1  # only the first backup's snapshot


def test_a_source_named_twice_is_backed_up_once(tmp_path, two_dbs):
    live, _, client, _ = two_dbs
    backed_up(tmp_path, live, client)
    result = statevault(tmp_path, "backup", "history", "history", "--json")
    assert result.returncode == 0, result.stderr
    assert [r["source"] for r in json.loads(result.stdout)["sources"]] == ["history"]
