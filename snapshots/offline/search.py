"""Reading the offline vector index: exact search, scroll, count and retrieve with Qdrant's semantics.

`OfflineIndex.open(dir)` finds the collections laid out by `write_offline_collection` (see
layout.py); `OfflineCollection` memory-maps their matrices and answers queries the way Qdrant does:

- search: Cosine and Dot scores are higher-better (the query is normalised for Cosine); Euclid and
  Manhattan report the distance, lower-better, and `score_threshold` is then a maximum distance.
  The threshold is strict, as in Qdrant (a score equal to it is dropped). `offset` skips that many
  of the best. Ties go to the lower row. Points without the searched named vector never appear.
- scroll: ordered by point id, integer ids ascending first, then UUIDs ascending (by their text,
  which is their byte order): Qdrant's order. `offset` is the first id to return (inclusive) and
  the second result is the next page's offset, or None.
- retrieve: in request order, duplicates and unknown ids dropped.
Payloads and ids are loaded on first use and kept in memory; masks of recent filters are cached.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import orjson

from snapshots.errors import CorruptChunkError, ManifestError, NotFoundError, UsageError
from snapshots.offline.filters import as_plain_filter, filter_mask
from snapshots.offline.layout import META_FILE, POINTS_FILE, PointId, normalize_point_id, read_meta, verify_files
from snapshots.offline.payload_paths import compile_payload_selector
from snapshots.offline import topk
from snapshots.offline.topk import HIGHER_IS_BETTER, RowStats, prepare_queries, row_stats

MASK_CACHE_SIZE = 16


class OfflineIndex:
    """The collections of one offline index directory (DIR/<collection>/meta.json ...)."""

    def __init__(self, root: Path, collections: dict[str, "OfflineCollection"]):
        self.root = root
        self._collections = collections
        self._aliases = {alias: name for name, c in collections.items() for alias in c.aliases}

    @classmethod
    def open(cls, dir: str | Path) -> "OfflineIndex":
        """The index laid out in `dir`; a NotFoundError (exit 2) pointing at `offline pull` when
        `dir` is missing or holds no collection (an empty index would answer every agent with
        "no such collection", worse than the connection error that makes it fail over)."""
        root = Path(dir)
        hint = (f"Run `statevault offline pull --dir {root}` first "
                "(with --source S when several Qdrant sources are configured).")
        if not root.is_dir():
            raise NotFoundError(f"offline index directory {root} does not exist", hint=hint)
        collections = {}
        for child in sorted(root.iterdir()):
            if child.name.startswith(".") or not (child / META_FILE).is_file():
                continue
            coll = OfflineCollection.open(child)
            if coll.name != child.name:
                raise ManifestError(f"offline index: {child}/meta.json names collection {coll.name!r}")
            collections[coll.name] = coll
        if not collections:
            raise NotFoundError(f"offline index directory {root} holds no collection (no <collection>/meta.json)",
                                hint=hint)
        return cls(root, collections)

    def names(self) -> list[str]:
        return list(self._collections)

    def aliases(self) -> list[tuple[str, str]]:
        """(alias, collection) pairs, sorted by alias."""
        return sorted(self._aliases.items())

    def resolve(self, name: str) -> str | None:
        if name in self._collections:
            return name
        return self._aliases.get(name)

    def collection(self, name: str) -> "OfflineCollection":
        real = self.resolve(name)
        if real is None:
            # the message is Qdrant's (offline serve answers it); the hint is for the CLI
            raise NotFoundError(f"Not found: Collection `{name}` doesn't exist!",
                                hint=f"The offline index in {self.root} has: {', '.join(self.names())}. "
                                     f"`statevault offline pull --dir {self.root} --collection {name}` "
                                     "adds a collection of the snapshot.")
        return self._collections[real]


class OfflineCollection:
    """One collection of the offline index; safe to share between threads."""

    def __init__(self, coll_dir: Path, meta: dict):
        self.dir = Path(coll_dir)
        self.meta = meta
        self._lock = threading.RLock()
        self._matrices: dict[str, np.ndarray] = {}
        self._stats: dict[str, RowStats | None] = {}
        self._presence: dict[str, np.ndarray] = {}
        self._ids: list[PointId] | None = None
        self._payloads: list[dict] | None = None
        self._order: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._masks: OrderedDict[bytes, np.ndarray] = OrderedDict()

    @classmethod
    def open(cls, coll_dir: str | Path) -> "OfflineCollection":
        return cls(Path(coll_dir), read_meta(Path(coll_dir)))

    name = property(lambda self: self.meta["collection"])
    snapshot_id = property(lambda self: str(self.meta.get("snapshot_id", "")))
    snapshot_time = property(lambda self: str(self.meta.get("snapshot_time", "")))
    points_count = property(lambda self: int(self.meta["points_count"]))
    vectors = property(lambda self: self.meta["vectors"])
    sparse_vectors = property(lambda self: list(self.meta.get("sparse_vectors") or []))
    aliases = property(lambda self: list(self.meta.get("aliases") or []))

    def verify(self) -> None:
        """Re-hash every file against meta.json and check the matrices' shapes; raise naming the bad file."""
        verify_files(self.dir, self.meta)
        for name in self.vectors:
            self.matrix(name)

    # -- lazily loaded data --------------------------------------------------------------------

    def matrix(self, name: str) -> np.ndarray:
        """The (points_count, size) float32 matrix of a vector, memory-mapped."""
        with self._lock:
            if name not in self._matrices:
                spec = self.vectors[name]
                path = self.dir / spec["file"]
                chunk_id = f"{self.name}/{spec['file']}"
                shape = (self.points_count, spec["size"])
                try:
                    arr = np.load(path, mmap_mode="r") if self.points_count else np.load(path)
                except (OSError, ValueError) as exc:
                    raise CorruptChunkError(f"offline index file {chunk_id} is unreadable: {exc}", chunk_id=chunk_id) from None
                if arr.dtype != np.dtype("<f4") or arr.shape != shape or not arr.flags.c_contiguous:
                    raise CorruptChunkError(f"offline index file {chunk_id} holds {arr.dtype} {arr.shape}, "
                                            f"expected float32 {shape}", chunk_id=chunk_id)
                self._matrices[name] = arr
            return self._matrices[name]

    def row_stats(self, name: str) -> RowStats | None:
        """What the exact search's error bounds need (topk.row_stats: a reference point from a
        sample of rows, and one pass for a per-row norm), computed on first use and kept. Nothing
        is stored in the index, so indexes of every version search alike."""
        with self._lock:
            if name not in self._stats:
                self._stats[name] = row_stats(self.matrix(name), self.vectors[name]["distance"])
            return self._stats[name]

    def _points(self) -> tuple[list[PointId], list[dict]]:
        with self._lock:
            if self._ids is None:
                ids, payloads = [], []
                chunk_id = f"{self.name}/{POINTS_FILE}"
                try:
                    with open(self.dir / POINTS_FILE, "rb") as f:
                        for line in f:
                            rec = orjson.loads(line)
                            ids.append(normalize_point_id(rec["id"]))
                            payloads.append(rec.get("payload") or {})
                except (OSError, ValueError, KeyError, TypeError, UsageError) as exc:
                    raise CorruptChunkError(f"offline index file {chunk_id} is unreadable: {exc}", chunk_id=chunk_id) from None
                if len(ids) != self.points_count:
                    raise CorruptChunkError(f"offline index file {chunk_id} has {len(ids)} points, "
                                            f"meta.json says {self.points_count}", chunk_id=chunk_id)
                self._ids, self._payloads = ids, payloads
            return self._ids, self._payloads

    def _id_order(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rows in id order, sorted integer ids, sorted UUID hex keys); ints sort before UUIDs."""
        with self._lock:
            if self._order is None:
                ids, _ = self._points()
                int_rows = np.fromiter((i for i, p in enumerate(ids) if type(p) is int), dtype=np.int64)
                uuid_rows = np.fromiter((i for i, p in enumerate(ids) if type(p) is str), dtype=np.int64)
                int_keys = np.array([ids[i] for i in int_rows], dtype=np.uint64)
                uuid_keys = np.array([ids[i].replace("-", "") for i in uuid_rows], dtype="S32")
                io, uo = np.argsort(int_keys, kind="stable"), np.argsort(uuid_keys, kind="stable")
                self._order = (np.concatenate([int_rows[io], uuid_rows[uo]]), int_keys[io], uuid_keys[uo])
            return self._order

    def _position(self, pid: PointId) -> int:
        """Where `pid` is, or would be, in id order."""
        _, int_keys, uuid_keys = self._id_order()
        if type(pid) is int:
            return int(np.searchsorted(int_keys, np.uint64(pid)))
        return len(int_keys) + int(np.searchsorted(uuid_keys, pid.replace("-", "").encode()))

    def row_of(self, point_id: Any) -> int | None:
        pid = normalize_point_id(point_id)
        order, _, _ = self._id_order()
        pos = self._position(pid)
        if pos < len(order) and self._points()[0][order[pos]] == pid:
            return int(order[pos])
        return None

    def vector_presence(self, name: str) -> np.ndarray | None:
        """Which rows hold the named vector (NaN rows do not); None for an unknown name."""
        if name not in self.vectors:
            return None
        with self._lock:
            if name not in self._presence:
                self._presence[name] = ~np.isnan(self.matrix(name)[:, 0])
            return self._presence[name]

    def mask(self, filter: Any) -> np.ndarray | None:
        """The rows matching a Qdrant filter (None: no filter, all rows); recent masks are cached."""
        flt = as_plain_filter(filter)
        if not flt:
            if flt not in (None, {}):
                raise UsageError(f"Format error in JSON body: filter: expected a filter object, got {flt!r}")
            return None
        key = orjson.dumps(flt, option=orjson.OPT_SORT_KEYS)
        with self._lock:
            if key in self._masks:
                self._masks.move_to_end(key)
                return self._masks[key]
        ids, payloads = self._points()
        mask = filter_mask(flt, ids, payloads, vector_presence=self.vector_presence)
        with self._lock:
            self._masks[key] = mask
            while len(self._masks) > MASK_CACHE_SIZE:
                self._masks.popitem(last=False)
        return mask

    # -- queries -------------------------------------------------------------------------------

    def resolve_using(self, using: str | None) -> str:
        name = "" if using is None else using
        if name in self.vectors:
            return name
        if name in self.sparse_vectors:
            raise UsageError(f"Bad request: sparse vector `{name}` cannot be searched offline: the statevault "
                             "offline index (degraded mode) serves dense vectors only")
        raise UsageError(f"Wrong input: Not existing vector name error: {name}")

    def search(self, vector: Any, *, using: str | None = None, top_k: int = 10, filter: Any = None,
               score_threshold: float | None = None, offset: int = 0, with_payload: Any = True,
               with_vectors: Any = False) -> list[dict]:
        """Exact nearest neighbours of one query vector: ScoredPoint-like dicts, best first."""
        return self.search_batch([vector], using=using, top_k=top_k, filter=filter, score_threshold=score_threshold,
                                 offset=offset, with_payload=with_payload, with_vectors=with_vectors)[0]

    def search_batch(self, vectors: Sequence[Any] | np.ndarray, *, using: str | None = None, top_k: int = 10,
                     filter: Any = None, score_threshold: float | None = None, offset: int = 0,
                     with_payload: Any = True, with_vectors: Any = False) -> list[list[dict]]:
        """`search` for many query vectors at once, in one pass over the matrix."""
        name = self.resolve_using(using)
        spec = self.vectors[name]
        _check_count("limit", top_k, minimum=1)
        _check_count("offset", offset, minimum=0)
        if score_threshold is not None and (isinstance(score_threshold, bool) or not isinstance(score_threshold, (int, float))):
            raise UsageError(f"Format error in JSON body: score_threshold must be a number, got {score_threshold!r}")
        queries = _query_matrix(vectors, spec["size"])
        select = compile_payload_selector(with_payload)
        _check_with_vectors(with_vectors)
        mask = self.mask(filter)
        rows = None if mask is None else np.flatnonzero(mask)
        distance = spec["distance"]
        matrix = self.matrix(name)
        found = topk.top_k(matrix, prepare_queries(queries, distance), distance, top_k + offset, rows=rows,
                           stats=self.row_stats(name))
        ids, payloads = self._points()
        results = []
        for rows_q, scores in found:
            if score_threshold is not None:
                keep = scores > score_threshold if HIGHER_IS_BETTER[distance] else scores < score_threshold
                rows_q, scores = rows_q[keep], scores[keep]
            results.append([
                {"id": ids[r], "version": 0, "score": float(s), "payload": select(payloads[r]),
                 "vector": self._vectors_of(r, with_vectors)}
                for r, s in zip(rows_q[offset:].tolist(), scores[offset:].tolist())
            ])
        return results

    def vector_of(self, point_id: Any, using: str | None = None) -> np.ndarray:
        """The stored vector of a point (normalised for Cosine), e.g. to search by point id."""
        name = self.resolve_using(using)
        row = self.row_of(point_id)
        if row is None:
            raise NotFoundError(f"Not found: No point with id {normalize_point_id(point_id)} found")
        vec = np.array(self.matrix(name)[row])
        if np.isnan(vec).any():
            raise UsageError(f"Wrong input: Vector with name `{name}` for point {normalize_point_id(point_id)} not found")
        return vec

    def scroll(self, offset: Any = None, limit: int = 10, filter: Any = None, with_payload: Any = True,
               with_vectors: Any = False) -> tuple[list[dict], PointId | None]:
        """One page of points in id order and the id the next page starts at (None at the end)."""
        _check_count("limit", limit, minimum=1)
        select = compile_payload_selector(with_payload)
        _check_with_vectors(with_vectors)
        order, _, _ = self._id_order()
        start = 0 if offset is None else self._position(normalize_point_id(offset))
        mask = self.mask(filter)
        if mask is None:
            picked = order[start:start + limit + 1]
        else:
            rest = order[start:]
            picked = rest[np.flatnonzero(mask[rest])[:limit + 1]]
        ids, payloads = self._points()
        picked = picked.tolist()
        records = [self._record(r, ids, payloads, select, with_vectors) for r in picked[:limit]]
        return records, (ids[picked[limit]] if len(picked) > limit else None)

    def count(self, filter: Any = None, exact: bool = True) -> int:
        """How many points match the filter (always exact here)."""
        mask = self.mask(filter)
        return self.points_count if mask is None else int(np.count_nonzero(mask))

    def retrieve(self, ids: Sequence[Any], with_payload: Any = True, with_vectors: Any = False) -> list[dict]:
        """Points by id, in request order; duplicates and unknown ids are skipped, as in Qdrant."""
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
            raise UsageError("Format error in JSON body: ids must be a list of point ids")
        select = compile_payload_selector(with_payload)
        _check_with_vectors(with_vectors)
        all_ids, payloads = self._points()
        seen, out = set(), []
        for raw in ids:
            pid = normalize_point_id(raw)
            row = self.row_of(pid)
            if row is not None and pid not in seen:
                seen.add(pid)
                out.append(self._record(row, all_ids, payloads, select, with_vectors))
        return out

    def _record(self, row: int, ids: list, payloads: list, select: Any, with_vectors: Any) -> dict:
        return {"id": ids[row], "payload": select(payloads[row]), "vector": self._vectors_of(row, with_vectors)}

    def _vectors_of(self, row: int, with_vectors: Any) -> list[float] | dict | None:
        if not with_vectors:
            return None
        names = list(self.vectors) if with_vectors is True else [n for n in with_vectors if n in self.vectors]
        out = {}
        for name in names:
            vec = self.matrix(name)[row]
            if not np.isnan(vec[0]):
                out[name] = vec.tolist()
        if list(out) == [""]:
            return out[""]
        return out


def _check_count(what: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UsageError(f"Bad request: {what} value {value!r} is invalid. Must be {minimum} or larger.")


def _check_with_vectors(with_vectors: Any) -> None:
    if with_vectors is None or isinstance(with_vectors, bool):
        return
    if not isinstance(with_vectors, (list, tuple)) or not all(isinstance(n, str) for n in with_vectors):
        raise UsageError(f"Format error in JSON body: with_vector must be a bool or a list of vector names, "
                         f"got {with_vectors!r}")


def _query_matrix(vectors: Any, size: int) -> np.ndarray:
    try:
        queries = np.asarray(vectors, dtype=np.float64)
    except (TypeError, ValueError):
        raise UsageError("Wrong input: query vectors must be lists of numbers of the same length") from None
    if queries.ndim != 2 or queries.shape[0] == 0:
        raise UsageError("Wrong input: expected dense query vectors (lists of numbers)")
    if queries.shape[1] != size:
        raise UsageError(f"Wrong input: Vector dimension error: expected dim: {size}, got {queries.shape[1]}")
    if not np.isfinite(queries).all():
        raise UsageError("Wrong input: query vector contains NaN or infinite values")
    return queries
