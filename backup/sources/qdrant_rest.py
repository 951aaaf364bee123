"""Pages of a collection on a Qdrant *server*, read through its REST scroll and parsed with orjson.

qdrant-client's `scroll` validates every response into pydantic models, which checks each
vector value as a float one at a time: over REST that was more than half of a backup's main
thread (py-spy, 20k points of 384 dims: `parse_response` 54%, the encoder, chunking and
digest 15%). The encoder reads three things of a point (id, payload, vector), all plain JSON
in the response, so here the request qdrant-client would send goes out on the client's own
connection pool and through its middleware (the api-key and its other headers), and the
body is parsed by orjson:

- ids are ints or UUID strings, payloads dicts, dense vectors lists of floats and
  multivectors lists of them, as pydantic leaves them;
- a sparse vector (`{"indices": [...], "values": [...]}`) becomes a SparseVector, built
  without validation (`model_construct`), as `scroll` would have built it with.

So the encoder gets the same values either way and writes the same bytes
(tests/integration/test_qdrant_rest.py compares both paths' records byte for byte on named,
sparse and multivectors and UUID ids). A response other than 200 raises the client's own
UnexpectedResponse, and a transport error its ResponseHandlingException, so errors translate
as before (translate_qdrant_error).

This relies on qdrant-client internals (QdrantClient._client.openapi_client.client: the
ApiClient's host, httpx client, middleware and send_inner). `rest_api` checks they are there,
and callers scroll when they are not (a gRPC client, a client version that moved them).
"""
from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Any, Iterator
from urllib.parse import quote, urljoin

import orjson

from backup.sources.qdrant_local import LocalPoint
from snapshots.threads import read_ahead_pool

_SCROLL = "collections/{}/points/scroll"
_POINTS = "collections/{}/points"
_NEXT = b'"next_page_offset":'
_SEND_WAIT = 5.0  # seconds the page loop waits for the next request to go out (then parses anyway)


def rest_api(client: Any) -> Any | None:
    """The REST ApiClient behind a QdrantClient for a server, or None (local mode, gRPC, or a
    qdrant-client whose internals are not the ones this module knows)."""
    remote = getattr(client, "_client", None)
    if getattr(remote, "_prefer_grpc", False):
        return None
    api = getattr(getattr(remote, "openapi_client", None), "client", None)
    if not all(hasattr(api, a) for a in ("host", "_client", "middleware", "send_inner")):
        return None
    if not callable(getattr(api._client, "build_request", None)):
        return None
    return api


def rest_call(api: Any, method: str, path: str, body: bytes, params: dict | None = None,
              sent: threading.Event | None = None) -> bytes:
    """One REST request with a JSON body, as qdrant-client sends its own (its connection pool,
    middleware and headers); the response body, or the client's UnexpectedResponse. `sent` is
    set once the request is on the wire (httpcore's trace of the body sent)."""
    from qdrant_client.http.exceptions import UnexpectedResponse

    url = urljoin(api.host if api.host.endswith("/") else api.host + "/", path)
    extensions = None if sent is None else {"trace": lambda event, info: _mark_sent(event, sent)}
    request = api._client.build_request(method, url, content=body, params=params, extensions=extensions,
                                        headers={"Content-Type": "application/json"})
    response = api.middleware(request, api.send_inner)
    if response.status_code != 200:
        raise UnexpectedResponse.for_response(response)
    return response.content


def _mark_sent(event: str, sent: threading.Event) -> None:
    if event.endswith("send_request_body.complete"):
        sent.set()


def upsert_points(api: Any, name: str, points: list[dict]) -> None:
    """PUT points ({"id", "vector", "payload"} dicts; vectors may be float32 arrays) and wait
    for them to be applied. orjson writes a float32 as its shortest decimal, which Qdrant
    parses back to the same float32: the exact values, in ~40% fewer bytes than the float64
    text qdrant-client sends, without a pydantic model per point (~0.1 ms of client CPU a
    384-dim point, against ~0.012 ms)."""
    body = orjson.dumps({"points": points}, option=orjson.OPT_SERIALIZE_NUMPY)
    rest_call(api, "PUT", _POINTS.format(quote(name, safe="")), body, params={"wait": "true"})


def iter_rest_pages(api: Any, name: str, page_size: int) -> Iterator[list[LocalPoint]]:
    """Every point of collection (or alias) `name`, in scroll order, a page at a time.

    The next page is asked for before this one is parsed: its offset is read off the end of
    the response (`next_page_offset` follows the points), so the server builds page N+1 while
    page N is parsed and encoded here. A worker thread only sends the request and receives the
    body; the parsing stays on the caller's thread, and starts once the worker's request is on
    the wire (`ask`). When the offset
    read off the end is not the parsed one (a server that orders its fields otherwise), the
    page asked for ahead is dropped and the right one asked for."""
    def fetch(offset: Any, sent: threading.Event) -> bytes:
        body = {"limit": page_size, "with_payload": True, "with_vector": True}
        if offset is not None:
            body = {"offset": offset, **body}
        try:
            return rest_call(api, "POST", _SCROLL.format(quote(name, safe="")), orjson.dumps(body), sent=sent)
        finally:
            sent.set()

    def ask(offset: Any) -> Future:
        """Page `offset`, once its request is on the wire: orjson holds the GIL for its whole
        parse (~7 ms a 512-point page), and a worker that could not send meanwhile left the
        server idle for as long. 20k x 384 points against `offline serve`: the page loop alone
        1.24-1.39 -> 0.86-0.94 s; the backup, medians of 6 alternating runs, 1.61 -> 1.17 s
        (the bare scroll 1.25 s)."""
        sent = threading.Event()
        future = pool.submit(fetch, offset, sent)
        sent.wait(_SEND_WAIT)
        return future

    with read_ahead_pool(1, "qdrant-scroll") as pool:
        ahead = ask(None)
        try:
            while True:
                content = ahead.result()
                guess = _trailing_offset(content)
                if guess is not None:
                    ahead = ask(guess)
                result = orjson.loads(content)["result"]
                offset = result.get("next_page_offset")
                if offset != guess:
                    if guess is not None and not ahead.cancel():
                        ahead.exception()  # a page not needed, already on its way: wait it out
                    if offset is not None:
                        ahead = ask(offset)
                points = result["points"]
                if points:
                    yield [LocalPoint(p["id"], p.get("payload"), _vector(p.get("vector"))) for p in points]
                if offset is None:
                    return
        finally:
            ahead.cancel()


def _trailing_offset(content: bytes) -> Any:
    """The `next_page_offset` value at the end of a scroll response (an int or a UUID string),
    read without parsing the points; None when there is none or it is not there."""
    i = content.rfind(_NEXT)
    if i < 0:
        return None
    start = i + len(_NEXT)
    end = min((j for j in (content.find(b",", start), content.find(b"}", start)) if j >= 0), default=-1)
    if end < 0:
        return None
    try:
        return orjson.loads(content[start:end])
    except orjson.JSONDecodeError:
        return None


def _vector(vector: Any) -> Any:
    if not isinstance(vector, dict):
        return vector
    for name, value in vector.items():
        if isinstance(value, dict):
            from qdrant_client.http.models import SparseVector

            vector[name] = SparseVector.model_construct(indices=value["indices"], values=value["values"])
    return vector
