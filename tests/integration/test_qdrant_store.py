"""Qdrant source and target against qdrant-client local mode (a real local store, not a mock).

Local mode takes a file lock per directory: one client per path and process. Tests reach the
store through `connect_qdrant`, which the source and target share, and close their handle
before a child process opens the same path.
"""
from __future__ import annotations

import base64
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import numpy as np
import orjson
import pytest
from qdrant_client import models as m

from backup.job import snapshot_source
from backup.sources.qdrant import QdrantSource, connect_qdrant, iter_collection_records, translate_qdrant_error
from backup.sources.qdrant_config import (collection_schema, create_collection_kwargs, payload_index_ops,
                                          vector_layout)
from backup.sources.qdrant_records import FORMAT, FORMAT_V1, decode_record, local_canonical
from restore.run import restore_snapshot
from restore.targets.base import RestoreOptions
from restore.targets.qdrant import QdrantTarget
from restore.verify import digest_of
from snapshots.errors import (CorruptChunkError, IncompatibleTargetError, NotFoundError, SourceError,
                              TargetNotEmptyError, UsageError)
from snapshots.manifest import Manifest, RepoConfig, new_snapshot_id, utcnow
from snapshots.repository import open_repository
from snapshots.settings import QdrantSource as QdrantSettings
from snapshots.settings import Settings
from tests.damage import damage_late_chunk

ROOT = Path(__file__).resolve().parents[2]
# local mode's own notices about options it ignores (payload indexes, exact search)
pytestmark = [pytest.mark.filterwarnings("ignore:Payload indexes have no effect:UserWarning"),
              pytest.mark.filterwarnings("ignore:Local mode performs exact:UserWarning"),
              pytest.mark.filterwarnings("ignore:Api key is used with an insecure connection:UserWarning")]


def small_repo(url: str):
    return open_repository(url, create=True, config=RepoConfig(
        id="t", created_at=utcnow(), chunk_avg_size=16 << 10, chunk_min_size=4 << 10, chunk_max_size=64 << 10))


def settings(path, **kw) -> QdrantSettings:
    return QdrantSettings(kind="qdrant", path=str(path), **kw)


def backup(repo, path, **kw):
    manifest, stats = snapshot_source(repo, "kb", settings(path, **kw))
    return manifest, stats


def seed_named(client, name: str = "kb", n: int = 400, seed: int = 1) -> None:
    """Two named dense vectors (Cosine, Euclid; some points lack `image`), a sparse vector,
    int ids, payloads with nested objects, arrays and unicode, payload indexes."""
    rng = random.Random(seed)
    client.create_collection(name, vectors_config={
        "text": m.VectorParams(size=24, distance=m.Distance.COSINE),
        "image": m.VectorParams(size=8, distance=m.Distance.EUCLID)},
        sparse_vectors_config={"keywords": m.SparseVectorParams(modifier=m.Modifier.IDF)})
    points = []
    for i in range(n):
        vec = {"text": [rng.gauss(0, 1) for _ in range(24)],
               "keywords": m.SparseVector(indices=sorted(rng.sample(range(1000), 4)), values=[rng.random() for _ in range(4)])}
        if i % 5:
            vec["image"] = [rng.gauss(0, 1) for _ in range(8)]
        payload = {"lang": rng.choice(["en", "de", "ja"]), "title": f"Größe №{i} — 日本語 ✓",
                   "meta": {"tags": ["a", "b", str(i)], "score": rng.random(), "nested": {"deep": [1, {"x": None}]}}}
        points.append(m.PointStruct(id=i * 7 + 3, vector=vec, payload=payload))
    client.upsert(name, points)
    client.create_payload_index(name, "lang", m.PayloadSchemaType.KEYWORD)


def seed_mixed_ids(client, name: str = "faq", n: int = 200, seed: int = 2) -> None:
    """One unnamed Dot vector; UUID ids and int ids in one collection."""
    rng = random.Random(seed)
    client.create_collection(name, vectors_config=m.VectorParams(size=16, distance=m.Distance.DOT))
    points = []
    for i in range(n):
        pid = str(uuid.UUID(int=rng.getrandbits(128))) if i % 2 else rng.randrange(1, 2**40)
        points.append(m.PointStruct(id=pid, vector=[rng.uniform(-1, 1) for _ in range(16)],
                                    payload={"q": f"question {i}", "answers": [{"text": "ok", "votes": i}]}))
    client.upsert(name, points)


def records_of(handle, name: str) -> list[bytes]:
    schema = collection_schema(handle.client.get_collection(name), local=True)
    return list(iter_collection_records(handle.client, name, schema, local=True))


@pytest.fixture(scope="module")
def seeded_template(tmp_path_factory):
    """Seeded once (local mode commits every point to sqlite: slow), copied for each test."""
    path = tmp_path_factory.mktemp("qdrant-template")
    handle = connect_qdrant(path=str(path))
    try:
        seed_named(handle.client)
        seed_mixed_ids(handle.client)
    finally:
        handle.close()
    return path


@pytest.fixture
def store(seeded_template, qdrant_path):
    shutil.copytree(seeded_template, qdrant_path, dirs_exist_ok=True)
    handle = connect_qdrant(path=str(qdrant_path))
    yield handle
    handle.close()


def search_ids(client, name: str, query, using: str | None) -> list:
    res = client.query_points(name, query=query, using=using, limit=10, search_params=m.SearchParams(exact=True))
    return [(p.id, round(p.score, 5)) for p in res.points]


def test_records_in_id_order_with_float32_vectors(store, file_repo_url, qdrant_path):
    manifest, _ = backup(small_repo(file_repo_url), qdrant_path)
    repo = open_repository(file_repo_url)
    item = manifest.item("faq")
    assert item.format == "qdrant-points-jsonl-v2"
    lines = list(repo.iter_records(item))
    ids = [orjson.loads(line)["id"] for line in lines]
    ints = [i for i in ids if isinstance(i, int)]
    uuids = [i for i in ids if isinstance(i, str)]
    assert ids == sorted(ints) + sorted(uuids) and ints and uuids  # ints first, then UUIDs by text
    first = lines[0]
    assert first.startswith(b'{"id":') and b',"payload":{"answers":' in first and first.endswith(b'"}\n')
    packed = orjson.loads(first)["vector"]  # base64 of the little-endian float32 components
    as_f32 = np.frombuffer(base64.b64decode(packed, validate=True), dtype="<f4")
    assert len(as_f32) == 16
    assert decode_record(first, vector_layout(item.schema), item.format)["vector"] == as_f32.tolist()
    [stored] = store.client.retrieve("faq", [ids[0]], with_vectors=True)
    assert np.array_equal(as_f32, np.asarray(stored.vector, dtype=np.float32))
    named = orjson.loads(next(iter(repo.iter_records(manifest.item("kb")))))
    assert set(named["vector"]) == {"text", "keywords"}  # point 3 (i=0) has no image vector
    assert sorted(named["vector"]["keywords"]) == ["indices", "values"]
    assert isinstance(named["vector"]["text"], str)


def test_round_trip_restores_points_config_and_search(store, file_repo_url, qdrant_path):
    repo = small_repo(file_repo_url)
    manifest, _ = backup(repo, qdrant_path)
    item = manifest.item("kb")
    assert item.records == 400 and item.schema["source_mode"] == "local"
    assert set(item.schema["vectors"]) == {"text", "image"} and item.schema["vectors"]["text"]["distance"] == "Cosine"
    assert item.schema["sparse_vectors"] == {"keywords": {"modifier": "idf"}}
    assert item.schema["payload_indexes"] == {}  # local mode reports none (see test_config_round_trip_*)
    client = store.client
    rng = np.random.default_rng(5)
    queries = [("kb", rng.standard_normal(24).tolist(), "text"), ("kb", rng.standard_normal(8).tolist(), "image"),
               ("faq", rng.standard_normal(16).tolist(), None)]
    before = [search_ids(client, c, q, u) for c, q, u in queries]
    config_before = {c: client.get_collection(c).config.params.model_dump() for c in ("kb", "faq")}
    for name in ("kb", "faq"):
        client.delete_collection(name)

    target = QdrantTarget(path=str(qdrant_path))
    try:
        plans = target.plan(manifest, only=[], into=None, mode="new")
        assert [(p.target, p.action, p.live_records) for p in plans] == [("faq", "create", None), ("kb", "create", None)]
        for plan in plans:
            target.restore(plan, repo.iter_records(plan.item), RestoreOptions())
            assert digest_of(target.read_back(plan)) == (plan.item.records, plan.item.digest)
    finally:
        target.close()
    assert {c: client.get_collection(c).config.params.model_dump() for c in ("kb", "faq")} == config_before
    assert [search_ids(client, c, q, u) for c, q, u in queries] == before


def test_local_canonical_form_is_stable_under_local_normalisation():
    rng = np.random.default_rng(0)
    changed = 0
    for _ in range(300):
        a = rng.standard_normal(64).astype(np.float32)
        a = a / np.linalg.norm(a)
        b = a / np.linalg.norm(a)  # what local mode stores when `a` is upserted again
        changed += not np.array_equal(a, b)
        assert np.array_equal(local_canonical(a), local_canonical(b))
        c = local_canonical(a)
        assert np.array_equal(local_canonical(c / np.linalg.norm(c)), c)
    assert changed > 30  # the problem is real: re-normalising changes many unit vectors


def test_config_round_trip_for_server_options():
    """What a server reports (hnsw, quantization, payload indexes...) survives schema -> create args."""
    info = m.CollectionInfo(
        status=m.CollectionStatus.GREEN, optimizer_status=m.OptimizersStatusOneOf.OK, points_count=3,
        segments_count=1, indexed_vectors_count=0,
        payload_schema={"lang": m.PayloadIndexInfo(data_type=m.PayloadSchemaType.KEYWORD, points=3),
                        "body": m.PayloadIndexInfo(data_type=m.PayloadSchemaType.TEXT, points=3,
                                                   params=m.TextIndexParams(type="text", tokenizer="word", lowercase=True))},
        config=m.CollectionConfig(
            params=m.CollectionParams(vectors={"text": m.VectorParams(size=4, distance="Cosine", on_disk=True),
                                               "colbert": m.VectorParams(size=2, distance="Dot", multivector_config=
                                                                         m.MultiVectorConfig(comparator="max_sim"))},
                                      shard_number=2, replication_factor=1, on_disk_payload=True,
                                      sparse_vectors={"bm25": m.SparseVectorParams(modifier="idf")}),
            hnsw_config=m.HnswConfig(m=32, ef_construct=200, full_scan_threshold=10000),
            optimizer_config=m.OptimizersConfig(deleted_threshold=0.2, vacuum_min_vector_number=1000,
                                                default_segment_number=2, flush_interval_sec=5),
            wal_config=m.WalConfig(wal_capacity_mb=64, wal_segments_ahead=0),
            quantization_config=m.ScalarQuantization(scalar=m.ScalarQuantizationConfig(type="int8", always_ram=True))))
    schema = orjson.loads(orjson.dumps(collection_schema(info, local=False)))  # survives the JSON manifest
    kw = create_collection_kwargs(schema)
    assert kw["vectors_config"]["text"] == m.VectorParams(size=4, distance="Cosine", on_disk=True)
    assert kw["vectors_config"]["colbert"].multivector_config.comparator == "max_sim"
    assert kw["sparse_vectors_config"]["bm25"].modifier == m.Modifier.IDF
    assert kw["hnsw_config"].m == 32 and kw["wal_config"].wal_capacity_mb == 64
    assert kw["optimizers_config"].default_segment_number == 2
    assert kw["quantization_config"].scalar.always_ram is True
    assert (kw["shard_number"], kw["on_disk_payload"]) == (2, True)
    ops = dict(payload_index_ops(schema))
    assert ops["lang"] == m.PayloadSchemaType.KEYWORD
    assert ops["body"].tokenizer == m.TokenizerType.WORD and ops["body"].lowercase is True


def test_mode_new_refuses_non_empty_and_incompatible(store, file_repo_url, qdrant_path):
    repo = small_repo(file_repo_url)
    manifest, _ = backup(repo, qdrant_path)
    before = records_of(store, "kb")
    target = QdrantTarget(path=str(qdrant_path))
    try:
        with pytest.raises(TargetNotEmptyError):
            target.plan(manifest, only=["kb"], into=None, mode="new")
        store.client.create_collection("other", vectors_config={"text": m.VectorParams(size=12, distance="Cosine")})
        for mode in ("new", "replace", "swap"):
            with pytest.raises(IncompatibleTargetError, match="size 24"):
                target.plan(manifest, only=["kb"], into="other", mode=mode)
        with pytest.raises(NotFoundError):
            target.plan(manifest, only=["nope"], into=None, mode="new")
        with pytest.raises(UsageError):
            target.plan(manifest, only=[], into="x", mode="new")  # --into needs one collection
        # an empty compatible collection is fine for mode new
        store.client.create_collection("empty", **create_collection_kwargs(manifest.item("kb").schema))
        [plan] = target.plan(manifest, only=["kb"], into="empty", mode="new")
        target.restore(plan, repo.iter_records(plan.item), RestoreOptions())
        assert digest_of(target.read_back(plan)) == (400, plan.item.digest)
    finally:
        target.close()
    assert records_of(store, "kb") == before
    assert store.client.count("other").count == 0


def _run_restore(repo_url, path, mode, only=("kb",)):
    cfg = Settings(sources={"kb": {"kind": "qdrant", "path": str(path)}})
    return restore_snapshot(open_repository(repo_url), cfg, "kb", "latest", only=list(only), mode=mode)


def test_swap_switches_alias_and_replace_replaces(store, file_repo_url, qdrant_path):
    repo = small_repo(file_repo_url)
    manifest, _ = backup(repo, qdrant_path)
    expected = list(repo.iter_records(manifest.item("kb")))
    client = store.client
    client.delete(collection_name="kb", points_selector=m.PointIdsList(points=[3, 10, 17]))
    client.set_payload("kb", payload={"lang": "xx"}, points=[24])

    result = _run_restore(file_repo_url, qdrant_path, "swap")  # first swap: kb is a real collection
    assert result.ok and result.checks[0].actual_records == 400
    aliases = {a.alias_name: a.collection_name for a in client.get_aliases().aliases}
    assert aliases["kb"].startswith("kb__sv_")
    assert records_of(store, "kb") == expected

    client.delete(collection_name="kb", points_selector=m.PointIdsList(points=[3]))  # through the alias
    first = aliases["kb"]
    _run_restore(file_repo_url, qdrant_path, "swap")  # now an alias: one atomic alias update
    aliases = {a.alias_name: a.collection_name for a in client.get_aliases().aliases}
    assert aliases["kb"] != first and aliases["kb"].startswith("kb__sv_")
    assert client.collection_exists(first)  # kept for rollback
    assert records_of(store, "kb") == expected

    # replace through the alias: the physical collection is recreated, the alias kept
    client.set_payload("kb", payload={"lang": "yy"}, points=[3])
    live_physical = aliases["kb"]
    result = _run_restore(file_repo_url, qdrant_path, "replace")
    assert result.ok and result.pre_restore_snapshot is not None
    assert {a.alias_name: a.collection_name for a in client.get_aliases().aliases}["kb"] == live_physical
    assert records_of(store, "kb") == expected

    # a backup sees the live name, not the staging names
    manifest2, stats = backup(repo, qdrant_path)
    assert sorted(i.name for i in manifest2.items) == ["faq", "kb"]
    assert manifest2.item("kb").digest == manifest.item("kb").digest

    client.delete(collection_name="faq", points_selector=m.PointIdsList(points=[orjson.loads(
        next(iter(repo.iter_records(manifest.item("faq")))))["id"]]))
    result = _run_restore(file_repo_url, qdrant_path, "replace", only=("faq",))
    assert result.ok and result.pre_restore_snapshot is not None
    assert records_of(store, "faq") == list(repo.iter_records(manifest.item("faq")))
    pre = repo.load_manifest(result.pre_restore_snapshot)
    assert pre.item("faq").records == 199 and "pre-restore" in pre.tags


def test_swap_removes_stale_staging_collections(store, file_repo_url, qdrant_path):
    repo = small_repo(file_repo_url)
    manifest, _ = backup(repo, qdrant_path, collections=["faq"])
    stale = "faq__sv_20200101000000abcd"
    store.client.create_collection(stale, **create_collection_kwargs(manifest.item("faq").schema))
    target = QdrantTarget(path=str(qdrant_path))
    try:
        [plan] = target.plan(manifest, only=["faq"], into=None, mode="swap")
        assert plan.details["stale"] == [stale] and any("stale" in n for n in plan.notes)
        target.restore(plan, repo.iter_records(plan.item), RestoreOptions())
        target.switch([plan])
    finally:
        target.close()
    assert not store.client.collection_exists(stale)


CHILD = textwrap.dedent('''
    import sys, time
    from restore.targets.base import RestoreOptions
    from restore.targets.qdrant import QdrantTarget
    from snapshots.repository import open_repository

    repo = open_repository(sys.argv[1])
    manifest = repo.load_manifest(sys.argv[3])
    target = QdrantTarget(path=sys.argv[2])
    [plan] = target.plan(manifest, only=["kb"], into=None, mode="swap")

    def records():
        for n, record in enumerate(repo.iter_records(plan.item)):
            if n == 300:  # the first batch of 256 is in the staging collection by now
                print("STAGED", plan.details["staging"], flush=True)
                while True:
                    time.sleep(60)  # the parent SIGKILLs us here
            yield record

    target.restore(plan, records(), RestoreOptions())
''')


def test_swap_killed_midway_leaves_live_collection_untouched(store, file_repo_url, qdrant_path):
    repo = small_repo(file_repo_url)
    manifest, _ = backup(repo, qdrant_path)
    store.client.delete(collection_name="kb", points_selector=m.PointIdsList(points=[3]))
    live = records_of(store, "kb")
    store.close()  # local mode: the child needs the directory's lock
    child = subprocess.Popen([sys.executable, "-c", CHILD, file_repo_url, str(qdrant_path), manifest.id],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline()
        assert line.startswith("STAGED"), child.stderr.read()
        staging = line.split()[1]
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    handle = connect_qdrant(path=str(qdrant_path))  # the kernel dropped the dead child's lock
    try:
        assert records_of(handle, "kb") == live
        assert handle.client.get_aliases().aliases == []
        assert handle.client.count(staging).count == 256  # left behind, named as staging
        assert "kb" in {c.name for c in handle.client.get_collections().collections}
    finally:
        handle.close()
    result = _run_restore(file_repo_url, qdrant_path, "swap")  # a later swap still works
    assert result.ok


def test_a_failed_swap_drops_its_staging_copy_and_leaves_the_live_collection(store, file_repo_url, qdrant_path):
    repo = small_repo(file_repo_url)
    manifest, _ = backup(repo, qdrant_path)
    damage_late_chunk(file_repo_url, manifest.item("kb"), last=True)  # after a first batch of 256 points
    store.client.delete(collection_name="kb", points_selector=m.PointIdsList(points=[3]))
    live = records_of(store, "kb")
    names = {c.name for c in store.client.get_collections().collections}
    store.close()  # local mode: a client keeps what it loaded; look again with a fresh one below
    with pytest.raises(CorruptChunkError) as caught:
        _run_restore(file_repo_url, qdrant_path, "swap")
    assert "collection(s) it had created were dropped: kb__sv_" in caught.value.message
    handle = connect_qdrant(path=str(qdrant_path))
    try:
        assert {c.name for c in handle.client.get_collections().collections} == names
        assert handle.client.get_aliases().aliases == []
        assert records_of(handle, "kb") == live
    finally:
        handle.close()


def test_a_failed_new_restore_drops_the_collection_it_created(store, file_repo_url, qdrant_path, tmp_path):
    repo = small_repo(file_repo_url)
    manifest, _ = backup(repo, qdrant_path)
    damage_late_chunk(file_repo_url, manifest.item("kb"))
    other = tmp_path / "other-qdrant"
    other.mkdir()
    cfg = Settings(sources={"kb": {"kind": "qdrant", "path": str(qdrant_path)}})
    with pytest.raises(CorruptChunkError) as caught:
        restore_snapshot(repo, cfg, "kb", "latest", only=["kb"], to_path=str(other))
    assert "dropped: kb;" in caught.value.message
    handle = connect_qdrant(path=str(other))
    try:
        assert handle.client.get_collections().collections == []
    finally:
        handle.close()


def test_a_failed_new_restore_into_an_empty_collection_deletes_the_points_it_wrote(store, file_repo_url,
                                                                                   qdrant_path, monkeypatch):
    repo = small_repo(file_repo_url)
    manifest, _ = backup(repo, qdrant_path)
    damage_late_chunk(file_repo_url, manifest.item("kb"), last=True)  # after a first batch of 256 points
    store.client.create_collection("kb_empty", **create_collection_kwargs(manifest.item("kb").schema))
    cfg = Settings(sources={"kb": {"kind": "qdrant", "path": str(qdrant_path)}})
    written = []
    undo = QdrantTarget.undo

    def counting_undo(self, plans):
        written.append(self.client.count("kb_empty").count)
        return undo(self, plans)

    monkeypatch.setattr(QdrantTarget, "undo", counting_undo)
    with pytest.raises(CorruptChunkError) as caught:
        restore_snapshot(repo, cfg, "kb", "latest", only=["kb"], into="kb_empty")
    assert written[0] >= 256  # a batch had gone in before the damaged chunk
    assert "the points it had written into 'kb_empty' were deleted" in caught.value.message
    handle = connect_qdrant(path=str(qdrant_path))  # a fresh client: local mode caches what it loaded
    try:
        assert handle.client.count("kb_empty").count == 0
        assert handle.client.collection_exists("kb_empty")  # it was there before: kept, empty
    finally:
        handle.close()


def test_unchanged_collection_backs_up_without_upload(store, file_repo_url, qdrant_path):
    repo = small_repo(file_repo_url)
    first, s1 = backup(repo, qdrant_path)
    assert first.offline_index and s1["bytes_uploaded"] > 0
    second, s2 = backup(repo, qdrant_path)
    assert s2["bytes_uploaded"] <= 0.01 * s1["bytes_uploaded"]
    assert [(i.name, i.digest) for i in second.items] == [(i.name, i.digest) for i in first.items]
    store.client.set_payload("kb", payload={"lang": "changed"}, points=[3])
    third, s3 = backup(repo, qdrant_path)
    assert 0 < s3["bytes_uploaded"] < 0.5 * s1["bytes_uploaded"]


def test_only_and_unknown_collections(store, qdrant_path):
    source = QdrantSource(settings(qdrant_path))
    with source.open(only=["faq"]) as cut:
        assert [i.name for i in cut.items()] == ["faq"]
        assert cut.source_info["mode"] == "local"
    with pytest.raises(NotFoundError):
        with source.open(only=["missing"]):
            pass
    store.client.update_collection_aliases(change_aliases_operations=[
        m.CreateAliasOperation(create_alias=m.CreateAlias(collection_name="faq", alias_name="faq_live"))])
    with source.open() as cut:  # a user's own alias is not listed twice...
        assert [i.name for i in cut.items()] == ["faq", "kb"]
    with source.open(only=["faq_live"]) as cut:  # ...but can be named
        [item] = cut.items()
        assert item.name == "faq_live" and len(list(cut.records(item))) == 200
    with pytest.raises(NotFoundError):
        with QdrantSource(settings(qdrant_path, collections=["missing"])).open():
            pass


def test_unreachable_server_is_a_retryable_source_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    source = QdrantSource(QdrantSettings(kind="qdrant", url=f"http://127.0.0.1:{port}", api_key="secret"))
    with pytest.raises(SourceError) as info:
        with source.open():
            pass
    assert info.value.retryable and "secret" not in info.value.message
    empty = Manifest(id=new_snapshot_id(), source="kb", kind="qdrant", started_at=utcnow(), finished_at=utcnow(),
                     cut_time=utcnow(), items=[])
    with pytest.raises(SourceError) as info:
        QdrantTarget(url=f"http://127.0.0.1:{port}").plan(empty, only=[], into=None, mode="new")
    assert info.value.retryable


def test_unmapped_exception_is_not_retryable():
    err = translate_qdrant_error(KeyError("boom"), "scroll kb")
    assert isinstance(err, SourceError) and not err.retryable and "KeyError" in err.message


def test_round_trip_unnamed_with_sparse_and_multivectors(qdrant_path, file_repo_url):
    rng = np.random.default_rng(3)
    handle = connect_qdrant(path=str(qdrant_path))
    try:
        c = handle.client
        c.create_collection("mixed", vectors_config=m.VectorParams(size=6, distance="Cosine"),
                            sparse_vectors_config={"sp": m.SparseVectorParams()})
        c.create_collection("colbert", vectors_config={
            "mv": m.VectorParams(size=4, distance="Cosine", multivector_config=m.MultiVectorConfig(comparator="max_sim")),
            "small": m.VectorParams(size=3, distance="Manhattan")})
        c.upsert("mixed", [m.PointStruct(id=i, vector={"": rng.standard_normal(6).tolist(), **(
            {"sp": m.SparseVector(indices=[i, i + 5], values=[0.25, 0.5])} if i % 2 else {})}) for i in range(60)])
        c.upsert("colbert", [m.PointStruct(id=i, vector={"mv": rng.standard_normal((1 + i % 3, 4)).tolist(),
                                                         "small": rng.standard_normal(3).tolist()}) for i in range(60)])
        repo = small_repo(file_repo_url)
        manifest, _ = backup(repo, qdrant_path)
        first = orjson.loads(next(iter(repo.iter_records(manifest.item("mixed")))))
        assert sorted(first["vector"]) == [""]  # point 0 has no sparse vector, but the layout is a dict
        assert sorted(orjson.loads(list(repo.iter_records(manifest.item("mixed")))[1])["vector"]) == ["", "sp"]
        offline = sorted(i.name for i in manifest.offline_index)
        assert offline == ["colbert#points", "colbert#vectors:small", "mixed#points", "mixed#vectors:"]
        target = QdrantTarget(path=str(qdrant_path))
        try:
            for name in ("mixed", "colbert"):
                [plan] = target.plan(manifest, only=[name], into=f"{name}_copy", mode="new")
                target.restore(plan, repo.iter_records(plan.item), RestoreOptions())
                assert digest_of(target.read_back(plan)) == (60, plan.item.digest)
        finally:
            target.close()
    finally:
        handle.close()


def seed_colbert(client, name: str = "colbert", n: int = 40) -> None:
    rng = np.random.default_rng(3)
    client.create_collection(name, vectors_config={
        "mv": m.VectorParams(size=4, distance="Cosine", multivector_config=m.MultiVectorConfig(comparator="max_sim")),
        "small": m.VectorParams(size=3, distance="Manhattan")})
    client.upsert(name, [m.PointStruct(id=i, vector={"mv": rng.standard_normal((1 + i % 3, 4)).tolist(),
                                                     "small": rng.standard_normal(3).tolist()}) for i in range(n)])


def v1_snapshot(repo, handle, names):
    """A snapshot as statevault wrote it before records format v2 (vectors as decimals)."""
    writer = repo.begin_snapshot("kb", "qdrant", source_info={"mode": "local"})
    for name in names:
        schema = collection_schema(handle.client.get_collection(name), local=True)
        with writer.item(name, "collection", FORMAT_V1, schema) as w:
            w.add_many(iter_collection_records(handle.client, name, schema, local=True, fmt=FORMAT_V1))
    return writer.commit(utcnow())


def _f32(value):
    """Every list of numbers as the bytes of its float32 values (v1 decodes to the decimals'
    float64 values, v2 to the float32 values themselves: the same float32 either way)."""
    if isinstance(value, dict):
        return {k: _f32(v) for k, v in value.items()}
    if isinstance(value, list) and value and all(isinstance(x, (int, float, list)) for x in value):
        return np.asarray(value, dtype=np.float32).tobytes()
    return value


def test_both_record_formats_decode_to_the_same_points(store):
    seed_colbert(store.client)
    for name in ("kb", "faq", "colbert"):
        schema = collection_schema(store.client.get_collection(name), local=True)
        layout = vector_layout(schema)
        v1 = list(iter_collection_records(store.client, name, schema, local=True, fmt=FORMAT_V1))
        v2 = list(iter_collection_records(store.client, name, schema, local=True, fmt=FORMAT))
        assert len(v1) == len(v2) > 0 and v1 != v2
        assert sum(map(len, v2)) < sum(map(len, v1))
        decoded = [decode_record(r, layout, FORMAT) for r in v2]
        assert [_f32(d) for d in decoded] == [_f32(decode_record(r, layout, FORMAT_V1)) for r in v1]
        live = {p.id: p for p in store.client.scroll(name, limit=1000, with_vectors=True)[0]}
        for rec in decoded:  # the decoded vectors are the stored float32 values
            point = live[rec["id"]]
            stored = point.vector if isinstance(point.vector, dict) else {"": point.vector}
            vectors = rec["vector"] if isinstance(rec["vector"], dict) else {"": rec["vector"]}
            assert vectors.keys() == stored.keys()
            for key, value in vectors.items():
                if key == "keywords":
                    assert value["indices"] == stored[key].indices
                    assert np.array_equal(np.float32(value["values"]), np.float32(stored[key].values))
                elif key != "text" and key != "mv":  # Cosine ones are in their canonical local form
                    assert np.array_equal(np.float32(value), np.float32(stored[key]))


def test_a_v1_snapshot_still_restores_verifies_and_shows_no_drift(store, file_repo_url, qdrant_path):
    seed_colbert(store.client)
    repo = small_repo(file_repo_url)
    manifest = v1_snapshot(repo, store, ["colbert", "kb"])
    assert {i.format for i in manifest.items} == {FORMAT_V1}
    cfg = Settings(sources={"kb": {"kind": "qdrant", "path": str(qdrant_path)}})
    from restore.drift import verify_live

    _, checks = verify_live(repo, cfg, "kb", manifest.id)
    assert [(c.item, c.ok) for c in checks] == [("colbert", True), ("kb", True)]
    for name in ("colbert", "kb"):
        result = restore_snapshot(repo, cfg, "kb", manifest.id, only=[name], into=f"{name}_copy")
        assert result.ok and result.records_restored == manifest.item(name).records
        assert records_of(store, f"{name}_copy") == records_of(store, name)  # v2 records of both


def test_diff_reports_name_vector_low_bit_changes_in_v2_records(store):
    schema = collection_schema(store.client.get_collection("faq"), local=True)
    [first, second] = list(iter_collection_records(store.client, "faq", schema, local=True))[:2]
    rec = orjson.loads(first)
    vec = np.frombuffer(base64.b64decode(rec["vector"]), "<f4").copy()
    vec[0] = np.nextafter(vec[0], np.float32(np.inf))  # one last-bit change
    low_bits = first.replace(rec["vector"].encode(), base64.b64encode(vec.astype("<f4").tobytes()))
    vec[1] += 0.5
    changed = first.replace(rec["vector"].encode(), base64.b64encode(vec.astype("<f4").tobytes()))
    payload = first.replace(b'"votes":', b'"votes":1')
    from snapshots.manifest import Item

    item = Item(name="faq", kind="collection", format=FORMAT, records=1, digest="", digest_algo="x", bytes=0,
                stored_bytes=0, chunks=[], schema=schema)
    target = QdrantTarget.__new__(QdrantTarget)
    assert target.classify(item, first, low_bits) == "vector-low-bits"
    assert target.classify(item, first, changed) == "vector"
    assert target.classify(item, first, payload) == "payload"
    assert target.classify(item, first, second) in ("payload", "vector")


def _public_scroll_records(handle, name: str, fmt: str, monkeypatch) -> list[bytes]:
    """The records as qdrant-client's public `scroll` gives the points (the direct local read
    switched off)."""
    import backup.sources.qdrant as qdrant_source

    with monkeypatch.context() as mp:
        mp.setattr(qdrant_source, "LOCAL_DIRECT_READ", False)
        schema = collection_schema(handle.client.get_collection(name), local=True)
        return list(iter_collection_records(handle.client, name, schema, local=True, page_size=7, fmt=fmt))


def test_local_direct_read_gives_the_records_scroll_gives(store, monkeypatch):
    """Local mode is read from the collection itself (qdrant_local.py, one sort of the ids, not
    one per page): the same records, byte for byte, as through `scroll`, for named dense +
    sparse vectors with some points lacking one, UUID + int ids, multivectors, deleted points
    and a collection reached through an alias; in both record formats."""
    from backup.sources.qdrant import iter_pages
    from backup.sources.qdrant_local import LocalPoint, local_collection

    c = store.client
    seed_colbert(c)
    c.delete("kb", points_selector=m.PointIdsList(points=[3, 10, 17 * 7 + 3]))
    c.delete("faq", points_selector=m.FilterSelector(filter=m.Filter(must=[
        m.FieldCondition(key="q", match=m.MatchText(text="question 1"))])))
    c.delete_vectors("colbert", vectors=["small"], points=[2, 5])
    c.update_collection_aliases(change_aliases_operations=[
        m.CreateAliasOperation(create_alias=m.CreateAlias(collection_name="faq", alias_name="faq_live"))])
    for name in ("kb", "faq", "colbert", "faq_live"):
        assert local_collection(c, name) is not None, name  # the direct path is the one taken
        first = next(iter(iter_pages(c, name, page_size=7)))
        assert isinstance(first[0], LocalPoint) and len(first) == 7
        schema = collection_schema(c.get_collection(name), local=True)
        for fmt in (FORMAT, FORMAT_V1):
            direct = list(iter_collection_records(c, name, schema, local=True, page_size=7, fmt=fmt))
            assert direct == _public_scroll_records(store, name, fmt, monkeypatch), (name, fmt)
        assert len(direct) == c.count(name).count
    assert len(records_of(store, "kb")) == 397
    assert not any(b'"small"' in r for r in records_of(store, "colbert")[2:3])


def test_local_direct_read_falls_back_to_scroll_when_internals_differ(store, monkeypatch):
    """A qdrant-client whose local collection lacks what qdrant_local reads is read through
    `scroll`: same records; a missing collection is NotFoundError either way."""
    from backup.sources import qdrant_local
    from backup.sources.qdrant_local import local_collection

    expected = records_of(store, "faq")
    monkeypatch.setattr(qdrant_local, "_COLLECTION_FIELDS", qdrant_local._COLLECTION_FIELDS + ("not_there",))
    assert local_collection(store.client, "faq") is None
    assert records_of(store, "faq") == expected
    with pytest.raises(NotFoundError):
        list(iter_collection_records(store.client, "nope", {"vectors": {}}, local=True))
