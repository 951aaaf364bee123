"""The REST scroll read (backup/sources/qdrant_rest.py) against qdrant-client's own `scroll`,
over HTTP, on the same responses.

No Qdrant server can be installed on the development machine, so the server here is a
stand-in: a real HTTP server answering Qdrant's REST scroll from a qdrant-client local-mode
collection, with qdrant-client's own response models serialized as JSON (the shapes Qdrant's
OpenAPI schema gives). Both read paths parse the very same bytes; what is compared is what
the backup writes from them.
"""
from __future__ import annotations

import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import orjson
import pytest
from qdrant_client import QdrantClient
from qdrant_client import models as m

import backup.sources.qdrant as qdrant_source
from backup.sources.qdrant import iter_collection_records, iter_pages
from backup.sources.qdrant_config import collection_schema, vector_layout
from backup.sources.qdrant_records import FORMAT, PointEncoder
from backup.sources import qdrant_rest
from backup.sources.qdrant_rest import rest_api
from snapshots.errors import NotFoundError


class _StandIn(BaseHTTPRequestHandler):
    local: QdrantClient
    seen: list
    offset_first = False  # next_page_offset before the points, as a server is free to order them

    def do_PUT(self):  # noqa: N802 - http.server's name: PUT /collections/{name}/points?wait=true
        body = orjson.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.seen.append((self.path, len(body["points"]), self.headers.get("api-key")))
        name = self.path.split("/")[2]
        self.local.upsert(name, [m.PointStruct(**p) for p in body["points"]], wait=True)
        self._send(200, orjson.dumps({"result": {"operation_id": 0, "status": "completed"}, "status": "ok",
                                      "time": 0.001}))

    def do_POST(self):  # noqa: N802 - http.server's name
        body = orjson.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.seen.append((self.path, body, self.headers.get("api-key")))
        name = self.path.split("/")[2]
        try:
            points, offset = self.local.scroll(name, limit=body["limit"], offset=body.get("offset"),
                                               with_payload=body["with_payload"], with_vectors=body["with_vector"])
        except ValueError as exc:  # local mode: "Collection ... not found"
            return self._send(404, orjson.dumps({"status": {"error": f"Not found: {exc}"}, "time": 0.0}))
        reply = m.InlineResponse20019(result=m.ScrollResult(points=points, next_page_offset=offset),
                                      status="ok", time=0.001)
        if not self.offset_first:
            return self._send(200, reply.model_dump_json().encode())
        result = reply.model_dump(mode="json")["result"]
        self._send(200, orjson.dumps({"result": {"next_page_offset": result["next_page_offset"],
                                                 "points": result["points"]}, "status": "ok", "time": 0.001}))

    def _send(self, status: int, data: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def stand_in(tmp_path):
    local = QdrantClient(path=str(tmp_path / "qdrant"))
    rng = np.random.default_rng(5)
    local.create_collection("mixed", vectors_config={
        "text": m.VectorParams(size=4, distance="Cosine"),
        "img": m.VectorParams(size=3, distance="Dot"),
        "mv": m.VectorParams(size=2, distance="Euclid", multivector_config=m.MultiVectorConfig(comparator="max_sim"))},
        sparse_vectors_config={"sp": m.SparseVectorParams()})
    points = []
    for i in range(40):
        vector = {"text": rng.standard_normal(4).tolist()}
        if i % 3:
            vector["img"] = rng.standard_normal(3).tolist()
        if i % 4 == 1:
            vector["sp"] = m.SparseVector(indices=[i, i + 9], values=[0.125, -2.5])
        if i % 5 == 2:
            vector["mv"] = rng.standard_normal((1 + i % 3, 2)).tolist()
        pid = i if i % 2 else str(uuid.UUID(int=i * 7919))
        payload = {"n": i, "text": f"caf\u00e9 {i}", "f": i / 3, "nested": {"tags": ["a", i], "none": None}}
        if i % 7 == 6:  # what a client could mistake for the page's next offset
            payload["next_page_offset"] = 10_000 + i
        points.append(m.PointStruct(id=pid, vector=vector, payload=payload))
    local.upsert("mixed", points)
    handler = type("Handler", (_StandIn,), {"local": local, "seen": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    client = QdrantClient(url=f"http://127.0.0.1:{server.server_port}", api_key="k3y", https=False,
                          check_compatibility=False)
    try:
        yield local, client, handler
    finally:
        client.close()
        server.shutdown()
        server.server_close()
        local.close()


def _records(client, local, monkeypatch, direct: bool) -> tuple[list[int], list[bytes]]:
    monkeypatch.setattr(qdrant_source, "REST_DIRECT_READ", direct)
    encoder = PointEncoder(vector_layout(collection_schema(local.get_collection("mixed"), local=False)), False, FORMAT)
    sizes, lines = [], []
    for page in iter_pages(client, "mixed", page_size=7):
        sizes.append(len(page))
        lines += encoder.encode(page).lines
    return sizes, lines


@pytest.mark.filterwarnings("ignore:Api key is used with an insecure connection")
@pytest.mark.parametrize("offset_first", [False, True])
def test_the_rest_read_writes_what_scroll_writes(stand_in, monkeypatch, offset_first):
    """Either field order: with the offset first, the page asked for ahead is sometimes the
    wrong one (a payload's own "next_page_offset" key comes last): dropped, not used."""
    local, client, handler = stand_in
    handler.offset_first, seen = offset_first, handler.seen
    guesses = []
    guess = qdrant_rest._trailing_offset
    monkeypatch.setattr(qdrant_rest, "_trailing_offset", lambda content: guesses.append(guess(content)) or guesses[-1])
    assert rest_api(client) is not None and rest_api(local) is None
    sizes, direct = _records(client, local, monkeypatch, True)
    asked = list(seen)
    seen.clear()
    assert (sizes, direct) == _records(client, local, monkeypatch, False)
    offsets = [body.get("offset") for _, body, _ in seen][1:] + [None]
    if offset_first:  # some pages were guessed wrong: asked for ahead in vain (or cancelled in time)
        assert any(g != o for g, o in zip(guesses, offsets))
        assert all(r[1]["offset"] >= 10_000 for r in asked if r not in seen)
        asked = [r for r in asked if r in seen]
    else:
        assert guesses == offsets
    assert sizes == [7] * 5 + [5] and len(set(direct)) == 40
    decoded = [orjson.loads(line) for line in direct]
    assert {type(r["id"]) for r in decoded} == {int, str}
    assert sum("sp" in r["vector"] for r in decoded) == 10 and sum("mv" in r["vector"] for r in decoded) == 8
    # the same requests as qdrant-client's: body, paging by the returned offset, the api key
    assert asked == seen
    assert asked[0] == ("/collections/mixed/points/scroll", {"limit": 7, "with_payload": True, "with_vector": True},
                        "k3y")
    assert all(body["offset"] is not None for _, body, _ in asked[1:])


@pytest.mark.filterwarnings("ignore:Api key is used with an insecure connection")
def test_a_refused_rest_read_is_the_same_error_as_a_refused_scroll(stand_in, monkeypatch):
    _, client, _ = stand_in
    errors = []
    for direct in (True, False):
        monkeypatch.setattr(qdrant_source, "REST_DIRECT_READ", direct)
        with pytest.raises(NotFoundError) as info:
            next(iter_pages(client, "missing"))
        errors.append(info.value.message)
    assert errors[0] == errors[1] and "missing" in errors[0]


@pytest.mark.filterwarnings("ignore:Api key is used with an insecure connection")
def test_a_restore_to_a_server_upserts_the_points_scroll_reads_back(stand_in, monkeypatch, tmp_path):
    """The REST upsert (JSON made from the records, float32 vectors as their shortest decimals)
    stores exactly what qdrant-client's own upsert of the same records stores."""
    from restore.targets import qdrant as qdrant_target
    from restore.targets.base import RestoreOptions
    from restore.targets.qdrant import QdrantTarget

    local, client, handler = stand_in
    schema = collection_schema(local.get_collection("mixed"), local=False)
    records = list(iter_collection_records(client, "mixed", schema, False))
    config = local.get_collection("mixed").config.params
    for name in ("via_rest", "via_client"):
        local.create_collection(name, vectors_config=config.vectors, sparse_vectors_config=config.sparse_vectors)
    target = QdrantTarget(url=client._client.rest_uri, api_key="k3y")
    try:
        handler.seen.clear()
        target._upsert_all("via_rest", iter(records), schema, FORMAT, RestoreOptions(batch_size=16))
        assert [n for _, n, key in handler.seen] == [16, 16, 8] and {key for *_, key in handler.seen} == {"k3y"}
        monkeypatch.setattr(qdrant_target, "rest_api", lambda c: None)  # qdrant-client's upsert, same server
        target._upsert_all("via_client", iter(records), schema, FORMAT, RestoreOptions(batch_size=16))
    finally:
        target.close()
    rest, own = (list(iter_collection_records(client, n, schema, False)) for n in ("via_rest", "via_client"))
    assert rest == own and len(rest) == 40


@pytest.mark.filterwarnings("ignore:Api key is used with an insecure connection")
def test_the_next_page_is_on_the_wire_before_this_one_is_parsed(stand_in, monkeypatch):
    """Parsing a page holds the GIL: if the worker had not sent the next request by then, the
    server would sit idle until the parse ended. Sends are slowed here, so a loop that did not
    wait for them would parse first."""
    import time
    from types import SimpleNamespace

    local, client, _ = stand_in
    monkeypatch.setattr(qdrant_source, "REST_DIRECT_READ", True)
    api = rest_api(client)
    send = api.send_inner
    monkeypatch.setattr(api, "send_inner", lambda request: time.sleep(0.05) or send(request))
    events = []
    mark = qdrant_rest._mark_sent
    monkeypatch.setattr(qdrant_rest, "_mark_sent",
                        lambda event, sent: (events.append("sent") if event.endswith("send_request_body.complete")
                                             else None, mark(event, sent)))
    loads = orjson.loads
    monkeypatch.setattr(qdrant_rest, "orjson", SimpleNamespace(
        dumps=orjson.dumps, JSONDecodeError=orjson.JSONDecodeError,
        loads=lambda data: (events.append("parse") if b'"points"' in data else None, loads(data))[1]))
    pages = [len(page) for page in iter_pages(client, "mixed", page_size=7)]
    assert pages == [7] * 5 + [5]
    # each page's parse comes after the next page's request went out (the last has no next)
    assert events == ["sent"] + ["sent", "parse"] * 5 + ["parse"]
