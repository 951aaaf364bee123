"""`prune`: delete chunks no snapshot references, once they are older than a grace period.

The grace period protects a backup that is uploading right now: its chunks are not yet
referenced by any manifest (the manifest is written last). Prune runs under the exclusive
repository lease, and refuses to run while any manifest is unreadable (it could not know
which chunks that snapshot needs).

With an `abort` event (the daemon's shutdown), prune stops before its next deletion and raises
Aborted: every chunk it deleted was unreferenced and past the grace period, and the rest wait
for the next prune, so stopping anywhere is safe.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import timedelta

from snapshots.errors import ManifestError, raise_if_aborted
from snapshots.manifest import utcnow
from snapshots.repository import Repository


@dataclass
class PruneReport:
    dry_run: bool
    chunks_total: int = 0
    chunks_unreferenced: int = 0
    chunks_deleted: int = 0
    bytes_deleted: int = 0
    chunks_in_grace: int = 0
    stale_files_deleted: int = 0
    deleted: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["deleted"] = self.deleted[:100]
        return d


def prune_repository(repo: Repository, *, grace: timedelta, dry_run: bool = False,
                     abort: threading.Event | None = None) -> PruneReport:
    report = PruneReport(dry_run=dry_run)

    def check_abort() -> None:
        raise_if_aborted(abort, f"prune interrupted after deleting {report.chunks_deleted} unreferenced chunk(s); "
                         "the others stay until the next prune", hint="Nothing referenced was touched.")

    with repo.lease("prune", exclusive=True):
        manifests = repo.list_snapshots()
        if repo.manifest_errors:
            raise ManifestError("prune refused: " + "; ".join(e.message for e in repo.manifest_errors),
                                hint="Fix or remove the damaged manifest first (see `statevault snapshots check`).")
        referenced = set().union(*(m.chunk_ids() for m in manifests)) if manifests else set()
        cutoff = utcnow() - grace
        for obj in list(repo.store.list("data")):
            report.chunks_total += 1
            cid = obj.key.rsplit("/", 1)[-1]
            if cid in referenced:
                continue
            report.chunks_unreferenced += 1
            if obj.modified > cutoff:
                report.chunks_in_grace += 1
                continue
            check_abort()
            report.chunks_deleted += 1
            report.bytes_deleted += obj.size
            report.deleted.append(cid)
            if not dry_run:
                repo.store.delete(obj.key)
        stale = getattr(repo.store, "stale_temp_files", None)
        if stale is not None:
            for path in list(stale()):
                try:
                    if utcnow().timestamp() - path.stat().st_mtime > grace.total_seconds():
                        check_abort()
                        report.stale_files_deleted += 1
                        if not dry_run:
                            path.unlink()
                except FileNotFoundError:
                    continue
        if not dry_run:
            _prune_claims(repo, cutoff)
    return report


def _prune_claims(repo: Repository, cutoff) -> None:
    """Daemon tick claims are only needed around their tick."""
    for obj in list(repo.store.list("locks/claims")):
        if obj.modified < cutoff - timedelta(days=1):
            repo.store.delete(obj.key)
