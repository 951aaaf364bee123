"""Regressions from QA, Qdrant local mode (a real qdrant-client local store, small collections):

1. a swap that fails before its alias switch (a tampered manifest, a read-back that does not
   verify) drops its staging collection and leaves the live collection and alias as they were;
2. `restore --dry-run --to-path NEW` and `verify` create no store where there is none;
3. a source whose `path` does not exist fails the backup (exit 1) naming the path, creating nothing.

The CLI runs in-process (tests/cli_runner.py) on a config naming the store as `knowledge`.
"""
from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import orjson
import pytest
from qdrant_client import models as m

from backup.sources.qdrant import STAGING_MARK, QdrantSource, connect_qdrant, iter_collection_records
from backup.sources.qdrant_config import collection_schema
from backup.sources.qdrant_records import FORMAT
from restore.targets.base import RestoreOptions
from restore.targets.qdrant import QdrantTarget
from snapshots.errors import SourceError
from snapshots.manifest import utcnow
from snapshots.repository import open_repository
from snapshots.settings import QdrantSource as QdrantSettings
from tests.cli_runner import run_cli

KB = "customer_service_kb"
DIM = 8
pytestmark = [pytest.mark.filterwarnings("ignore:Local mode performs exact:UserWarning")]


def write_config(path: Path, repo: Path, qdrant_path: Path) -> Path:
    path.write_text(f'[repository]\nurl = "{repo.as_uri()}"\n\n'
                    f'[sources.knowledge]\nkind = "qdrant"\npath = "{qdrant_path}"\n')
    return path


def cli(capsys, cfg: Path, *args: str, rc: int = 0) -> dict:
    code, out, err = run_cli(capsys, "-c", str(cfg), *args, "--json")
    assert code == rc, f"rc={code}\nstdout:{out}\nstderr:{err}"
    return json.loads(out)


def seed(path: Path, n: int = 40) -> None:
    rng = np.random.default_rng(7)
    handle = connect_qdrant(path=str(path))
    try:
        handle.client.create_collection(KB, vectors_config=m.VectorParams(size=DIM, distance=m.Distance.COSINE))
        handle.client.upsert(KB, [m.PointStruct(id=i, vector=rng.standard_normal(DIM).tolist(),
                                                payload={"title": f"article {i}"}) for i in range(n)])
    finally:
        handle.close()


def store_state(path: Path) -> tuple[set[str], dict[str, str], list[bytes]]:
    """(physical collections, aliases, the records read through KB) with a fresh client."""
    handle = connect_qdrant(path=str(path))
    try:
        client = handle.client
        names = {c.name for c in client.get_collections().collections}
        aliases = {a.alias_name: a.collection_name for a in client.get_aliases().aliases}
        schema = collection_schema(client.get_collection(KB), local=True)
        return names, aliases, list(iter_collection_records(client, KB, schema, local=True))
    finally:
        handle.close()


@pytest.fixture
def env(tmp_path, qdrant_path):
    seed(qdrant_path)
    repo = tmp_path / "repo"
    return write_config(tmp_path / "statevault.toml", repo, qdrant_path), repo, qdrant_path


# ---- 1: a failed swap drops its staging collection -------------------------------------------

def tamper_digest(repo: Path, snapshot_id: str) -> None:
    path = repo / "snapshots" / f"{snapshot_id}.json"
    doc = json.loads(path.read_text())
    for item in doc["items"]:
        if item["name"] == KB:
            item["digest"] = "0" * len(item["digest"])
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize("first_swap", [True, False], ids=["real-collection", "alias"])
def test_swap_of_a_tampered_manifest_exits_3_and_drops_its_staging(env, capsys, first_swap):
    cfg, repo, qdrant_path = env
    snap = cli(capsys, cfg, "backup", "knowledge")["sources"][0]["snapshot_id"]
    if not first_swap:  # KB becomes an alias of a staging collection: the second swap is an alias update
        cli(capsys, cfg, "restore", snap, "--source", "knowledge", "--only", KB, "--mode", "swap", "--yes")
    before = store_state(qdrant_path)
    assert (KB in before[1]) is not first_swap
    tamper_digest(repo, snap)
    code, out, err = run_cli(capsys, "-c", str(cfg), "restore", snap, "--source", "knowledge", "--only", KB,
                             "--mode", "swap", "--yes")
    assert code == 3, f"stdout:{out}\nstderr:{err}"
    assert store_state(qdrant_path) == before  # no staging collection left, alias and live points as they were


def server_like_snapshot(repo_dir: Path, qdrant_path: Path) -> str:
    """A snapshot of KB as a server would give it, with Cosine vectors of length 2: local mode
    normalises them on upsert, so a restore into it reads back other vectors (exit 3)."""
    repo = open_repository(repo_dir.as_uri())
    handle = connect_qdrant(path=str(qdrant_path))
    try:
        schema = {**collection_schema(handle.client.get_collection(KB), local=True), "source_mode": "server"}
        points, _ = handle.client.scroll(KB, limit=100, with_vectors=True)
    finally:
        handle.close()
    writer = repo.begin_snapshot("knowledge", "qdrant", source_info={"mode": "server"})
    with writer.item(KB, "collection", FORMAT, schema) as w:
        for p in points:
            vector = np.asarray(p.vector, dtype="<f4") * np.float32(2)
            w.add_many([orjson.dumps({"id": p.id, "payload": p.payload,
                                      "vector": base64.b64encode(vector.tobytes()).decode()},
                                     option=orjson.OPT_SORT_KEYS) + b"\n"])
    return writer.commit(utcnow()).id


def test_swap_that_does_not_verify_drops_its_staging(env, capsys):
    cfg, repo, qdrant_path = env
    cli(capsys, cfg, "init")
    snap = server_like_snapshot(repo, qdrant_path)
    before = store_state(qdrant_path)
    report = cli(capsys, cfg, "restore", snap, "--source", "knowledge", "--mode", "swap", "--yes", rc=3)
    [check] = report["checks"]
    assert (check["expected"]["records"], check["actual"]["records"]) == (40, 40) and not check["ok"]
    assert store_state(qdrant_path) == before
    assert not any(STAGING_MARK in n for n in before[0])


def test_close_keeps_a_switched_staging_collection(env, capsys):
    cfg, repo_dir, qdrant_path = env
    snap = cli(capsys, cfg, "backup", "knowledge")["sources"][0]["snapshot_id"]
    repo = open_repository(repo_dir.as_uri())
    manifest = repo.load_manifest(snap)
    target = QdrantTarget(path=str(qdrant_path))
    try:
        [plan] = target.plan(manifest, only=[KB], into=None, mode="swap")
        target.restore(plan, repo.iter_records(plan.item), RestoreOptions(mode="swap"))
        target.switch([plan])
    finally:
        target.close()
    names, aliases, records = store_state(qdrant_path)
    assert aliases == {KB: plan.details["staging"]} and names == {plan.details["staging"]}
    assert len(records) == 40


# ---- 2: a dry run and verify create nothing -------------------------------------------------

@pytest.mark.parametrize("mode", ["new", "swap"])
def test_dry_run_to_a_new_path_creates_nothing(env, capsys, tmp_path, mode):
    cfg, repo, qdrant_path = env
    cli(capsys, cfg, "backup", "knowledge")
    new = tmp_path / "new" / "dir"
    result = cli(capsys, cfg, "restore", "latest", "--source", "knowledge", "--to-path", str(new), "--mode", mode,
                 "--dry-run")
    [plan] = result["plan"]
    assert plan["target"] == KB and plan["live_records"] is None
    assert any(f"no Qdrant local store at {new}" in n for n in plan["notes"])
    assert not (tmp_path / "new").exists()
    # an existing directory without a store is planned the same, and left as it was
    new.mkdir(parents=True)
    cli(capsys, cfg, "restore", "latest", "--source", "knowledge", "--to-path", str(new), "--mode", mode, "--dry-run")
    assert list(new.iterdir()) == []


def test_restore_to_a_new_path_still_creates_the_store(env, capsys, tmp_path):
    cfg, repo, qdrant_path = env
    cli(capsys, cfg, "backup", "knowledge")
    new = tmp_path / "new" / "dir"
    result = cli(capsys, cfg, "restore", "latest", "--source", "knowledge", "--to-path", str(new))
    assert result["verified"] and result["records_restored"] == 40
    handle = connect_qdrant(path=str(new))
    try:
        assert handle.client.count(KB).count == 40
    finally:
        handle.close()


def test_verify_of_a_missing_store_exits_1_naming_it_and_creates_nothing(env, capsys, tmp_path, monkeypatch):
    cfg, repo, qdrant_path = env
    cli(capsys, cfg, "backup", "knowledge")
    assert cli(capsys, cfg, "verify", "latest", "--source", "knowledge")["in_sync"] is True
    typo = tmp_path / "typo2"
    monkeypatch.setenv("STATEVAULT_SOURCES__KNOWLEDGE__PATH", str(typo))
    error = cli(capsys, cfg, "verify", "latest", "--source", "knowledge", rc=1)
    assert f"no Qdrant local store at {typo}" in error["message"], error
    assert not typo.exists()


# ---- 3: a source whose path does not exist ------------------------------------------------

def test_backup_of_a_missing_path_fails_the_source_and_creates_nothing(env, capsys, tmp_path, monkeypatch):
    cfg, repo, qdrant_path = env
    typo = tmp_path / "typo2"
    monkeypatch.setenv("STATEVAULT_SOURCES__KNOWLEDGE__PATH", str(typo))
    result = cli(capsys, cfg, "backup", "knowledge", rc=1)
    [src] = result["sources"]
    assert not src["ok"] and src["snapshot_id"] is None
    assert f"no Qdrant local store at {typo}" in src["error"]["message"]
    assert "path" in src["error"]["hint"]
    assert not typo.exists()
    assert cli(capsys, cfg, "snapshots", "list", "--source", "knowledge")["snapshots"] == []
    monkeypatch.delenv("STATEVAULT_SOURCES__KNOWLEDGE__PATH")
    cli(capsys, cfg, "backup", "knowledge")  # the configured path still backs up


def test_source_refuses_a_path_that_is_a_file(tmp_path):
    not_a_dir = tmp_path / "qdrant.txt"
    not_a_dir.write_text("x")
    with pytest.raises(SourceError, match="not a directory"):
        with QdrantSource(QdrantSettings(kind="qdrant", path=str(not_a_dir))).open():
            pass


def test_an_existing_empty_store_still_backs_up_with_no_items(tmp_path, capsys):
    empty = tmp_path / "empty-qdrant"
    connect_qdrant(path=str(empty)).close()  # a store with no collection
    cfg = write_config(tmp_path / "statevault.toml", tmp_path / "repo", empty)
    [src] = cli(capsys, cfg, "backup", "knowledge")["sources"]
    assert src["ok"] and src["items"] == 0
