"""Writing a snapshot: record streams in, deduplicated chunks and one manifest out.

    writer = repo.begin_snapshot("memory", "postgres")
    with writer.item("public.memories", "table", "pg-copy-text", schema={...}) as item:
        for line in rows:
            item.add(line)
    manifest = writer.commit(cut_time)

Chunks are compressed and uploaded by a small thread pool while the caller keeps streaming;
at most `2 x upload_concurrency x chunk_avg_size` bytes of chunks are in flight (or one chunk,
if it is bigger), so memory stays bounded whatever the source size. The manifest is written last with a conditional create: until then the snapshot
does not exist, and a crash leaves only unreferenced chunks for prune.
"""
from __future__ import annotations

import os
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Callable, Iterable

import numpy as np

from snapshots import codec
from snapshots.errors import NotFoundError, StatevaultError, StoreError, raise_if_aborted
from snapshots.manifest import ChunkRef, Item, Manifest, new_snapshot_id, utcnow

if TYPE_CHECKING:
    from snapshots.repository import Repository

# Records are buffered and hashed/chunked a block at a time: up to 1 MiB, or the minimum chunk
# size when smaller, so a finished chunk leaves for upload within about one block of its last record.
BLOCK_BYTES = 1 << 20
_MMAP_THRESHOLD = 256 << 10
_heap_tuned = False


def _mmap_big_buffers() -> None:
    """Keep chunk-sized buffers out of the malloc arenas (glibc only; once per process).

    Chunks are 0.25-4 MiB buffers allocated by the reading thread and freed by the upload
    threads. glibc raises its mmap threshold to the size of the first such buffer freed, after
    which they come from per-thread arenas that fragment, so the RSS of a long backup creeps up
    with the amount of data (bench/bench_rss.py: 1.34x the peak at 10x the rows). A fixed
    threshold keeps them mmapped: returned to the OS as soon as they are freed. An operator's
    MALLOC_MMAP_THRESHOLD_ wins.
    """
    global _heap_tuned
    if _heap_tuned:
        return
    _heap_tuned = True
    import os
    import sys

    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.mallopt(-3, _MMAP_THRESHOLD)  # M_MMAP_THRESHOLD; a non-glibc libc has no mallopt
    except (OSError, AttributeError):
        pass


@dataclass
class WriteStats:
    """What a writer did; read by backup results, metrics and benchmarks."""

    chunks: int = 0
    chunks_new: int = 0
    bytes_read: int = 0          # uncompressed bytes of all records
    bytes_uploaded: int = 0      # compressed bytes actually written to the store
    bytes_deduplicated: int = 0  # uncompressed bytes of chunks that were already stored
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def as_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in ("chunks", "chunks_new", "bytes_read", "bytes_uploaded", "bytes_deduplicated")}


def lower_thread_priority(step: int) -> None:
    """Add `step` to the calling thread's nice value (Linux, where it is per thread; elsewhere
    it would be the whole process's, so nothing), up to 19. Never raises: a refusal leaves the
    thread as it was.

    For the upload pool (repository.upload_nice): the reader and the store's server are the
    backup's critical path, compression can lag by the in-flight budget. Alternating backups on
    2 CPUs, medians: Redis 200k keys 1.60 -> 1.56 s (+10) / 1.54 s (+19), PostgreSQL 1M rows
    1.99 -> 1.90 s (either). Under systemd or Kubernetes each service has its own cgroup, so
    this orders statevault's own threads, not statevault against other services."""
    if step <= 0 or not sys.platform.startswith("linux"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + step))
    except OSError:
        pass


class _Uploader:
    def __init__(self, repo: "Repository", known: dict[str, int], stats: WriteStats, level: int):
        self.repo = repo
        self.known = known  # chunk id -> stored size, from the source's previous manifest
        self.stats = stats
        self.level = level
        self._pool = ThreadPoolExecutor(max_workers=repo.upload_concurrency, thread_name_prefix="upload",
                                        initializer=lower_thread_priority, initargs=(repo.upload_nice,))
        # a budget of bytes, not of chunks: chunk sizes have a long tail (up to chunk_max_size,
        # 4x the average), and with a count limit the peak memory rose with the number of chunks,
        # as a longer backup met a run of big ones in flight together
        self.budget = repo.upload_concurrency * 2 * repo.config.chunk_avg_size
        self.in_flight = 0
        self._room = threading.Condition()
        self._claimed: dict[str, int] = {}  # chunk id -> stored size (0 while its upload is in flight)
        self._claim_lock = threading.Lock()
        self.error: BaseException | None = None

    def submit(self, data: bytes, records: int) -> Future:
        if self.error is not None:
            raise self.error
        size = len(data)
        with self._room:
            while self.in_flight and self.in_flight + size > self.budget:
                self._room.wait()
            self.in_flight += size
        try:
            fut = self._pool.submit(self._store, data, records)
        except BaseException:
            self._release(size)
            raise
        fut.add_done_callback(lambda f: self._done(f, size))
        return fut

    def _release(self, size: int) -> None:
        with self._room:
            self.in_flight -= size
            self._room.notify_all()

    def _done(self, fut: Future, size: int) -> None:
        self._release(size)
        if fut.cancelled():  # abort(): exception() would raise CancelledError inside this callback
            return
        if fut.exception() is not None and self.error is None:
            self.error = fut.exception()

    def _store(self, data: bytes, records: int) -> ChunkRef:
        cid = codec.chunk_id(data)
        with self._claim_lock:
            fresh = cid not in self.known and cid not in self._claimed
            stored = self.known.get(cid) or self._claimed.get(cid, 0)
            self._claimed.setdefault(cid, stored)
        key = codec.chunk_key(cid)
        if fresh:
            # stat, not exists: the same round trip also gives the stored size for the manifest
            try:
                stored = self.repo.retrying(lambda: self.repo.store.stat(key), f"stat chunk {cid[:12]}").size
                fresh = False
            except NotFoundError:
                pass
        if fresh:
            blob = codec.compress(data, self.level)
            self.repo.retrying(lambda: self.repo.store.put(key, blob), f"upload chunk {cid[:12]}")
            stored = len(blob)
        if stored:
            with self._claim_lock:
                self._claimed[cid] = stored
        with self.stats._lock:
            self.stats.chunks += 1
            if fresh:
                self.stats.chunks_new += 1
                self.stats.bytes_uploaded += stored
            else:
                self.stats.bytes_deduplicated += len(data)
        return ChunkRef(id=cid, size=len(data), stored=stored, records=records)

    def close(self, cancel: bool = False) -> None:
        self._pool.shutdown(wait=True, cancel_futures=cancel)


class ItemWriter:
    """Accepts one item's records in their deterministic order.

    Records are buffered and processed a block (BLOCK_BYTES, or chunk_min_size if smaller) at
    a time: one hash call per record in a `map`, then the digest sum and the chunk boundaries
    with numpy. Memory: the block plus the open chunk (< chunk_max_size) plus the chunks in
    flight.
    """

    def __init__(self, snapshot: "SnapshotWriter", name: str, kind: str, fmt: str, schema: dict[str, Any],
                 offline: bool):
        self._snap = snapshot
        self.name, self.kind, self.format, self.schema, self.offline = name, kind, fmt, schema, offline
        cfg = snapshot.repo.config
        self._chunker = codec.RecordChunker(cfg.chunk_avg_size, cfg.chunk_min_size, cfg.chunk_max_size)
        self._digest = codec.RecordDigest()
        self._hash = codec.record_hasher(self._digest.algo)
        self._futures: list[Future] = []
        self._recs: list[bytes] = []
        self._keys: list[bytes] = []   # what the digest covers: the record or its canonical form
        self._pending = 0              # bytes in _recs
        self._block = max(1, min(BLOCK_BYTES, cfg.chunk_min_size))
        # called with the records processed so far after each block (progress bars, abort checks:
        # an exception it raises comes out of `add`); cheaper than wrapping `add` per record
        self.on_progress: Callable[[int], None] | None = None
        self.item: Item | None = None

    def add(self, record: bytes, canonical: bytes | None = None) -> None:
        """Add one record; the digest covers `canonical` when given (e.g. a Redis record
        without its TTL, which cannot be read back exactly), else the record itself."""
        self._recs.append(record)
        self._keys.append(record if canonical is None else canonical)
        self._pending += len(record)
        if self._pending >= self._block:
            self._process()

    def add_many(self, records: Iterable[bytes], canonicals: list[bytes] | None = None) -> None:
        """`add` for each record, without a method call per record. With `canonicals` (a list
        as long as `records`, which must then be a list too) the digest covers those."""
        if canonicals is not None:
            if len(canonicals) != len(records):
                raise ValueError(f"{len(records)} records but {len(canonicals)} canonical forms")
            self._recs += records
            self._keys += canonicals
            self._pending += sum(map(len, records))
            if self._pending >= self._block:
                self._process()
            return
        recs, keys = self._recs, self._keys
        pending, block = self._pending, self._block
        for r in records:
            recs.append(r)
            keys.append(r)
            pending += len(r)
            if pending >= block:
                self._pending = pending
                self._process()
                recs, keys, pending = self._recs, self._keys, 0
        self._pending = pending

    def add_block(self, data: bytes, width: int | None = None) -> None:
        """Add every record of `data`: whole newline-terminated lines, or rows of `width` bytes.
        The same records as `add` would get one by one (same chunks, same digest)."""
        if width:
            if len(data) % width:
                raise ValueError(f"block of {len(data)} bytes is not whole {width}-byte rows")
            self.add_many(codec.split_fixed(data, width))
        elif data:
            if not data.endswith(b"\n"):
                raise ValueError("a line block must end with a newline")
            self.add_many(codec.split_lines(data))

    def _process(self) -> None:
        recs, keys = self._recs, self._keys
        self._recs, self._keys, self._pending = [], [], 0
        if not recs:
            return
        hashes = b"".join(map(self._hash, keys))
        lens = np.fromiter(map(len, recs), dtype=np.int64, count=len(recs))
        self._digest.add_hashes(hashes, len(recs), int(lens.sum()))
        for data, records in self._chunker.add_block(recs, hashes, lens):
            self._emit(data, records)
        if self.on_progress is not None:
            self.on_progress(self._digest.count)

    def _emit(self, chunk: bytes, records: int) -> None:
        self._snap.stats.bytes_read += len(chunk)
        self._futures.append(self._snap._uploader.submit(chunk, records))

    def close(self) -> Item:
        if self.item is not None:
            return self.item
        self._process()
        rest = self._chunker.flush_counted()
        if rest is not None:
            self._emit(*rest)
        refs = [f.result() for f in self._futures]
        self.item = Item(name=self.name, kind=self.kind, format=self.format, records=self._digest.count,
                         digest=self._digest.hexdigest, digest_algo=self._digest.algo, bytes=self._digest.nbytes,
                         stored_bytes=sum(r.stored for r in refs), chunks=refs, schema=self.schema)
        self._snap._finish_item(self)
        return self.item

    def __enter__(self) -> "ItemWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()


class SnapshotWriter:
    def __init__(self, repo: "Repository", source: str, kind: str, *, tags: Iterable[str] = (),
                 backup_set: str | None = None, source_info: dict | None = None,
                 known_chunks: dict[str, int] | set[str] | None = None, compression_level: int | None = None):
        _mmap_big_buffers()
        self.repo = repo
        self.source, self.kind = source, kind
        self.tags = sorted(set(tags))
        self.backup_set = backup_set
        self.source_info = dict(source_info or {})
        self.started_at = utcnow()
        self.id = new_snapshot_id(self.started_at)
        self.stats = WriteStats()
        # known chunks are trusted to be stored (no round trip); a dict also gives their stored sizes
        known = known_chunks if isinstance(known_chunks, dict) else dict.fromkeys(known_chunks or (), 0)
        level = codec.compression_level(kind, compression_level, repo.compression_level)
        self._uploader = _Uploader(repo, dict(known), self.stats, level)
        self._items: list[Item] = []
        self._offline: list[Item] = []
        self._names: set[tuple[bool, str]] = set()
        self.manifest: Manifest | None = None

    def item(self, name: str, kind: str, fmt: str, schema: dict[str, Any] | None = None, *,
             offline: bool = False) -> ItemWriter:
        if (offline, name) in self._names:
            raise StatevaultError(f"item {name!r} written twice in snapshot {self.id}")
        self._names.add((offline, name))
        return ItemWriter(self, name, kind, fmt, dict(schema or {}), offline)

    def _finish_item(self, w: ItemWriter) -> None:
        (self._offline if w.offline else self._items).append(w.item)

    def commit(self, cut_time: datetime, *, extra_info: dict | None = None) -> Manifest:
        """Wait for every chunk, then write the manifest: the snapshot exists from here on.

        Fencing: chunks were deduplicated against what the repository held while this process
        held its shared repository lease, which keeps prune out. If that lease lapsed meanwhile
        (a stall longer than its ttl: see snapshots/leases.py), a prune may have deleted some of
        them. The manifest is then written only under a fresh shared lease (none while a prune
        runs), after every chunk it names is found in the store; else nothing is committed. A
        lapse that falls between that check and the manifest landing is re-checked the same way
        after the write, and the manifest deleted again if a chunk is gone."""
        self._uploader.close()
        if self._uploader.error is not None:
            raise self._uploader.error
        held = self.repo.held_leases()
        if held and not all(lease.stands() for lease in held):
            with self.repo.lease(f"re-check of snapshot {self.id} of {self.source}: its lease lapsed"):
                self._verify_chunks_stored()
                return self._write_manifest(cut_time, extra_info)
        manifest = self._write_manifest(cut_time, extra_info)
        if held and not all(lease.stands() for lease in held):
            # the lease lapsed between that check and the manifest landing (a stall inside the
            # write): the same re-check, after the fact; a snapshot missing chunks is taken back
            with self.repo.lease(f"re-check of snapshot {self.id} of {self.source}: its lease lapsed"):
                try:
                    self._verify_chunks_stored()
                except StoreError:
                    self.repo.store.delete(f"snapshots/{self.id}.json")
                    self.manifest = None
                    raise
        return manifest

    def _verify_chunks_stored(self) -> None:
        missing = []
        for cid in sorted({c.id for it in self._items + self._offline for c in it.chunks}):
            try:
                self.repo.retrying(lambda: self.repo.store.stat(codec.chunk_key(cid)), f"stat chunk {cid[:12]}")
            except NotFoundError:
                missing.append(cid)
        if missing:
            raise StoreError(f"snapshot {self.id} of {self.source} not committed: {len(missing)} of its chunks "
                             f"were deleted (e.g. {missing[0][:12]}) by a prune that ran while this backup's "
                             "repository lease had lapsed", retryable=True,
                             hint="Run the backup again: it uploads what is missing.")

    def _write_manifest(self, cut_time: datetime, extra_info: dict | None) -> Manifest:
        manifest = Manifest(id=self.id, source=self.source, kind=self.kind, started_at=self.started_at,
                            finished_at=utcnow(), cut_time=cut_time, tags=self.tags, backup_set=self.backup_set,
                            items=self._items, offline_index=self._offline,
                            source_info={**self.source_info, **(extra_info or {})})
        key = f"snapshots/{self.id}.json"
        if not self.repo.store.create(key, manifest.to_json()):
            raise StoreError(f"snapshot id collision on {self.id}; run the backup again")
        self.manifest = manifest
        return manifest

    def abort(self) -> None:
        """Stop uploading; nothing becomes visible (chunks already stored wait for prune)."""
        self._uploader.close(cancel=True)

    def check_aborted(self, event: threading.Event | None) -> None:
        if event is not None and event.is_set():
            self.abort()
        raise_if_aborted(event, f"backup of {self.source} interrupted before commit; no snapshot was written")
