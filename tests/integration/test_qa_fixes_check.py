"""QA fixes: `snapshots check` (exclusive read options, item counts and digests recomputed from
the records) and `resolve` (unreadable newer manifests warned about, `--at` in UTC and to the
second). Real repositories in temp dirs; Redis snapshots from the real source.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import orjson
import pytest
import redis

from snapshots import codec
from snapshots.check import check_repository
from snapshots.errors import NotFoundError
from snapshots.manifest import RepoConfig, utcnow
from snapshots.repository import Repository, open_repository
from tests.cli_runner import run_cli
from tests.integration.redis_helpers import backup as redis_backup

SMALL = dict(chunk_avg_size=16 << 10, chunk_min_size=4 << 10, chunk_max_size=64 << 10)
ROOT = Path(__file__).resolve().parents[2]


def rows(tag: str, n: int) -> list[bytes]:
    return [orjson.dumps({"id": i, "tag": tag, "text": f"{tag} fact {i * 7919 % 10007} " * (1 + i % 4)}) + b"\n"
            for i in range(n)]


@pytest.fixture
def repo(file_repo_url, monkeypatch, tmp_path) -> Repository:
    monkeypatch.setenv("STATEVAULT_REPOSITORY__URL", file_repo_url)
    monkeypatch.chdir(tmp_path)
    return open_repository(file_repo_url, create=True, config=RepoConfig(id="t", created_at=utcnow(), **SMALL))


def snapshot(repo, source: str = "memory", items: dict[str, list[bytes]] | None = None, cut=None):
    writer = repo.begin_snapshot(source, "postgres")
    for name, records in (items or {"big": rows("big", 2000), "small": rows("small", 20)}).items():
        with writer.item(name, "table", "jsonl") as w:
            w.add_many(records)
    return writer.commit(cut or utcnow())


def manifest_path(repo, sid: str) -> Path:
    return Path(repo.store.root) / "snapshots" / f"{sid}.json"


def edit_manifest(repo, sid: str, change) -> None:
    path = manifest_path(repo, sid)
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc, indent=1))


# ---- 1. --read-data and --read-data-subset are exclusive ----------------------------------

@pytest.mark.parametrize("as_json", [False, True])
def test_read_data_and_subset_together_exit_2_reading_nothing(repo, capsys, monkeypatch, as_json):
    snapshot(repo)
    read = []
    monkeypatch.setattr(Repository, "read_chunk", lambda self, cid: read.append(cid) or b"")
    code, out, err = run_cli(capsys, "snapshots", "check", "--read-data", "--read-data-subset", "5%",
                             *(["--json"] if as_json else []))
    assert code == 2
    assert "mutually exclusive" in (json.loads(out)["message"] if as_json else err)
    assert read == []


# ---- 2. item counts and digests, recomputed from the records ------------------------------

def test_a_tampered_item_digest_fails_check_read_data_naming_the_item(repo, capsys):
    m = snapshot(repo)
    assert check_repository(repo, read_data=True).ok
    edit_manifest(repo, m.id, lambda d: d["items"][1].update(digest="0" * 32))

    code, out, err = run_cli(capsys, "snapshots", "check", "--read-data", "--json")
    assert code == 3, err
    report = json.loads(out)
    assert report["ok"] is False and report["problems"] == []  # every chunk is intact
    assert report["broken_snapshots"] == [m.id]
    [problem] = report["item_problems"]
    assert (problem["snapshot"], problem["item"]) == (m.id, "small")
    assert problem["expected"] == {"records": 20, "digest": "0" * 32}
    assert problem["actual"] == {"records": 20, "digest": m.item("small").digest}
    assert "digest" in problem["problem"]
    assert report["items_digest_checked"] == report["items"] == 2

    code, out, err = run_cli(capsys, "snapshots", "check", "--read-data")
    assert code == 3
    text = " ".join(out.split())
    assert f"item mismatch snapshot {m.id} item small" in text and "no problems found" not in text
    assert "1 items whose manifest does not match" in " ".join(err.split())

    # the structure check reads no data, so it cannot see it
    code, out, err = run_cli(capsys, "snapshots", "check")
    assert code == 0


def test_a_tampered_record_count_is_found_too(repo):
    m = snapshot(repo)
    edit_manifest(repo, m.id, lambda d: d["items"][0].update(records=d["items"][0]["records"] - 1))
    [problem] = check_repository(repo, read_data=True).item_problems
    assert problem["item"] == "big" and "record count" in problem["problem"]
    assert problem["actual"]["records"] == problem["expected"]["records"] + 1


def test_subset_checks_digests_only_of_items_whose_every_chunk_was_read(repo, monkeypatch):
    m = snapshot(repo)
    big, small = m.item("big"), m.item("small")
    assert len(big.chunks) >= 4 and len(small.chunks) == 1
    edit_manifest(repo, m.id, lambda d: [it.update(digest="0" * 32) for it in d["items"]])
    read: list[str] = []
    original = Repository.read_chunk
    monkeypatch.setattr(Repository, "read_chunk", lambda self, cid: read.append(cid) or original(self, cid))
    for seed in range(40):
        read.clear()
        report = check_repository(repo, subset_percent=30, seed=seed)
        fully_read = [it.name for it in (big, small) if {c.id for c in it.chunks} <= set(read)]
        assert report.digest_checked == ({m.id: fully_read} if fully_read else {})
        assert sorted(p["item"] for p in report.item_problems) == sorted(fully_read)
        assert report.ok == (not fully_read)
        if "small" in fully_read and "big" not in fully_read:
            break
    else:
        pytest.fail("no seed read the small item without the whole big one")


def test_a_damaged_chunk_is_reported_by_chunk_and_its_item_is_not_digest_checked(repo):
    m = snapshot(repo)
    cid = m.item("big").chunks[1].id
    path = Path(repo.store.root) / "data" / cid[:2] / cid
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    report = check_repository(repo, read_data=True)
    assert [p["chunk"] for p in report.problems] == [cid]
    assert report.item_problems == [] and report.digest_checked == {m.id: ["small"]}


def test_shared_chunks_are_read_once_and_every_snapshot_item_is_checked(repo, monkeypatch):
    shared = rows("shared", 800)
    a = snapshot(repo, "a", {"shared": shared, "own": rows("a", 50)})
    b = snapshot(repo, "b", {"shared": shared})
    edit_manifest(repo, b.id, lambda d: d["items"][0].update(digest="1" * 32))
    read: list[str] = []
    original = Repository.read_chunk
    monkeypatch.setattr(Repository, "read_chunk", lambda self, cid: read.append(cid) or original(self, cid))
    report = check_repository(repo, read_data=True)
    assert sorted(read) == sorted(a.chunk_ids() | b.chunk_ids())
    assert report.digest_checked == {a.id: ["shared", "own"], b.id: ["shared"]}
    assert [(p["snapshot"], p["item"]) for p in report.item_problems] == [(b.id, "shared")]
    assert report.broken_snapshots == [b.id]


def test_redis_items_verify_by_their_canonical_records_and_a_tampered_one_fails(repo, redis_url):
    """Redis records carry their expiry ("x"), which the digest leaves out: the check digests
    the canonical records, as the writer and the restore targets do."""
    c = redis.Redis.from_url(redis_url)
    for i in range(300):
        c.set(f"history:u{i}", json.dumps({"turns": [f"hello {i}"] * (i % 7)}), ex=3600 + i)
        c.rpush(f"history:u{i}:list", *[f"turn {j}" for j in range(5)])
    c.close()
    m, _ = redis_backup(repo, redis_url, source="history")
    item = m.items[0]
    assert item.format.startswith("redis-jsonl") and b'"x":null' not in next(repo.iter_records(item))
    report = check_repository(repo, read_data=True)
    assert report.ok, report.to_dict()
    assert report.digest_checked == {m.id: [i.name for i in m.items]}

    edit_manifest(repo, m.id, lambda d: d["items"][0].update(digest="2" * 32))
    [problem] = check_repository(repo, read_data=True).item_problems
    assert problem["actual"]["digest"] == item.digest  # what the writer computed, recomputed


def test_an_unknown_digest_algorithm_is_an_item_problem(repo):
    m = snapshot(repo)
    edit_manifest(repo, m.id, lambda d: d["items"][1].update(digest_algo="md5-sum"))
    [problem] = check_repository(repo, read_data=True).item_problems
    assert problem["item"] == "small" and "unknown digest algorithm" in problem["problem"]


# ---- 3. an unreadable manifest that could be newer is warned about -------------------------

def _truncate(repo, sid: str) -> None:
    manifest_path(repo, sid).write_text('{"format_version": 1, "id": ')


def test_latest_warns_about_a_newer_unreadable_manifest_and_still_picks_the_older(repo, caplog):
    old = snapshot(repo, "history")
    new = snapshot(repo, "history")
    _truncate(repo, new.id)
    with caplog.at_level(logging.WARNING, logger="statevault.repository"):
        assert repo.resolve("latest", source="history").id == old.id
        assert repo.resolve("latest").id == old.id
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert all(f"unreadable manifest: snapshots/{new.id}.json" in w and "statevault snapshots check" in w
               and old.id in w for w in warnings)
    # an id or prefix names its snapshot: nothing to warn about
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="statevault.repository"):
        repo.resolve(old.id)
    assert caplog.records == []


def test_no_warning_for_an_unreadable_manifest_older_than_the_choice(repo, caplog):
    broken = snapshot(repo, "history")
    _truncate(repo, broken.id)
    newer = "20991231T235959Z-00000000"  # picked by latest, id well after the broken one
    good = snapshot(repo, "history")
    doc = json.loads(manifest_path(repo, good.id).read_text())
    doc["id"] = newer
    manifest_path(repo, newer).write_text(json.dumps(doc))
    manifest_path(repo, good.id).unlink()
    with caplog.at_level(logging.WARNING, logger="statevault.repository"):
        assert repo.resolve("latest", source="history").id == newer
    assert caplog.records == []


def test_at_warns_only_about_unreadable_manifests_that_could_be_at_or_before_it(repo, caplog):
    t0 = utcnow()
    old = snapshot(repo, "history", cut=t0 - timedelta(hours=1))
    new = snapshot(repo, "history")
    _truncate(repo, new.id)
    with caplog.at_level(logging.WARNING, logger="statevault.repository"):
        assert repo.resolve("latest", source="history", at=t0 - timedelta(minutes=30)).id == old.id
    assert caplog.records == []  # written after the cutoff: could not be the answer
    with caplog.at_level(logging.WARNING, logger="statevault.repository"):
        assert repo.resolve("latest", source="history", at=t0 + timedelta(minutes=5)).id == old.id
    assert [new.id in r.getMessage() for r in caplog.records] == [True]


def test_no_readable_snapshot_but_an_unreadable_one_says_so_in_the_hint(repo):
    only = snapshot(repo, "history")
    _truncate(repo, only.id)
    with pytest.raises(NotFoundError) as exc:
        repo.resolve("latest", source="history")
    assert only.id in exc.value.hint and "snapshots check" in exc.value.hint


def test_cli_warning_is_on_stderr_and_json_stdout_stays_one_document(repo, tmp_path):
    old = snapshot(repo, "history")
    new = snapshot(repo, "history")
    _truncate(repo, new.id)
    proc = subprocess.run([sys.executable, "-m", "cli.app", "snapshots", "show", "latest", "--source", "history",
                           "--json"], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["id"] == old.id
    assert f"unreadable manifest: snapshots/{new.id}.json" in proc.stderr and "statevault snapshots check" in proc.stderr


# ---- 4. --at: converted to UTC, and a whole second means the end of that second ------------

def test_at_with_an_offset_is_compared_and_reported_in_utc(repo):
    cut = datetime(2026, 11, 27, 1, 0, 0, tzinfo=timezone.utc)
    m = snapshot(repo, "history", cut=cut)
    plus5 = timezone(timedelta(hours=5))
    with pytest.raises(NotFoundError) as exc:
        repo.resolve("latest", source="history", at=datetime(2026, 11, 27, 5, 57, 26, tzinfo=plus5))
    assert "at or before 2026-11-27T00:57:26Z" in exc.value.message
    assert repo.resolve("latest", source="history", at=datetime(2026, 11, 27, 6, 0, 0, tzinfo=plus5)).id == m.id
    assert repo.resolve("latest", source="history", at=datetime(2026, 11, 27, 1, 0, 0)).id == m.id  # naive: UTC


def test_cli_at_with_an_offset_names_the_utc_cutoff(repo, capsys, tmp_path):
    snapshot(repo, "history", cut=datetime(2026, 11, 27, 1, 0, 0, tzinfo=timezone.utc))
    cfg = tmp_path / "statevault.toml"
    cfg.write_text(f'[repository]\nurl = "{os.environ["STATEVAULT_REPOSITORY__URL"]}"\n\n'
                   '[sources.history]\nkind = "redis"\nurl = "redis://127.0.0.1:1/0"\n')
    code, out, err = run_cli(capsys, "-c", str(cfg), "restore", "--source", "history",
                             "--at", "2026-11-27T05:57:26+05:00", "--dry-run")
    assert code == 2
    assert "at or before 2026-11-27T00:57:26Z" in " ".join(err.split())


def test_a_listed_cut_time_pasted_into_at_finds_that_snapshot(repo):
    from cli.backup_cmd import _parse_at

    cut = datetime(2026, 11, 27, 0, 57, 26, 731_000, tzinfo=timezone.utc)
    earlier = snapshot(repo, "history", cut=cut - timedelta(seconds=5))
    m = snapshot(repo, "history", cut=cut)
    from cli.context import fmt_time

    shown = fmt_time(m.cut_time)  # what `snapshots list` shows
    assert shown == "2026-11-27 00:57:26Z"
    assert repo.resolve("latest", source="history", at=_parse_at(shown.replace(" ", "T"))).id == m.id
    assert repo.resolve("latest", source="history", at=_parse_at("2026-11-27T00:57:25Z")).id == earlier.id
    # a time with a fraction is exact
    assert repo.resolve("latest", source="history", at=cut - timedelta(microseconds=1)).id == earlier.id
    assert repo.resolve("latest", source="history", at=cut).id == m.id


# ---- 5. a forget + prune while the check runs ---------------------------------------------

def test_chunks_pruned_with_their_forgotten_snapshot_during_a_check_are_no_problem(repo, monkeypatch):
    kept = snapshot(repo, items={"kept": rows("kept", 300)})
    gone = snapshot(repo, items={"gone": rows("gone", 300)})
    only_gone = sorted(set(gone.chunk_ids()) - set(kept.chunk_ids()))
    assert only_gone
    read = Repository.read_chunk
    pruned = []

    def read_while_pruning(self, cid):
        if not pruned:  # the daemon's forget + prune, between the check's listing and its reads
            repo.store.delete(f"snapshots/{gone.id}.json")
            for c in only_gone:
                repo.store.delete(codec.chunk_key(c))
            pruned.append(True)
        return read(self, cid)

    monkeypatch.setattr(Repository, "read_chunk", read_while_pruning)
    report = check_repository(repo, read_data=True)
    assert pruned and report.ok, report.to_dict()
    assert report.digest_checked.get(kept.id) == ["kept"]

    # a chunk missing for a snapshot that is still there stays a problem
    repo.store.delete(codec.chunk_key(sorted(kept.chunk_ids())[0]))
    monkeypatch.setattr(Repository, "read_chunk", read)
    report = check_repository(repo, read_data=True)
    assert not report.ok and report.broken_snapshots == [kept.id]


# ---- 6. a --source that names nothing -----------------------------------------------------

@pytest.mark.parametrize("command", [["snapshots", "list"], ["snapshots", "forget", "--keep-last", "1"]])
def test_a_source_neither_configured_nor_in_the_repository_is_exit_2(repo, capsys, command):
    m = snapshot(repo, source="memory")
    code, _, err = run_cli(capsys, *command, "--source", "memroy")
    assert code == 2 and "no source 'memroy'" in err
    assert [s.id for s in repo.list_snapshots()] == [m.id]
    # a source dropped from the config still has its snapshots: listed, and forgotten by policy
    code, out, _ = run_cli(capsys, "snapshots", "list", "--source", "memory", "--json")
    assert code == 0 and [s["id"] for s in json.loads(out)["snapshots"]] == [m.id]


def test_prune_grace_that_is_no_duration_is_a_usage_error_not_a_config_one(repo, capsys):
    code, _, err = run_cli(capsys, "snapshots", "prune", "--grace", "banana")
    assert code == 2 and "not a duration: 'banana'" in err and "config file" not in err
