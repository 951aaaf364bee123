"""Qdrant source: every point of each collection, scrolled page by page, as JSON lines.

Items: one per collection (`collections` in the config, default all), kind "collection", format
"qdrant-points-jsonl-v2", schema = the collection config (backup/sources/qdrant_config.py). With
`offline_index` on, the same scroll also feeds the offline vector index (backup/offline_build.py).

Record format "qdrant-points-jsonl-v2": one JSON object per point, newline-terminated, UTF-8,
object keys sorted at every level (so the top level is id, payload, vector):

    {"id":42,"payload":{"lang":"en","tags":["a","b"]},"vector":{"image":"AAAAPwAAgD4=","text":"mpkZP83MTD8="}}

- id: an unsigned integer, or a UUID as lowercase hyphenated text.
- payload: the point's payload (an object, {} when it has none), as Qdrant returns it.
- vector: one value for a collection whose only vector is one unnamed dense vector; otherwise
  an object {name: value} holding the vectors the point has (the unnamed dense vector under ""),
  {} for a point without vectors. A dense vector is the base64 (RFC 4648, padded) of its
  float32 components, little-endian; a multivector the same of its rows one after another
  (the row size is in the collection config); a sparse vector {"indices": [...], "values":
  [...]} with each value a float32 written as the shortest decimal that reads back as the same
  float32 (orjson's float32 output: 0.1, not 0.10000000149011612).
  Decode a dense vector with `numpy.frombuffer(base64.b64decode(v), "<f4")`; `decode_record`
  does it for every kind.

"qdrant-points-jsonl-v1" (snapshots before v2; still restored and verified) is the same except
that dense vectors and multivector rows are lists of float32 shortest decimals. v2 stores the
exact bits, and costs half: 2048 base64 characters for a 384-dim vector against ~3.6 KB of
decimals, which were half the backup's CPU time (formatting 7.7M floats per 20k points) and
compress no better (bench/README.md).

Order: point id order, as plain scroll returns it: integer ids ascending, then UUIDs ascending
(byte order = text order). The Qdrant docs state scroll results are sorted by id; qdrant-client's
local mode sorts the same way (tests check it). The order only matters for dedup; the digest is
order-independent.

Digest: over the records as written. Restoring a record and reading it back reproduces the same
bytes: a Qdrant server stores a Cosine vector whose squared length is within 1e-6 of 1 as given
(lib/segment spaces `is_length_zero_or_normalized`), and every stored Cosine vector is such. The
exception is qdrant-client's local mode, which re-normalises every Cosine vector on every upsert
and load (`v / np.linalg.norm(v)` in float32), changing the last bit of ~30% of already-unit
vectors. So records read from a *local-mode* Qdrant carry each Cosine vector in its canonical
local form: the fixed point of that normalisation (or the smallest member, by bytes, of the
2-cycle it falls into). A local-mode store then round-trips bit for bit, and so does a snapshot
of it restored onto a server. A server snapshot restored into local mode does not (the local
re-normalisation changes low bits); restore/targets/qdrant.py says so in its plan notes.

Consistency: Qdrant has no read snapshot. cut_time is taken before the first scroll; points
written while the backup runs may or may not be in it (each point is either whole or absent,
and no id appears twice because scroll pages by id). Pause writers for a strict cut.
"""
from __future__ import annotations

import base64
import binascii
import functools
import os
import struct
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import orjson

from backup.sources.base import ItemSpec
from backup.sources.qdrant_config import VectorLayout, collection_schema, vector_layout
from backup.sources.qdrant_local import iter_local_pages, local_collection
from snapshots.errors import NotFoundError, SourceError, StatevaultError
from snapshots.manifest import utcnow
from snapshots.settings import redact_url

FORMAT_V1 = "qdrant-points-jsonl-v1"
FORMAT = "qdrant-points-jsonl-v2"
FORMATS = (FORMAT_V1, FORMAT)
ITEM_KIND = "collection"
PAGE_SIZE = 512
STAGING_MARK = "__sv_"  # restore/targets/qdrant.py names its staging collections <name>__sv_<stamp>
_NUMPY = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_SORT_KEYS
_LOCAL_EPSILON = 1.1920929e-7  # qdrant_client.local.local_collection.EPSILON
# read local-mode collections directly (qdrant_local.py); False reads them through `scroll`, as a
# server is read: bench_qdrant.py uses it to measure the encoder's cost over the scroll alone
LOCAL_DIRECT_READ = True


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
_LOCAL_LOCK = threading.Lock()


def connect_qdrant(url: str | None = None, path: str | None = None, api_key: str | None = None,
                   timeout: int = 60) -> QdrantHandle:
    """Open a client on a server (`url`) or a local-mode directory (`path`). Connecting is lazy
    for servers: the first call reports an unreachable one (as a retryable SourceError)."""
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
            with qdrant_call(f"open local Qdrant at {path}"):
                entry = _LOCAL_CLIENTS[key] = [QdrantClient(path=str(path)), 0]
        entry[1] += 1
        return QdrantHandle(entry[0], True, key)


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


# ---- records -----------------------------------------------------------------------------

def _local_normalize(v: np.ndarray) -> np.ndarray:
    """qdrant-client local mode's Cosine preprocessing of a dense vector, verbatim."""
    norm = np.linalg.norm(v)
    return v / norm if norm > _LOCAL_EPSILON else v


def _local_normalize_multi(m: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(m, axis=-1)[:, np.newaxis]
    return m / np.where(norm != 0.0, norm, _LOCAL_EPSILON)


def local_canonical(v: np.ndarray, normalize=_local_normalize, limit: int = 200) -> np.ndarray:
    """The fixed point of local mode's normalisation reached from `v` (or the smallest cycle
    member by bytes). Equal for v and normalize(v), so a local round trip reads back the same."""
    seen = {v.tobytes(): 0}
    cur = v
    for step in range(1, limit):
        nxt = normalize(cur)
        key = nxt.tobytes()
        if key in seen:
            if np.array_equal(nxt, cur):
                return cur
            first = seen[key]
            cycle = min(k for k, i in seen.items() if i >= first)
            return np.frombuffer(cycle, dtype=np.float32).reshape(v.shape).copy()
        seen[key] = step
        cur = nxt
    return cur


def _row_norms(mat: np.ndarray) -> np.ndarray:
    """np.linalg.norm of each row, bit for bit: a stack of 1xn @ nx1 products is computed by the
    same BLAS dot that `v.dot(v)` (inside np.linalg.norm of a 1-D array) uses; a sum or einsum
    is not (it rounds differently). tests/unit/test_qdrant_canonical.py checks the equality."""
    return np.sqrt(np.matmul(mat[:, np.newaxis, :], mat[:, :, np.newaxis])[:, 0, 0])


def local_canonical_rows(mat: np.ndarray, rows: np.ndarray, steps: int = 4) -> None:
    """`local_canonical` of mat[i] for each i in `rows`, in place, with a few whole-matrix
    normalisation passes: a row that reaches its fixed point within `steps` passes has the
    fixed point local_canonical returns (a row that cycles never reaches one); the rest go
    through local_canonical one by one."""
    todo = np.asarray(rows, dtype=np.intp)
    cur = mat[todo]
    for _ in range(steps):
        if not len(todo):
            return
        norms = _row_norms(cur)
        big = norms > np.float32(_LOCAL_EPSILON)
        nxt = cur.copy()
        nxt[big] = cur[big] / norms[big, np.newaxis]
        fixed = (nxt == cur).all(axis=1)
        mat[todo[fixed]] = cur[fixed]
        todo, cur = todo[~fixed], nxt[~fixed]
    for i in todo:
        mat[i] = local_canonical(mat[i])


@dataclass
class EncodedPage:
    lines: list[bytes]                      # collection records
    point_lines: list[bytes]                # offline {"id","payload"} lines (empty unless asked)
    dense: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (n, size) float32; NaN rows = absent


def _b64(values: np.ndarray) -> str:
    return binascii.b2a_base64(values.astype("<f4", copy=False), newline=False).decode("ascii")


def _b64_rows(mat: np.ndarray) -> list[bytes]:
    """The base64 text of each row of a float32 matrix (as `_b64` gives it). When a row is a
    whole number of 3-byte groups (size divisible by 3: 384, 768, 1536, ...), one encoding of
    the whole matrix, cut every row."""
    mat = np.ascontiguousarray(mat, dtype="<f4")
    width = mat.shape[1] * 4
    if width % 3:
        return [binascii.b2a_base64(row, newline=False) for row in mat]
    text = binascii.b2a_base64(mat, newline=False)
    step = width // 3 * 4
    return [text[i:i + step] for i in range(0, len(text), step)]


@functools.lru_cache(maxsize=32)
def _row_packer(size: int):
    return struct.Struct(f"={size}f").pack


def float32_matrix(rows: list, size: int) -> np.ndarray:
    """Rows of `size` Python floats as a writable (len(rows), size) float32 matrix.

    struct packs a row at ~21 ns a float where np.array(rows, float32) takes ~38: this is
    most of what the encoder adds to a local-mode scroll. Both round a double to float32 the
    same way (a C cast); anything struct refuses (a row of another length, a value beyond
    float32's range, not a number) goes through np.array as before, for the same result or
    ValueError."""
    if rows and isinstance(rows[0], np.ndarray):  # local mode's stored float32 rows (qdrant_local.py)
        return np.array(rows, dtype=np.float32).reshape(len(rows), size)
    pack = _row_packer(size)
    try:
        data = bytearray().join([pack(*r) for r in rows])
    except (struct.error, OverflowError, TypeError):
        return np.array(rows, dtype=np.float32).reshape(len(rows), size)
    return np.frombuffer(data, dtype=np.float32).reshape(len(rows), size)


class PointEncoder:
    """Turns scroll pages into records of `fmt` (FORMATS); dense vectors go through one float32
    matrix per page."""

    def __init__(self, layout: VectorLayout, local: bool, fmt: str = FORMAT):
        if fmt not in FORMATS:
            raise SourceError(f"unknown Qdrant record format {fmt!r} (this statevault knows {', '.join(FORMATS)})")
        self.layout, self.local = layout, local
        self._cosine_multi = {n for n, (_, d) in layout.multi.items() if d == "Cosine"}
        self._packed = fmt != FORMAT_V1  # vectors as base64 float32, else lists of numbers

    def _matrix(self, rows: list, size: int, name: str, cosine: bool) -> tuple[np.ndarray, list[bool]]:
        present = [r is not None for r in rows]
        n = len(rows)
        try:
            if all(present):
                mat = float32_matrix(rows, size)
            else:
                mat = np.full((n, size), np.nan, dtype=np.float32)
                idx = [i for i, p in enumerate(present) if p]
                if idx:
                    mat[idx] = float32_matrix([rows[i] for i in idx], size)
        except ValueError:
            raise SourceError(f"vector {name!r}: a point's vector does not have the configured size {size}") from None
        if cosine and self.local:
            local_canonical_rows(mat, np.flatnonzero(present))
        return mat, present

    def encode(self, points: list, with_points: bool = False) -> EncodedPage:
        lay = self.layout
        dense: dict[str, np.ndarray] = {}
        present: dict[str, list[bool]] = {}
        for name, (size, dist) in lay.dense.items():
            if lay.unnamed:
                rows = [p.vector if not isinstance(p.vector, dict) else p.vector.get("") for p in points]
            else:
                rows = [(p.vector or {}).get(name) for p in points]
            dense[name], present[name] = self._matrix(rows, size, name, dist == "Cosine")
        simple = lay.unnamed and not lay.sparse and not lay.multi
        packed = self._packed
        rows = {name: _b64_rows(mat) if packed else mat for name, mat in dense.items()}
        lines, point_lines = [], []
        for i, p in enumerate(points):
            head = b'{"id":' + orjson.dumps(p.id) + b',"payload":' + orjson.dumps(p.payload or {}, option=_NUMPY)
            if simple and packed:  # the common case: the base64 text goes in as it is
                vector = b'"' + rows[""][i] + b'"' if present[""][i] else b"{}"
            else:
                if simple:
                    vec: Any = rows[""][i] if present[""][i] else {}
                else:
                    vec = {name: rows[name][i].decode("ascii") if packed else rows[name][i]
                           for name in rows if present[name][i]}
                    if isinstance(p.vector, dict):
                        self._add_other(vec, p.vector)
                vector = orjson.dumps(vec, option=_NUMPY)
            lines.append(head + b',"vector":' + vector + b"}\n")
            if with_points:
                point_lines.append(head + b"}\n")
        return EncodedPage(lines, point_lines, dense)

    def _add_other(self, vec: dict, raw: dict) -> None:
        for name in self.layout.sparse:
            sv = raw.get(name)
            if sv is not None:
                vec[name] = {"indices": list(sv.indices), "values": np.asarray(sv.values, dtype=np.float32)}
        for name in self.layout.multi:
            mv = raw.get(name)
            if mv is not None:
                m = np.asarray(mv, dtype=np.float32)
                if self.local and name in self._cosine_multi:
                    m = local_canonical(m, _local_normalize_multi)
                vec[name] = _b64(m) if self._packed else m


def decode_record(record: bytes, layout: VectorLayout, fmt: str = FORMAT) -> dict:
    """A record of `fmt` as {"id", "payload", "vector"} with every vector as numbers (lists of
    floats, lists of rows for a multivector), whatever the format: what an upsert takes."""
    rec = orjson.loads(record)
    if fmt == FORMAT_V1:
        return rec
    vec = rec["vector"]
    if isinstance(vec, str):
        rec["vector"] = np.frombuffer(base64.b64decode(vec), "<f4").tolist()
    elif vec:
        for name, value in vec.items():
            if isinstance(value, str):
                values = np.frombuffer(base64.b64decode(value), "<f4")
                if name in layout.multi:
                    values = values.reshape(-1, layout.multi[name][0])
                vec[name] = values.tolist()
    return rec


def iter_pages(client: Any, name: str, page_size: int = PAGE_SIZE) -> Iterator[list]:
    """Scroll pages of a collection (or alias), in point id order, vectors and payloads included.
    In local mode, read from the collection itself (qdrant_local.py: one sort of the ids, not
    one per page), unless this qdrant-client's internals are not the ones it knows."""
    with qdrant_call(f"scroll collection {name!r}"):
        collection = local_collection(client, name) if LOCAL_DIRECT_READ else None
    if collection is not None:
        yield from iter_local_pages(collection, page_size)
        return
    offset = None
    while True:
        with qdrant_call(f"scroll collection {name!r}"):
            points, offset = client.scroll(name, limit=page_size, offset=offset, with_payload=True,
                                           with_vectors=True)
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
        handle = connect_qdrant(s.url, s.path, s.api_key)
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
