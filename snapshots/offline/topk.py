"""Exact top-k over a float32 matrix (usually memory-mapped), with Qdrant's distance semantics.

Every distance becomes one key where larger is better, as in Qdrant's core:

    Cosine, Dot   q.x (for Cosine the rows are unit vectors already and the query is normalised here)
    Euclid        -|x - q|^2; Qdrant reports the distance |x - q| (lower is better)
    Manhattan     -sum|x - q|; Qdrant reports the distance (lower is better)

"Exact" means: the same rows, in the same order, as a float64 brute force over the stored float32
rows and the float32 query (ties: lower row first), whatever the data's scale or offset. Two stages:

1. A fast float32 pass reads the matrix once for all queries, block by block, one BLAS call per
   block, so a query costs about one pass over the matrix (bandwidth-bound, as fast as a bare
   `matrix @ q`). It gives every row an approximate key k~ with a PROVEN error bound E: k~ is
   within E of the row's float64 key (up to a constant shared by all rows of a query). With L the
   m-th largest lower bound k~ - E seen so far, a row whose upper bound k~ + E is below L is beaten
   by m rows for sure and is dropped; every other row is a candidate (>=: rows tied with the m-th
   are kept, so ties are decided exactly). L only grows.
2. The candidates are rescored in float64 (each row on its own, so equal rows get equal keys) and
   the m best kept: usually m rows and a few more. Should candidates pile up, they are rescored
   as they come, a batch at a time: memory stays bounded, the answer stays exact, only slower.
   A query whose float32 keys could overflow is answered by a float64 pass instead.

Error bounds, with u = 2^-24 and gamma_d = d u / (1 - d u) (Higham: a d-term float32 dot product or
sum, in any order, with or without FMA, errs by at most gamma_d times the sum of its terms' absolute
values), each doubled (SAFETY) to absorb the rounding (relative, well under 1%) of the norms and of
the bound's own arithmetic, plus an absolute TINY for float32 underflow and the float64 rescoring's
own error (for Euclid stated explicitly: float64 cannot always separate what the centred float32
keys do, and the answer must be the float64 brute force's):

    Dot, Cosine  |fl(q.x) - q.x| <= (gamma_d + u) |q||x|
    Manhattan    |fl(sum|x - q|) - sum|x - q|| <= (gamma_d + 2u) sum|x - q|   (relative: a sum of
                                                      non-negative terms does not cancel)
    Euclid       |x|^2 - 2q.x + |q|^2 cancels catastrophically far from the origin (its error grows
                 with |x||q|, not with |x - q|). So keys are centred on a reference point c of the
                 collection (a sample's mean, in float32; any c is correct, a central one is fast):
                     -|x - q|^2 / 2 = q'.x - h - (c.q' + |q'|^2 / 2),   q' = q - c,  h = |x - c|^2 / 2
                 h is computed once per row (float32, x - c first: no cancellation), the last term
                 is the same for every row of a query, and k~ = fl(q'.x) - h errs by at most
                     (gamma_d + 4u) |q'||x| + (gamma_d + 5u) h.

When the data sits far from the origin compared with its spread (|c| > CENTRE_RATIO times the rows'
RMS distance to c), |x| in those bounds is large and every key would be a candidate. Then the rows
are centred too, x - c in cache-sized pieces before each BLAS call (~1.4x the cost of a bare pass
for one query): q.(x - c) ranks like q.x (Dot, Cosine) and q'.(x - c) - h like -|x - q|^2
(Euclid), with |x - c| in place of |x| in the bounds (plus u |q||x - c| for the subtraction).

Per matrix, `row_stats` computes once (one pass; none for Cosine and Manhattan unless centred) the
per-row value the bounds need: |x| or |x - c| (Dot, centred Cosine), h (Euclid), 4 bytes a row.
Resident memory stays bounded: one block of rows and its keys, the candidates, that per-row value.
A filter's rows are gathered when sparse, else the whole block is scored and the wanted rows kept.
A NaN row (a point lacking this named vector) is never returned.
"""
from __future__ import annotations

import mmap
from dataclasses import dataclass

import numpy as np

BLOCK_BYTES = 64 << 20
MANHATTAN_BLOCK_BYTES = 8 << 20  # Manhattan materialises |x - q| for a whole block
KEYS_BLOCK_BYTES = 64 << 20  # the (queries x block rows) keys of one block
STATS_BLOCK_BYTES = 16 << 20  # rows read at once by row_stats
CENTRE_BYTES = 2 << 20  # rows centred at once (x - c stays in the CPU cache for the BLAS call)
RESCORE_BYTES = 8 << 20  # float64 rows converted at once when rescoring candidates
SAMPLE_ROWS = 4096  # rows, evenly spread, that choose the centre c
SAMPLE_RUNS = 16
CENTRE_RATIO = 4.0  # centre the rows when |c| > this x the rows' RMS distance to c
POOL_ROWS = 4096  # a query's candidates are rescored once more than this (or 2 m) pile up
F32_EPSILON = 1.1920929e-7
U = 2.0 ** -24  # float32 unit roundoff
U64 = 2.0 ** -53
SAFETY = 2.0
TINY = 2.0 ** -100  # absolute slack per term: float32 underflow (denormals) in products and sums
COSINE_ROW_NORM = 1.0 + 1e-5  # Cosine rows are unit length, or shorter than F32_EPSILON (layout.py)
OVERFLOW = 1e36  # float32 overflows at 3.4e38: larger possible keys go to the float64 pass
HIGHER_IS_BETTER = {"Cosine": True, "Dot": True, "Euclid": False, "Manhattan": False}


@dataclass(frozen=True)
class RowStats:
    """What the error bounds need, from `row_stats`.

    `center` is c (float32 values, as float64); `centred` says whether the fast pass subtracts it
    from the rows. `aux` per row (float32, 0 for a NaN row, None when not needed): Euclid h =
    |x - c|^2 / 2; Dot |x|, or |x - c| when centred; Cosine |x - c| when centred. Norms are
    rounded up. `max_aux` is the largest (inf when one overflows float32).
    """
    center: np.ndarray
    centred: bool
    aux: np.ndarray | None = None
    max_aux: float = 0.0

    @property
    def center_norm(self) -> float:
        return float(np.sqrt(self.center @ self.center))


def prepare_queries(queries: np.ndarray, distance: str) -> np.ndarray:
    """Queries as a C-contiguous float32 (Q, dim) matrix; normalised for Cosine as Qdrant does."""
    q = np.asarray(queries, dtype=np.float64)
    if distance == "Cosine":
        norms = np.sqrt((q * q).sum(axis=1, keepdims=True))
        q = np.where(norms >= F32_EPSILON, q / np.where(norms == 0, 1, norms), q)
    return np.ascontiguousarray(q, dtype=np.float32)


def choose_center(matrix: np.ndarray) -> tuple[np.ndarray, bool]:
    """(c, centre the rows?) from up to SAMPLE_ROWS rows in SAMPLE_RUNS runs spread evenly over the
    matrix (runs of consecutive rows: a few sequential reads of a cold file, not thousands)."""
    n, dim = matrix.shape
    run = max(1, SAMPLE_ROWS // SAMPLE_RUNS)
    starts = np.unique(np.linspace(0, max(0, n - run), SAMPLE_RUNS).astype(np.int64)).tolist() if n else []
    _prefetch(matrix, [(start, run) for start in starts])
    sample = np.concatenate([np.asarray(matrix[s:s + run], dtype=np.float64) for s in starts]) if n else \
        np.empty((0, dim))
    sample = sample[np.isfinite(sample).all(axis=1)]
    if not len(sample):
        return np.zeros(dim), False
    with np.errstate(over="ignore"):
        c32 = sample.mean(axis=0).astype(np.float32)
    if not np.isfinite(c32).all():
        return np.zeros(dim), False
    c = c32.astype(np.float64)
    spread = np.sqrt(((sample - c) ** 2).sum(axis=1).mean())
    return c, bool(np.sqrt(c @ c) > CENTRE_RATIO * spread)


def _prefetch(matrix: np.ndarray, runs: list[tuple[int, int]]) -> None:
    """Ask the kernel to read these (start row, rows) runs of a memory-mapped matrix at once, so a
    cold file costs one disk round trip for all of them instead of one each (best effort)."""
    mm = getattr(matrix, "_mmap", None)  # np.memmap's mapping
    if not isinstance(mm, mmap.mmap) or not hasattr(mmap, "MADV_WILLNEED") or not matrix.flags.c_contiguous:
        return
    row_bytes = matrix.shape[1] * matrix.itemsize
    try:
        first = matrix.ctypes.data - np.frombuffer(mm, dtype=np.uint8).ctypes.data  # row 0 in the mapping
        if not 0 <= first <= len(mm) - matrix.nbytes:
            return
        for start, rows in runs:
            begin = first + start * row_bytes
            aligned = begin - begin % mmap.PAGESIZE
            mm.madvise(mmap.MADV_WILLNEED, aligned, begin + rows * row_bytes - aligned)
    except (OSError, ValueError):
        pass


def row_stats(matrix: np.ndarray, distance: str, center: np.ndarray | None = None,
              centred: bool | None = None) -> RowStats | None:
    """What `top_k` needs for `distance` (None for Manhattan): c chosen by `choose_center` unless
    given (any c is correct; it only sets how tight the bounds are), then one pass over the matrix
    for the per-row value (none for Cosine unless centred)."""
    if distance == "Manhattan":
        return None
    n, dim = matrix.shape
    if center is None:
        center, chosen = choose_center(matrix)
        centred = chosen if centred is None else centred
    center = np.asarray(center, dtype=np.float32).astype(np.float64)
    if center.shape != (dim,) or not np.isfinite(center).all():
        raise ValueError(f"bad centre: shape {center.shape}, expected ({dim},), finite")
    centred = bool(centred)
    if distance == "Cosine" and not centred:
        return RowStats(center, False)
    shift = distance == "Euclid" or centred
    c32 = center.astype(np.float32)
    aux = np.empty(n, dtype=np.float32)
    step = max(64, CENTRE_BYTES // (4 * dim)) if shift else max(1024, STATS_BLOCK_BYTES // (4 * dim))
    buf = np.empty((min(step, n), dim), dtype=np.float32) if shift else None
    with np.errstate(over="ignore", invalid="ignore"):  # beyond float32: inf, the float64 pass answers
        for start in range(0, n, step):
            block = matrix[start:start + step]
            if shift:
                block = np.subtract(block, c32, out=buf[:len(block)])
            aux[start:start + step] = np.einsum("ij,ij->i", block, block)
        if distance == "Euclid":
            aux *= np.float32(0.5)  # h; its float32 error is in the bound
        else:
            np.sqrt(aux, out=aux)
            aux *= np.float32(1 + 2 * dim * U)  # rounded up: an upper bound of the norm
    np.copyto(aux, np.float32(0), where=np.isnan(aux))  # a NaN row's key is NaN: it is never a candidate
    return RowStats(center, centred, aux, float(aux.max()) if n else 0.0)


def top_k(matrix: np.ndarray, queries: np.ndarray, distance: str, m: int, *,
          rows: np.ndarray | None = None, stats: RowStats | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each query, up to `m` (rows, scores) best first, scores as Qdrant reports them (float64).

    `queries` come from `prepare_queries`. `rows` restricts the search to those rows (ascending,
    e.g. a filter's matches); `stats` is `row_stats(matrix, distance)`, computed here when not
    given (callers that search a matrix more than once keep it).
    """
    nq, dim = queries.shape
    if m <= 0:
        return [(np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float64)) for _ in range(nq)]
    if stats is None:
        stats = row_stats(matrix, distance)
    bounds = _Bounds(queries, distance, stats, dim)
    pools = [_Candidates(matrix, queries[qi], distance, m) for qi in range(nq)]
    fast = np.flatnonzero(~bounds.overflow)
    if len(fast):
        for start, sel, keys, aux in _blocks(matrix, bounds.fast_queries[fast], distance, rows, stats):
            slack = bounds.block_slack(aux)
            for j, qi in enumerate(fast.tolist()):
                k = keys[j]
                if distance == "Manhattan" and np.isinf(k).any():
                    bounds.overflow[qi] = True  # a sum beyond float32: this query takes the float64 pass
                if bounds.overflow[qi]:
                    continue
                bar = pools[qi].bar
                if bar == -np.inf and len(k) > 4 * m:
                    bar = _seed_bar(bounds, qi, k, aux, m)
                hit = np.flatnonzero(k >= bounds.threshold(qi, bar, slack))
                if len(hit):
                    kh = k[hit].astype(np.float64)
                    err = bounds.error(qi, kh, None if aux is None else aux[hit])
                    pools[qi].offer(hit + start if sel is None else sel[hit], kh + err, kh - err)
    results = []
    for qi in range(nq):
        if bounds.overflow[qi]:
            found, keys = _exact_pass(matrix, queries[qi], distance, m, rows)
        else:
            found, keys = pools[qi].result()
        results.append((found, _scores(keys, distance)))
    return results


def _seed_bar(bounds: "_Bounds", qi: int, keys: np.ndarray, aux: np.ndarray | None, m: int) -> float:
    """A bar for a query's first block: the least lower bound of the block's m best float32 keys
    (-inf when it has fewer than m rows that are not NaN). These m rows are candidates themselves,
    so this is at most the m-th largest lower bound of the rows seen, like the pool's own bar; it
    spares the pool the block's other rows."""
    n = len(keys)
    best = np.argpartition(np.where(np.isnan(keys), np.float32(-np.inf), keys), n - m)[n - m:]
    top = keys[best].astype(np.float64)
    if not np.isfinite(top).all():
        return -np.inf
    return float((top - bounds.error(qi, top, None if aux is None else aux[best])).min())


def _scores(keys: np.ndarray, distance: str) -> np.ndarray:
    if distance == "Euclid":
        return np.sqrt(-keys)
    return keys if HIGHER_IS_BETTER[distance] else -keys


class _Bounds:
    """The fast pass's queries and the error bound E of its keys (see the module docstring):
    E = a |fed row| + b h + float64 slop + tiny, where the fed row is x or x - c."""

    def __init__(self, queries: np.ndarray, distance: str, stats: RowStats | None, dim: int):
        self.distance = distance
        gamma = dim * U / (1 - dim * U)
        if distance == "Euclid":
            with np.errstate(over="ignore"):
                self.fast_queries = np.ascontiguousarray(queries.astype(np.float64) - stats.center, dtype=np.float32)
        else:
            self.fast_queries = queries
        fq = self.fast_queries.astype(np.float64)
        self.qnorm = np.sqrt((fq * fq).sum(axis=1))
        self.tiny = SAFETY * TINY * dim * (1.0 + np.abs(fq).max(axis=1, initial=0.0))
        self.a = SAFETY * (gamma + 4 * U) * self.qnorm
        self.b = SAFETY * (gamma + 5 * U) if distance == "Euclid" else 0.0
        self.e64 = SAFETY * (dim + 4) * U64
        self.rel = SAFETY * (gamma + 2 * U)  # Manhattan
        self.centred = stats is not None and stats.centred
        self.center_norm = 0.0 if stats is None else stats.center_norm
        with np.errstate(over="ignore", invalid="ignore"):
            if distance == "Manhattan":
                self.overflow = ~np.isfinite(self.qnorm)  # and block by block, on an infinite key
            else:
                top = stats.max_aux
                magnitude = self.qnorm * self._fed_norm(top) + (top if distance == "Euclid" else 0.0)
                self.overflow = ~(magnitude <= OVERFLOW)

    def _fed_norm(self, aux):
        """An upper bound of the norm of the rows as fed to the dot product (x, or x - c)."""
        if self.distance == "Euclid":
            return np.sqrt(2 * aux) + (0.0 if self.centred else self.center_norm)
        if self.distance == "Cosine" and not self.centred:
            return COSINE_ROW_NORM
        return aux

    def _slop64(self, aux, qnorm):
        """How far the float64 rescoring's key may be from the real one, in fast-key units."""
        if self.distance == "Euclid":  # (d + 3) roundings of |x - q|^2 <= (|x - c| + |q'|)^2, halved
            return 0.5 * self.e64 * (np.sqrt(2 * aux) + qnorm) ** 2
        norm = self._fed_norm(aux) + (self.center_norm if self.centred else 0.0)  # >= |x|
        return self.e64 * qnorm * norm

    def block_slack(self, aux: np.ndarray | None) -> np.ndarray | None:
        """Per query, the largest E of any row of a block (None for Manhattan: its E is relative)."""
        if self.distance == "Manhattan":
            return None
        top = float(aux.max()) if aux is not None and len(aux) else 0.0
        return self.a * self._fed_norm(top) + self.b * top + self._slop64(top, self.qnorm) + self.tiny

    def threshold(self, qi: int, bar: float, slack: np.ndarray | None) -> np.float32:
        """A float32 t such that every row of the block whose upper bound k~ + E reaches `bar` has k~ >= t."""
        if bar == -np.inf:
            return np.float32(-np.inf)
        if slack is None:
            # Manhattan: k~ <= 0 and E = rel |k~| + tiny, so k~ + E >= bar <=> k~ >= (bar - tiny) / (1 - rel)
            t = (bar - self.tiny[qi]) / (1 - self.rel)
        else:
            t = bar - slack[qi]
        t32 = np.float32(t)
        return np.nextafter(t32, np.float32(-np.inf)) if t32 > t else t32  # rounded down, never up

    def error(self, qi: int, keys: np.ndarray, aux: np.ndarray | None) -> np.ndarray:
        """E for each of these keys (float64)."""
        if self.distance == "Manhattan":
            return self.rel * np.abs(keys) + self.tiny[qi]
        aux = None if aux is None else aux.astype(np.float64)
        err = self.a[qi] * self._fed_norm(aux) + self._slop64(aux, self.qnorm[qi]) + self.tiny[qi]
        if self.distance == "Euclid":
            err = err + self.b * aux
        return np.broadcast_to(err, keys.shape)


class _Candidates:
    """One query's candidates: rows whose upper bound reaches the bar, rescored exactly in batches."""

    def __init__(self, matrix: np.ndarray, query: np.ndarray, distance: str, m: int):
        self.matrix, self.query, self.distance, self.m = matrix, query, distance, m
        self.bar = -np.inf            # the m-th largest lower bound so far
        self.lows = np.empty(0)       # the m largest lower bounds so far
        self.rows = np.empty(0, dtype=np.int64)
        self.ups = np.empty(0)
        self.best_rows = np.empty(0, dtype=np.int64)  # the m best rescored rows, best first
        self.best_keys = np.empty(0)
        self.limit = max(POOL_ROWS, 2 * m)

    def offer(self, rows: np.ndarray, ups: np.ndarray, lows: np.ndarray) -> None:
        m = self.m
        merged = np.concatenate([self.lows, lows[lows > self.bar]])
        if len(merged) > m:
            merged = np.partition(merged, len(merged) - m)[len(merged) - m:]
        self.lows = merged
        if len(merged) == m and merged.min() > self.bar:
            self.bar = float(merged.min())
            keep = self.ups >= self.bar
            self.rows, self.ups = self.rows[keep], self.ups[keep]
        keep = ups >= self.bar
        self.rows = np.concatenate([self.rows, rows[keep]])
        self.ups = np.concatenate([self.ups, ups[keep]])
        if len(self.rows) > self.limit:
            self._rescore()

    def _rescore(self) -> None:
        rows = np.concatenate([self.best_rows, self.rows])
        keys = np.concatenate([self.best_keys, _exact_keys(self.matrix, self.rows, self.query, self.distance)])
        order = np.lexsort((rows, -keys))[:self.m]
        self.best_rows, self.best_keys = rows[order], keys[order]
        self.rows, self.ups = self.rows[:0], self.ups[:0]

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        self._rescore()
        return self.best_rows, self.best_keys


def _keys64(x: np.ndarray, query: np.ndarray, distance: str) -> np.ndarray:
    """Exact keys (float64, larger is better) of float64 rows; each row on its own, so equal rows
    get equal keys whatever their neighbours."""
    if distance in ("Cosine", "Dot"):
        return (x * query).sum(axis=1)
    diff = x - query
    if distance == "Euclid":
        return -(diff * diff).sum(axis=1)
    return -np.abs(diff).sum(axis=1)


def _exact_keys(matrix: np.ndarray, rows: np.ndarray, query: np.ndarray, distance: str) -> np.ndarray:
    out = np.empty(len(rows), dtype=np.float64)
    order = np.argsort(rows, kind="stable")  # ascending rows: sequential reads of the mmap
    q = query.astype(np.float64)
    step = max(1, RESCORE_BYTES // (8 * matrix.shape[1]))
    for start in range(0, len(rows), step):
        pos = order[start:start + step]
        out[pos] = _keys64(np.asarray(matrix[rows[pos]], dtype=np.float64), q, distance)
    return out


def _exact_pass(matrix: np.ndarray, query: np.ndarray, distance: str, m: int,
                rows: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """The m best (rows, exact keys) by a float64 pass over every wanted row (no float32 keys)."""
    n, dim = matrix.shape
    q = query.astype(np.float64)
    step = max(1024, RESCORE_BYTES // (8 * dim))
    best_rows, best_keys = np.empty(0, dtype=np.int64), np.empty(0)
    for start in range(0, n, step):
        stop = min(start + step, n)
        if rows is None:
            block_rows = np.arange(start, stop, dtype=np.int64)
            x = np.asarray(matrix[start:stop], dtype=np.float64)
        else:
            lo, hi = np.searchsorted(rows, [start, stop])
            if lo == hi:
                continue
            block_rows = rows[lo:hi].astype(np.int64)
            x = np.asarray(matrix[block_rows], dtype=np.float64)
        with np.errstate(over="ignore", invalid="ignore"):
            keys = _keys64(x, q, distance)
        ok = ~np.isnan(keys)
        r = np.concatenate([best_rows, block_rows[ok]])
        k = np.concatenate([best_keys, keys[ok]])
        order = np.lexsort((r, -k))[:m]
        best_rows, best_keys = r[order], k[order]
    return best_rows, best_keys


def _blocks(matrix: np.ndarray, queries: np.ndarray, distance: str, rows: np.ndarray | None,
            stats: RowStats | None):
    """Yield (start, sel, float32 keys (Q, B), the rows' RowStats.aux or None) over the wanted rows,
    in row order: key j is row start + j, or row sel[j] when sel is not None. NaN rows have NaN
    keys, which pass no threshold."""
    n_total, dim = matrix.shape
    aux = None if stats is None else stats.aux
    half = aux if distance == "Euclid" else None
    center = stats.center.astype(np.float32) if stats is not None and stats.centred else None
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
        if sel is None or 2 * len(sel) >= stop - start:
            # all rows, or a dense selection: score the whole block (a sequential read)
            keys = _block_keys(matrix[start:stop], queries, distance, center,
                               None if half is None else half[start:stop])
            if sel is None:
                picked = slice(start, stop)
            else:
                keys = keys[:, sel - start]  # keep the wanted columns
                sel = picked = sel.astype(np.int64, copy=False)
        else:
            keys = _block_keys(matrix[sel], queries, distance, center, None if half is None else half[sel])
            sel = picked = sel.astype(np.int64, copy=False)
        yield start, sel, keys, None if aux is None else aux[picked]


def _block_keys(block: np.ndarray, queries: np.ndarray, distance: str, center: np.ndarray | None,
                half: np.ndarray | None) -> np.ndarray:
    if distance == "Manhattan":
        keys = np.empty((len(queries), len(block)), dtype=np.float32)
        with np.errstate(over="ignore"):
            for qi, query in enumerate(queries):
                keys[qi] = -np.abs(block - query).sum(axis=1)
        return keys
    if center is None:
        keys = (block @ queries[0])[None, :] if len(queries) == 1 else queries @ block.T
    else:
        # rows far from the origin: x - c, a cache-sized piece at a time, then its BLAS call
        keys = np.empty((len(queries), len(block)), dtype=np.float32)
        step = max(64, CENTRE_BYTES // (4 * block.shape[1]))
        buf = np.empty((min(step, len(block)), block.shape[1]), dtype=np.float32)
        with np.errstate(over="ignore", invalid="ignore"):
            for start in range(0, len(block), step):
                piece = np.subtract(block[start:start + step], center, out=buf[:len(block[start:start + step])])
                if len(queries) == 1:
                    np.matmul(piece, queries[0], out=keys[0, start:start + step])
                else:
                    np.matmul(queries, piece.T, out=keys[:, start:start + step])
    if half is not None:
        keys -= half[None, :]  # Euclid: q'.x - h (or q'.(x - c) - h)
    return keys
