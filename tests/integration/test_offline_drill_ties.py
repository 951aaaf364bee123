"""DR drills on a Qdrant collection with duplicate vectors: the offline index and Qdrant return tied
points in different orders (QA: statevault (181, 481), Qdrant (481, 181)); the drill must pass,
comparing answers up to ties, and still fail on a real disagreement."""
from __future__ import annotations

import json

import numpy as np
import pytest
from qdrant_client import QdrantClient, models

from restore import drill
from restore.drill import agree_up_to_ties
from restore.drill_render import to_markdown
from snapshots.offline.pull import pull_offline_index
from snapshots.offline.search import OfflineIndex
from snapshots.repository import open_repository
from tests.cli_runner import run_cli
from tests.integration.test_qdrant_qa_fixes import write_config

pytestmark = [pytest.mark.filterwarnings("ignore:Local mode performs exact:UserWarning")]

VECTORS = {"text": (16, models.Distance.COSINE), "img": (8, models.Distance.EUCLID), "dot": (8, models.Distance.DOT)}


def seed_duplicates(path) -> None:
    """240 points in groups sharing every vector: 12 groups of 12 (more than a top-10 holds) and
    48 pairs. Inserted in descending id order, so Qdrant meets the higher id of a tie first."""
    rng = np.random.default_rng(42)
    groups = [12] * 12 + [2] * 48
    bases = [{name: rng.normal(size=size).tolist() for name, (size, _) in VECTORS.items()} for _ in groups]
    owner = [g for g, size in enumerate(groups) for _ in range(size)]
    order = rng.permutation(len(owner))  # members of a group get scattered ids
    points = [models.PointStruct(id=int(pid) + 1, vector=bases[owner[k]], payload={"group": owner[k]})
              for k, pid in enumerate(order)]
    client = QdrantClient(path=str(path))
    try:
        client.create_collection("dups", vectors_config={n: models.VectorParams(size=s, distance=d)
                                                         for n, (s, d) in VECTORS.items()})
        for start in range(0, len(points), 64):
            client.upsert("dups", sorted(points, key=lambda p: -p.id)[start:start + 64])
    finally:
        client.close()


@pytest.fixture
def config(tmp_path, qdrant_path):
    seed_duplicates(qdrant_path)
    return write_config(tmp_path / "statevault.toml", tmp_path / "repo", qdrant_path)  # offline_index: on by default


def test_drill_passes_on_duplicate_vectors(config, capsys, tmp_path, qdrant_path):
    code, out, err = run_cli(capsys, "-c", str(config), "backup", "--json")
    assert code == 0, err
    snapshot = json.loads(out)["sources"][0]["snapshot_id"]

    # the scenario is real: a duplicated vector's ties come back in another order from Qdrant
    repo = open_repository((tmp_path / "repo").as_uri())
    pull_offline_index(repo, repo.resolve(snapshot, source="knowledge"), tmp_path / "offline")
    col = OfflineIndex.open(tmp_path / "offline").collection("dups")
    client = QdrantClient(path=str(qdrant_path))
    try:
        differ = 0
        for row in range(0, 240, 7):
            q = col.matrix("text")[row]
            ours = [(p["id"], p["score"]) for p in col.search(q, using="text", top_k=10, with_payload=False)]
            theirs = [(p.id, p.score) for p in client.query_points("dups", query=q.tolist(), using="text",
                                                                   limit=10).points]
            differ += [i for i, _ in ours] != [i for i, _ in theirs]
            assert agree_up_to_ties(ours, theirs, 10), (ours, theirs)
    finally:
        client.close()
    assert differ, "no query met ties in a different order: the test does not exercise the drill's bug"

    code, out, err = run_cli(capsys, "-c", str(config), "drill", "--json", "--report", str(tmp_path / "reports"))
    report = json.loads(out)
    assert code == 0, (report, err)
    entry = report["sources"][0]
    assert entry["status"] == "pass" and entry["cleaned_up"]
    assert entry["offline_check"]["ok"] and entry["offline_check"]["queries"] == 3 * drill.SAMPLED_QUERIES
    assert entry["offline_check"]["mismatches"] == []


def test_drill_still_fails_on_a_real_disagreement(config, capsys, tmp_path, monkeypatch):
    code, _, err = run_cli(capsys, "-c", str(config), "backup", "--json")
    assert code == 0, err
    real = OfflineIndex.open

    def one_wrong_id(dir):
        index = real(dir)
        coll = index.collection("dups")
        search = coll.search

        def wrong(*args, **kw):  # the best hit replaced by a point of another score
            hits = search(*args, **kw)
            return [{**hits[-1], "score": hits[0]["score"]}] + hits[1:]
        coll.search = wrong
        return index

    monkeypatch.setattr(OfflineIndex, "open", staticmethod(one_wrong_id))
    code, out, err = run_cli(capsys, "-c", str(config), "drill", "--json")
    report = json.loads(out)
    assert code == 3, (report, err)
    entry = report["sources"][0]
    assert entry["status"] == "verification_failed" and entry["cleaned_up"]
    check = entry["offline_check"]
    assert not check["ok"] and check["mismatches"]
    first = check["mismatches"][0]
    assert len(first["offline"]) == len(first["qdrant"]) == 10
    assert "offline index answers differ" in entry["error"]
    assert f"row {first['row']}: offline [" in to_markdown(report)


S = 0.5


@pytest.mark.parametrize("ours,theirs,ok", [
    ([(1, .9), (2, S), (3, S), (4, .1)], [(1, .9), (3, S), (2, S), (4, .1)], True),    # a tie swapped
    ([(1, .9), (2, S), (3, S), (4, .1)], [(1, .9), (2, S), (5, S), (4, .1)], False),   # another id in the tie
    ([(1, .9), (2, .8), (3, .7)], [(2, .9), (1, .8), (3, .7)], False),                 # no tie: order matters
    ([(1, .9), (2, .8)], [(1, .9), (2, .8), (3, .7)], False),                          # lengths differ
    ([(1, .9), (2, .8)], [(1, .9), (2, .7)], False),                                   # scores differ
    ([(1, .9), (2, .8 + 1e-7)], [(1, .9), (2, .8)], True),                             # float32 vs float64
    ([(1, 1e6), (2, 5e5)], [(1, 1e6 + 20), (2, 5e5)], True),                           # relative tolerance
])
def test_agree_up_to_ties(ours, theirs, ok):
    assert agree_up_to_ties(ours, theirs, 10) is ok


def test_a_tie_cut_by_the_limit_accepts_any_of_its_points():
    # 12 points share the boundary score; each side keeps a different 3 of them in its top 5
    ours = [(1, .9), (2, .8), (10, S), (11, S), (12, S)]
    theirs = [(1, .9), (2, .8), (19, S), (12, S), (15, S)]
    assert agree_up_to_ties(ours, theirs, 5)
    assert not agree_up_to_ties(ours, theirs, 10)  # fewer hits than the limit: nothing was cut
    # a different id before the cut still fails, as does a boundary id with another score
    assert not agree_up_to_ties([(1, .9), (3, .8), *ours[2:]], theirs, 5)
    assert not agree_up_to_ties(ours, [*theirs[:4], (15, .4)], 5)
    # the whole answer is one tie cut by the limit
    assert agree_up_to_ties([(i, S) for i in range(5)], [(i, S) for i in range(7, 12)], 5)
