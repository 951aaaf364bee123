"""The offline index built during a Qdrant backup, pulled to disk and searched (local-mode Qdrant)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import orjson
import pytest
from qdrant_client import models as m

from backup.job import snapshot_source
from backup.sources.qdrant import connect_qdrant
from backup.sources.qdrant_records import decode_record
from backup.sources.qdrant_config import vector_layout
from snapshots import codec
from snapshots.errors import CorruptChunkError, ManifestError, NotFoundError
from snapshots.offline.layout import read_meta, verify_files
from snapshots.offline.pull import pull_offline_collections, pull_offline_index
from snapshots.offline.search import OfflineIndex
from snapshots.repository import open_repository
from tests.integration.test_qdrant_store import seeded_template, settings, small_repo  # noqa: F401 - a fixture

# local mode's own notices about options it ignores (payload indexes, exact search)
pytestmark = [pytest.mark.filterwarnings("ignore:Payload indexes have no effect:UserWarning"),
              pytest.mark.filterwarnings("ignore:Local mode performs exact:UserWarning"),
              pytest.mark.filterwarnings("ignore:Api key is used with an insecure connection:UserWarning")]


@pytest.fixture
def backed_up(seeded_template, qdrant_path, file_repo_url):
    shutil.copytree(seeded_template, qdrant_path, dirs_exist_ok=True)  # "kb": 400 points, "faq": 200
    handle = connect_qdrant(path=str(qdrant_path))
    repo = small_repo(file_repo_url)
    manifest, _ = snapshot_source(repo, "kb", settings(qdrant_path, offline_index=True))
    yield handle, repo, manifest
    handle.close()


def scroll_all(client, name: str) -> list:
    points, offset = [], None
    while True:
        page, offset = client.scroll(name, limit=256, offset=offset, with_vectors=True, with_payload=True)
        points += page
        if offset is None:
            return points


def test_pull_lays_out_the_index_row_for_row(backed_up, tmp_path):
    handle, repo, manifest = backed_up
    paths = pull_offline_index(repo, manifest, tmp_path / "offline")
    assert sorted(p.name for p in paths) == ["faq", "kb"]
    kb = tmp_path / "offline" / "kb"
    assert sorted(os.listdir(kb)) == ["meta.json", "points.jsonl", "vectors.image.npy", "vectors.text.npy"]
    assert sorted(os.listdir(tmp_path / "offline")) == ["faq", "kb"]  # no temp dirs left
    meta = read_meta(kb)
    verify_files(kb, meta)
    assert (meta["snapshot_id"], meta["source"], meta["points_count"]) == (manifest.id, "kb", 400)
    assert meta["snapshot_time"].endswith("Z") and meta["snapshot_time"].startswith(f"{manifest.cut_time:%Y-%m-%dT%H:%M}")
    assert meta["vectors"]["text"] | {"normalized": True} == {"size": 24, "distance": "Cosine", "file": "vectors.text.npy",
                                                               "normalized": True}
    assert meta["vectors"]["image"]["distance"] == "Euclid" and meta["sparse_vectors"] == ["keywords"]
    assert meta["config"] == manifest.item("kb").schema

    text, image = np.load(kb / "vectors.text.npy"), np.load(kb / "vectors.image.npy")
    lines = [orjson.loads(line) for line in (kb / "points.jsonl").read_bytes().splitlines()]
    live = scroll_all(handle.client, "kb")
    assert text.dtype == np.float32 and text.shape == (400, 24) and image.shape == (400, 8)
    assert [p["id"] for p in lines] == [p.id for p in live]
    assert [p["payload"] for p in lines] == [p.payload for p in live]
    for row, point in enumerate(live):
        # (a reopened local-mode store returns Cosine vectors as upserted, not normalised)
        unit = np.asarray(point.vector["text"]) / np.linalg.norm(point.vector["text"])
        assert np.allclose(text[row], unit, rtol=0, atol=1e-6)
        assert abs(float(np.linalg.norm(text[row].astype(np.float64))) - 1) < 1e-6
        if "image" in point.vector:
            assert np.array_equal(image[row], np.asarray(point.vector["image"], dtype=np.float32))
        else:
            assert np.isnan(image[row]).all()
    # bit for bit what the collection item holds
    item = manifest.item("kb")
    snap = [decode_record(r, vector_layout(item.schema), item.format) for r in repo.iter_records(item)]
    assert np.array_equal(text, np.asarray([r["vector"]["text"] for r in snap], dtype=np.float32))

    faq = tmp_path / "offline" / "faq"
    assert sorted(os.listdir(faq)) == ["meta.json", "points.jsonl", "vectors.npy"]
    vectors = np.load(faq / "vectors.npy")
    live = scroll_all(handle.client, "faq")
    assert np.array_equal(vectors, np.asarray([p.vector for p in live], dtype=np.float32))
    assert [orjson.loads(x)["id"] for x in (faq / "points.jsonl").read_bytes().splitlines()] == [p.id for p in live]


def test_offline_search_equals_qdrant_exact_search(backed_up, tmp_path):
    handle, repo, manifest = backed_up
    pull_offline_index(repo, manifest, tmp_path / "offline")
    index = OfflineIndex.open(tmp_path / "offline")
    rng = np.random.default_rng(7)
    for collection, using, size in (("kb", "text", 24), ("kb", "image", 8), ("faq", None, 16)):
        for _ in range(3):
            q = rng.standard_normal(size).astype(np.float32)
            ours = [p["id"] for p in index.collection(collection).search(q, using=using, top_k=10)]
            theirs = handle.client.query_points(collection, query=q.tolist(), using=using, limit=10,
                                                search_params=m.SearchParams(exact=True)).points
            assert ours == [p.id for p in theirs]


def _chunk_path(repo_url: str, cid: str) -> Path:
    return Path(urlsplit(repo_url).path) / codec.chunk_key(cid)


def test_corrupted_chunk_fails_the_pull_and_keeps_the_previous_copy(backed_up, tmp_path, file_repo_url):
    handle, repo, manifest = backed_up
    good = tmp_path / "good"
    pull_offline_index(repo, manifest, good)
    meta_path = good / "kb" / "meta.json"
    meta = orjson.loads(meta_path.read_bytes())
    meta["snapshot_id"] = "20200101T000000Z-00000000"  # an older pull: the next pull replaces it
    meta_path.write_bytes(orjson.dumps(meta))
    before = {p.name: p.read_bytes() for p in (good / "kb").iterdir()}

    item = next(i for i in manifest.offline_index if i.name == "kb#vectors:text")
    _chunk_path(file_repo_url, item.chunks[-1].id).write_bytes(codec.compress(b"\0" * 96, 3))
    with pytest.raises(CorruptChunkError):
        pull_offline_index(repo, manifest, good)
    assert {p.name: p.read_bytes() for p in (good / "kb").iterdir()} == before  # untouched
    assert sorted(os.listdir(good)) == ["faq", "kb"]                           # no half index beside it

    fresh = tmp_path / "fresh"
    with pytest.raises(CorruptChunkError):
        pull_offline_index(repo, manifest, fresh, ["kb"])
    assert os.listdir(fresh) == []


def test_pulling_the_same_snapshot_again_is_a_no_op(backed_up, tmp_path):
    handle, repo, manifest = backed_up
    tmp_path = tmp_path / "offline"
    first = pull_offline_collections(repo, manifest, tmp_path)
    assert [r.status for r in first] == ["pulled", "pulled"] and all(r.bytes > 0 for r in first)
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "kb").iterdir()}
    again = pull_offline_collections(repo, manifest, tmp_path)
    assert [(r.collection, r.status, r.bytes) for r in again] == [("faq", "unchanged", 0), ("kb", "unchanged", 0)]
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "kb").iterdir()} == stamps
    (tmp_path / "kb" / "points.jsonl").write_bytes(b"damaged\n")  # a damaged local copy is pulled again
    [result] = pull_offline_collections(repo, manifest, tmp_path, ["kb"])
    assert result.status == "pulled"
    verify_files(tmp_path / "kb", read_meta(tmp_path / "kb"))


def test_tampered_collection_name_is_refused(backed_up, tmp_path):
    handle, repo, manifest = backed_up
    for bad in ("../evil", ".hidden", "a/b", ""):
        items = [i.model_copy(update={"schema_": {**i.schema, "collection": bad}}) if i.name.startswith("kb#") else i
                 for i in manifest.offline_index]
        with pytest.raises(ManifestError):
            pull_offline_index(repo, manifest.model_copy(update={"offline_index": items}), tmp_path / "out")
    assert not (tmp_path / "evil").exists() and not (tmp_path / "out").exists()


def test_without_offline_index_or_unknown_collection(backed_up, tmp_path, qdrant_path, file_repo_url):
    handle, repo, manifest = backed_up
    with pytest.raises(NotFoundError):
        pull_offline_index(repo, manifest, tmp_path, ["nope"])
    plain, _ = snapshot_source(open_repository(file_repo_url), "kb", settings(qdrant_path, offline_index=False))
    assert plain.offline_index == [] and [i.digest for i in plain.items] == [i.digest for i in manifest.items]
    with pytest.raises(NotFoundError):
        pull_offline_index(repo, plain, tmp_path)


def test_points_item_notes_what_is_not_indexed(backed_up):
    _, _, manifest = backed_up
    points = next(i for i in manifest.offline_index if i.name == "kb#points")
    assert points.schema["sparse_vectors"] == ["keywords"] and "not in the offline index" in points.schema["not_indexed"]
    text = next(i for i in manifest.offline_index if i.name == "kb#vectors:text")
    assert text.schema == {"collection": "kb", "vector": "text", "size": 24, "distance": "Cosine", "row_bytes": 96,
                           "normalized": True}
    assert text.records == points.records == 400
