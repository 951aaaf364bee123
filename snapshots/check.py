"""`check`: prove every snapshot's chunks exist, and with read_data that they are intact.

Corruption is reported by chunk with every snapshot it breaks, so an operator knows which
restore points are lost and which are still good.

Reading data also proves each manifest's items: the records of every chunk read are counted
and digested as the writer did (the item's digest algorithm over each record's canonical
form, `item_canonical`), per chunk, and the chunks' partial digests add up (the digest is a
sum) to each item whose every chunk was read. A count or digest that differs from the
manifest is an item problem: the manifest no longer describes its data (a manifest has no
checksum of its own; chunk ids only prove the chunks). With a subset, only the items whose
chunks were all read are proven, and the report names them. Memory: a chunk per reading
thread, and a few integers per (chunk, digest variant) read.

With an `abort` event (the daemon's shutdown), the data reads stop and Aborted is raised: a
partial check proves nothing, so it reports nothing.
"""
from __future__ import annotations

import random
import threading
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from snapshots import codec
from snapshots.errors import CorruptChunkError, UsageError, raise_if_aborted
from snapshots.manifest import Item
from snapshots.repository import Repository, record_width, split_records

# how an item's chunks are cut into records and digested: (digest algo, format, record width)
Variant = tuple[str, str, "int | None"]


@dataclass
class CheckReport:
    snapshots: int = 0
    chunks_referenced: int = 0
    chunks_read: int = 0
    bytes_read: int = 0
    problems: list[dict] = field(default_factory=list)       # {"chunk", "problem", "snapshots": [...]}
    manifest_errors: list[str] = field(default_factory=list)
    items: int = 0                                            # items (and offline-index parts) referenced
    # {"snapshot", "item", "problem", "expected": {"records", "digest"}, "actual": {...}}
    item_problems: list[dict] = field(default_factory=list)
    # items whose count and digest were recomputed from their records: {snapshot id: [item names]}
    digest_checked: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems and not self.manifest_errors and not self.item_problems

    @property
    def items_digest_checked(self) -> int:
        return sum(map(len, self.digest_checked.values()))

    @property
    def broken_snapshots(self) -> list[str]:
        return sorted({s for p in self.problems for s in p["snapshots"]}
                      | {p["snapshot"] for p in self.item_problems})

    def to_dict(self) -> dict:
        return {"ok": self.ok, "snapshots": self.snapshots, "chunks_referenced": self.chunks_referenced,
                "chunks_read": self.chunks_read, "bytes_read": self.bytes_read, "problems": self.problems,
                "broken_snapshots": self.broken_snapshots, "manifest_errors": self.manifest_errors,
                "items": self.items, "items_digest_checked": self.items_digest_checked,
                "digest_checked": self.digest_checked, "item_problems": self.item_problems}


def item_canonical(fmt: str) -> Callable[[bytes], bytes] | None:
    """The part of a record an item's digest covers, by record format (None: all of it).

    The same function the writer was given the canonical forms by and the restore targets
    digest with (`Target.canonical`): Redis records without their expiry fields
    (backup/sources/redis_records.py); every other format's digest covers the whole record.
    """
    if fmt.startswith("redis-jsonl"):
        from backup.sources.redis_records import FORMATS, canonical

        if fmt in FORMATS:
            return canonical
    return None


def _variant(item: Item) -> Variant:
    return item.digest_algo, item.format, record_width(item)


def _digest_chunk(data: bytes, variant: Variant) -> codec.RecordDigest | str:
    """The count and partial digest of one chunk's records as `variant` reads them, or why not."""
    algo, fmt, width = variant
    try:
        digest = codec.RecordDigest(algo)
    except ValueError:
        return f"unknown digest algorithm {algo!r}"
    records = split_records(data, width)
    canonical = item_canonical(fmt)
    return digest.update(records if canonical is None else map(canonical, records))


def check_repository(repo: Repository, *, read_data: bool = False, subset_percent: float | None = None,
                     seed: int | None = None, abort: threading.Event | None = None) -> CheckReport:
    """Check structure (and data, when asked). Never raises for corruption: it reports it."""
    if read_data and subset_percent is not None:
        raise UsageError("read every chunk or a subset of them, not both",
                         hint="Give --read-data or --read-data-subset N%.")
    report = CheckReport()
    manifests = repo.list_snapshots()
    report.manifest_errors = [e.message for e in repo.manifest_errors]
    report.snapshots = len(manifests)
    users: dict[str, list[str]] = defaultdict(list)
    variants: dict[str, set[Variant]] = defaultdict(set)  # chunk -> every way an item reads it
    for m in manifests:
        for cid in sorted(m.chunk_ids()):
            users[cid].append(m.id)
        for it in m.items + m.offline_index:
            report.items += 1
            for c in it.chunks:
                variants[c.id].add(_variant(it))
    report.chunks_referenced = len(users)
    present = {obj.key.rsplit("/", 1)[-1] for obj in repo.store.list("data")}
    missing = sorted(cid for cid in users if cid not in present)
    for cid in missing:
        report.problems.append({"chunk": cid, "problem": "missing", "snapshots": users[cid]})
    to_read: list[str] = []
    reading = read_data or subset_percent is not None
    if reading:
        candidates = sorted(cid for cid in users if cid in present)
        if subset_percent is not None and subset_percent < 100:
            k = max(1, round(len(candidates) * subset_percent / 100)) if candidates else 0
            to_read = random.Random(seed).sample(candidates, k)
        else:
            to_read = candidates

    def read(cid: str) -> tuple[str, int, str | None, dict]:
        raise_if_aborted(abort, f"check interrupted after reading {report.chunks_read} of {len(to_read)} chunks",
                         hint="Nothing was reported; run the check again.")
        try:
            data = repo.read_chunk(cid)
        except CorruptChunkError as exc:
            return cid, 0, "missing" if "missing" in exc.message else "damaged", {}
        return cid, len(data), None, {v: _digest_chunk(data, v) for v in variants[cid]}

    partial: dict[tuple[str, Variant], codec.RecordDigest | str] = {}
    with ThreadPoolExecutor(max_workers=max(2, repo.upload_concurrency)) as pool:
        for cid, size, problem, digests in pool.map(read, to_read):
            report.chunks_read += 1
            report.bytes_read += size
            if problem:
                report.problems.append({"chunk": cid, "problem": problem, "snapshots": users[cid]})
            for v, d in digests.items():
                partial[(cid, v)] = d
    report.problems.sort(key=lambda p: p["chunk"])
    if reading:
        _check_items(report, manifests, partial)
    if report.problems or report.item_problems:
        _drop_forgotten(report, repo)
    return report


def _drop_forgotten(report: CheckReport, repo: Repository) -> None:
    """Forget the problems of snapshots forgotten while the check ran. The check takes no lease:
    a forget + prune meanwhile (the daemon runs both) deletes chunks of snapshots the check
    listed, which are not broken but gone. Listing again after the reads settles it: a chunk
    still missing for a snapshot still there is a real problem."""
    still = set(repo.snapshot_ids())
    for p in report.problems:
        p["snapshots"] = [s for s in p["snapshots"] if s in still]
    report.problems = [p for p in report.problems if p["snapshots"]]
    report.item_problems = [p for p in report.item_problems if p["snapshot"] in still]


def _check_items(report: CheckReport, manifests, partial: dict) -> None:
    """Add up each item's chunk digests where every chunk was read intact; compare with the manifest."""
    for m in manifests:
        for it in m.items + m.offline_index:
            v = _variant(it)
            parts = [partial.get((c.id, v)) for c in it.chunks]
            if any(p is None for p in parts):
                continue  # a chunk not read (subset) or broken (reported by chunk)
            report.digest_checked.setdefault(m.id, []).append(it.name)
            expected = {"records": it.records, "digest": it.digest}
            why = next((p for p in parts if isinstance(p, str)), None)
            if why is not None:
                report.item_problems.append({"snapshot": m.id, "item": it.name, "problem": why,
                                             "expected": expected, "actual": None})
                continue
            total = codec.RecordDigest(it.digest_algo)
            for p in parts:
                total.merge(p)
            actual = {"records": total.count, "digest": total.hexdigest}
            if actual != expected:
                what = [name for k, name in (("records", "record count"), ("digest", "digest"))
                        if actual[k] != expected[k]]
                report.item_problems.append({
                    "snapshot": m.id, "item": it.name, "expected": expected, "actual": actual,
                    "problem": f"the manifest's {' and '.join(what)} {'do' if len(what) > 1 else 'does'} "
                               "not match the item's records"})


def chunk_path(cid: str) -> str:
    return codec.chunk_key(cid)
