"""The offline vector index, built during a Qdrant backup from the same scroll pages.

Per collection, written with `writer.item(..., offline=True)` into the manifest's
`offline_index` list (snapshots/offline/pull.py lays them out on disk, snapshots/offline/search.py
searches them):

- `<collection>#vectors:<name>` (one per dense vector; "" = the unnamed vector), kind
  "offline-vectors", format "f32le-rows", schema {"collection", "vector", "size", "distance",
  "row_bytes": size*4, "normalized"}. Each record is one row: `size` float32 little-endian
  values, row i belonging to point i of the collection in point id order. Cosine rows are unit
  length: a row whose squared length is within 1e-6 of 1 is kept as Qdrant stored it, others
  are normalised (Qdrant's own rule, so rows equal the collection's vectors bit for bit). A
  point without that named vector has a row of NaN.
- `<collection>#points`, kind "offline-points", format "jsonl", schema {"collection", "config"
  (the collection item's schema), "vectors", "sparse_vectors", "multivectors", "not_indexed"}:
  one `{"id":...,"payload":...}` line per point (keys sorted, same bytes as the head of the
  collection record), in the same row order.

Sparse vectors and multivectors are not in the offline index (the points item's schema says so).
Work is per page and vectorised: the page's float32 matrix is built once by the record encoder
(backup/sources/qdrant_records.py) and shared; here it is only checked for unit length, turned into
bytes and sliced into rows.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from backup.sources.qdrant_config import vector_layout

VECTORS_KIND = "offline-vectors"
POINTS_KIND = "offline-points"
_F32_EPSILON = 1.1920929e-7
NOT_INDEXED = "sparse vectors and multivectors are not in the offline index"


def vectors_item_name(collection: str, vector: str) -> str:
    return f"{collection}#vectors:{vector}"


def points_item_name(collection: str) -> str:
    return f"{collection}#points"


def unit_rows(mat: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length where Qdrant would (not zero, not already unit); NaN rows stay."""
    sq = np.einsum("ij,ij->i", mat, mat, dtype=np.float64)
    fix = np.isfinite(sq) & (sq >= _F32_EPSILON) & (np.abs(sq - 1.0) > 1e-6)
    if not fix.any():
        return mat
    out = mat.copy()
    out[fix] = (mat[fix] / np.sqrt(sq[fix])[:, None]).astype(np.float32)
    return out


class OfflineIndexBuilder:
    """Fed page by page (EncodedPage from the source's encoder); `close()` finishes the items."""

    def __init__(self, writer: Any, collection: str, schema: dict[str, Any]):
        layout = vector_layout(schema)
        self._vectors: list[tuple[str, Any, bool, int]] = []
        for name, (size, distance) in layout.dense.items():
            item_schema = {"collection": collection, "vector": name, "size": size, "distance": distance,
                           "row_bytes": size * 4, "normalized": distance == "Cosine"}
            w = writer.item(vectors_item_name(collection, name), VECTORS_KIND, "f32le-rows", item_schema,
                            offline=True)
            self._vectors.append((name, w, distance == "Cosine", size * 4))
        points_schema = {"collection": collection, "config": schema, "vectors": list(layout.dense),
                         "sparse_vectors": list(layout.sparse), "multivectors": list(layout.multi),
                         "not_indexed": NOT_INDEXED}
        self._points = writer.item(points_item_name(collection), POINTS_KIND, "jsonl", points_schema, offline=True)

    def add_page(self, page: Any) -> None:
        for name, w, cosine, row_bytes in self._vectors:
            mat = page.dense[name]
            if cosine:
                mat = unit_rows(mat)
            data = mat.astype("<f4", copy=False).tobytes()
            add = w.add
            for off in range(0, len(data), row_bytes):
                add(data[off:off + row_bytes])
        add = self._points.add
        for line in page.point_lines:
            add(line)

    def close(self) -> None:
        for _, w, _, _ in self._vectors:
            w.close()
        self._points.close()
