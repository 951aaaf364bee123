"""The offline index answers exactly as Qdrant does: same data in qdrant-client's local mode,
exact search, same top-10 ids (up to ties), same scores, same threshold and offset behaviour."""
from __future__ import annotations

import uuid

import numpy as np
import pytest

from qdrant_client import QdrantClient, models  # noqa: E402

from snapshots.errors import CorruptChunkError, NotFoundError, UsageError  # noqa: E402
from snapshots.offline import OfflineIndex, write_offline_collection  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Local mode performs exact")

N, DIM = 2000, 32
DISTANCES = ["Cosine", "Dot", "Euclid", "Manhattan"]
HIGHER_BETTER = {"Cosine": True, "Dot": True, "Euclid": False, "Manhattan": False}
FILTERS = [
    None,
    {"must": [{"key": "group", "match": {"value": 2}}]},
    {"should": [{"key": "tag", "match": {"any": ["a", "c"]}}, {"key": "price", "range": {"gt": 80}}],
     "must_not": [{"key": "tags", "match": {"value": "x"}}]},
    {"must": [{"key": "price", "range": {"gte": 10, "lt": 12}}]},  # a sparse selection: ~2% of points
    {"must": [{"is_empty": {"key": "tag"}}]},
]


def make_vectors(kind: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "random":
        return rng.normal(size=(N, DIM)).astype(np.float32)
    centers = rng.normal(scale=4.0, size=(12, DIM))
    vecs = centers[rng.integers(0, 12, N)] + rng.normal(scale=0.3, size=(N, DIM))
    vecs[1::97] = vecs[0::97][: len(vecs[1::97])]  # exact duplicates: tied scores
    return vecs.astype(np.float32)


def make_payload(i: int, rng: np.random.Generator) -> dict:
    payload = {"group": i % 5, "price": float(rng.uniform(0, 100)), "tags": ["x", "y"] if i % 7 == 0 else ["y"]}
    if i % 4:
        payload["tag"] = "abc"[i % 3]
    return payload


def points_of(vecs: np.ndarray, seed: int = 1) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"id": i, "vector": vecs[i].tolist(), "payload": make_payload(i, rng)} for i in range(len(vecs))]


def build(tmp_path, name, distance, points, *, named=None):
    """The same points in local-mode Qdrant and in the offline index."""
    client = QdrantClient(location=":memory:")
    if named:
        config = {n: models.VectorParams(size=s, distance=d) for n, (s, d) in named.items()}
        vectors_meta = {n: {"size": s, "distance": d} for n, (s, d) in named.items()}
    else:
        config = models.VectorParams(size=DIM, distance=distance)
        vectors_meta = {"": {"size": DIM, "distance": distance}}
    client.create_collection(name, vectors_config=config)
    client.upsert(name, [models.PointStruct(id=p["id"], vector=p["vector"], payload=p["payload"]) for p in points])
    write_offline_collection(tmp_path, {"collection": name, "snapshot_id": "snap-1", "snapshot_time": "2026-11-26T03:00:00Z",
                                        "source": "knowledge", "vectors": vectors_meta}, points)
    return client, OfflineIndex.open(tmp_path).collection(name)


def qdrant_search(client, name, query, flt=None, **kw):
    return client.query_points(name, query=query, limit=kw.pop("limit", 10),
                               query_filter=models.Filter.model_validate(flt) if flt else None,
                               search_params=models.SearchParams(exact=True), **kw).points


def tie_groups(ids, scores, tol=1e-6):
    groups, current = [], [ids[0]] if ids else []
    for k in range(1, len(ids)):
        if abs(scores[k] - scores[k - 1]) <= tol:
            current.append(ids[k])
        else:
            groups.append(set(current))
            current = [ids[k]]
    return groups + ([set(current)] if current else [])


def assert_same_hits(ours, theirs):
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert abs(a["score"] - b.score) <= 1e-4, (a, b)
    our_groups = tie_groups([p["id"] for p in ours], [p["score"] for p in ours])
    their_groups = tie_groups([p.id for p in theirs], [p.score for p in theirs])
    assert [len(g) for g in our_groups] == [len(g) for g in their_groups]
    # ids agree exactly except inside a group of equal scores; the last group may be cut by the limit
    assert our_groups[:-1] == their_groups[:-1]
    if our_groups and len(ours) < 10:
        assert our_groups[-1] == their_groups[-1]


@pytest.fixture(scope="module")
def collections(tmp_path_factory):
    built = {}
    for kind in ("random", "clustered"):
        vecs = make_vectors(kind, seed=7 if kind == "random" else 8)
        points = points_of(vecs)
        for distance in DISTANCES:
            name = f"{kind}_{distance.lower()}"
            built[(kind, distance)] = (*build(tmp_path_factory.mktemp(name), name, distance, points), vecs)
    return built


@pytest.mark.parametrize("kind", ["random", "clustered"])
@pytest.mark.parametrize("distance", DISTANCES)
def test_top10_equals_qdrant_exact_search(collections, kind, distance):
    client, coll, vecs = collections[(kind, distance)]
    rng = np.random.default_rng(3)
    queries = [rng.normal(size=DIM) * (4 if kind == "clustered" else 1) for _ in range(3)] + [vecs[0], vecs[123]]
    for flt in FILTERS:
        for q in queries:
            ours = coll.search(q, top_k=10, filter=flt)
            theirs = qdrant_search(client, coll.name, np.asarray(q).tolist(), flt)
            assert_same_hits(ours, theirs)


@pytest.mark.parametrize("distance", DISTANCES)
def test_score_threshold_and_offset_as_qdrant(collections, distance):
    client, coll, vecs = collections[("random", distance)]
    q = np.random.default_rng(5).normal(size=DIM).tolist()
    reference = qdrant_search(client, coll.name, q, limit=20)
    threshold = (reference[5].score + reference[6].score) / 2  # between two results, never on one
    ours = coll.search(q, top_k=10, score_threshold=threshold)
    theirs = qdrant_search(client, coll.name, q, score_threshold=threshold)
    assert len(ours) == len(theirs) == 6
    assert_same_hits(ours, theirs)
    for flt in (None, FILTERS[1]):
        ours = coll.search(q, top_k=7, offset=5, filter=flt)
        theirs = qdrant_search(client, coll.name, q, flt, limit=7, offset=5)
        assert_same_hits(ours, theirs)
    far = coll.search(q, top_k=10, offset=N - 3)
    assert len(far) == 3 == len(qdrant_search(client, coll.name, q, offset=N - 3))
    worst = reference[0].score
    assert coll.search(q, score_threshold=worst + (1 if HIGHER_BETTER[distance] else -1) * 1e-3) == []


def test_payload_vectors_and_batch(collections):
    client, coll, vecs = collections[("random", "Cosine")]
    q = vecs[10] * 3
    hit = coll.search(q, top_k=1, with_vectors=True, with_payload=["group", "tags"])[0]
    ref = client.query_points(coll.name, query=q.tolist(), limit=1, with_vectors=True, with_payload=["group", "tags"]).points[0]
    assert hit["id"] == ref.id == 10 and hit["version"] == 0
    assert hit["payload"] == ref.payload
    np.testing.assert_allclose(hit["vector"], ref.vector, atol=1e-6)  # Qdrant returns the normalised vector
    assert coll.search(q, top_k=1, with_payload={"exclude": ["price", "tags"]})[0]["payload"].keys() <= {"group", "tag"}
    assert coll.search(q, top_k=1, with_payload=False)[0]["payload"] is None
    queries = np.random.default_rng(9).normal(size=(6, DIM))
    batch = coll.search_batch(queries, top_k=5, filter=FILTERS[2])
    singles = [coll.search(qq, top_k=5, filter=FILTERS[2]) for qq in queries]
    assert [[p["id"] for p in hits] for hits in batch] == [[p["id"] for p in hits] for hits in singles]
    np.testing.assert_allclose([[p["score"] for p in hits] for hits in batch],
                               [[p["score"] for p in hits] for hits in singles], atol=1e-6)  # gemm vs gemv rounding


def test_named_vectors_with_missing_ones(tmp_path):
    rng = np.random.default_rng(11)
    points = []
    for i in range(1500):
        vector = {"text": rng.normal(size=DIM).tolist()}
        if i % 3:
            vector["image"] = rng.normal(size=16).tolist()
        points.append({"id": str(uuid.UUID(int=i + 1)) if i % 2 else i, "vector": vector, "payload": {"g": i % 4}})
    client, coll = build(tmp_path, "multi", None, points, named={"text": (DIM, "Cosine"), "image": (16, "Euclid")})
    for using, dim in (("text", DIM), ("image", 16)):
        for flt in (None, {"must": [{"key": "g", "match": {"any": [1, 2]}}]}):
            q = rng.normal(size=dim).tolist()
            ours = coll.search(q, using=using, top_k=10, filter=flt)
            assert_same_hits(ours, qdrant_search(client, "multi", q, flt, using=using))
    image_hits = coll.search(rng.normal(size=16), using="image", top_k=600)
    assert len(image_hits) == 600 and all(points_by_id(points)[h["id"]]["vector"].get("image") for h in image_hits)
    assert len(coll.search(rng.normal(size=16), using="image", top_k=2000)) == 1000  # 500 points have no image
    got = coll.retrieve([0], with_vectors=True)[0]["vector"]
    assert set(got) == {"text"}
    assert coll.count({"must": [{"has_vector": "image"}]}) == 1000
    with pytest.raises(UsageError, match="Not existing vector name"):
        coll.search(q)  # no unnamed vector in this collection


def points_by_id(points):
    return {p["id"]: p for p in points}


def test_scroll_count_retrieve_as_qdrant(tmp_path):
    rng = np.random.default_rng(12)
    ids = [*rng.permutation(400).tolist(), *(str(uuid.UUID(bytes=rng.bytes(16))) for _ in range(300))]
    points = [{"id": pid, "vector": rng.normal(size=8).tolist(), "payload": {"k": n % 3}} for n, pid in enumerate(ids)]
    client = QdrantClient(location=":memory:")
    client.create_collection("s", vectors_config=models.VectorParams(size=8, distance="Dot"))
    client.upsert("s", [models.PointStruct(**p) for p in points])
    write_offline_collection(tmp_path, {"collection": "s", "snapshot_id": "x", "snapshot_time": "t",
                                        "vectors": {"": {"size": 8, "distance": "Dot"}}}, points)
    coll = OfflineIndex.open(tmp_path).collection("s")
    for flt in (None, {"must": [{"key": "k", "match": {"value": 1}}]}):
        ours, theirs, offset, their_offset = [], [], None, None
        while True:
            page, offset = coll.scroll(offset=offset, limit=64, filter=flt)
            ref, their_offset = client.scroll("s", offset=their_offset, limit=64,
                                              scroll_filter=models.Filter.model_validate(flt) if flt else None)
            assert offset == their_offset
            ours += [(p["id"], p["payload"]) for p in page]
            theirs += [(p.id, p.payload) for p in ref]
            if offset is None:
                break
        assert ours == theirs and len(ours) == coll.count(flt) == client.count("s", count_filter=flt and models.Filter.model_validate(flt)).count
    some = [ids[5], ids[450], 99999, ids[5]]
    got = coll.retrieve(some, with_vectors=True)
    ref = client.retrieve("s", some[:3], with_vectors=True)
    assert [(p["id"], p["payload"]) for p in got] == [(p.id, p.payload) for p in ref]
    np.testing.assert_allclose(got[1]["vector"], ref[1].vector, atol=1e-6)
    page, next_offset = coll.scroll(offset=ids[450].upper(), limit=1)  # any UUID spelling
    assert page[0]["id"] == ids[450]


def test_ties_go_to_the_lower_row(tmp_path):
    v = [1.0, 0.0, 0.0]
    points = [{"id": 10 - i, "vector": v if i % 2 == 0 else [0.0, 1.0, 0.0], "payload": {}} for i in range(10)]
    write_offline_collection(tmp_path, {"collection": "t", "snapshot_id": "x", "snapshot_time": "t",
                                        "vectors": {"": {"size": 3, "distance": "Euclid"}}}, points)
    coll = OfflineIndex.open(tmp_path).collection("t")
    assert [p["id"] for p in coll.search(v, top_k=3)] == [10, 8, 6]
    assert [p["id"] for p in coll.search(v, top_k=3, offset=3)] == [4, 2, 9]


def test_errors_name_the_problem(collections, tmp_path):
    _, coll, _ = collections[("random", "Cosine")]
    with pytest.raises(UsageError, match=r"Wrong input: Vector dimension error: expected dim: 32, got 3"):
        coll.search([1.0, 2.0, 3.0])
    with pytest.raises(UsageError, match="limit"):
        coll.search([0.0] * DIM, top_k=0)
    with pytest.raises(UsageError, match="NaN"):
        coll.search([float("nan")] * DIM)
    with pytest.raises(NotFoundError, match="No point with id 123456"):
        coll.vector_of(123456)
    with pytest.raises(NotFoundError, match="Collection `nope` doesn't exist"):
        OfflineIndex.open(coll.dir.parent).collection("nope")
    write_offline_collection(tmp_path, {"collection": "c", "snapshot_id": "x", "snapshot_time": "t",
                                        "vectors": {"": {"size": 4, "distance": "Dot"}}},
                             [{"id": i, "vector": [float(i)] * 4, "payload": {}} for i in range(50)])
    victim = tmp_path / "c" / "vectors.npy"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x40
    victim.write_bytes(bytes(data))
    with pytest.raises(CorruptChunkError, match="c/vectors.npy") as info:
        OfflineIndex.open(tmp_path).collection("c").verify()
    assert info.value.chunk_id == "c/vectors.npy" and info.value.exit_code == 3
