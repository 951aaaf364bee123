"""Chunk naming, compression, record digests and record-aligned content-defined chunking.

Record formats are newline-terminated lines (PostgreSQL COPY text rows, JSON lines) or
fixed-size binary rows (offline vector matrices). A chunk is a run of whole records, cut
where a record's hash says so, so a change to one record changes only the chunk holding it
and unchanged data dedups. A stored chunk is one plain zstd frame of those bytes: readable
with `zstd -d` without statevault.

Digest of an item: sum mod 2^128 of the first 16 bytes of blake3(record), as hex. It is
order-independent (a multiset hash: duplicates count, order does not), so a table without a
primary key verifies whatever order the server returns its rows in.
"""
from __future__ import annotations

import threading

import blake3
import zstandard

DIGEST_ALGO = "blake3-sum128"
_MOD = 1 << 128
_TWO64 = float(1 << 64)


def chunk_id(data: bytes) -> str:
    """A chunk's name: the blake3 hash of its uncompressed bytes."""
    return blake3.blake3(data, max_threads=blake3.blake3.AUTO if len(data) > 1 << 20 else 1).hexdigest()


def chunk_key(cid: str) -> str:
    return f"data/{cid[:2]}/{cid}"


_local = threading.local()


def compress(data: bytes, level: int) -> bytes:
    cctx = getattr(_local, "cctx", None)
    if cctx is None or _local.level != level:
        cctx = zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True)
        _local.cctx, _local.level = cctx, level
    return cctx.compress(data)


def decompress(data: bytes) -> bytes:
    dctx = getattr(_local, "dctx", None)
    if dctx is None:
        dctx = _local.dctx = zstandard.ZstdDecompressor()
    return dctx.decompress(data)


class RecordDigest:
    """Count and order-independent digest of a stream of records."""

    __slots__ = ("count", "nbytes", "_acc")

    def __init__(self) -> None:
        self.count = 0
        self.nbytes = 0
        self._acc = 0

    def add(self, record: bytes) -> bytes:
        h = blake3.blake3(record).digest(length=16)
        self._acc += int.from_bytes(h, "little")
        self.count += 1
        self.nbytes += len(record)
        return h

    def update(self, records) -> "RecordDigest":
        for r in records:
            self.add(r)
        return self

    @property
    def hexdigest(self) -> str:
        return (self._acc % _MOD).to_bytes(16, "little").hex()


def digest_records(records) -> tuple[int, str]:
    d = RecordDigest().update(records)
    return d.count, d.hexdigest


class RecordChunker:
    """Groups records into chunks of about `avg_size` bytes at content-defined boundaries.

    After each record the chunk is cut when it is at least `min_size` and the record's hash,
    read as a fraction of 2^64, falls under len(record)/avg_size (so the expected chunk size is
    avg_size whatever the record size), or when the chunk reaches `max_size`.
    """

    def __init__(self, avg_size: int, min_size: int | None = None, max_size: int | None = None):
        self.avg_size = avg_size
        self.min_size = min_size if min_size is not None else avg_size // 4
        self.max_size = max_size if max_size is not None else avg_size * 4
        self._scale = _TWO64 / avg_size
        self._parts: list[bytes] = []
        self._size = 0

    def add(self, record: bytes, record_hash: bytes) -> bytes | None:
        """Add one record (with its 16-byte hash); returns a finished chunk or None."""
        self._parts.append(record)
        self._size += len(record)
        if self._size < self.min_size:
            return None
        if self._size >= self.max_size or int.from_bytes(record_hash[:8], "little") < len(record) * self._scale:
            return self.flush()
        return None

    def flush(self) -> bytes | None:
        if not self._parts:
            return None
        data = b"".join(self._parts)
        self._parts = []
        self._size = 0
        return data


def split_lines(data: bytes):
    """Records of a line-format chunk (each keeps its trailing newline)."""
    return data.splitlines(keepends=True)


def split_fixed(data: bytes, width: int):
    return [data[i:i + width] for i in range(0, len(data), width)]
