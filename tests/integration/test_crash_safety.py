"""kill -9 of a snapshot writer at every stage: nothing half-written becomes visible.

A child process writes a multi-chunk snapshot through the real writer. The child script
(below) wraps its own store object so that it stops at a chosen point and prints a marker;
the test then SIGKILLs it. Library code is not patched: the wrapping lives in the child.
After the kill: no snapshot is listed, `check --read-data` is clean, the orphaned chunks are
reported by `prune --dry-run`, kept by a default-grace prune (they are young), removed by
`prune --grace 0h`, and a later write succeeds.
"""
from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import orjson
import pytest

from snapshots import codec
from snapshots.manifest import RepoConfig, utcnow
from snapshots.repository import open_repository
from tests.cli_runner import run_cli

ROOT = Path(__file__).resolve().parents[2]
STATEVAULT = [sys.executable, "-m", "cli.app"]
ROWS = 6000  # about a dozen chunks at the tests' 16 KiB average chunk size

CHILD = textwrap.dedent('''
    import os, sys, threading, time
    import orjson
    from snapshots.manifest import utcnow
    from snapshots.repository import open_repository

    crash_at = os.environ["SV_CRASH_AT"]
    ROWS = int(os.environ["SV_ROWS"])
    after = int(os.environ.get("SV_CRASH_AFTER_CHUNKS", "3"))
    repo = open_repository(sys.argv[1])
    store = repo.store
    lock = threading.Lock()
    stored = [0]      # chunk puts completed
    calls = [0, 0]    # chunk puts / chunk temp files started
    paused = threading.Event()

    def pause(marker):
        with lock:
            if not paused.is_set():
                paused.set()
                print(f"MARK {marker} {stored[0]}", flush=True)
        while True:  # the parent SIGKILLs us here
            time.sleep(60)

    real_put, real_create = store.put, store.create

    def nth(i):
        with lock:
            calls[i] += 1
            return calls[i] - 1

    def wait_for_earlier_chunks():  # "after N chunks": the first N are complete, not just started
        while stored[0] < after:
            time.sleep(0.005)

    def put(key, data):
        if key.startswith("data/"):
            n = nth(0)
            if crash_at == "before_chunk":
                pause(crash_at)
            if crash_at == "after_chunks" and n >= after:
                wait_for_earlier_chunks()
                pause(crash_at)
        real_put(key, data)
        if key.startswith("data/"):
            with lock:
                stored[0] += 1

    def create(key, data):
        if crash_at == "before_manifest" and key.startswith("snapshots/"):
            pause(crash_at)
        return real_create(key, data)

    store.put, store.create = put, create
    if crash_at == "mid_chunk":  # local store: the temp file is written, the rename never happens
        real_write_tmp = store._write_tmp

        def write_tmp(path, data):
            tmp = real_write_tmp(path, data)
            if "/data/" in str(path) and nth(1) >= after:
                wait_for_earlier_chunks()
                pause(crash_at)
            return tmp

        store._write_tmp = write_tmp

    writer = repo.begin_snapshot("memory", "postgres")
    with writer.item("public.memories", "table", "jsonl") as item:
        for i in range(ROWS):
            item.add(orjson.dumps({"id": i, "text": f"fact {i * 7919 % 10007} " * (1 + i % 5)}) + b"\\n")
    manifest = writer.commit(utcnow())
    print(f"COMMITTED {manifest.id}", flush=True)
''')



def kill_writer_at(script: Path, url: str, crash_at: str, timeout: float = 30) -> str:
    env = {**os.environ, "SV_CRASH_AT": crash_at, "SV_ROWS": str(ROWS), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(script), url], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, cwd=ROOT)
    try:
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            pytest.fail(f"writer never reached {crash_at}")
        line = proc.stdout.readline().decode()
        assert line.startswith(f"MARK {crash_at}"), (line, proc.stderr.read().decode() if proc.poll() else "")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    return line


@pytest.fixture
def writer_script(tmp_path) -> Path:
    path = tmp_path / "crash_writer.py"
    path.write_text(CHILD)
    return path


CASES = [("file", "before_chunk"), ("file", "mid_chunk"), ("file", "after_chunks"), ("file", "before_manifest"),
         ("s3", "after_chunks"), ("s3", "before_manifest")]


@pytest.mark.parametrize("store_kind, crash_at", CASES, ids=[f"{s}-{c}" for s, c in CASES])
def test_killed_writer_leaves_no_snapshot_and_prune_cleans_up(request, store_kind, crash_at, writer_script,
                                                              tmp_path, monkeypatch, capsys):
    url = request.getfixturevalue(f"{store_kind}_repo_url")
    repo = open_repository(url, create=True, config=RepoConfig(
        id="t", created_at=utcnow(), chunk_avg_size=16 << 10, chunk_min_size=4 << 10, chunk_max_size=64 << 10))
    monkeypatch.setenv("STATEVAULT_REPOSITORY__URL", url)
    monkeypatch.chdir(tmp_path)

    kill_writer_at(writer_script, url, crash_at)
    orphans = {o.key.rsplit("/", 1)[-1] for o in repo.store.list("data")}
    if crash_at == "before_chunk":
        assert orphans == set()
    else:
        assert len(orphans) >= 3, "the writer should have stored chunks before it died"
    stale = list(repo.store.stale_temp_files()) if store_kind == "file" else []
    if crash_at == "mid_chunk":
        assert stale, "the kill should have left a temp file behind"
    elif crash_at == "before_chunk":
        assert stale == []
    # (after_chunks may also have caught another upload thread mid-write: any stale file is cleaned up)

    # nothing visible: the manifest is the commit point (once as a subprocess, the command as typed)
    if (store_kind, crash_at) == ("file", "before_manifest"):
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        listed = subprocess.run([*STATEVAULT, "snapshots", "list", "--json"], capture_output=True, env=env,
                                cwd=tmp_path, timeout=60)
        code, out, err = listed.returncode, listed.stdout.decode(), listed.stderr.decode()
    else:
        code, out, err = run_cli(capsys, "snapshots", "list", "--json")
    assert code == 0, err
    assert json.loads(out) == {"snapshots": [], "manifest_errors": []}

    code, out, err = run_cli(capsys, "snapshots", "check", "--read-data", "--json")
    assert code == 0, err
    assert json.loads(out)["ok"] is True

    code, out, err = run_cli(capsys, "snapshots", "prune", "--dry-run", "--grace", "0h", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert (report["chunks_deleted"], set(report["deleted"])) == (len(orphans), orphans)
    assert report["stale_files_deleted"] == len(stale)
    assert {o.key.rsplit("/", 1)[-1] for o in repo.store.list("data")} == orphans  # dry run deleted nothing

    code, out, err = run_cli(capsys, "snapshots", "prune", "--json")  # default grace (24h): too young to delete
    assert code == 0, err
    report = json.loads(out)
    assert (report["chunks_deleted"], report["chunks_in_grace"]) == (0, len(orphans))
    assert {o.key.rsplit("/", 1)[-1] for o in repo.store.list("data")} == orphans

    # a later write succeeds (different data, so the orphans stay unreferenced)
    rows = [orjson.dumps({"n": i, "later": "x" * (i % 50)}) + b"\n" for i in range(2500)]
    writer = repo.begin_snapshot("memory", "postgres")
    with writer.item("public.memories", "table", "jsonl") as item:
        item.add_many(rows)
    manifest = writer.commit(utcnow())
    assert list(repo.iter_records(manifest.items[0])) == rows

    code, out, err = run_cli(capsys, "snapshots", "prune", "--grace", "0h", "--json")
    assert code == 0, err
    report = json.loads(out)
    referenced = manifest.chunk_ids()
    assert set(report["deleted"]) == orphans - referenced
    assert report["stale_files_deleted"] == len(stale)
    assert {o.key.rsplit("/", 1)[-1] for o in repo.store.list("data")} == referenced
    if store_kind == "file":
        assert list(repo.store.stale_temp_files()) == []

    code, out, err = run_cli(capsys, "snapshots", "check", "--read-data", "--json")
    assert code == 0, err
    checked = json.loads(out)
    assert (checked["ok"], checked["snapshots"], checked["chunks_read"]) == (True, 1, len(referenced))
    assert [m.id for m in repo.list_snapshots()] == [manifest.id]


def test_rewriting_the_same_data_after_a_crash_reuses_the_orphaned_chunks(file_repo_url, writer_script):
    repo = open_repository(file_repo_url, create=True, config=RepoConfig(
        id="t", created_at=utcnow(), chunk_avg_size=16 << 10, chunk_min_size=4 << 10, chunk_max_size=64 << 10))
    kill_writer_at(writer_script, file_repo_url, "before_manifest")
    orphans = {o.key.rsplit("/", 1)[-1] for o in repo.store.list("data")}
    assert len(orphans) > 3
    writer = repo.begin_snapshot("memory", "postgres")
    with writer.item("public.memories", "table", "jsonl") as item:
        for i in range(ROWS):  # exactly what the child wrote
            item.add(orjson.dumps({"id": i, "text": f"fact {i * 7919 % 10007} " * (1 + i % 5)}) + b"\n")
    manifest = writer.commit(utcnow())
    assert writer.stats.chunks_new == 0
    assert manifest.chunk_ids() == orphans
    for cid in orphans:
        assert codec.chunk_id(repo.read_chunk(cid)) == cid
