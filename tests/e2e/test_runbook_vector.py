"""Runbook scenarios 1 (vector DB down: degraded search) and 2 (knowledge base deleted), and
the Qdrant half of 6 (restoring to a new place), run as docs/runbook.md writes them.

Qdrant runs in local mode (a directory): "down" is that directory moved away.
"""
from __future__ import annotations

import json

import pytest

from backup.local_servers import free_port
from tests.e2e import runbook_harness as rh

KB = "customer_service_kb"


def expected_hits(path, query, limit=3, category=None) -> list:
    from qdrant_client import models

    flt = None
    if category:
        flt = models.Filter(must=[models.FieldCondition(key="category", match=models.MatchValue(value=category))])
    with rh.qdrant(path) as client:
        return [p.id for p in client.query_points(KB, query=query, limit=limit, query_filter=flt).points]


def test_vector_db_down_degraded_search_then_back(agent_env, tmp_path):
    sv, qpath = agent_env.sv, agent_env.qdrant_path
    backup = sv.setup("backup", "knowledge", "--json").json
    snapshot_id = backup["sources"][0]["snapshot_id"]
    query = rh.vector(7)
    want, want_billing = expected_hits(qpath, query), expected_hits(qpath, query, category="billing")
    original = rh.qdrant_points(qpath, KB)

    down = qpath.with_name("qdrant-down")
    qpath.rename(down)  # the incident: Qdrant is gone; nothing below may need it
    offline = tmp_path / "offline"
    res = sv.run("statevault offline pull --source knowledge --dir $DIR", dir=offline)
    assert f"offline index of snapshot {snapshot_id}" in res.stdout and KB in res.stdout
    pulled = sv.run("statevault offline pull --source knowledge --dir $DIR --json", dir=offline).json
    assert pulled["snapshot_id"] == snapshot_id and len(pulled["collections"]) == 2

    query_file = tmp_path / "query.json"
    query_file.write_text(json.dumps(query))
    res = sv.run("statevault offline search --dir $DIR --collection customer_service_kb --vector-file <query-file> "
                 "--top-k 3", dir=offline, query_file=query_file)
    assert f"degraded search: snapshot {snapshot_id}" in res.stderr
    assert [int(line.split("│")[1]) for line in res.stdout.splitlines() if line.startswith("│")] == want
    res = sv.run("statevault offline search --dir $DIR --collection customer_service_kb --vector-file <query-file> "
                 "--top-k 3 --filter '{\"must\": [{\"key\": \"category\", \"match\": {\"value\": \"billing\"}}]}' "
                 "--json", dir=offline, query_file=query_file).json
    assert res["snapshot_id"] == snapshot_id
    assert [h["id"] for h in res["result"]] == want_billing
    assert all(h["payload"]["category"] == "billing" for h in res["result"])

    port = free_port()
    server = sv.start("statevault offline serve --dir $DIR --host $HOST --port $PORT", dir=offline,
                      host="127.0.0.1", port=port)
    try:
        rh.wait_for_port("127.0.0.1", port, server)
        from qdrant_client import QdrantClient, models

        client = QdrantClient(url=f"http://127.0.0.1:{port}")  # the agent's one-URL failover
        assert sorted(c.name for c in client.get_collections().collections) == [KB, "product_kb"]
        assert [p.id for p in client.query_points(KB, query=query, limit=3).points] == want
        with pytest.raises(Exception):  # read-only: writes are refused
            client.upsert(KB, [models.PointStruct(id=999, vector=query, payload={})])
        client.close()
    finally:
        server.terminate()
        assert server.wait(timeout=15) is not None
    assert "read-only, degraded mode" in server.stderr.read()

    # going back: Qdrant returns with its data; verify proves it before the agents switch back
    down.rename(qpath)
    res = sv.run("statevault verify latest --source knowledge")
    assert res.stdout.count("same") == 2
    # had it come back without the KB collection: scenario 2
    with rh.qdrant(qpath) as client:
        client.delete_collection(KB)
    sv.run("statevault restore latest --source knowledge --only customer_service_kb")
    assert rh.same_points(rh.qdrant_points(qpath, KB), original)


def test_kb_deleted_restore_swap_and_restore_elsewhere(agent_env, tmp_path):
    sv, qpath = agent_env.sv, agent_env.qdrant_path
    sv.setup("backup", "knowledge")
    original, product = rh.qdrant_points(qpath, KB), rh.qdrant_points(qpath, "product_kb")
    with rh.qdrant(qpath) as client:
        client.delete_collection(KB)  # the incident

    res = sv.run("statevault snapshots show latest --source knowledge")
    assert KB in res.stdout and "product_kb" in res.stdout and "150" in res.stdout
    res = sv.run("statevault restore latest --source knowledge --only customer_service_kb --dry-run")
    assert "dry run: nothing was written" in res.stdout
    with rh.qdrant(qpath) as client:
        assert not client.collection_exists(KB)
    res = sv.run("statevault restore latest --source knowledge --only customer_service_kb")
    assert f"verified {KB} -> {KB}: 150 records" in res.stdout
    assert rh.same_points(rh.qdrant_points(qpath, KB), original)

    # the collection exists but was damaged: swap replaces it atomically
    from qdrant_client import models

    def damage():
        with rh.qdrant(qpath) as client:
            client.set_payload(KB, {"category": "CORRUPTED"}, points=list(range(0, 150, 5)))
            client.delete(KB, points_selector=models.PointIdsList(points=[1, 2, 3]))

    damage()
    res = sv.run("statevault restore latest --source knowledge --only customer_service_kb --mode swap --yes")
    assert "pre-restore snapshot:" in res.stdout and f"verified {KB} -> {KB}: 150 records" in res.stdout
    assert rh.same_points(rh.qdrant_points(qpath, KB), original)
    damage()
    res = sv.run("statevault restore latest --source knowledge --only customer_service_kb --mode swap --yes --json").json
    assert res["verified"] and res["pre_restore_snapshot"] and res["plan"][0]["action"] == "swap"
    assert rh.same_points(rh.qdrant_points(qpath, KB), original)
    with rh.qdrant(qpath) as client:
        aliases = {a.alias_name: a.collection_name for a in client.get_aliases().aliases}
    assert aliases[KB].startswith(f"{KB}__sv_")
    assert rh.same_points(rh.qdrant_points(qpath, "product_kb"), product)  # the other collection was never touched

    # scenario 6 for Qdrant: into another local-mode directory, and beside the live collection
    original = {KB: original, "product_kb": product}
    new_path = tmp_path / "new-qdrant"
    new_path.mkdir()
    res = sv.run("statevault restore latest --source knowledge --to-path <new-qdrant-path>", new_qdrant_path=new_path)
    assert [line.split()[1] for line in res.stdout.splitlines() if line.startswith("verified ")] == [KB, "product_kb"]
    assert all(rh.same_points(rh.qdrant_points(new_path, c), original[c]) for c in original)

    res = sv.run("statevault restore latest --source knowledge --only customer_service_kb --into "
                 "customer_service_kb_restored --json").json
    assert res["verified"] and res["plan"][0]["target"] == "customer_service_kb_restored"
    assert rh.same_points(rh.qdrant_points(qpath, "customer_service_kb_restored"), original[KB])
    assert rh.same_points(rh.qdrant_points(qpath, KB), original[KB])
