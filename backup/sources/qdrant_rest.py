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

from typing import Any, Iterator
from urllib.parse import quote, urljoin

import orjson

from backup.sources.qdrant_local import LocalPoint

_SCROLL = "collections/{}/points/scroll"


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


def iter_rest_pages(api: Any, name: str, page_size: int) -> Iterator[list[LocalPoint]]:
    """Every point of collection (or alias) `name`, in scroll order, a page at a time."""
    from qdrant_client.http.exceptions import UnexpectedResponse

    host = api.host if api.host.endswith("/") else api.host + "/"
    url = urljoin(host, _SCROLL.format(quote(name, safe="")))
    offset = None
    while True:
        body = {"limit": page_size, "with_payload": True, "with_vector": True}
        if offset is not None:
            body = {"offset": offset, **body}
        request = api._client.build_request("POST", url, content=orjson.dumps(body),
                                            headers={"Content-Type": "application/json"})
        response = api.middleware(request, api.send_inner)
        if response.status_code != 200:
            raise UnexpectedResponse.for_response(response)
        result = orjson.loads(response.content)["result"]
        points = result["points"]
        if points:
            yield [LocalPoint(p["id"], p.get("payload"), _vector(p.get("vector"))) for p in points]
        offset = result.get("next_page_offset")
        if offset is None:
            return


def _vector(vector: Any) -> Any:
    if not isinstance(vector, dict):
        return vector
    for name, value in vector.items():
        if isinstance(value, dict):
            from qdrant_client.http.models import SparseVector

            vector[name] = SparseVector.model_construct(indices=value["indices"], values=value["values"])
    return vector
