"""Damaged chunks are found and named, with every snapshot they break, on both stores.

The damage is done behind statevault's back: with the filesystem for file://, with boto3 for
s3://. Two snapshots share one item's chunks and each has one item of its own, so a test can
tell "names exactly the snapshots that reference the chunk" from "names everything".
"""
from __future__ import annotations

import json

import orjson
import pytest

from snapshots.errors import CorruptChunkError
from snapshots.manifest import RepoConfig, utcnow
from snapshots.repository import open_repository
from tests.cli_runner import run_cli
from tests.damage import Damage



def rows(tag: str, n: int) -> list[bytes]:
    return [orjson.dumps({"id": i, "tag": tag, "text": f"{tag} fact {i * 7919 % 10007} " * (1 + i % 4)}) + b"\n"
            for i in range(n)]


BOTH = pytest.mark.parametrize("damaged_repo", ["file", "s3"], indirect=True)


@pytest.fixture
def damaged_repo(request):
    """(repo, damage, snapshot A, snapshot B): both have item 'shared' (same chunks) and their own item."""
    url = request.getfixturevalue(f"{request.param}_repo_url")
    repo = open_repository(url, create=True, config=RepoConfig(
        id="t", created_at=utcnow(), chunk_avg_size=16 << 10, chunk_min_size=4 << 10, chunk_max_size=64 << 10))
    shared = rows("shared", 300)
    snaps = []
    for source in ("agent-a", "agent-b"):
        writer = repo.begin_snapshot(source, "postgres")
        for name, records in (("shared", shared), ("own", rows(source, 800))):
            with writer.item(name, "table", "jsonl") as w:
                w.add_many(records)
        snaps.append(writer.commit(utcnow()))
    a, b = snaps
    assert a.item("shared").chunks == b.item("shared").chunks  # same ids and sizes, the stored size included
    assert len(a.item("own").chunks) >= 3
    monkeypatch = request.getfixturevalue("monkeypatch")
    monkeypatch.setenv("STATEVAULT_REPOSITORY__URL", url)
    monkeypatch.chdir(request.getfixturevalue("tmp_path"))
    s3 = request.getfixturevalue("s3_server") if request.param == "s3" else None
    return repo, Damage(url, s3), a, b


# on S3 an overwrite is an overwrite: flip covers it there, truncate is a filesystem accident
@pytest.mark.parametrize("damaged_repo, how", [("file", "flip"), ("file", "truncate"), ("file", "delete"),
                                               ("s3", "flip"), ("s3", "delete")], indirect=["damaged_repo"])
def test_damaged_chunk_is_named_with_the_one_snapshot_it_breaks(damaged_repo, how, capsys):
    repo, damage, a, b = damaged_repo
    cid = a.item("own").chunks[1].id
    assert cid not in b.chunk_ids()
    damage(how, cid)
    problem = "missing" if how == "delete" else "damaged"

    code, out, err = run_cli(capsys, "snapshots", "check", "--read-data", "--json")
    assert code == 3, err
    report = json.loads(out)
    assert report["ok"] is False
    assert report["problems"] == [{"chunk": cid, "problem": problem, "snapshots": [a.id]}]
    assert report["broken_snapshots"] == [a.id]
    assert report["chunks_read"] == report["chunks_referenced"] - (1 if how == "delete" else 0)

    code, out, err = run_cli(capsys, "snapshots", "check", "--read-data")
    assert code == 3
    assert f"{problem} chunk {cid} breaks snapshots: {a.id}" in " ".join(out.split())
    assert b.id not in out and a.id in err

    code, out, err = run_cli(capsys, "snapshots", "check", "--read-data-subset", "100%", "--json")
    assert code == 3
    assert [p["chunk"] for p in json.loads(out)["problems"]] == [cid]

    code, out, err = run_cli(capsys, "snapshots", "check", "--json")  # structure only: existence
    if how == "delete":
        assert code == 3
        assert json.loads(out)["problems"] == [{"chunk": cid, "problem": "missing", "snapshots": [a.id]}]
    else:
        assert code == 0, "a present chunk passes the existence check; --read-data finds the damage"

    with pytest.raises(CorruptChunkError) as exc:
        list(repo.iter_records(a.item("own")))
    assert exc.value.chunk_id == cid and cid in exc.value.message
    assert exc.value.exit_code == 3
    # the untouched snapshot still reads back completely
    assert list(repo.iter_records(b.item("own"))) == rows("agent-b", 800)
    assert list(repo.iter_records(a.item("shared"))) == rows("shared", 300)


@BOTH
def test_damaged_shared_chunk_names_both_snapshots(damaged_repo, capsys):
    repo, damage, a, b = damaged_repo
    cid = a.item("shared").chunks[0].id
    damage("flip", cid)
    code, out, _ = run_cli(capsys, "snapshots", "check", "--read-data", "--json")
    assert code == 3
    report = json.loads(out)
    (problem,) = report["problems"]
    assert (problem["chunk"], problem["problem"], sorted(problem["snapshots"])) == (cid, "damaged", sorted([a.id, b.id]))
    assert report["broken_snapshots"] == sorted([a.id, b.id])
    for snap in (a, b):
        with pytest.raises(CorruptChunkError, match=cid):
            list(repo.iter_records(snap.item("shared")))


@BOTH
def test_undamaged_repository_checks_clean(damaged_repo, capsys):
    _, _, a, b = damaged_repo
    code, out, err = run_cli(capsys, "snapshots", "check", "--read-data", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert (report["ok"], report["snapshots"], report["problems"]) == (True, 2, [])
    assert report["chunks_read"] == report["chunks_referenced"] == len(a.chunk_ids() | b.chunk_ids())


@BOTH
def test_the_repair_the_hint_describes_works(damaged_repo, capsys):
    """forget the broken snapshot, prune --grace 0h, back up again: the repository is whole again."""
    repo, damage, a, b = damaged_repo
    cid = a.item("own").chunks[1].id
    damage("flip", cid)
    code, _, err = run_cli(capsys, "snapshots", "check", "--read-data")
    assert code == 3 and "prune --grace 0h" in " ".join(err.split())

    repo.delete_snapshot(a.id)
    code, out, err = run_cli(capsys, "snapshots", "prune", "--grace", "0h", "--json")
    assert code == 0, err
    assert cid in json.loads(out)["deleted"]

    writer = repo.begin_snapshot("agent-a", "postgres")
    for name, records in (("shared", rows("shared", 300)), ("own", rows("agent-a", 800))):
        with writer.item(name, "table", "jsonl") as w:
            w.add_many(records)
    again = writer.commit(utcnow())
    assert cid in again.chunk_ids() and writer.stats.chunks_new >= 1
    code, out, err = run_cli(capsys, "snapshots", "check", "--read-data", "--json")
    assert code == 0, out
    assert list(repo.iter_records(again.item("own"))) == rows("agent-a", 800)
