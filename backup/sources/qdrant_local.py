"""Pages of a qdrant-client *local-mode* collection, read from the collection itself.

Local mode's `scroll` sorts every point id of the collection on every call (in Python, through
a key function) before it skips to the page's offset, then deep-copies each payload and turns
each vector into a list of Python floats. A backup of N points in pages of P costs N/P full
sorts: 40 of 20k ids for 20k points (over half the scroll's time), 2000 sorts of 1M ids for 1M
points, which no one would wait for. Here the ids are sorted once, by the same key local mode
uses, and each page hands out the stored payload (read only, never copied) and the stored
float32 arrays, so the encoder skips the float -> list -> float32 round trip too.

The points are the ones `scroll` would return, in the same order, with the same ids, payloads
and vector values (tests/integration/test_qdrant_store.py compares the records of both paths
byte for byte, on named, sparse and multivectors, UUID ids, deleted points and points without
some of their vectors). It relies on qdrant-client internals (QdrantLocal.collections/aliases,
LocalCollection.ids, payload, vectors, sparse_vectors, multivectors, deleted,
deleted_per_vector): `local_collection` checks they are all there, and when they are not (a
client version that changed them), callers fall back to `scroll`.

Local mode allows one process per directory (it takes a file lock) and statevault shares one
client per directory within a process; jobs on a source run one at a time (leases), so no
write interleaves with a backup's reads, as with `scroll`.
"""
from __future__ import annotations

from typing import Any, Iterator, NamedTuple

import numpy as np

_COLLECTION_FIELDS = ("ids", "payload", "vectors", "sparse_vectors", "multivectors", "deleted", "deleted_per_vector",
                      "_universal_id")


class LocalPoint(NamedTuple):
    """What the encoder reads of a scroll Record; vectors are the stored arrays (read only)."""
    id: Any
    payload: dict
    vector: Any   # the unnamed vector's array, or {name: array | SparseVector | (rows, size) array}


def local_collection(client: Any, name: str) -> Any | None:
    """The LocalCollection behind `name` (a collection or an alias) if `client` is in local mode
    and has the internals this module reads; else None. A missing collection raises local
    mode's own ValueError ("Collection ... not found"), as `scroll` would."""
    try:
        from qdrant_client.local.qdrant_local import QdrantLocal
    except ImportError:  # pragma: no cover - a qdrant-client without local mode
        return None
    inner = getattr(client, "_client", None)
    if not isinstance(inner, QdrantLocal) or not callable(getattr(inner, "_get_collection", None)):
        return None
    collection = inner._get_collection(name)
    if not all(hasattr(collection, f) for f in _COLLECTION_FIELDS):
        return None
    if not (isinstance(collection.ids, dict) and isinstance(collection.vectors, dict)
            and all(isinstance(v, np.ndarray) and v.ndim == 2 for v in collection.vectors.values())):
        return None
    return collection


def iter_local_pages(collection: Any, page_size: int) -> Iterator[list[LocalPoint]]:
    """The live points of `collection` in scroll order, `page_size` at a time."""
    key = collection._universal_id
    order = sorted(collection.ids.items(), key=lambda item: key(item[0]))
    deleted = collection.deleted
    live = [(pid, idx) for pid, idx in order if not deleted[idx]]
    del order
    dense, sparse, multi = collection.vectors, collection.sparse_vectors, collection.multivectors
    absent = collection.deleted_per_vector
    unnamed_only = list(dense) == [""] and not sparse and not multi
    payload = collection.payload
    for start in range(0, len(live), page_size):
        page = live[start:start + page_size]
        if unnamed_only:
            rows, gone = dense[""], absent[""]
            yield [LocalPoint(pid, payload[idx], None if gone[idx] else rows[idx]) for pid, idx in page]
            continue
        points = []
        for pid, idx in page:
            vector: dict[str, Any] = {}
            for store in (dense, sparse, multi):
                for vname, values in store.items():
                    if not absent[vname][idx]:
                        vector[vname] = values[idx]
            points.append(LocalPoint(pid, payload[idx], vector))
        yield points
