"""The repository through its Python API, on both stores: write, read back, dedup, resolve."""
from __future__ import annotations

import gc
import logging
import sys
import threading
import time
import tracemalloc
from datetime import timedelta

import orjson
import pytest

from snapshots import codec
from snapshots.errors import Aborted, ManifestError, NotFoundError, UsageError
from snapshots.manifest import RepoConfig, utcnow
from snapshots.repository import open_repository

SMALL_CHUNKS = dict(chunk_avg_size=16 << 10, chunk_min_size=4 << 10, chunk_max_size=64 << 10)


@pytest.fixture
def repo(repo_url):
    return open_repository(repo_url, create=True, config=RepoConfig(id="t", created_at=utcnow(), **SMALL_CHUNKS))


def memory_rows(n: int, *, user: str = "u", start: int = 0) -> list[bytes]:
    """JSON lines like a memories table: deterministic, varied, compressible."""
    return [orjson.dumps({"id": i, "user": f"{user}{i % 37}", "text": f"remembers fact {i * 7919 % 10007} " * (1 + i % 5),
                          "score": (i % 101) / 100}) + b"\n" for i in range(start, start + n)]


def write(repo, source: str, items: dict[str, list[bytes]], *, cut=None, canonical=None):
    writer = repo.begin_snapshot(source, "postgres", tags=["t1"])
    for name, records in items.items():
        with writer.item(name, "table", "jsonl", schema={"columns": ["id", "user", "text"]}) as w:
            for r in records:
                w.add(r, canonical(r) if canonical else None)
    manifest = writer.commit(cut or utcnow())
    return manifest, writer.stats


def test_snapshot_round_trip_reads_back_identical_records_and_digest(repo):
    rows = memory_rows(4000)
    notes = memory_rows(50, user="n")
    manifest, stats = write(repo, "memory", {"public.memories": rows, "public.notes": notes})

    loaded = repo.load_manifest(manifest.id)
    assert loaded == manifest
    item = loaded.item("public.memories")
    assert len(item.chunks) > 5, "the test needs a multi-chunk item"
    assert sum(c.records for c in item.chunks) == len(rows)
    assert list(repo.iter_records(item)) == rows
    assert list(repo.iter_records(loaded.item("public.notes"))) == notes
    count, digest = codec.digest_records(rows)
    assert (item.records, item.digest) == (count, digest)
    assert item.bytes == sum(len(r) for r in rows)
    assert stats.chunks_new == stats.chunks == len({c.id for i in loaded.items for c in i.chunks})
    assert 0 < item.stored_bytes < item.bytes  # compressed
    # the order-independent digest: the same multiset in another order has the same digest
    assert codec.digest_records(reversed(rows))[1] == item.digest
    assert codec.digest_records(rows[:-1])[1] != item.digest
    assert loaded.tags == ["t1"] and loaded.item("public.memories").schema == {"columns": ["id", "user", "text"]}


def test_chunks_are_plain_zstd_frames_named_by_the_hash_of_their_content(repo):
    manifest, _ = write(repo, "memory", {"t": memory_rows(800)})
    ref = manifest.items[0].chunks[0]
    blob = repo.store.get(codec.chunk_key(ref.id))
    import zstandard

    data = zstandard.ZstdDecompressor().decompress(blob)
    assert codec.chunk_id(data) == ref.id
    assert (len(data), len(blob)) == (ref.size, ref.stored)


def test_digest_covers_the_canonical_form_when_given(repo):
    rows = memory_rows(300)
    canon = lambda r: r.upper()  # noqa: E731 - e.g. a Redis record without its TTL
    manifest, _ = write(repo, "history", {"keys": rows}, canonical=canon)
    item = manifest.items[0]
    assert item.digest == codec.digest_records(canon(r) for r in rows)[1]
    assert list(repo.iter_records(item)) == rows  # the stored records are the originals


def test_identical_second_snapshot_uploads_no_new_chunks(repo):
    rows = memory_rows(4000)
    first, s1 = write(repo, "memory", {"public.memories": rows})
    second, s2 = write(repo, "memory", {"public.memories": rows})
    assert s1.chunks_new > 5
    assert (s2.chunks_new, s2.bytes_uploaded) == (0, 0)
    assert s2.bytes_deduplicated == s2.bytes_read == sum(len(r) for r in rows)
    assert second.items[0].chunks == first.items[0].chunks  # ids, sizes and stored sizes
    assert second.stored_bytes == first.stored_bytes > 0
    assert second.id != first.id
    assert list(repo.iter_records(second.items[0])) == rows


def test_dedup_across_sources_and_a_small_change_costs_few_chunks(repo):
    rows = memory_rows(4000)
    first, _ = write(repo, "memory", {"t": rows})
    # another source has no previous snapshot to trust: the store is asked, and still nothing is uploaded
    _, other = write(repo, "memory-copy", {"t": rows})
    assert other.chunks_new == 0
    assert repo.resolve("latest", source="memory-copy").items[0].chunks == first.items[0].chunks
    changed = list(rows)
    changed[2000] = orjson.dumps({"id": 2000, "text": "edited"}) + b"\n"
    third, s3 = write(repo, "memory", {"t": changed})
    assert 1 <= s3.chunks_new <= 3, s3
    assert s3.chunks_new < len(third.items[0].chunks) // 4
    assert list(repo.iter_records(third.items[0])) == changed


def test_resolve_latest_prefix_ambiguous_and_at(repo):
    t0 = utcnow()
    a, _ = write(repo, "memory", {"t": memory_rows(10)}, cut=t0 - timedelta(hours=3))
    b, _ = write(repo, "memory", {"t": memory_rows(10, start=10)}, cut=t0 - timedelta(hours=2))
    c, _ = write(repo, "memory", {"t": memory_rows(10, start=20)}, cut=t0 - timedelta(hours=1))
    h, _ = write(repo, "history", {"k": memory_rows(5)}, cut=t0)

    assert repo.resolve("latest").id == h.id
    assert repo.resolve("latest", source="memory").id == c.id
    assert repo.resolve(a.id).id == a.id
    assert repo.resolve(b.id[:-1]).id == b.id  # a unique prefix
    with pytest.raises(UsageError, match="ambiguous") as exc:
        repo.resolve(a.id[:8], source="memory")  # the date: shared by all three
    assert not isinstance(exc.value, NotFoundError)
    assert repo.resolve("latest", source="memory", at=t0 - timedelta(minutes=90)).id == b.id
    assert repo.resolve("latest", source="memory", at=t0 - timedelta(hours=3)).id == a.id
    with pytest.raises(NotFoundError):
        repo.resolve("latest", source="memory", at=t0 - timedelta(hours=4))
    with pytest.raises(UsageError, match="belongs to source"):
        repo.resolve(h.id, source="memory")
    with pytest.raises(NotFoundError):
        repo.resolve("latest", source="no-such-source")
    assert [m.id for m in repo.list_snapshots(source="memory")] == [a.id, b.id, c.id]


def test_unknown_and_malformed_snapshot_ids(repo):
    write(repo, "memory", {"t": memory_rows(10)})
    with pytest.raises(NotFoundError, match="20990101T000000Z-deadbeef"):
        repo.resolve("20990101T000000Z-deadbeef")
    with pytest.raises(NotFoundError):
        repo.load_manifest("20990101T000000Z-deadbeef")
    with pytest.raises(NotFoundError):
        repo.resolve("20990101")  # a well-formed prefix nothing has
    for bad in ("not-an-id", "../snapshots/x", "20990101T000000Z-DEADBEEF", ""):
        with pytest.raises(UsageError) as exc:
            repo.load_manifest(bad)
        assert exc.value.exit_code == 2


def test_a_renamed_manifest_is_refused(repo):
    m, _ = write(repo, "memory", {"t": memory_rows(10)})
    fake = "20990101T000000Z-00000000"
    repo.store.put(f"snapshots/{fake}.json", repo.store.get(f"snapshots/{m.id}.json"))
    with pytest.raises(ManifestError, match="renamed or tampered"):
        repo.load_manifest(fake)
    assert [x.id for x in repo.list_snapshots()] == [m.id]
    assert len(repo.manifest_errors) == 1


def test_an_aborted_snapshot_is_invisible_and_aborts_quietly(repo, caplog):
    gate = threading.Event()
    real_put = repo.store.put

    def held_put(key, data):  # uploads wait until abort() has been called
        gate.wait(10)
        real_put(key, data)

    repo.store.put = held_put
    repo.upload_concurrency = 1  # one upload running, one queued, the writer waiting for a slot
    writer = repo.begin_snapshot("memory", "postgres")
    item = writer.item("t", "table", "jsonl")

    def feed() -> None:
        try:
            item.add_many(memory_rows(5000))
        except RuntimeError:
            pass  # the upload pool was shut down under it: what abort() is for

    feeder = threading.Thread(target=feed)
    feeder.start()
    time.sleep(0.5)  # the feeder fills both slots and blocks
    with caplog.at_level(logging.ERROR):
        aborter = threading.Thread(target=writer.abort)
        aborter.start()
        time.sleep(0.1)
        gate.set()
        aborter.join(10)
        feeder.join(10)
    assert not aborter.is_alive() and not feeder.is_alive()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert repo.list_snapshots() == []
    with pytest.raises(Aborted):
        writer.check_aborted(gate)


def test_chunks_in_flight_stay_within_the_byte_budget(repo):
    """At most 2 x upload_concurrency x chunk_avg_size bytes of chunks wait or upload at once
    (one chunk alone may be bigger): observed as each chunk starts storing, with slow uploads
    so the writer keeps running into the budget."""
    seen: list[tuple[int, int]] = []  # (bytes in flight, size of the chunk being stored)
    repo.upload_concurrency = 2
    writer = repo.begin_snapshot("memory", "postgres")
    uploader = writer._uploader
    real_store = uploader._store

    def slow_store(data, records):
        seen.append((uploader.in_flight, len(data)))
        time.sleep(0.002)
        return real_store(data, records)

    uploader._store = slow_store
    with writer.item("t", "table", "jsonl") as w:
        w.add_many(memory_rows(20000))
    manifest = writer.commit(utcnow())
    sizes = [c.size for c in manifest.items[0].chunks]
    budget = 2 * 2 * (16 << 10)
    assert uploader.budget == budget
    assert len(sizes) > 50 and max(sizes) > budget / 4  # many chunks, some of them big
    # over the budget only as the one chunk in flight (a chunk ends at a record boundary, so
    # it can pass chunk_max_size)
    assert all(n <= budget or n == size for n, size in seen), [x for x in seen if x[0] > budget]
    assert max(n for n, _ in seen) > budget / 2  # the writer did run into the budget
    assert uploader.in_flight == 0


@pytest.mark.parametrize("step", [None, 5, 0])
def test_upload_threads_run_at_a_lower_priority_than_the_reader(repo, step):
    """repository.upload_nice (default 10) is added to the upload threads' nice value, not the
    reader's (the caller's) or the process's. Only on Linux, where nice is per thread:
    elsewhere the upload threads keep the caller's."""
    import os

    if step is not None:
        repo.upload_nice = step
    assert repo.upload_nice == (10 if step is None else step)  # the settings' default
    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    seen = set()
    writer = repo.begin_snapshot("memory", "postgres")
    real_store = writer._uploader._store

    def store(data, records):
        seen.add(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return real_store(data, records)

    writer._uploader._store = store
    with writer.item("t", "table", "jsonl") as w:
        w.add_many(memory_rows(5000))
    writer.commit(utcnow())
    linux = sys.platform.startswith("linux")
    assert seen == {min(19, mine + repo.upload_nice) if linux else mine}
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine


@pytest.mark.parametrize("kind, source_level, repo_level, expected", [
    ("postgres", None, None, 3), ("redis", None, None, 2), ("qdrant", None, None, 1), ("other", None, None, 3),
    ("redis", None, 6, 6), ("qdrant", 9, 6, 9),
])
def test_chunks_are_compressed_at_the_source_then_repository_then_kind_level(file_repo_url, kind, source_level,
                                                                              repo_level, expected):
    repo = open_repository(file_repo_url, create=True, config=RepoConfig(id="t", created_at=utcnow(), **SMALL_CHUNKS))
    repo.compression_level = repo_level
    records = memory_rows(40)
    data = b"".join(records)  # under the minimum chunk size: one chunk
    assert len({codec.compress(data, level) for level in (1, 2, 3, 6, 9)}) == 5  # the levels are told apart
    writer = repo.begin_snapshot("s", kind, compression_level=source_level)
    with writer.item("t", "table", "jsonl", {}) as item:
        item.add_many(records)
    manifest = writer.commit(utcnow())
    [chunk] = manifest.items[0].chunks
    assert repo.store.get(codec.chunk_key(chunk.id)) == codec.compress(data, expected)


def test_a_source_compression_level_reaches_its_chunks(tmp_path, qdrant_client, qdrant_path):
    from qdrant_client import models

    from backup.job import snapshot_source
    from snapshots.settings import QdrantSource

    qdrant_client.create_collection("kb", vectors_config=models.VectorParams(size=4, distance=models.Distance.DOT))
    qdrant_client.upsert("kb", [models.PointStruct(id=i, vector=[i, 1, 2, 3], payload={"t": "x" * i}) for i in range(50)])
    qdrant_client.close()
    for level in (None, 7):  # a repository each: the same chunk stored once would dedup
        repo = open_repository((tmp_path / f"repo-{level}").as_uri(), create=True)
        cfg = QdrantSource(kind="qdrant", path=str(qdrant_path), offline_index=False, compression_level=level)
        manifest, _ = snapshot_source(repo, "knowledge", cfg)
        [chunk] = manifest.items[0].chunks
        data = b"".join(repo.iter_records(manifest.items[0]))
        assert repo.store.get(codec.chunk_key(chunk.id)) == codec.compress(data, level or 1)


def test_pre_restore_snapshots_are_retained_apart_from_the_backups(file_repo_url):
    """A pre-restore snapshot (often of a few items) taken after the day's backup must not take
    that day's keep_daily slot, nor count toward keep_last: backups and pre-restore snapshots
    are two retention groups under the same policy (backup/forget.py)."""
    from datetime import datetime, timezone

    from backup.forget import forget_snapshots
    from snapshots.repository import PRE_RESTORE_TAG
    from snapshots.settings import Settings

    repo = open_repository(file_repo_url, create=True, config=RepoConfig(id="t", created_at=utcnow(), **SMALL_CHUNKS))

    def snap(day: int, hour: int, tags=()) -> str:
        writer = repo.begin_snapshot("memory", "postgres", tags=tags)
        with writer.item("t", "table", "jsonl") as w:
            w.add_many(memory_rows(5, start=day * 100 + hour))
        return writer.commit(datetime(2026, 11, day, hour, tzinfo=timezone.utc)).id

    backups = {day: snap(day, 2) for day in (20, 21, 22, 23)}       # the nightly backups
    pre = {day: snap(day, 15, [PRE_RESTORE_TAG]) for day in (22, 23)}  # restores in the afternoons
    settings = Settings(repository={"url": file_repo_url}, sources={"memory": {
        "kind": "postgres", "url": "postgresql://agent@db/agent", "retention": {"keep_daily": 2}}})
    result = forget_snapshots(repo, settings)
    decision = result.sources["memory"]
    kept = {k["id"]: k["group"] for k in decision["keep"]}
    assert kept == {backups[23]: "backups", backups[22]: "backups",
                    pre[23]: PRE_RESTORE_TAG, pre[22]: PRE_RESTORE_TAG}
    assert [r["id"] for r in decision["remove"]] == [backups[21], backups[20]]
    assert [k["time"] for k in decision["keep"]] == sorted((k["time"] for k in decision["keep"]), reverse=True)
    assert {m.id for m in repo.list_snapshots()} == set(kept)


def test_a_backup_whose_lease_lapsed_commits_only_when_its_chunks_survived(repo):
    """Fencing: a backup deduplicates against the chunks its shared lease protects from prune.
    If the holder stalls past the lease's ttl (its refresh stopped here, as in a partition),
    a prune may run meanwhile; a refresh after that does not hide the lapse. The manifest is
    then written only under a fresh lease, after every chunk is found: committed when nothing
    was deleted, refused (retryable, no manifest) when the prune took chunks it names."""
    from datetime import timedelta

    from snapshots.errors import StoreError
    from snapshots.prune import prune_repository

    repo.lease_ttl = 0.6
    write(repo, "memory", {"t": memory_rows(3000)})

    def stalled_backup():
        lease = repo.lease("backup memory")
        writer = repo.begin_snapshot("memory", "postgres")
        with writer.item("t", "table", "jsonl") as w:
            w.add_many(memory_rows(3000))  # the same records: every chunk deduplicated
        assert lease.stands()
        lease._stop.set()      # the holder stalls: no refresh...
        lease._thread.join()
        time.sleep(0.8)        # ...past the ttl
        assert not lease.stands()
        return lease, writer

    lease, writer = stalled_backup()
    lease._write(repo.store.put)  # it wakes up and refreshes: the lapse stays known
    assert lease.lapsed and not lease.stands()
    manifest = writer.commit(utcnow())  # nothing was pruned: committed after the re-check
    lease.release()
    assert manifest.id in {m.id for m in repo.list_snapshots()}
    assert repo.held_leases() == []

    lease, writer = stalled_backup()
    for m in repo.list_snapshots():
        repo.delete_snapshot(m.id)
    pruned = prune_repository(repo, grace=timedelta(0))  # the lapsed shared lease does not stop it
    assert pruned.chunks_deleted > 0
    with pytest.raises(StoreError, match="deleted .* by a prune") as caught:
        writer.commit(utcnow())
    assert caught.value.retryable
    lease.release()
    assert repo.list_snapshots() == []


def test_a_lease_that_lapses_while_the_manifest_is_written_is_checked_after_it(repo, monkeypatch):
    """The lapse falls after commit's lease check, inside the manifest's write (a stall there),
    and a prune deletes chunks meanwhile: the manifest that landed is re-checked under a fresh
    lease and taken back (retryable); with nothing deleted, it stays."""
    from datetime import timedelta

    from snapshots.errors import StoreError
    from snapshots.prune import prune_repository

    write(repo, "memory", {"t": memory_rows(3000)})

    def backup_stalling_in_its_write(prune: bool):
        lease = repo.lease("backup memory")
        writer = repo.begin_snapshot("memory", "postgres")
        with writer.item("t", "table", "jsonl") as w:
            w.add_many(memory_rows(3000))  # every chunk deduplicated
        create = type(repo.store).create

        def stall_then_create(store, key, data):
            if key.startswith("snapshots/") and key.endswith(f"{writer.id}.json"):
                lease._stop.set()
                lease._thread.join()
                lease.lapsed = True  # the stall outlasted the ttl (the next refresh records it so)
                if prune:
                    for m in repo.list_snapshots():
                        repo.delete_snapshot(m.id)
                    # the lapsed lease no longer keeps prune out (it is taken over once expired)
                    lease.release()
                    assert prune_repository(repo, grace=timedelta(0)).chunks_deleted > 0
            return create(store, key, data)

        monkeypatch.setattr(type(repo.store), "create", stall_then_create)
        return lease, writer

    lease, writer = backup_stalling_in_its_write(prune=False)
    manifest = writer.commit(utcnow())
    lease.release()
    assert manifest.id in {m.id for m in repo.list_snapshots()}

    lease, writer = backup_stalling_in_its_write(prune=True)
    with pytest.raises(StoreError, match="deleted .* by a prune") as caught:
        writer.commit(utcnow())
    assert caught.value.retryable and writer.manifest is None
    assert repo.list_snapshots() == []  # the manifest that landed was taken back


def test_stored_chunks_are_freed_as_they_are_stored(file_repo_url):
    """With the cyclic GC off, what a backup holds after its upload is what it still needs, not
    every chunk it stored: each new chunk's `stat` ends in NotFoundError inside the retry
    wrapper, and that must not leave the upload's frame, with the chunk, in a reference cycle
    (the peak RSS rose with the backup's size). A file repository: tracemalloc sees the whole
    process, and the S3 tests' moto server runs in this one."""
    repo = open_repository(file_repo_url, create=True,
                           config=RepoConfig(id="t", created_at=utcnow(), **SMALL_CHUNKS))
    rows = memory_rows(40000)  # ~5 MiB in ~300 small chunks
    gc.collect()
    gc.disable()
    tracemalloc.start()
    try:
        writer = repo.begin_snapshot("memory", "postgres")
        with writer.item("t", "table", "jsonl") as w:
            w.add_many(rows)
        manifest = writer.commit(utcnow())
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        gc.enable()
    data = sum(map(len, rows))
    assert len(manifest.items[0].chunks) > 100 and writer.stats.chunks_new == len(manifest.items[0].chunks)
    assert held < data / 4, f"{held} bytes still held after storing {data} bytes of chunks"


def test_an_unfinished_read_does_not_wait_for_its_read_ahead(repo, monkeypatch):
    """A reader that stops early (a failed restore) leaves its generator to the garbage
    collector, which may close it in any thread: closing must never join a read in progress
    (snapshots.threads.read_ahead_pool)."""
    manifest, _ = write(repo, "memory", {"public.memories": memory_rows(3000)})
    item = manifest.item("public.memories")
    assert len(item.chunks) > 5
    release, started = threading.Event(), threading.Event()
    real = repo.read_chunk

    def slow(cid):
        if cid != item.chunks[0].id:
            started.set()
            release.wait(30)
        return real(cid)

    monkeypatch.setattr(repo, "read_chunk", slow)
    chunks = repo.iter_chunks(item)
    try:
        assert next(chunks)
        assert started.wait(10)  # the read-ahead is blocked in a read
        t0 = time.monotonic()
        chunks.close()
        assert time.monotonic() - t0 < 5
    finally:
        release.set()
    # read to its end, it waits for its pool as before: every chunk, in order
    monkeypatch.setattr(repo, "read_chunk", real)
    assert b"".join(repo.iter_chunks(item)) == b"".join(memory_rows(3000))
