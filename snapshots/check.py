"""`check`: prove every snapshot's chunks exist, and with read_data that they are intact.

Corruption is reported by chunk with every snapshot it breaks, so an operator knows which
restore points are lost and which are still good.

With an `abort` event (the daemon's shutdown), the data reads stop and Aborted is raised: a
partial check proves nothing, so it reports nothing.
"""
from __future__ import annotations

import random
import threading
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from snapshots import codec
from snapshots.errors import CorruptChunkError, raise_if_aborted
from snapshots.repository import Repository


@dataclass
class CheckReport:
    snapshots: int = 0
    chunks_referenced: int = 0
    chunks_read: int = 0
    bytes_read: int = 0
    problems: list[dict] = field(default_factory=list)       # {"chunk", "problem", "snapshots": [...]}
    manifest_errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and not self.manifest_errors

    @property
    def broken_snapshots(self) -> list[str]:
        return sorted({s for p in self.problems for s in p["snapshots"]})

    def to_dict(self) -> dict:
        return {"ok": self.ok, "snapshots": self.snapshots, "chunks_referenced": self.chunks_referenced,
                "chunks_read": self.chunks_read, "bytes_read": self.bytes_read, "problems": self.problems,
                "broken_snapshots": self.broken_snapshots, "manifest_errors": self.manifest_errors}


def check_repository(repo: Repository, *, read_data: bool = False, subset_percent: float | None = None,
                     seed: int | None = None, abort: threading.Event | None = None) -> CheckReport:
    """Check structure (and data, when asked). Never raises for corruption: it reports it."""
    report = CheckReport()
    manifests = repo.list_snapshots()
    report.manifest_errors = [e.message for e in repo.manifest_errors]
    report.snapshots = len(manifests)
    users: dict[str, list[str]] = defaultdict(list)
    for m in manifests:
        for cid in sorted(m.chunk_ids()):
            users[cid].append(m.id)
    report.chunks_referenced = len(users)
    present = {obj.key.rsplit("/", 1)[-1] for obj in repo.store.list("data")}
    missing = sorted(cid for cid in users if cid not in present)
    for cid in missing:
        report.problems.append({"chunk": cid, "problem": "missing", "snapshots": users[cid]})
    to_read: list[str] = []
    if read_data or subset_percent is not None:
        candidates = sorted(cid for cid in users if cid in present)
        if subset_percent is not None and subset_percent < 100:
            k = max(1, round(len(candidates) * subset_percent / 100)) if candidates else 0
            to_read = random.Random(seed).sample(candidates, k)
        else:
            to_read = candidates

    def read(cid: str) -> tuple[str, int, str | None]:
        raise_if_aborted(abort, f"check interrupted after reading {report.chunks_read} of {len(to_read)} chunks",
                         hint="Nothing was reported; run the check again.")
        try:
            return cid, len(repo.read_chunk(cid)), None
        except CorruptChunkError as exc:
            return cid, 0, "missing" if "missing" in exc.message else "damaged"

    with ThreadPoolExecutor(max_workers=max(2, repo.upload_concurrency)) as pool:
        for cid, size, problem in pool.map(read, to_read):
            report.chunks_read += 1
            report.bytes_read += size
            if problem:
                report.problems.append({"chunk": cid, "problem": problem, "snapshots": users[cid]})
    report.problems.sort(key=lambda p: p["chunk"])
    return report


def chunk_path(cid: str) -> str:
    return codec.chunk_key(cid)
