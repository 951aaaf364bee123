"""Bad input at the `statevault` command, run as an operator runs it (a subprocess in a temp dir).

Bad config or arguments exit 2 naming the file or key; a tampered or too-new manifest exits 3;
nothing is read outside the repository; secrets from the config never reach any output.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from snapshots.manifest import utcnow
from snapshots.repository import open_repository

_BIN = Path(sys.executable).parent / "statevault"
STATEVAULT = [str(_BIN)] if _BIN.exists() else [sys.executable, "-m", "cli.app"]
ROOT = Path(__file__).resolve().parents[2]


def statevault(cwd: Path, *args: str, timeout: float = 60, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STATEVAULT_", "AWS_"))}
    env.update(env_extra or {})
    env["PYTHONPATH"] = str(ROOT)
    env["COLUMNS"] = "200"  # keep rich from wrapping long ids in the middle of an assertion
    return subprocess.run([*STATEVAULT, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout)


def write_config(path: Path, body: str) -> Path:
    path.write_text(body)
    return path


GOOD_REPO = '[repository]\nurl = "file://./repo"\n'

BAD_CONFIGS = {
    "malformed-toml": ('[repository\nurl = "file://./repo"\n', ["statevault.toml", "not valid TOML"]),
    "unknown-key": (GOOD_REPO + "compresion_level = 5\n", ["statevault.toml", "repository.compresion_level"]),
    "ftp-url": ('[repository]\nurl = "ftp://backup.example.com/agents"\n', ["repository.url", "ftp"]),
    "bad-cron": (GOOD_REPO + '[sources.memory]\nkind = "postgres"\nurl = "postgresql://u@127.0.0.1:1/db"\n'
                 'schedule = "61 * * *"\n', ["sources.memory", "schedule", "cron"]),
    "bad-source-kind": (GOOD_REPO + '[sources.memory]\nkind = "mysql"\nurl = "mysql://u@h/db"\n',
                        ["sources.memory", "mysql"]),
    "bad-top-level-key": (GOOD_REPO + '[sourcez.memory]\nkind = "redis"\n', ["sourcez"]),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_exits_2_naming_the_file_and_key(tmp_path, case):
    body, expected = BAD_CONFIGS[case]
    write_config(tmp_path / "statevault.toml", body)
    result = statevault(tmp_path, "snapshots", "list")
    assert result.returncode == 2, (result.stdout, result.stderr)
    for needle in expected:
        assert needle in result.stderr, f"{needle!r} not in: {result.stderr}"
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "repo").exists()  # nothing was changed


def test_missing_config_file_given_by_flag_exits_2(tmp_path):
    result = statevault(tmp_path, "--config", "missing.toml", "init")
    assert result.returncode == 2
    assert "missing.toml" in result.stderr and "does not exist" in result.stderr
    from_env = statevault(tmp_path, "init", env_extra={"STATEVAULT_CONFIG": "also-missing.toml"})
    assert from_env.returncode == 2 and "also-missing.toml" in from_env.stderr
    assert not (tmp_path / "statevault-repo").exists()


@pytest.fixture
def repo_dir(tmp_path):
    """A file repository under tmp/a/b/repo (deep enough to aim a '../..' at a canary) with one snapshot."""
    root = tmp_path / "a" / "b" / "repo"
    root.mkdir(parents=True)
    write_config(tmp_path / "statevault.toml", f'[repository]\nurl = "{root.as_uri()}"\n')
    repo = open_repository(root.as_uri(), create=True)
    writer = repo.begin_snapshot("memory", "postgres")
    with writer.item("public.memories", "table", "jsonl") as w:
        w.add_many(orjson.dumps({"id": i, "text": "x" * (i % 40)}) + b"\n" for i in range(500))
    manifest = writer.commit(utcnow())
    return root, manifest.id


def _edit_manifest(root: Path, snapshot_id: str, edit) -> None:
    path = root / "snapshots" / f"{snapshot_id}.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_show_unknown_or_malformed_snapshot_exits_2(repo_dir, tmp_path):
    _, sid = repo_dir
    unknown = statevault(tmp_path, "snapshots", "show", "20990101T000000Z-deadbeef")
    assert unknown.returncode == 2
    assert "20990101T000000Z-deadbeef" in unknown.stderr
    ok = statevault(tmp_path, "snapshots", "show", sid[:-2])  # a unique prefix works
    assert ok.returncode == 0 and sid in ok.stdout


def test_manifest_from_a_newer_format_exits_3_naming_the_version(repo_dir, tmp_path):
    root, sid = repo_dir
    _edit_manifest(root, sid, lambda d: d.update(format_version=99))
    result = statevault(tmp_path, "snapshots", "show", sid)
    assert result.returncode == 3, result.stderr
    assert "format version 99" in result.stderr and sid in result.stderr
    listed = statevault(tmp_path, "snapshots", "list", "--json")
    assert listed.returncode == 0
    report = json.loads(listed.stdout)
    assert report["snapshots"] == [] and "99" in report["manifest_errors"][0]
    checked = statevault(tmp_path, "snapshots", "check")
    assert checked.returncode == 3 and "unreadable manifest" in checked.stdout


def test_manifest_naming_a_path_outside_the_repository_exits_3_and_reads_nothing(repo_dir, tmp_path):
    root, sid = repo_dir
    evil = "../../outside-canary"
    # where data/<evil[:2]>/<evil> would land: a FIFO, so any attempt to read it would hang the command
    canary = (root / "data" / evil[:2] / evil).resolve()
    assert not canary.is_relative_to(root)
    os.mkfifo(canary)

    def poison(d):
        d["items"][0]["chunks"][0]["id"] = evil

    _edit_manifest(root, sid, poison)
    for args in (("snapshots", "show", sid), ("snapshots", "check", "--read-data")):
        result = statevault(tmp_path, *args, timeout=30)
        assert result.returncode == 3, (args, result.stderr)
        assert "64-hex-digit" in result.stdout + result.stderr
    assert canary.exists()  # still the untouched FIFO


def test_manifest_renamed_to_another_id_exits_3(repo_dir, tmp_path):
    root, sid = repo_dir
    other = "20990101T000000Z-0badc0de"
    shutil.move(root / "snapshots" / f"{sid}.json", root / "snapshots" / f"{other}.json")
    result = statevault(tmp_path, "snapshots", "show", other)
    assert result.returncode == 3
    assert "renamed or tampered" in result.stderr and other in result.stderr


def test_secrets_in_the_config_never_reach_any_output(tmp_path):
    pg_password, redis_password, qdrant_key = "Pg-S3cret-8c1f", "Redis-S3cret-77aa", "Qdrant-Key-5e5e"
    write_config(tmp_path / "statevault.toml", f'''
[repository]
url = "file://./repo"

[sources.memory]
kind = "postgres"
url = "postgresql://agent:{pg_password}@127.0.0.1:1/memory?connect_timeout=2"

[sources.history]
kind = "redis"
url = "redis://:{redis_password}@127.0.0.1:1/0"

[sources.knowledge]
kind = "qdrant"
url = "http://127.0.0.1:1"
api_key = "{qdrant_key}"

[daemon]
retry_attempts = 1
retry_max_wait_seconds = 0.1
''')
    runs = [
        statevault(tmp_path, "init", "--json"),
        statevault(tmp_path, "snapshots", "list", "--json"),
        statevault(tmp_path, "snapshots", "show", "latest", "--json"),
        statevault(tmp_path, "restore", "latest", "--source", "memory", "--json"),
        statevault(tmp_path, "backup", "memory", "history", "--json", timeout=120),
        statevault(tmp_path, "snapshots", "list", "--json"),
    ]
    codes = [r.returncode for r in runs]
    assert codes[:4] == [0, 0, 2, 2], [(r.args, r.returncode, r.stderr[-500:]) for r in runs]
    assert codes[4] != 0  # nothing listens on port 1: the backup fails ...
    assert json.loads(runs[5].stdout)["snapshots"] == []  # ... and commits nothing
    for r in runs:
        for secret in (pg_password, redis_password, qdrant_key):
            assert secret not in r.stdout and secret not in r.stderr, (r.args, secret)

    # a config error in the same file names the key, not the secrets beside it
    body = (tmp_path / "statevault.toml").read_text().replace("retry_attempts = 1", "retry_attempts = 0")
    write_config(tmp_path / "statevault.toml", body)
    bad = statevault(tmp_path, "snapshots", "list", "--json")
    assert bad.returncode == 2 and "daemon.retry_attempts" in bad.stderr
    assert all(s not in bad.stdout + bad.stderr for s in (pg_password, redis_password, qdrant_key))


def test_hash_field_ttls_into_a_server_that_cannot_hold_them_exit_2_and_write_nothing(
        tmp_path, valkey_server, redis_server, fresh_redis_url):
    import redis

    source, older = fresh_redis_url(valkey_server), fresh_redis_url(redis_server)  # Valkey 9; Redis 7.0
    c = redis.Redis.from_url(source)
    c.hset("session:u1", mapping={"token": "t", "name": "ann"})
    c.execute_command("HPEXPIRE", "session:u1", 3_600_000, "FIELDS", 1, "token")
    write_config(tmp_path / "statevault.toml", GOOD_REPO + f'[sources.history]\nkind = "redis"\nurl = "{source}"\n')
    assert statevault(tmp_path, "init").returncode == 0
    backed = statevault(tmp_path, "backup", "history", "--json")
    assert backed.returncode == 0, backed.stderr

    refused = statevault(tmp_path, "restore", "latest", "--source", "history", "--to", older)
    assert refused.returncode == 2, refused.stderr
    assert "cannot hold field TTLs" in refused.stderr and "--ttl none" in refused.stderr
    assert redis.Redis.from_url(older).dbsize() == 0
    done = statevault(tmp_path, "restore", "latest", "--source", "history", "--to", older, "--ttl", "none")
    assert done.returncode == 0, done.stderr
    assert redis.Redis.from_url(older).hgetall("session:u1") == {b"token": b"t", b"name": b"ann"}
