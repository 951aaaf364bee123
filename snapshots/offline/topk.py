"""Exact top-k over a float32 matrix (usually memory-mapped), with Qdrant's distance semantics.

Every distance becomes one internal key where larger is better, as in Qdrant's core:

    Cosine, Dot   q.x (for Cosine the rows are unit vectors already and the query is normalised here)
    Euclid        -(|x|^2 - 2 q.x + |q|^2), then the kept candidates are rescored exactly as
                  sqrt(sum((x - q)^2)), the distance Qdrant reports (lower is better)
    Manhattan     -sum|x - q| (Qdrant reports the distance, lower is better)

The matrix is read once for all queries, block by block, one BLAS call per block, so a query costs
about one pass over the matrix (measured: 1M x 384 in ~90 ms, as fast as a bare `matrix @ q`), and
resident memory stays bounded: one block of rows and its keys, the best candidates so far, and for
Euclid the cached |x|^2 (4 bytes per row). A filter's rows are gathered when sparse, else the
whole block is scored and the wanted rows kept. A NaN key (the NaN row of a point lacking this
named vector) is never returned. Ties are broken by row order, lower row first.
"""
from __future__ import annotations

import numpy as np

BLOCK_BYTES = 64 << 20
MANHATTAN_BLOCK_BYTES = 8 << 20  # Manhattan materialises |x - q| for a whole block
KEYS_BLOCK_BYTES = 64 << 20  # the (queries x block rows) keys of one block
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
    """For each query, up to `m` (rows, scores) best first, scores as Qdrant reports them.

    `queries` come from `prepare_queries`. `rows` restricts the search to those rows (ascending,
    e.g. a filter's matches); `sqnorms` is `squared_norms(matrix)`, needed for Euclid.
    """
    nq = len(queries)
    want = m + EUCLID_EXTRA if distance == "Euclid" else m
    best_rows = [np.empty(0, dtype=np.int64) for _ in range(nq)]
    best_keys = [np.empty(0, dtype=np.float32) for _ in range(nq)]
    if m > 0:
        # Blocks come in row order, so a later row only enters when strictly better than the
        # current worst kept key: on equal keys the lower row wins. After the first block the
        # bar is high and a block costs one comparison pass per query.
        bar = np.full(nq, -np.inf, dtype=np.float32)
        for block_rows, keys in _blocks(matrix, queries, distance, rows, sqnorms):
            for qi in range(nq):
                hit = np.flatnonzero(keys[qi] > bar[qi])
                if len(hit) == 0:
                    continue
                r = np.concatenate([best_rows[qi], block_rows[hit]])
                k = np.concatenate([best_keys[qi], keys[qi, hit]])
                keep = _best(k, r, want)
                best_rows[qi], best_keys[qi] = r[keep], k[keep]
                if len(keep) == want:
                    bar[qi] = best_keys[qi][-1]
    results = []
    for qi in range(nq):
        found, keys = best_rows[qi], best_keys[qi]
        if distance == "Euclid":
            scores = _exact_euclid(matrix, found, queries[qi])
            order = np.lexsort((found, scores))[:m]
            results.append((found[order], scores[order]))
        elif HIGHER_IS_BETTER[distance]:
            results.append((found, keys.astype(np.float64)))
        else:
            results.append((found, -keys.astype(np.float64)))
    return results


def _best(keys: np.ndarray, rows: np.ndarray, want: int) -> np.ndarray:
    """Positions of the `want` largest keys, best first, lower row first among equals; never -inf."""
    n = len(keys)
    if want < n:
        kth = keys[np.argpartition(keys, n - want)[n - want]]
        better = np.flatnonzero(keys > kth)
        equal = np.flatnonzero(keys == kth)
        equal = equal[np.argsort(rows[equal], kind="stable")[:want - len(better)]]
        pos = np.concatenate([better, equal])
    else:
        pos = np.arange(n)
    pos = pos[keys[pos] > -np.inf]
    return pos[np.lexsort((rows[pos], -keys[pos]))]


def _exact_euclid(matrix: np.ndarray, found: np.ndarray, query: np.ndarray) -> np.ndarray:
    out = np.empty(len(found), dtype=np.float64)
    order = np.argsort(found)  # ascending rows: sequential reads of the mmap
    diff = np.asarray(matrix[found[order]], dtype=np.float64) - query.astype(np.float64)
    out[order] = np.sqrt((diff * diff).sum(axis=1))
    return out


def _blocks(matrix: np.ndarray, queries: np.ndarray, distance: str, rows: np.ndarray | None,
            sqnorms: np.ndarray | None):
    """Yield (rows of the block, keys (Q, B)) over the wanted rows, in row order; NaN keys become -inf."""
    n_total, dim = matrix.shape
    qsq = (queries.astype(np.float64) ** 2).sum(axis=1).astype(np.float32) if distance == "Euclid" else None
    budget = MANHATTAN_BLOCK_BYTES if distance == "Manhattan" else BLOCK_BYTES
    step = max(1024, min(budget // (4 * dim), KEYS_BLOCK_BYTES // (4 * len(queries))))
    starts = range(0, n_total, step)
    bounds = None if rows is None else np.searchsorted(rows, [*starts, n_total])
    for bi, start in enumerate(starts):
        stop = min(start + step, n_total)
        if bounds is None:
            sel = None
        else:
            lo, hi = int(bounds[bi]), int(bounds[bi + 1])
            if lo == hi:
                continue
            sel = rows[lo:hi] if hi - lo < stop - start else None
        if sel is None:
            keys = _block_keys(matrix[start:stop], queries, distance, sqnorms[start:stop] if qsq is not None else None, qsq)
            block_rows = np.arange(start, stop, dtype=np.int64)
        elif 2 * len(sel) >= stop - start:
            # a dense selection: score the whole block (a sequential read), keep the wanted columns
            keys = _block_keys(matrix[start:stop], queries, distance, sqnorms[start:stop] if qsq is not None else None, qsq)
            keys = keys[:, sel - start]
            block_rows = sel.astype(np.int64, copy=False)
        else:
            keys = _block_keys(matrix[sel], queries, distance, sqnorms[sel] if qsq is not None else None, qsq)
            block_rows = sel.astype(np.int64, copy=False)
        np.copyto(keys, np.float32(-np.inf), where=np.isnan(keys))
        yield block_rows, keys


def _block_keys(block: np.ndarray, queries: np.ndarray, distance: str,
                sq: np.ndarray | None, qsq: np.ndarray | None) -> np.ndarray:
    if distance == "Manhattan":
        keys = np.empty((len(queries), len(block)), dtype=np.float32)
        for qi, query in enumerate(queries):
            keys[qi] = -np.abs(block - query).sum(axis=1)
        return keys
    if len(queries) == 1:
        keys = (block @ queries[0])[None, :]
    else:
        keys = queries @ block.T
    if distance == "Euclid":
        keys *= 2
        keys -= sq[None, :]
        keys -= qsq[:, None]
    return keys
