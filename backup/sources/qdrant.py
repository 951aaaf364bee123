"""Qdrant source: every point of each collection, scrolled page by page, as JSON lines.

Items: one per collection (`collections` in the config, default all), kind "collection", format
"qdrant-points-jsonl-v2", schema = the collection config (backup/sources/qdrant_config.py). With
`offline_index` on, the same scroll also feeds the offline vector index (backup/offline_build.py).

The record format, its digest and the local-mode canonical vectors: backup/sources/qdrant_records.py.

Order: point id order, as plain scroll returns it: integer ids ascending, then UUIDs ascending
(byte order = text order). The Qdrant docs state scroll results are sorted by id; qdrant-client's
local mode sorts the same way (tests check it). The order only matters for dedup; the digest is
order-independent.

Consistency: Qdrant has no read snapshot. cut_time is taken before the first scroll; points
written while the backup runs may or may not be in it (each point is either whole or absent,
and no id appears twice because scroll pages by id). Pause writers for a strict cut.
"""
from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from typing import Any, Iterator

from backup.sources.base import ItemSpec
from backup.sources.qdrant_config import collection_schema, vector_layout
from backup.sources.qdrant_local import iter_local_pages, local_collection
from backup.sources.qdrant_records import FORMAT, PointEncoder
from backup.sources.qdrant_rest import iter_rest_pages, rest_api
from snapshots.errors import NotFoundError, SourceError, StatevaultError
from snapshots.manifest import utcnow
from snapshots.settings import redact_url

ITEM_KIND = "collection"
PAGE_SIZE = 512
STAGING_MARK = "__sv_"  # restore/targets/qdrant.py names its staging collections <name>__sv_<stamp>
# read local-mode collections directly (qdrant_local.py); False reads them through `scroll`:
# bench_qdrant.py uses it to measure the encoder's cost over the scroll alone
LOCAL_DIRECT_READ = True
# read a server's pages through its REST scroll parsed with orjson (qdrant_rest.py); False reads
# them through qdrant-client's `scroll` (pydantic models), as the bench's reference does
REST_DIRECT_READ = True


# ---- clients -----------------------------------------------------------------------------

class QdrantHandle:
    """A client plus how to let go of it. Local mode allows one client per path and process
    (it takes a file lock), so handles on the same path share one client, closed with the last."""

    def __init__(self, client: Any, local: bool, key: str | None):
        self.client, self.local, self._key = client, local, key
        self._closed = False

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._key is None:
            self.client.close()
            return
        with _LOCAL_LOCK:
            entry = _LOCAL_CLIENTS.get(self._key)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] <= 0:
                del _LOCAL_CLIENTS[self._key]
                entry[0].close()


_LOCAL_CLIENTS: dict[str, list] = {}  # realpath -> [client, handles open]
LOCAL_META = "meta.json"  # qdrant_client.local.qdrant_local.META_INFO_FILENAME: written when a store is created
_LOCAL_LOCK = threading.Lock()


def connect_qdrant(url: str | None = None, path: str | None = None, api_key: str | None = None,
                   timeout: int = 60, *, existing: bool = False) -> QdrantHandle:
    """Open a client on a server (`url`) or a local-mode directory (`path`). Connecting is lazy
    for servers: the first call reports an unreachable one (as a retryable SourceError).

    Local mode creates the directory of a store it opens: `existing=True` (reading a store:
    backup, verify) refuses a `path` that is not a directory instead (SourceError naming it),
    so a typo in the path fails rather than backing up a new empty store it made."""
    from qdrant_client import QdrantClient

    if bool(url) == bool(path):
        raise SourceError("a Qdrant target needs exactly one of url or path")
    if url:
        with qdrant_call(f"connect to {redact_url(url)}"):
            client = QdrantClient(url=url, api_key=api_key, timeout=timeout, check_compatibility=False)
        return QdrantHandle(client, False, None)
    key = os.path.realpath(str(path))
    with _LOCAL_LOCK:
        entry = _LOCAL_CLIENTS.get(key)
        if entry is None:
            if existing and not os.path.isdir(key):
                what = "it is not a directory" if os.path.exists(key) else "the directory does not exist"
                raise SourceError(f"no Qdrant local store at {path}: {what}",
                                  hint="Check the source's `path` in the config (or its STATEVAULT_SOURCES__"
                                       "<NAME>__PATH override); nothing was created there.")
            with qdrant_call(f"open local Qdrant at {path}"):
                entry = _LOCAL_CLIENTS[key] = [QdrantClient(path=str(path)), 0]
        entry[1] += 1
        return QdrantHandle(entry[0], True, key)


def local_store_exists(path: str) -> bool:
    """Whether `path` holds a local-mode store (its meta.json): opening a directory without one
    writes it (and the directory), so a read-only look at a store that is not there must not open it."""
    return os.path.isfile(os.path.join(str(path), LOCAL_META))


def translate_qdrant_error(exc: BaseException, what: str) -> StatevaultError:
    """Map qdrant-client / httpx exceptions to ours; an unknown one is a non-retryable SourceError."""
    if isinstance(exc, StatevaultError):
        return exc
    from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

    if isinstance(exc, UnexpectedResponse):
        status = exc.status_code or 0
        try:
            detail = exc.structured().get("status", {}).get("error") or exc.reason_phrase
        except Exception:  # noqa: BLE001 - a non-JSON body: fall back to the reason phrase
            detail = exc.reason_phrase
        if status in (401, 403):
            return SourceError(f"{what}: access denied by Qdrant ({status})",
                               hint="Check api_key in the source config (or STATEVAULT_SOURCES__NAME__API_KEY).")
        if status == 404:
            return NotFoundError(f"{what}: {detail}")
        if status == 429 or status >= 500:
            return SourceError(f"{what}: Qdrant answered {status} ({detail})", retryable=True)
        return SourceError(f"{what}: Qdrant refused the request ({status}): {detail}")
    if isinstance(exc, ResponseHandlingException):
        cause = getattr(exc, "source", None)
        return SourceError(f"{what}: cannot reach Qdrant ({type(cause).__name__}: {cause})", retryable=True)
    try:
        import httpx

        if isinstance(exc, httpx.TransportError):
            return SourceError(f"{what}: cannot reach Qdrant ({type(exc).__name__})", retryable=True)
    except ImportError:  # pragma: no cover - httpx comes with qdrant-client
        pass
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return SourceError(f"{what}: cannot reach Qdrant ({type(exc).__name__})", retryable=True)
    text = str(exc)
    if isinstance(exc, RuntimeError) and "already accessed by another instance" in text:
        return SourceError(f"{what}: the local-mode storage is open in another process", retryable=True,
                           hint="qdrant-client local mode allows one process per directory; wait for the "
                                "other one or use a Qdrant server.")
    if isinstance(exc, ValueError) and "not found" in text:
        return NotFoundError(f"{what}: {text}")
    return SourceError(f"{what}: unexpected {type(exc).__name__}: {text}")


@contextmanager
def qdrant_call(what: str) -> Iterator[None]:
    try:
        yield
    except StatevaultError:
        raise
    except Exception as exc:  # noqa: BLE001 - translated, never swallowed
        raise translate_qdrant_error(exc, what) from exc


# ---- pages -------------------------------------------------------------------------------

def iter_pages(client: Any, name: str, page_size: int = PAGE_SIZE) -> Iterator[list]:
    """Scroll pages of a collection (or alias), in point id order, vectors and payloads included.
    In local mode, read from the collection itself (qdrant_local.py: one sort of the ids, not
    one per page); from a server, through its REST scroll without pydantic (qdrant_rest.py);
    either unless this qdrant-client's internals are not the ones they know."""
    what = f"scroll collection {name!r}"
    with qdrant_call(what):
        collection = local_collection(client, name) if LOCAL_DIRECT_READ else None
    if collection is not None:
        yield from iter_local_pages(collection, page_size)
        return
    api = rest_api(client) if REST_DIRECT_READ else None
    pages = iter_rest_pages(api, name, page_size) if api is not None else _scroll_pages(client, name, page_size)
    while True:
        with qdrant_call(what):
            page = next(pages, None)
        if page is None:
            return
        yield page


def _scroll_pages(client: Any, name: str, page_size: int) -> Iterator[list]:
    offset = None
    while True:
        points, offset = client.scroll(name, limit=page_size, offset=offset, with_payload=True, with_vectors=True)
        if points:
            yield points
        if offset is None:
            return


def iter_collection_records(client: Any, name: str, schema: dict, local: bool,
                            page_size: int = PAGE_SIZE, fmt: str = FORMAT) -> Iterator[bytes]:
    """The collection's records in `fmt` (see above), page by page."""
    encoder = PointEncoder(vector_layout(schema), local, fmt)
    for page in iter_pages(client, name, page_size):
        yield from encoder.encode(page).lines


def list_collection_names(client: Any) -> list[str]:
    """Every collection by its live name: a collection statevault swapped in is reached through
    an alias (`kb` -> `kb__sv_...`), so that alias is the name; left-over staging collections
    no alias points at are not listed."""
    with qdrant_call("list collections"):
        physical = [c.name for c in client.get_collections().collections]
        aliases = {a.alias_name: a.collection_name for a in client.get_aliases().aliases}
    names = {p for p in physical if STAGING_MARK not in p}
    names |= {alias for alias, target in aliases.items() if STAGING_MARK in target}
    return sorted(names)


# ---- the source --------------------------------------------------------------------------

class QdrantCut:
    def __init__(self, source: "QdrantSource", handle: QdrantHandle, names: list[str], source_info: dict):
        self._source, self._handle, self._names = source, handle, names
        self.cut_time = utcnow()
        self.source_info = source_info

    def items(self) -> list[ItemSpec]:
        specs = []
        for name in self._names:
            with qdrant_call(f"read config of collection {name!r}"):
                info = self._handle.client.get_collection(name)
            specs.append(ItemSpec(name, ITEM_KIND, FORMAT, collection_schema(info, local=self._handle.local)))
        return specs

    def records(self, item: ItemSpec) -> Iterator[bytes]:
        return iter_collection_records(self._handle.client, item.name, item.schema, self._handle.local,
                                       fmt=item.format)

    def backup_item(self, item: ItemSpec, writer) -> None:
        """Write the collection and, with offline_index on, its offline index from the same pages."""
        from backup.offline_build import OfflineIndexBuilder

        encoder = PointEncoder(vector_layout(item.schema), self._handle.local, item.format)
        builder = OfflineIndexBuilder(writer, item.name, item.schema) if self._source.settings.offline_index else None
        with writer.item(item.name, item.kind, item.format, item.schema) as w:
            for page in iter_pages(self._handle.client, item.name):
                encoded = encoder.encode(page, with_points=builder is not None)
                w.add_many(encoded.lines)
                if builder is not None:
                    builder.add_page(encoded)
        if builder is not None:
            builder.close()


class QdrantSource:
    kind = "qdrant"

    def __init__(self, settings):
        self.settings = settings

    @contextmanager
    def open(self, only: list[str] | None = None) -> Iterator[QdrantCut]:
        s = self.settings
        handle = connect_qdrant(s.url, s.path, s.api_key, existing=True)
        try:
            client = handle.client
            if handle.local:
                import importlib.metadata

                info = {"mode": "local", "path": str(s.path),
                        "qdrant_client": importlib.metadata.version("qdrant-client")}
            else:
                with qdrant_call(f"reach Qdrant at {redact_url(s.url)}"):
                    version = client.info().version
                info = {"mode": "server", "url": redact_url(s.url), "server_version": version}
            names = self._select(client, only)
            yield QdrantCut(self, handle, names, info)
        finally:
            handle.close()

    def _select(self, client: Any, only: list[str] | None) -> list[str]:
        configured = list(dict.fromkeys(self.settings.collections))
        if configured:
            for name in configured:
                if not _exists(client, name):  # get_collection resolves aliases too
                    raise NotFoundError(f"collection {name!r} (in the source config) does not exist")
            names = configured
        else:
            names = list_collection_names(client)
        if only:
            # any existing collection or alias may be named (a pre-restore snapshot covers
            # whatever a restore is about to overwrite, configured or not)
            unknown = [o for o in only if o not in names and not _exists(client, o)]
            if unknown:
                raise NotFoundError(f"no collection {', '.join(map(repr, unknown))} in this source "
                                    f"(collections: {', '.join(names) or 'none'})")
            names = sorted(set(only))
        return names


def _exists(client: Any, name: str) -> bool:
    try:
        with qdrant_call(f"find collection {name!r}"):
            client.get_collection(name)
    except NotFoundError:
        return False
    return True
