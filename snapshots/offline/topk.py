"""Exact top-k over a float32 matrix (usually memory-mapped), with Qdrant's distance semantics.

Every distance becomes one internal key where larger is better, as in Qdrant's core:

    Cosine, Dot   q.x (for Cosine the rows are unit vectors already and the query is normalised here)
    Euclid        -(|x|^2 - 2 q.x + |q|^2), then the kept candidates are rescored exactly as
                  sqrt(sum((x - q)^2)), the distance Qdrant reports (lower is better)
    Manhattan     -sum|x - q| (Qdrant reports the distance, lower is better)

The matrix is read once per group of queries, block by block, one BLAS call per block, so a query
costs about one pass over the matrix and resident memory stays bounded: the keys (4 bytes per
candidate row per query, queries grouped to stay under KEYS_BUDGET), one block of rows, and for
Euclid the cached |x|^2 (4 bytes per row). A NaN key (the NaN row of a point lacking this named
vector) is never returned. Ties are broken by row order, lower row first.
"""
from __future__ import annotations

import numpy as np

BLOCK_BYTES = 64 << 20
MANHATTAN_BLOCK_BYTES = 8 << 20  # Manhattan materialises |x - q| for a whole block
KEYS_BUDGET = 256 << 20
EUCLID_EXTRA = 16  # spare candidates, so the exact rescoring can reorder near-ties of the fast pass
F32_EPSILON = 1.1920929e-7
HIGHER_IS_BETTER = {"Cosine": True, "Dot": True, "Euclid": False, "Manhattan": False}


def prepare_queries(queries: np.ndarray, distance: str) -> np.ndarray:
    """Queries as a C-contiguous float32 (Q, dim) matrix; normalised for Cosine as Qdrant does."""
    q = np.asarray(queries, dtype=np.float64)
    if distance == "Cosine":
        norms = np.sqrt((q * q).sum(axis=1, keepdims=True))
        q = np.where(norms >= F32_EPSILON, q / np.where(norms == 0, 1, norms), q)
    return np.ascontiguousarray(q, dtype=np.float32)


def squared_norms(matrix: np.ndarray) -> np.ndarray:
    """|x|^2 of every row (float64 accumulation, stored as float32); NaN for NaN rows."""
    n, dim = matrix.shape
    out = np.empty(n, dtype=np.float32)
    step = max(1024, (16 << 20) // (8 * dim))
    for start in range(0, n, step):
        block = np.asarray(matrix[start:start + step], dtype=np.float64)
        out[start:start + step] = np.einsum("ij,ij->i", block, block)
    return out


def top_k(matrix: np.ndarray, queries: np.ndarray, distance: str, m: int, *,
          rows: np.ndarray | None = None, sqnorms: np.ndarray | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each query, up to `m` (row, score) pairs, best first, scores as Qdrant reports them.

    `queries` come from `prepare_queries`. `rows` restricts the search to those rows (ascending,
    e.g. a filter's matches); `sqnorms` is `squared_norms(matrix)`, needed for Euclid.
    """
    n = matrix.shape[0] if rows is None else len(rows)
    empty = (np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float64))
    if m <= 0 or n == 0:
        return [empty for _ in range(len(queries))]
    want = m + EUCLID_EXTRA if distance == "Euclid" else m
    per_group = max(1, KEYS_BUDGET // (4 * n))
    results = []
    for g0 in range(0, len(queries), per_group):
        group = queries[g0:g0 + per_group]
        keys = _keys(matrix, group, distance, rows, sqnorms)
        for qi, query in enumerate(group):
            pos = _best(keys[qi], want)
            found = pos if rows is None else rows[pos]
            found = found.astype(np.int64, copy=False)
            if distance == "Euclid":
                scores = _exact_euclid(matrix, found, query)
                order = np.lexsort((found, scores))[:m]
                found, scores = found[order], scores[order]
            elif HIGHER_IS_BETTER[distance]:
                scores = keys[qi, pos].astype(np.float64)
            else:
                scores = -keys[qi, pos].astype(np.float64)
            results.append((found, scores))
    return results


def _best(keys: np.ndarray, want: int) -> np.ndarray:
    """Positions of the `want` largest keys, best first, lower position first among equals; no -inf."""
    n = len(keys)
    if want < n:
        kth = keys[np.argpartition(keys, n - want)[n - want]]
        better = np.flatnonzero(keys > kth)
        equal = np.flatnonzero(keys == kth)[:want - len(better)]
        pos = np.concatenate([better, equal])
    else:
        pos = np.arange(n)
    pos = pos[keys[pos] > -np.inf]
    return pos[np.lexsort((pos, -keys[pos]))]


def _exact_euclid(matrix: np.ndarray, found: np.ndarray, query: np.ndarray) -> np.ndarray:
    if len(found) == 0:
        return np.empty(0, dtype=np.float64)
    diff = np.asarray(matrix[np.sort(found)], dtype=np.float64)  # sorted: sequential reads of the mmap
    diff = diff[np.argsort(np.argsort(found))] - query.astype(np.float64)
    return np.sqrt((diff * diff).sum(axis=1))


def _keys(matrix: np.ndarray, queries: np.ndarray, distance: str,
          rows: np.ndarray | None, sqnorms: np.ndarray | None) -> np.ndarray:
    n_total, dim = matrix.shape
    n = n_total if rows is None else len(rows)
    keys = np.empty((len(queries), n), dtype=np.float32)
    qsq = (queries.astype(np.float64) ** 2).sum(axis=1).astype(np.float32) if distance == "Euclid" else None
    budget = MANHATTAN_BLOCK_BYTES if distance == "Manhattan" else BLOCK_BYTES
    step = max(1024, budget // (4 * dim))
    starts = range(0, n_total, step)
    bounds = None if rows is None else np.searchsorted(rows, [*starts, n_total])
    for bi, start in enumerate(starts):
        stop = min(start + step, n_total)
        if bounds is None:
            lo, hi, sel = start, stop, None
        else:
            lo, hi = int(bounds[bi]), int(bounds[bi + 1])
            if lo == hi:
                continue
            sel = rows[lo:hi]
            if hi - lo == stop - start:
                sel = None  # every row of this block is wanted
        out = keys[:, lo:hi]
        if sel is None:
            _fill(out, matrix[start:stop], queries, distance, sqnorms, start, stop, None, qsq)
        elif 2 * (hi - lo) >= stop - start:
            # dense selection: score the whole block (sequential read) and keep the wanted columns
            full = np.empty((len(queries), stop - start), dtype=np.float32)
            _fill(full, matrix[start:stop], queries, distance, sqnorms, start, stop, None, qsq)
            out[...] = full[:, sel - start]
        else:
            _fill(out, matrix[sel], queries, distance, sqnorms, start, stop, sel, qsq)
    np.copyto(keys, np.float32(-np.inf), where=np.isnan(keys))
    return keys


def _fill(out: np.ndarray, block: np.ndarray, queries: np.ndarray, distance: str,
          sqnorms: np.ndarray | None, start: int, stop: int, sel: np.ndarray | None,
          qsq: np.ndarray | None) -> None:
    """Write the keys of `block` (rows start:stop, or the rows `sel`) for every query into `out`."""
    if distance == "Manhattan":
        for qi, query in enumerate(queries):
            out[qi] = -np.abs(block - query).sum(axis=1)
        return
    if len(queries) == 1 and out.flags.c_contiguous:
        np.matmul(block, queries[0], out=out[0])
    else:
        out[...] = queries @ block.T
    if distance == "Euclid":
        sq = sqnorms[start:stop] if sel is None else sqnorms[sel]
        out *= 2
        out -= sq[None, :]
        out -= qsq[:, None]
