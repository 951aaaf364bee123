"""An unchanged qdrant-client pointed at `statevault offline serve` gets what Qdrant would answer.

Every call is made twice, against the offline server (real uvicorn on a free port) and against a
local-mode QdrantClient holding the same data, and the answers are compared.
"""
from __future__ import annotations

import socket
import threading
import time
import uuid
import warnings

import httpx
import numpy as np
import pytest

import uvicorn  # noqa: E402
from qdrant_client import QdrantClient, models  # noqa: E402
from qdrant_client.http.exceptions import UnexpectedResponse  # noqa: E402

from snapshots.offline import write_offline_collection  # noqa: E402
from snapshots.offline.serve import create_app  # noqa: E402

DIM = 24
SNAP = {"snapshot_id": "20261126T030000Z-kb", "snapshot_time": "2026-11-26T03:00:00Z", "source": "knowledge"}
READ_ONLY = "statevault offline index is read-only (degraded mode): snapshot 20261126T030000Z-kb taken at 2026-11-26T03:00:00Z"


def _points(rng):
    ids = [*range(0, 1600, 2), *(str(uuid.UUID(bytes=rng.bytes(16))) for _ in range(400))]
    return [{"id": pid, "vector": rng.normal(size=DIM).tolist(),
             "payload": {"lang": ["en", "de", "fr"][n % 3], "n": n, "tags": ["faq"] if n % 5 == 0 else [],
                         "meta": {"score": n / 10}}} for n, pid in enumerate(ids)]


def _multi_points(rng):
    out = []
    for i in range(600):
        vector = {"text": rng.normal(size=DIM).tolist()}
        if i % 4:
            vector["image"] = rng.normal(size=8).tolist()
        out.append({"id": i, "vector": vector, "payload": {"g": i % 3}})
    return out


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    rng = np.random.default_rng(21)
    root = tmp_path_factory.mktemp("offline")
    local = QdrantClient(location=":memory:")
    kb, multi = _points(rng), _multi_points(rng)
    local.create_collection("kb", vectors_config=models.VectorParams(size=DIM, distance="Cosine"))
    local.upsert("kb", [models.PointStruct(**p) for p in kb])
    named = {"text": models.VectorParams(size=DIM, distance="Dot"), "image": models.VectorParams(size=8, distance="Euclid")}
    local.create_collection("multi", vectors_config=named)
    local.upsert("multi", [models.PointStruct(**p) for p in multi])
    config = local.get_collection("kb").config.model_dump(mode="json")  # what the backup stores
    write_offline_collection(root, {"collection": "kb", **SNAP, "config": config, "aliases": ["kb_live"],
                                    "vectors": {"": {"size": DIM, "distance": "Cosine"}}}, kb)
    write_offline_collection(root, {"collection": "multi", **SNAP, "sparse_vectors": ["bm25"],
                                    "vectors": {"text": {"size": DIM, "distance": "Dot"},
                                                "image": {"size": 8, "distance": "Euclid"}}}, multi)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(root), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "offline server did not start"
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    remote = QdrantClient(url=url, prefer_grpc=False, timeout=30)
    yield {"remote": remote, "local": local, "url": url, "root": root, "kb": kb, "rng": rng}
    remote.close()
    server.should_exit = True
    thread.join(timeout=10)


def _same_points(ours, theirs, scored=True):
    assert [p.id for p in ours] == [p.id for p in theirs]
    assert [p.payload for p in ours] == [p.payload for p in theirs]
    if scored:
        np.testing.assert_allclose([p.score for p in ours], [p.score for p in theirs], atol=1e-4)


def test_collections_and_info(env):
    remote, local = env["remote"], env["local"]
    assert sorted(c.name for c in remote.get_collections().collections) == ["kb", "multi"]
    assert remote.collection_exists("kb") and remote.collection_exists("kb_live")
    assert not remote.collection_exists("nope")
    for name in ("kb", "multi"):
        ours, theirs = remote.get_collection(name), local.get_collection(name)
        assert ours.points_count == theirs.points_count
        assert ours.config.params.vectors == theirs.config.params.vectors
        assert ours.config.metadata["statevault"]["snapshot_id"] == SNAP["snapshot_id"]
        assert "read-only" in ours.warnings[0].message
    assert remote.get_aliases().aliases == [models.AliasDescription(alias_name="kb_live", collection_name="kb")]
    assert remote.get_collection_aliases("kb").aliases[0].alias_name == "kb_live"


def test_version_check_passes_quietly(env):
    from qdrant_client.qdrant_remote import QdrantRemote

    headers = {"User-Agent": env["remote"]._client._rest_headers["User-Agent"]}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        QdrantRemote._check_compatibility(env["url"], headers, None, 5)
    assert not [w for w in caught if "compatib" in str(w.message)]
    response = httpx.get(env["url"] + "/", headers=headers)
    assert response.json()["title"] == "qdrant - vector search engine"
    for probe in ("/healthz", "/livez", "/readyz"):
        assert httpx.get(env["url"] + probe).status_code == 200


def test_query_points_match_qdrant(env):
    remote, local, rng = env["remote"], env["local"], env["rng"]
    flt = models.Filter(must=[models.FieldCondition(key="lang", match=models.MatchAny(any=["en", "fr"]))],
                        must_not=[models.IsEmptyCondition(is_empty=models.PayloadField(key="tags"))])
    for query_filter in (None, flt):
        for _ in range(3):
            q = rng.normal(size=DIM).tolist()
            kw = dict(query=q, limit=10, query_filter=query_filter, with_payload=True)
            _same_points(remote.query_points("kb", **kw).points, local.query_points("kb", **kw).points)
            _same_points(remote.query_points("kb_live", **kw).points, local.query_points("kb", **kw).points)
    q = rng.normal(size=DIM).tolist()
    kw = dict(query=q, limit=5, offset=3, score_threshold=-0.2, with_vectors=True)
    ours, theirs = remote.query_points("kb", **kw).points, local.query_points("kb", **kw).points
    _same_points(ours, theirs)
    np.testing.assert_allclose(ours[0].vector, theirs[0].vector, atol=1e-6)
    for using, dim in (("text", DIM), ("image", 8)):
        q = rng.normal(size=dim).tolist()
        kw = dict(query=q, using=using, limit=10, query_filter=models.Filter(must=[
            models.FieldCondition(key="g", match=models.MatchValue(value=1))]))
        _same_points(remote.query_points("multi", **kw).points, local.query_points("multi", **kw).points)
    by_id = dict(query=env["kb"][7]["id"], limit=5)  # nearest to a stored point, that point left out
    _same_points(remote.query_points("kb", **by_id).points, local.query_points("kb", **by_id).points)
    batch = [models.QueryRequest(query=rng.normal(size=DIM).tolist(), limit=4, with_payload=True) for _ in range(3)]
    for ours, theirs in zip(remote.query_batch_points("kb", batch), local.query_batch_points("kb", batch)):
        _same_points(ours.points, theirs.points)


def test_legacy_search_endpoints(env):
    remote, rng = env["remote"], env["rng"]
    q = rng.normal(size=DIM).tolist()
    reference = remote.query_points("kb", query=q, limit=6, with_payload=True).points
    r = httpx.post(f"{env['url']}/collections/kb/points/search", json={"vector": q, "limit": 6, "with_payload": True})
    assert r.status_code == 200 and r.headers["x-statevault-snapshot"] == f"{SNAP['snapshot_id']} {SNAP['snapshot_time']}"
    assert [p["id"] for p in r.json()["result"]] == [p.id for p in reference]
    named = {"searches": [{"vector": {"name": "image", "vector": [0.1] * 8}, "limit": 3},
                          {"vector": {"name": "text", "vector": q}, "limit": 2}]}
    r = httpx.post(f"{env['url']}/collections/multi/points/search/batch", json=named)
    assert r.status_code == 200 and [len(x) for x in r.json()["result"]] == [3, 2]


def test_scroll_count_retrieve_match_qdrant(env):
    remote, local = env["remote"], env["local"]
    flt = models.Filter(must=[models.FieldCondition(key="meta.score", range=models.Range(gte=20, lt=150))])
    for scroll_filter in (None, flt):
        ours, theirs, offset, their_offset = [], [], None, None
        while True:
            page, offset = remote.scroll("kb", limit=128, offset=offset, scroll_filter=scroll_filter)
            ref, their_offset = local.scroll("kb", limit=128, offset=their_offset, scroll_filter=scroll_filter)
            assert offset == their_offset
            ours += page
            theirs += ref
            if offset is None:
                break
        _same_points(ours, theirs, scored=False)
        assert remote.count("kb", count_filter=scroll_filter).count == local.count("kb", count_filter=scroll_filter).count == len(ours)
    ids = [env["kb"][3]["id"], env["kb"][1000]["id"], 999_999]
    ours, theirs = remote.retrieve("kb", ids, with_vectors=True), local.retrieve("kb", ids, with_vectors=True)
    _same_points(ours, theirs, scored=False)
    np.testing.assert_allclose(ours[1].vector, theirs[1].vector, atol=1e-6)
    point = httpx.get(f"{env['url']}/collections/kb/points/{env['kb'][3]['id']}").json()["result"]
    assert point["id"] == env["kb"][3]["id"] and len(point["vector"]) == DIM
    assert httpx.get(f"{env['url']}/collections/kb/points/1").status_code == 404  # odd ids were never written


def test_writes_are_refused_with_the_snapshot_named(env):
    remote = env["remote"]
    with pytest.raises(UnexpectedResponse) as info:
        remote.upsert("kb", [models.PointStruct(id=1, vector=[0.0] * DIM, payload={})])
    assert info.value.status_code == 403 and READ_ONLY in str(info.value)
    for call in (lambda: remote.delete("kb", points_selector=models.PointIdsList(points=[0])),
                 lambda: remote.delete_collection("kb"),
                 lambda: remote.create_collection("new", vectors_config=models.VectorParams(size=4, distance="Dot")),
                 lambda: remote.set_payload("kb", payload={"a": 1}, points=[0])):
        with pytest.raises(UnexpectedResponse, match="read-only"):
            call()
    assert remote.count("kb").count == 1200


def test_errors_are_qdrant_shaped_never_500(env):
    url = env["url"]
    r = httpx.post(f"{url}/collections/kb/points/query", json={"query": [1.0, 2.0, 3.0]})
    assert r.status_code == 400
    assert r.json()["status"]["error"] == "Wrong input: Vector dimension error: expected dim: 24, got 3"
    with pytest.raises(UnexpectedResponse) as info:
        env["remote"].query_points("kb", query=[1.0, 2.0, 3.0])
    assert info.value.status_code == 400
    with pytest.raises(UnexpectedResponse) as info:
        env["remote"].get_collection("nope")
    assert info.value.status_code == 404 and "doesn't exist" in info.value.structured()["status"]["error"]
    bad = [
        ("post", "/collections/nope/points/query", {"query": [0.0] * DIM}, 404),
        ("post", "/collections/kb/points/query", {"query": [0.0] * DIM, "filter": {"must": [{"nope": 1}]}}, 400),
        ("post", "/collections/kb/points/query", {"query": [0.0] * DIM, "limit": 0}, 400),
        ("post", "/collections/kb/points/query", {"query": [0.0] * DIM, "bogus": 1}, 400),
        ("post", "/collections/kb/points/query", {"query": {"recommend": {"positive": [2]}}}, 400),
        ("post", "/collections/kb/points/query", {"query": {"indices": [1], "values": [0.5]}}, 400),
        ("post", "/collections/kb/points/query", {"query": "not-a-uuid"}, 400),
        ("post", "/collections/kb/points/query", {"query": 1}, 404),
        ("post", "/collections/multi/points/query", {"query": [0.0] * DIM, "using": "bm25"}, 400),
        ("post", "/collections/kb/points/query", [1, 2], 400),
        ("post", "/collections/kb/points/scroll", {"limit": "ten"}, 400),
        ("post", "/collections/kb/points/scroll", {"offset": {"x": 1}}, 400),
        ("post", "/collections/kb/points", {"ids": [-1]}, 400),
        ("post", "/collections/kb/points/recommend", {"positive": [2], "limit": 3}, 400),
        ("get", "/collections/kb/points/not-an-id", None, 400),
        ("get", "/telemetry", None, 404),
    ]
    for method, path, body, status in bad:
        r = getattr(httpx, method)(url + path, **({"json": body} if body is not None else {}))
        assert r.status_code == status, (path, body, r.text)
        assert set(r.json()) == {"status", "time"} and r.json()["status"]["error"], r.text
    r = httpx.post(f"{url}/collections/kb/points/query", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "Format error in JSON body" in r.json()["status"]["error"]


def test_corrupted_vectors_are_named_by_verify(env, tmp_path):
    from snapshots.errors import CorruptChunkError
    from snapshots.offline import OfflineIndex

    write_offline_collection(tmp_path, {"collection": "kb", **SNAP, "vectors": {"": {"size": DIM, "distance": "Cosine"}}},
                             env["kb"][:100])
    OfflineIndex.open(tmp_path).collection("kb").verify()
    victim = tmp_path / "kb" / "vectors.npy"
    data = bytearray(victim.read_bytes())
    data[-7] ^= 0x01
    victim.write_bytes(bytes(data))
    with pytest.raises(CorruptChunkError, match="kb/vectors.npy"):
        OfflineIndex.open(tmp_path).collection("kb").verify()


def test_run_server_serves_until_terminated(env):
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = f"from snapshots.offline.serve import run_server; run_server({str(env['root'])!r}, '127.0.0.1', {port}, log_level='warning')"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=str(__import__("pathlib").Path(__file__).parents[2]))
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/collections/kb/exists", timeout=1)
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, "run_server did not come up"
                time.sleep(0.1)
        assert r.json()["result"] == {"exists": True}
    finally:
        proc.terminate()
        # uvicorn shuts down gracefully, then re-raises SIGTERM so the exit status reports it
        assert proc.wait(timeout=15) in (0, -15)
