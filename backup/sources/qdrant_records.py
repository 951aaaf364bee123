"""Qdrant records: the `qdrant-points-jsonl` formats, their encoder and decoder, and local mode's
canonical Cosine vectors. Read by the Qdrant source (backup/sources/qdrant.py), the Qdrant target
and the offline index.

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
"""
from __future__ import annotations

import base64
import binascii
import functools
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from backup.sources.qdrant_config import VectorLayout
from snapshots.errors import SourceError

FORMAT_V1 = "qdrant-points-jsonl-v1"
FORMAT = "qdrant-points-jsonl-v2"
FORMATS = (FORMAT_V1, FORMAT)
_NUMPY = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_SORT_KEYS
_LOCAL_EPSILON = 1.1920929e-7  # qdrant_client.local.local_collection.EPSILON


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


def decode_record(record: bytes, layout: VectorLayout, fmt: str = FORMAT, *, arrays: bool = False) -> dict:
    """A record of `fmt` as {"id", "payload", "vector"} with every vector as numbers (lists of
    floats, lists of rows for a multivector), whatever the format: what an upsert takes. With
    `arrays`, v2's packed vectors stay float32 arrays (for orjson's OPT_SERIALIZE_NUMPY)."""
    rec = orjson.loads(record)
    if fmt == FORMAT_V1:
        return rec
    vec = rec["vector"]
    if isinstance(vec, str):
        values = np.frombuffer(base64.b64decode(vec), "<f4")
        rec["vector"] = values if arrays else values.tolist()
    elif vec:
        for name, value in vec.items():
            if isinstance(value, str):
                values = np.frombuffer(base64.b64decode(value), "<f4")
                if name in layout.multi:
                    values = values.reshape(-1, layout.multi[name][0])
                vec[name] = values if arrays else values.tolist()
    return rec
