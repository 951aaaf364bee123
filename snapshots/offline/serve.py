"""`statevault offline serve`: the read-only part of Qdrant's REST API, answered from the offline index.

An agent's own qdrant-client fails over by changing one URL (REST, not gRPC). Served:

    GET  /  /healthz  /livez  /readyz  /collections  /collections/{name}  /collections/{name}/exists
    GET  /aliases  /collections/{name}/aliases  /collections/{name}/points/{id}
    POST /collections/{name}/points/query[/batch]  /points/search[/batch]  /points/scroll
    POST /collections/{name}/points/count  /collections/{name}/points (retrieve)

Responses use Qdrant's envelope {"result", "status": "ok", "time"} and carry the header
`X-Statevault-Snapshot: <snapshot id> <snapshot time>`. Errors are Qdrant-shaped
{"status": {"error": ...}, "time": ...}: 400 bad input or unsupported here, 404 unknown collection
or point, 403 for every write (the index is read-only: upsert, delete, create...), 503 when the
index files are damaged, 500 only for a bug. `GET /` reports the Qdrant version the calling
qdrant-client expects (read from its User-Agent), so its compatibility check passes quietly.
"""
from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any

import orjson
from fastapi import Body, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from snapshots.errors import NotFoundError, StatevaultError, UsageError, VerificationError
from snapshots.offline import rest_queries as rq
from snapshots.offline.layout import normalize_point_id
from snapshots.offline.search import OfflineCollection, OfflineIndex

log = logging.getLogger("statevault.offline.serve")
FALLBACK_SERVER_VERSION = "1.16.0"
SNAPSHOT_HEADER = "X-Statevault-Snapshot"
_CLIENT_VERSION = re.compile(r"(?:python-client|qdrant-js|qdrant-client|go-client|rust-client)/(\d+)\.(\d+)")
UNSUPPORTED_READS = ("recommend", "discover", "groups", "facet", "matrix")


class ReadOnlyError(StatevaultError):
    """A write reached the offline server."""


def _snapshot_label(coll: OfflineCollection) -> str:
    return f"{coll.snapshot_id} {coll.snapshot_time}".strip()


def _json(body: Any, status: int = 200, snapshot: str | None = None) -> Response:
    headers = {SNAPSHOT_HEADER: snapshot} if snapshot else None
    return Response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), status_code=status,
                    media_type="application/json", headers=headers)


def _ok(result: Any, started: float, coll: OfflineCollection | None = None) -> Response:
    return _json({"result": result, "status": "ok", "time": time.perf_counter() - started},
                 snapshot=_snapshot_label(coll) if coll else None)


def _error(message: str, status: int, snapshot: str | None = None) -> Response:
    return _json({"status": {"error": message}, "time": 0.0}, status, snapshot)


def server_version(user_agent: str) -> str:
    match = _CLIENT_VERSION.search(user_agent or "")
    return f"{match.group(1)}.{match.group(2)}.0" if match else FALLBACK_SERVER_VERSION


def collection_info(coll: OfflineCollection) -> dict:
    """A CollectionInfo valid for qdrant-client: the snapshot's own config when it has one, else defaults."""
    stored = coll.meta.get("config") or {}
    if isinstance(stored.get("config"), dict):  # a whole CollectionInfo was stored
        payload_schema, stored = stored.get("payload_schema") or {}, stored["config"]
    else:
        payload_schema = {}
    vectors = {n: {"size": s["size"], "distance": s["distance"]} for n, s in coll.vectors.items()}
    config = {
        "params": {"vectors": vectors[""] if list(vectors) == [""] else vectors, "shard_number": 1,
                   "replication_factor": 1, "write_consistency_factor": 1, "on_disk_payload": True,
                   **({"sparse_vectors": {n: {} for n in coll.sparse_vectors}} if coll.sparse_vectors else {})},
        "hnsw_config": {"m": 16, "ef_construct": 100, "full_scan_threshold": 10000, "max_indexing_threads": 0},
        "optimizer_config": {"deleted_threshold": 0.2, "vacuum_min_vector_number": 1000, "default_segment_number": 0,
                             "indexing_threshold": 20000, "flush_interval_sec": 5},
        "wal_config": {"wal_capacity_mb": 32, "wal_segments_ahead": 0},
        "quantization_config": None,
    }
    if isinstance(stored, dict) and isinstance(stored.get("params"), dict):
        candidate = {**config, **{k: v for k, v in stored.items() if v is not None or k == "quantization_config"}}
        if _valid("CollectionConfig", candidate):
            config = candidate
        else:
            log.warning("offline collection %s: stored config does not validate, serving defaults", coll.name)
    statevault = {"mode": "offline read-only (degraded)", "snapshot_id": coll.snapshot_id,
                  "snapshot_time": coll.snapshot_time, "source": coll.meta.get("source")}
    config["metadata"] = {**(config.get("metadata") or {}), "statevault": statevault}
    if payload_schema and not _valid("PayloadIndexInfo", payload_schema, mapping=True):
        payload_schema = {}
    return {
        "status": "green", "optimizer_status": "ok",
        "warnings": [{"message": f"statevault offline index, read-only (degraded mode): snapshot "
                                 f"{coll.snapshot_id} taken at {coll.snapshot_time}"}],
        "indexed_vectors_count": 0, "points_count": coll.points_count, "segments_count": 1,
        "config": config, "payload_schema": payload_schema,
    }


def _valid(model: str, value: Any, mapping: bool = False) -> bool:
    """Check a structure against qdrant-client's own model, when qdrant-client is importable."""
    try:
        from qdrant_client.http import models
    except ImportError:  # pragma: no cover - qdrant-client is a dependency
        return True
    cls = getattr(models, model)
    try:
        for v in (value.values() if mapping else [value]):
            cls.model_validate(v)
        return True
    except Exception:  # pydantic.ValidationError, or a model that changed shape
        return False


def create_app(index_dir: str | Path) -> FastAPI:
    """The read-only Qdrant-compatible app over the offline index in `index_dir`."""
    index = OfflineIndex.open(index_dir)
    app = FastAPI(title="statevault offline index (read-only Qdrant API)", docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.index = index
    labels = sorted({_snapshot_label(index.collection(n)) for n in index.names()})
    index_label = ", ".join(labels) or "none"

    def read_only_message(path: str) -> str:
        name = re.match(r"^/collections/([^/]+)", path)
        real = index.resolve(name.group(1)) if name else None
        if real is not None:
            coll = index.collection(real)
            return (f"statevault offline index is read-only (degraded mode): snapshot {coll.snapshot_id} "
                    f"taken at {coll.snapshot_time}")
        return f"statevault offline index is read-only (degraded mode): snapshot {index_label}"

    @app.middleware("http")
    async def snapshot_header(request: Request, call_next):
        response = await call_next(request)
        response.headers.setdefault(SNAPSHOT_HEADER.lower(), index_label)
        return response

    @app.exception_handler(StatevaultError)
    async def statevault_error(request: Request, exc: StatevaultError):
        if isinstance(exc, ReadOnlyError):
            return _error(exc.message, 403)
        if isinstance(exc, NotFoundError):
            return _error(exc.message, 404)
        if isinstance(exc, UsageError):
            return _error(exc.message, 400)
        if isinstance(exc, VerificationError):
            log.error("offline index damaged: %s", exc.message)
            return _error(f"Service unavailable: {exc.message}", 503)
        return _error(f"Service internal error: {exc.message}", 500)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        details = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
        return _error(f"Format error in JSON body: {details}", 400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            return _error(read_only_message(request.url.path), 403)
        return _error(f"Not found: {request.method} {request.url.path} is not served by the statevault offline "
                      "index (degraded mode)", 404 if exc.status_code in (404, 405) else exc.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.exception("offline serve: unexpected error on %s %s", request.method, request.url.path)
        return _error(f"Service internal error: {type(exc).__name__}: {exc}", 500)

    @app.get("/")
    def root(request: Request):
        return _json({"title": "qdrant - vector search engine",
                      "version": server_version(request.headers.get("user-agent", "")),
                      "commit": None, "statevault": {"mode": "offline read-only (degraded)", "snapshots": labels}})

    for probe in ("/healthz", "/livez", "/readyz"):
        app.add_api_route(probe, lambda p=probe: PlainTextResponse(f"{p[1:]} check passed"), methods=["GET"])

    @app.get("/collections")
    def list_collections():
        started = time.perf_counter()
        return _ok({"collections": [{"name": n} for n in index.names()]}, started)

    @app.get("/aliases")
    def list_aliases():
        started = time.perf_counter()
        return _ok({"aliases": [{"alias_name": a, "collection_name": c} for a, c in index.aliases()]}, started)

    @app.get("/collections/{name}")
    def get_collection(name: str):
        started = time.perf_counter()
        coll = index.collection(name)
        return _ok(collection_info(coll), started, coll)

    @app.get("/collections/{name}/exists")
    def collection_exists(name: str):
        return _ok({"exists": index.resolve(name) is not None}, time.perf_counter())

    @app.get("/collections/{name}/aliases")
    def collection_aliases(name: str):
        started = time.perf_counter()
        coll = index.collection(name)
        return _ok({"aliases": [{"alias_name": a, "collection_name": c} for a, c in index.aliases()
                                if c == coll.name]}, started, coll)

    @app.get("/collections/{name}/points/{point_id}")
    def get_point(name: str, point_id: str):
        started = time.perf_counter()
        coll = index.collection(name)
        pid = normalize_point_id(int(point_id) if point_id.isdigit() else point_id)
        found = coll.retrieve([pid], with_payload=True, with_vectors=True)
        if not found:
            raise NotFoundError(f"Not found: No point with id {pid} found")
        return _ok(found[0], started, coll)

    @app.post("/collections/{name}/points/query")
    def query_points(name: str, body: Any = Body(None)):
        started = time.perf_counter()
        coll = index.collection(name)
        return _ok({"points": rq.run_searches(coll, [rq.parse_query(coll, body)])[0]}, started, coll)

    @app.post("/collections/{name}/points/query/batch")
    def query_batch(name: str, body: Any = Body(None)):
        started = time.perf_counter()
        coll = index.collection(name)
        req = rq.request_object(body, {"searches"}, "query batch request")
        searches = [rq.parse_query(coll, s) for s in _list_field(req, "searches")]
        return _ok([{"points": points} for points in rq.run_searches(coll, searches)], started, coll)

    @app.post("/collections/{name}/points/search")
    def search_points(name: str, body: Any = Body(None)):
        started = time.perf_counter()
        coll = index.collection(name)
        return _ok(rq.run_searches(coll, [rq.parse_search(body)])[0], started, coll)

    @app.post("/collections/{name}/points/search/batch")
    def search_batch(name: str, body: Any = Body(None)):
        started = time.perf_counter()
        coll = index.collection(name)
        req = rq.request_object(body, {"searches"}, "search batch request")
        return _ok(rq.run_searches(coll, [rq.parse_search(s) for s in _list_field(req, "searches")]), started, coll)

    @app.post("/collections/{name}/points/scroll")
    def scroll_points(name: str, body: Any = Body(None)):
        started = time.perf_counter()
        coll = index.collection(name)
        return _ok(rq.run_scroll(coll, body), started, coll)

    @app.post("/collections/{name}/points/count")
    def count_points(name: str, body: Any = Body(None)):
        started = time.perf_counter()
        coll = index.collection(name)
        return _ok(rq.run_count(coll, body), started, coll)

    @app.post("/collections/{name}/points")
    def retrieve_points(name: str, body: Any = Body(None)):
        started = time.perf_counter()
        coll = index.collection(name)
        return _ok(rq.run_retrieve(coll, body), started, coll)

    @app.api_route("/{path:path}", methods=["POST", "PUT", "PATCH", "DELETE"])
    def refuse_write(path: str, request: Request):
        tail = path.rstrip("/").rsplit("/", 2)
        if request.method == "POST" and re.match(r"^collections/[^/]+/", path) and \
                any(part in UNSUPPORTED_READS for part in tail):
            raise UsageError(f"Bad request: /{path} is not supported {rq.DEGRADED}; "
                             "served: query, search, scroll, count, retrieve")
        raise ReadOnlyError(read_only_message("/" + path))

    return app


def _list_field(req: dict, name: str) -> list:
    if not isinstance(req.get(name), list):
        raise UsageError(f"Format error in JSON body: missing field `{name}`")
    return req[name]


def run_server(index_dir: str | Path, host: str = "127.0.0.1", port: int = 6333, *, log_level: str = "info") -> None:
    """Serve the offline index until interrupted (uvicorn handles SIGINT/SIGTERM)."""
    import uvicorn

    uvicorn.Server(uvicorn.Config(create_app(index_dir), host=host, port=port, log_level=log_level)).run()
