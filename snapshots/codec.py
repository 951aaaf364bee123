"""Chunk naming, compression, record digests and record-aligned content-defined chunking.

Record formats are newline-terminated lines (PostgreSQL COPY text rows, JSON lines) or
fixed-size binary rows (offline vector matrices). A chunk is a run of whole records, cut
where a record's hash says so, so a change to one record changes only the chunk holding it
(and at most the next one) and unchanged data dedups. A stored chunk is one plain zstd frame
of those bytes: readable with `zstd -d` without statevault.

Record hash: XXH3-128 (xxHash 0.8, seed 0) of the record, or of its `canonical` form when the
writer is given one: a 128-bit value (`xxhash.xxh3_128_intdigest`; `xxh3_128_digest` gives it
as 16 big-endian bytes). XXH3 is not cryptographic and need not be: the digest guards against
lost, extra and changed records, not against someone who can write the repository (chunk
ids, the integrity check on every read, stay blake3).

Digest of an item ("xxh3-128-sum128"): the sum mod 2^128 of the records' hash values, as 32
hex digits (16 bytes little-endian). It is order-independent (a multiset hash: duplicates
count, order does not), so a table without a primary key verifies whatever order the server
returns its rows in. Items written before this algorithm carry digest_algo "blake3-sum128"
(the same sum over the first 16 bytes of blake3 read little-endian); `RecordDigest(algo)`
computes either.

Chunk boundaries: after each record the open chunk is cut when it holds at least `min_size`
bytes and the low 64 bits of the record's hash value fall under len(record) * (2^64 //
avg_size) (so the expected chunk size is avg_size whatever the record size; a record of
avg_size bytes or more is always a candidate), or when it reaches `max_size`. The rule only
reads one record at a time, so it is evaluated a block of records at once with numpy.
"""
from __future__ import annotations

import threading
from itertools import islice
from typing import Callable, Iterable, Iterator

import blake3
import numpy as np
import xxhash
import zstandard

DIGEST_ALGO = "xxh3-128-sum128"
LEGACY_DIGEST_ALGO = "blake3-sum128"
_MOD = 1 << 128
_TWO64 = 1 << 64
_BLOCK_RECORDS = 4096  # records hashed per batch when a whole iterable is digested


def chunk_id(data: bytes) -> str:
    """A chunk's name: the blake3 hash of its uncompressed bytes."""
    return blake3.blake3(data, max_threads=blake3.blake3.AUTO if len(data) > 1 << 20 else 1).hexdigest()


def chunk_key(cid: str) -> str:
    return f"data/{cid[:2]}/{cid}"


_local = threading.local()

# zstd level per source kind when neither the source nor the repository sets one. Measured on
# each kind's records (1 MiB chunks; bench/README.md, "Compression levels"):
#   redis JSON lines:      level 2 637 MB/s ratio 2.09, level 3 359 MB/s ratio 2.08
#   qdrant points (v2, base64 float32 vectors): level 1 816 MB/s ratio 1.40, level 3 480 MB/s ratio 1.40
#   (v1 records, decimal vectors: level 1 384 MB/s ratio 2.50, level 3 206 MB/s ratio 2.38)
#   postgres COPY text:    level 2 450 MB/s ratio 4.10, level 3 396 MB/s ratio 4.32
# Level 3 buys nothing on the first two, so they take the faster level.
DEFAULT_LEVELS = {"postgres": 3, "redis": 2, "qdrant": 1}
FALLBACK_LEVEL = 3


def compression_level(kind: str, *configured: int | None) -> int:
    """The first level configured (source, then repository), else the kind's default."""
    for level in configured:
        if level is not None:
            return level
    return DEFAULT_LEVELS.get(kind, FALLBACK_LEVEL)


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


# ---- record hashes and digests ------------------------------------------------------------

def _blake3_16(record: bytes) -> bytes:
    # stored reversed so that, like xxh3_128_digest, the bytes read big-endian give the value
    return blake3.blake3(record).digest(length=16)[::-1]


_HASHERS: dict[str, Callable[[bytes], bytes]] = {
    DIGEST_ALGO: xxhash.xxh3_128_digest,   # 16 bytes, big-endian value (XXH128_canonical)
    LEGACY_DIGEST_ALGO: _blake3_16,
}


def record_hasher(algo: str = DIGEST_ALGO) -> Callable[[bytes], bytes]:
    """The per-record hash of a digest algorithm: bytes -> 16 bytes, a big-endian 128-bit value."""
    try:
        return _HASHERS[algo]
    except KeyError:
        raise ValueError(f"unknown digest algorithm {algo!r} (known: {', '.join(_HASHERS)})") from None


def record_hash_values(hashes: bytes) -> np.ndarray:
    """Concatenated 16-byte hashes -> an (n, 4) uint32 array of their 32-bit limbs, least
    significant first (column 0 is bits 0-31 of the value)."""
    return np.frombuffer(hashes, dtype=">u4").reshape(-1, 4)[:, ::-1]


def boundary_keys(hashes: bytes) -> np.ndarray:
    """The low 64 bits of each hash value (what the chunker compares), as uint64."""
    return np.frombuffer(hashes, dtype=">u8")[1::2].astype(np.uint64)


def sum_hashes(hashes: bytes) -> int:
    """The exact sum of the hash values in `hashes` (not reduced mod 2^128)."""
    if not hashes:
        return 0
    limbs = record_hash_values(hashes)
    # each limb < 2^32, so a uint64 column sum is exact for fewer than 2^32 records
    s = limbs.sum(axis=0, dtype=np.uint64)
    return int(s[0]) + (int(s[1]) << 32) + (int(s[2]) << 64) + (int(s[3]) << 96)


class RecordDigest:
    """Count, byte count and order-independent digest of a stream of records.

    `add` costs one hash call and a list append; the 16-byte hashes are summed a block at a
    time with numpy. `add_hashes` takes hashes the caller already computed (the writer).
    """

    __slots__ = ("algo", "count", "nbytes", "_acc", "_pending", "_hash")

    def __init__(self, algo: str = DIGEST_ALGO) -> None:
        self.algo = algo
        self._hash = record_hasher(algo)
        self.count = 0
        self.nbytes = 0
        self._acc = 0
        self._pending: list[bytes] = []

    def add(self, record: bytes) -> bytes:
        """Add one record; returns its 16-byte hash."""
        h = self._hash(record)
        pending = self._pending
        pending.append(h)
        self.count += 1
        self.nbytes += len(record)
        if len(pending) >= _BLOCK_RECORDS:
            self._fold()
        return h

    def add_hashes(self, hashes: bytes, count: int, nbytes: int) -> None:
        """Add `count` records whose hashes (16 bytes each, concatenated) are already known."""
        self._acc += sum_hashes(hashes)
        self.count += count
        self.nbytes += nbytes

    def update(self, records: Iterable[bytes]) -> "RecordDigest":
        h = self._hash
        for block in batched(records, _BLOCK_RECORDS):
            self.add_hashes(b"".join(map(h, block)), len(block), sum(map(len, block)))
        return self

    def merge(self, other: "RecordDigest") -> "RecordDigest":
        """Add the records `other` counted (same algorithm): the digest is a sum, so records
        counted in parts, in any order, give the digest of the whole."""
        if other.algo != self.algo:
            raise ValueError(f"cannot merge a {other.algo} digest into a {self.algo} one")
        other._fold()
        self._acc += other._acc
        self.count += other.count
        self.nbytes += other.nbytes
        return self

    def _fold(self) -> None:
        if self._pending:
            self._acc += sum_hashes(b"".join(self._pending))
            self._pending = []

    @property
    def hexdigest(self) -> str:
        self._fold()
        return (self._acc % _MOD).to_bytes(16, "little").hex()


def digest_records(records: Iterable[bytes], algo: str = DIGEST_ALGO) -> tuple[int, str]:
    d = RecordDigest(algo).update(records)
    return d.count, d.hexdigest


# ---- chunking ----------------------------------------------------------------------------

class RecordChunker:
    """Groups records into chunks of about `avg_size` bytes at content-defined boundaries
    (the rule is in the module docstring).

    Fed a block of records at a time with their hashes (`add_block`), it returns the finished
    chunks as (bytes, record count). It holds at most the open chunk (< max_size bytes).
    """

    def __init__(self, avg_size: int, min_size: int | None = None, max_size: int | None = None):
        self.avg_size = avg_size
        self.min_size = min_size if min_size is not None else avg_size // 4
        self.max_size = max_size if max_size is not None else avg_size * 4
        self._k = np.uint64(_TWO64 // avg_size)
        self._open: list[bytes] = []   # the open chunk's records
        self._open_size = 0
        self._open_records = 0

    def cut_points(self, lens: np.ndarray, keys: np.ndarray) -> list[int]:
        """Indices of the records after which the chunk is cut, given the open chunk's size.

        Pure: does not change the chunker's state (add_block does)."""
        n = len(lens)
        if n == 0:
            return []
        big = lens >= self.avg_size
        # lens * k only overflows for records of avg_size or more, and those are candidates anyway
        with np.errstate(over="ignore"):
            cand = big | (keys < lens.astype(np.uint64) * self._k)
        cands = np.flatnonzero(cand)
        cum = np.cumsum(lens, dtype=np.int64)
        cuts: list[int] = []
        start, base = 0, -self._open_size  # chunk size after record i is cum[i] - base
        lo, hi = self.min_size, self.max_size
        while start < n:
            i_min = max(start, int(np.searchsorted(cum, base + lo, "left")))
            if i_min >= n:
                break
            i_max = int(np.searchsorted(cum, base + hi, "left"))
            j = int(np.searchsorted(cands, i_min, "left"))
            i_cand = int(cands[j]) if j < len(cands) else n
            cut = min(i_cand, i_max)
            if cut >= n:
                break
            cuts.append(cut)
            base = int(cum[cut])
            start = cut + 1
        return cuts

    def add_block(self, records: list[bytes], hashes: bytes, lens: np.ndarray | None = None
                  ) -> list[tuple[bytes, int]]:
        """Add records (and their concatenated 16-byte hashes); returns finished chunks."""
        if lens is None:
            lens = np.fromiter(map(len, records), dtype=np.int64, count=len(records))
        out = []
        start = 0
        for cut in self.cut_points(lens, boundary_keys(hashes)):
            parts = records[start:cut + 1]
            if self._open:
                parts = self._open + parts
            out.append((b"".join(parts), self._open_records + cut + 1 - start))
            self._open, self._open_size, self._open_records = [], 0, 0
            start = cut + 1
        if start < len(records):
            # the open chunk keeps references to its records: each record is copied once, into its chunk
            self._open.extend(records[start:])
            self._open_size += int(lens[start:].sum())
            self._open_records += len(records) - start
        return out

    def add(self, record: bytes, record_hash: bytes) -> bytes | None:
        """Add one record (with its 16-byte hash); returns a finished chunk or None."""
        done = self.add_block([record], record_hash)
        return done[0][0] if done else None

    def flush(self) -> bytes | None:
        """The open chunk (None when empty); the chunker starts afresh."""
        data = self.flush_counted()
        return data[0] if data else None

    def flush_counted(self) -> tuple[bytes, int] | None:
        if not self._open_records:
            return None
        data = (b"".join(self._open), self._open_records)
        self._open, self._open_size, self._open_records = [], 0, 0
        return data


def batched(items: Iterable, n: int) -> Iterator[list]:
    """Lists of `n` consecutive items (the last one shorter): itertools.batched, Python 3.12."""
    it = iter(items)
    while batch := list(islice(it, n)):
        yield batch


def split_lines(data: bytes):
    """Records of a line-format chunk (each keeps its trailing newline)."""
    return data.splitlines(keepends=True)


def split_fixed(data: bytes, width: int):
    return [data[i:i + width] for i in range(0, len(data), width)]
