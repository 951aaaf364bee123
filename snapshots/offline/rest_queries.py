"""Qdrant REST request bodies (query, search, scroll, count, retrieve) turned into OfflineCollection calls.

Defaults are the server's: `limit` 10, `offset` 0; search and query return no payload and no
vector unless asked; scroll and retrieve return the payload. Unknown fields are rejected, as
Qdrant's `deny_unknown_fields` does. What the offline index cannot do (prefetch, sparse vectors,
recommend/discover/fusion/... queries, lookup_from) is a clear 400, never a wrong answer.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from snapshots.errors import UsageError
from snapshots.offline.search import OfflineCollection

QUERY_FIELDS = {"shard_key", "prefetch", "query", "using", "filter", "params", "score_threshold", "limit",
                "offset", "with_vector", "with_payload", "lookup_from"}
SEARCH_FIELDS = {"shard_key", "vector", "filter", "params", "limit", "offset", "with_payload", "with_vector",
                 "score_threshold"}
SCROLL_FIELDS = {"shard_key", "offset", "limit", "filter", "with_payload", "with_vector", "order_by"}
COUNT_FIELDS = {"shard_key", "filter", "exact"}
RETRIEVE_FIELDS = {"shard_key", "ids", "with_payload", "with_vector"}
QUERY_KINDS_UNSUPPORTED = ("recommend", "discover", "context", "order_by", "fusion", "rrf", "formula", "sample",
                           "relevance_feedback", "text")
DEGRADED = "by the statevault offline index (degraded mode)"


def request_object(body: Any, allowed: set[str], what: str) -> dict:
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise UsageError(f"Format error in JSON body: {what}: expected a JSON object")
    if unknown := sorted(set(body) - allowed):
        raise UsageError(f"Format error in JSON body: {what}: unknown field `{unknown[0]}`, "
                         f"expected one of {sorted(allowed)}")
    return body


@dataclass
class DenseSearch:
    """One dense search, or a scroll-like listing when `vector` is None (a query without `query`)."""

    vector: list[float] | None
    options: dict = field(default_factory=dict)

    def group_key(self) -> bytes:
        return orjson.dumps(self.options, option=orjson.OPT_SORT_KEYS)


def _limits(req: dict) -> tuple[int, int]:
    limit = req.get("limit")
    offset = req.get("offset")
    return (10 if limit is None else limit), (0 if offset is None else offset)


def _exclude_point(flt: Any, point_id: Any) -> dict:
    """Qdrant leaves the point a query names out of that query's results."""
    exclusion = {"must_not": [{"has_id": [point_id]}]}
    return {**exclusion, "must": [flt]} if flt else exclusion


def parse_query(coll: OfflineCollection, body: Any) -> DenseSearch:
    """A /points/query body: a dense vector, {"nearest": ...}, a point id, or no query at all."""
    req = request_object(body, QUERY_FIELDS, "query request")
    for unsupported in ("prefetch", "lookup_from"):
        if req.get(unsupported):
            raise UsageError(f"Bad request: `{unsupported}` is not supported {DEGRADED}")
    limit, offset = _limits(req)
    using, flt = req.get("using"), req.get("filter")
    query = req.get("query")
    if isinstance(query, dict):
        if "nearest" in query:
            if query.get("mmr") is not None or set(query) - {"nearest", "mmr"}:
                raise UsageError(f"Bad request: MMR re-ranking is not supported {DEGRADED}")
            query = query["nearest"]
        elif kind := next((k for k in QUERY_KINDS_UNSUPPORTED if k in query), None):
            raise UsageError(f"Bad request: `{kind}` queries are not supported {DEGRADED}; "
                             "use a dense vector or a point id")
    if isinstance(query, dict) and "indices" in query:
        raise UsageError(f"Bad request: sparse vector queries are not supported {DEGRADED}")
    if isinstance(query, dict):
        raise UsageError(f"Bad request: this query is not supported {DEGRADED}: {sorted(query)}")
    options = {"using": using, "top_k": limit, "offset": offset, "filter": flt,
               "score_threshold": req.get("score_threshold"),
               "with_payload": req.get("with_payload", False), "with_vectors": req.get("with_vector", False)}
    if query is None:
        return DenseSearch(None, options)
    if isinstance(query, (int, str)) and not isinstance(query, bool):
        vector = coll.vector_of(query, using).tolist()
        options["filter"] = _exclude_point(flt, query)
        return DenseSearch(vector, options)
    if isinstance(query, list) and query and all(isinstance(x, list) for x in query):
        raise UsageError(f"Bad request: multivector queries are not supported {DEGRADED}")
    if isinstance(query, list):
        return DenseSearch(query, options)
    raise UsageError(f"Format error in JSON body: query: unsupported value {query!r}")


def parse_search(body: Any) -> DenseSearch:
    """A legacy /points/search body: {"vector": [..] | {"name", "vector"}, "limit", ...}."""
    req = request_object(body, SEARCH_FIELDS, "search request")
    if req.get("limit") is None:
        raise UsageError("Format error in JSON body: search request: missing field `limit`")
    vector, using = req.get("vector"), None
    if isinstance(vector, dict):
        if isinstance(vector.get("vector"), dict) or "indices" in vector:
            raise UsageError(f"Bad request: sparse vector search is not supported {DEGRADED}")
        if set(vector) != {"name", "vector"}:
            raise UsageError("Format error in JSON body: search request: vector must be a list of numbers "
                             "or {\"name\": ..., \"vector\": [...]}")
        using, vector = vector["name"], vector["vector"]
    if not isinstance(vector, list):
        raise UsageError("Format error in JSON body: search request: missing or invalid field `vector`")
    limit, offset = _limits(req)
    return DenseSearch(vector, {"using": using, "top_k": limit, "offset": offset, "filter": req.get("filter"),
                                "score_threshold": req.get("score_threshold"),
                                "with_payload": req.get("with_payload", False),
                                "with_vectors": req.get("with_vector", False)})


def run_searches(coll: OfflineCollection, searches: list[DenseSearch]) -> list[list[dict]]:
    """Answer many searches; those sharing every option go through one pass over the matrix."""
    results: list[list[dict] | None] = [None] * len(searches)
    groups: dict[bytes, list[int]] = {}
    for i, s in enumerate(searches):
        if s.vector is None:
            results[i] = _listing(coll, s.options)
        else:
            groups.setdefault(s.group_key(), []).append(i)
    for members in groups.values():
        options = searches[members[0]].options
        answers = coll.search_batch([searches[i].vector for i in members], **options)
        for i, answer in zip(members, answers):
            results[i] = answer
    return results  # type: ignore[return-value]


def _listing(coll: OfflineCollection, options: dict) -> list[dict]:
    """A query without a vector lists points in id order (score 1.0, as qdrant-client's local mode)."""
    limit, offset = options["top_k"], options["offset"]
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise UsageError(f"Bad request: offset value {offset!r} is invalid. Must be 0 or larger.")
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise UsageError(f"Bad request: limit value {limit!r} is invalid. Must be 1 or larger.")
    records, _ = coll.scroll(limit=limit + offset, filter=options["filter"],
                             with_payload=options["with_payload"], with_vectors=options["with_vectors"])
    return [{"id": r["id"], "version": 0, "score": 1.0, "payload": r["payload"], "vector": r["vector"]}
            for r in records[offset:]]


def run_scroll(coll: OfflineCollection, body: Any) -> dict:
    req = request_object(body, SCROLL_FIELDS, "scroll request")
    if req.get("order_by") is not None:
        raise UsageError(f"Bad request: scroll `order_by` is not supported {DEGRADED}")
    points, next_offset = coll.scroll(offset=req.get("offset"), limit=10 if req.get("limit") is None else req["limit"],
                                      filter=req.get("filter"), with_payload=req.get("with_payload", True),
                                      with_vectors=req.get("with_vector", False))
    return {"points": points, "next_page_offset": next_offset}


def run_count(coll: OfflineCollection, body: Any) -> dict:
    req = request_object(body, COUNT_FIELDS, "count request")
    return {"count": coll.count(req.get("filter"), exact=bool(req.get("exact", True)))}


def run_retrieve(coll: OfflineCollection, body: Any) -> list[dict]:
    req = request_object(body, RETRIEVE_FIELDS, "point request")
    if not isinstance(req.get("ids"), list):
        raise UsageError("Format error in JSON body: point request: missing field `ids`")
    return coll.retrieve(req["ids"], with_payload=req.get("with_payload", True),
                         with_vectors=req.get("with_vector", False))
