"""QA's repro end to end: a Qdrant (local mode) collection far from the origin, backed up, pulled and
searched with `statevault offline search`: the answer is the float64 brute force's, and Qdrant's."""
from __future__ import annotations

import json

import numpy as np
import pytest
from qdrant_client import QdrantClient, models

from restore.drill import agree_up_to_ties
from tests.cli_runner import run_cli
from snapshots.offline import OfflineIndex
from snapshots.offline.topk import prepare_queries
from tests.unit.test_offline_exact import brute_force

pytestmark = [pytest.mark.filterwarnings("ignore:Local mode performs exact:UserWarning")]

QA_QUERY = [1000, 1000.01, 999.99, 1000.02, 1000, 999.98, 1000.03, 1000]
NAMED = {"cos": models.Distance.COSINE, "dot": models.Distance.DOT, "man": models.Distance.MANHATTAN,
         "euc": models.Distance.EUCLID}


def far(n: int, seed: int) -> np.ndarray:
    return (1000 + np.random.default_rng(seed).standard_normal((n, 8)) * 0.05).astype(np.float32)


@pytest.fixture(scope="module")
def pulled(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("far")
    qdrant = tmp / "qdrant"
    euc, named = far(300, 0), {name: far(300, k + 1) for k, name in enumerate(NAMED)}
    client = QdrantClient(path=str(qdrant))
    client.create_collection("euc_far", vectors_config=models.VectorParams(size=8, distance=models.Distance.EUCLID))
    client.upsert("euc_far", [models.PointStruct(id=i, vector=v.tolist()) for i, v in enumerate(euc)])
    client.create_collection("far_named", vectors_config={n: models.VectorParams(size=8, distance=d)
                                                          for n, d in NAMED.items()})
    client.upsert("far_named", [models.PointStruct(id=i, vector={n: named[n][i].tolist() for n in NAMED})
                                for i in range(300)])
    client.close()
    cfg = tmp / "statevault.toml"
    cfg.write_text(f'[repository]\nurl = "{(tmp / "repo").as_uri()}"\n\n'
                   f'[sources.knowledge]\nkind = "qdrant"\npath = "{qdrant}"\noffline_index = true\n')
    return cfg, tmp / "off", qdrant, euc, named


def cli(capsys, *args):
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    return json.loads(out)


def test_offline_search_far_from_the_origin_is_exact(pulled, capsys):
    cfg, off, qdrant, euc, named = pulled
    cli(capsys, "-c", str(cfg), "backup", "--json")
    cli(capsys, "-c", str(cfg), "offline", "pull", "--dir", str(off), "--json")

    res = cli(capsys, "offline", "search", "--dir", str(off), "--collection", "euc_far",
              "--vector", json.dumps(QA_QUERY), "--top-k", "3", "--json")["result"]
    rows, dists = brute_force(euc, np.asarray(QA_QUERY, dtype=np.float32), "Euclid", 3)
    assert [h["id"] for h in res] == rows                      # QA got 100, 177, 80
    np.testing.assert_allclose([h["score"] for h in res], dists, rtol=1e-9)

    client = QdrantClient(path=str(qdrant))
    try:
        queries = far(40, 99)
        for q in queries:
            hits = cli(capsys, "offline", "search", "--dir", str(off), "--collection", "euc_far",
                       "--vector", json.dumps(q.tolist()), "--top-k", "10", "--json")["result"]
            assert [h["id"] for h in hits] == brute_force(euc, q, "Euclid", 10)[0]
            theirs = client.query_points("euc_far", query=q.tolist(), limit=10).points
            assert agree_up_to_ties([(h["id"], h["score"]) for h in hits], [(p.id, p.score) for p in theirs], 10)
        index = OfflineIndex.open(off).collection("far_named")
        for name, distance in NAMED.items():
            data = index.matrix(name)  # as Qdrant stored them (its own unit rows for Cosine)
            if distance != models.Distance.COSINE:
                assert np.array_equal(data, named[name])
            for q in queries[:10]:
                hits = cli(capsys, "offline", "search", "--dir", str(off), "--collection", "far_named",
                           "--using", name, "--vector", json.dumps(q.tolist()), "--json")["result"]
                q32 = prepare_queries(q[None], distance.value)[0]
                assert [h["id"] for h in hits] == brute_force(data, q32, distance.value, 10)[0], name
    finally:
        client.close()
