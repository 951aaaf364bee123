"""Record digests and record-aligned content-defined chunking (snapshots/codec.py), and the
snapshot writer's block-at-a-time hot path that uses them (snapshots/writer.py)."""
from __future__ import annotations

import random

import blake3
import numpy as np
import pytest

from snapshots import codec, writer as writer_mod
from snapshots.manifest import RepoConfig, utcnow
from snapshots.repository import open_repository

AVG, MIN, MAX = 16 << 10, 4 << 10, 64 << 10


def rows(n: int, seed: int = 1) -> list[bytes]:
    """COPY-like lines of 20-600 bytes, deterministic for a seed."""
    rnd = random.Random(seed)
    return [b"%d\t%s\t{\"k\": %d}\n" % (i, rnd.randbytes(rnd.randint(10, 300)).hex().encode(), rnd.randint(0, 9))
            for i in range(n)]


def chunk_all(records: list[bytes], *, block: int = 1000, avg=AVG, lo=MIN, hi=MAX) -> list[tuple[bytes, int]]:
    """Chunk `records` fed `block` records at a time (as the writer does)."""
    chunker = codec.RecordChunker(avg, lo, hi)
    h = codec.record_hasher()
    out = []
    for i in range(0, len(records), block):
        part = records[i:i + block]
        out += chunker.add_block(part, b"".join(map(h, part)))
    rest = chunker.flush_counted()
    return out + ([rest] if rest else [])


@pytest.fixture
def repo(tmp_path):
    cfg = RepoConfig(id="t", created_at=utcnow(), chunk_avg_size=AVG, chunk_min_size=MIN, chunk_max_size=MAX)
    return open_repository(f"file://{tmp_path}/repo", create=True, config=cfg)


def write_item(repo, records, *, canonical=None, how="add", source="s"):
    w = repo.begin_snapshot(source, "postgres")
    with w.item("t", "table", "jsonl") as item:
        if how == "add":
            for r in records:
                item.add(r, canonical(r) if canonical else None)
        elif how == "add_many":
            item.add_many(iter(records))
        else:
            item.add_block(b"".join(records))
    return w.commit(utcnow()).items[0]


# ---- digests -----------------------------------------------------------------------------

def test_digest_is_order_independent_and_counts_duplicates():
    recs = rows(3000)
    count, digest = codec.digest_records(recs)
    assert count == 3000
    shuffled = list(recs)
    random.Random(5).shuffle(shuffled)
    assert codec.digest_records(shuffled) == (3000, digest)
    # a multiset: a duplicate changes the digest, and which record is duplicated matters
    assert codec.digest_records(recs + recs[:1])[1] != digest
    assert codec.digest_records(recs + recs[:1])[1] != codec.digest_records(recs + recs[1:2])[1]
    assert codec.digest_records([recs[0], recs[0], recs[1]]) != codec.digest_records([recs[0], recs[1], recs[1]])
    # one changed byte anywhere changes it
    changed = list(recs)
    changed[1234] = changed[1234][:-2] + b"X\n"
    assert codec.digest_records(changed)[1] != digest
    assert codec.digest_records([]) == (0, "0" * 32)


def test_digest_is_the_sum_mod_2_128_of_the_xxh3_128_values():
    import xxhash

    recs = rows(5000, seed=3)  # more than one numpy block
    total = sum(xxhash.xxh3_128_intdigest(r) for r in recs) % (1 << 128)
    assert codec.digest_records(recs) == (5000, total.to_bytes(16, "little").hex())


def test_legacy_blake3_digest_is_still_computed_as_before():
    recs = rows(700, seed=4)
    old = sum(int.from_bytes(blake3.blake3(r).digest(length=16), "little") for r in recs) % (1 << 128)
    assert codec.digest_records(recs, codec.LEGACY_DIGEST_ALGO) == (700, old.to_bytes(16, "little").hex())
    with pytest.raises(ValueError, match="unknown digest algorithm"):
        codec.RecordDigest("md5-sum")


def test_record_digest_add_update_and_add_hashes_agree():
    recs = rows(9000, seed=6)
    one = codec.RecordDigest()
    for r in recs:
        one.add(r)
    many = codec.RecordDigest().update(iter(recs))
    h = codec.record_hasher()
    pre = codec.RecordDigest()
    pre.add_hashes(b"".join(map(h, recs[:5000])), 5000, sum(map(len, recs[:5000])))
    pre.update(recs[5000:])
    assert one.hexdigest == many.hexdigest == pre.hexdigest
    assert one.count == many.count == pre.count == 9000
    assert one.nbytes == many.nbytes == pre.nbytes == sum(map(len, recs))
    one.add(recs[0])  # reading the digest does not end the stream
    assert one.hexdigest == codec.digest_records(recs + recs[:1])[1]


def test_sum_hashes_is_exact_with_carries_between_limbs():
    values = [(1 << 128) - 1, (1 << 96) + (1 << 64) - 1, (1 << 32) - 1, 12345] * 1000
    data = b"".join(v.to_bytes(16, "big") for v in values)
    assert codec.sum_hashes(data) == sum(values)
    assert [int(x) for x in codec.boundary_keys(data[:32])] == [(1 << 64) - 1, (1 << 64) - 1]


# ---- chunk boundaries --------------------------------------------------------------------

def test_boundaries_are_deterministic_and_independent_of_block_size():
    recs = rows(6000)
    first = chunk_all(recs, block=1000)
    assert len(first) > 10, "the test needs many chunks"
    assert chunk_all(recs, block=1000) == first
    assert chunk_all(recs, block=1) == first      # record by record
    assert chunk_all(recs, block=7) == first
    assert chunk_all(recs, block=6000) == first   # one block
    assert b"".join(c for c, _ in first) == b"".join(recs)
    assert sum(n for _, n in first) == len(recs)


def test_chunks_respect_min_and_max_and_average_about_avg():
    recs = rows(20000, seed=2)
    chunks = chunk_all(recs)
    sizes = [len(c) for c, _ in chunks]
    assert all(s >= MIN for s in sizes[:-1])
    # cut at the first record that reaches max_size: at most max + one record
    assert all(s < MAX + 700 for s in sizes)
    mean = sum(sizes) / len(sizes)
    assert AVG * 0.6 < mean < (MIN + AVG) * 1.5, mean
    # every chunk is whole records
    at = 0
    for data, n in chunks:
        assert data == b"".join(recs[at:at + n])
        at += n


def test_a_record_without_boundaries_is_cut_at_max_size():
    # records of 1 byte have a probability of 1/AVG each to be a boundary: max_size decides most cuts
    chunker = codec.RecordChunker(1 << 20, 100, 1000)
    recs = [b"\n"] * 5000
    h = codec.record_hasher()
    out = chunker.add_block(recs, b"".join(map(h, recs)))
    assert [len(c) for c, _ in out] == [1000] * 5  # identical records: never a hash boundary
    assert chunker.flush() is None


def test_a_change_in_one_record_changes_at_most_two_chunks():
    recs = rows(8000, seed=9)
    before = {c for c, _ in chunk_all(recs)}
    rnd = random.Random(11)
    for _ in range(10):
        i = rnd.randrange(len(recs))
        changed = list(recs)
        changed[i] = b"%d\tedited %d\n" % (i, rnd.randint(0, 10**9))
        after = [c for c, _ in chunk_all(changed)]
        new = [c for c in after if c not in before]
        assert 1 <= len(new) <= 2, (i, len(new))
        inserted = recs[:i] + [b"inserted\n"] + recs[i:]
        assert len([c for c, _ in chunk_all(inserted) if c not in before]) <= 2


def test_chunker_add_one_by_one_matches_blocks():
    recs = rows(3000, seed=8)
    chunker = codec.RecordChunker(AVG, MIN, MAX)
    h = codec.record_hasher()
    single = [c for c in (chunker.add(r, h(r)) for r in recs) if c is not None]
    single.append(chunker.flush())
    assert single == [c for c, _ in chunk_all(recs)]


def test_big_records_are_always_candidates_and_may_exceed_max():
    chunker = codec.RecordChunker(1000, 10, 4000)
    recs = [b"a" * 5000 + b"\n", b"b\n", b"c" * 1200 + b"\n"]
    out = chunker.add_block(recs, b"".join(map(codec.record_hasher(), recs)))
    assert [n for _, n in out] == [1, 2]


# ---- the writer --------------------------------------------------------------------------

def test_writer_digest_equals_record_digest_and_digest_records(repo):
    recs = rows(5000, seed=12)
    item = write_item(repo, recs)
    assert item.digest_algo == codec.DIGEST_ALGO
    assert (item.records, item.digest) == codec.digest_records(recs)
    d = codec.RecordDigest()
    for r in repo.iter_records(item):
        d.add(r)
    assert (d.count, d.hexdigest) == (item.records, item.digest)
    assert item.bytes == sum(map(len, recs)) == sum(c.size for c in item.chunks)
    assert [c.records for c in item.chunks] == [n for _, n in chunk_all(recs)]


def test_writer_add_add_many_and_add_block_give_the_same_item(repo):
    recs = rows(4000, seed=13)
    a = write_item(repo, recs, how="add", source="a")
    b = write_item(repo, recs, how="add_many", source="b")
    c = write_item(repo, recs, how="add_block", source="c")
    assert a.chunks == b.chunks == c.chunks
    assert (a.records, a.digest) == (b.records, b.digest) == (c.records, c.digest)
    assert list(repo.iter_records(c)) == recs


def test_writer_chunks_do_not_depend_on_its_block_size(repo, monkeypatch):
    recs = rows(4000, seed=14)
    a = write_item(repo, recs, source="a")
    monkeypatch.setattr(writer_mod, "BLOCK_BYTES", 333)
    b = write_item(repo, recs, source="b")
    assert a.chunks == b.chunks and a.digest == b.digest


def test_writer_digest_covers_canonical_forms_and_counts_duplicates(repo):
    recs = rows(2000, seed=15)
    recs = recs + recs[:300]  # duplicates are records too
    canon = lambda r: r.split(b"\t", 1)[1]  # noqa: E731 - e.g. a Redis record without its TTL
    item = write_item(repo, recs, canonical=canon)
    assert item.records == 2300
    assert item.digest == codec.digest_records(canon(r) for r in recs)[1]
    assert item.digest != codec.digest_records(recs)[1]
    assert item.bytes == sum(map(len, recs))  # the stored records, not their canonical forms
    assert list(repo.iter_records(item)) == recs


def test_writer_add_many_with_canonical_forms_equals_add_one_by_one(repo):
    recs = rows(3000, seed=17)
    canon = [r.split(b"\t", 1)[1] for r in recs]
    one = repo.begin_snapshot("one", "redis")
    with one.item("t", "keys", "jsonl") as item:
        for r, c in zip(recs, canon):
            item.add(r, canonical=c)
    many = repo.begin_snapshot("many", "redis")
    with many.item("t", "keys", "jsonl") as blocks:
        for lo in range(0, len(recs), 777):  # uneven blocks, as a reader's value requests come
            blocks.add_many(recs[lo:lo + 777], canon[lo:lo + 777])
        with pytest.raises(ValueError, match="canonical"):
            blocks.add_many(recs[:3], canon[:2])
    a, b = one.commit(utcnow()).items[0], many.commit(utcnow()).items[0]
    assert (a.chunks, a.digest, a.records, a.bytes) == (b.chunks, b.digest, b.records, b.bytes)
    assert a.digest == codec.digest_records(canon)[1]


def test_add_block_rejects_partial_records(repo):
    w = repo.begin_snapshot("s", "postgres")
    item = w.item("t", "table", "jsonl")
    with pytest.raises(ValueError, match="newline"):
        item.add_block(b"a\nb")
    with pytest.raises(ValueError, match="rows"):
        item.add_block(b"abcde", width=4)
    item.add_block(np.arange(8, dtype="<f4").tobytes(), width=16)
    assert item.close().records == 2


def test_on_progress_is_called_per_block_and_can_abort(repo):
    recs = rows(3000, seed=16)
    w = repo.begin_snapshot("s", "postgres")
    item = w.item("t", "table", "jsonl")
    seen = []
    item.on_progress = seen.append
    item.add_many(recs)
    assert seen and seen == sorted(seen) and seen[-1] < 3000  # per block, not per record
    item.close()
    assert seen[-1] == 3000

    class Stop(Exception):
        pass

    def stop(n):
        raise Stop(n)

    other = w.item("u", "table", "jsonl")
    other.on_progress = stop
    with pytest.raises(Stop):
        for r in recs:
            other.add(r)
    w.abort()
