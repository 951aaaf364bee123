"""`prune`: delete chunks no snapshot references, once they are older than a grace period.

The grace period protects a backup that is uploading right now: its chunks are not yet
referenced by any manifest (the manifest is written last). Prune runs under the exclusive
repository lease, and refuses to run while any manifest is unreadable (it could not know
which chunks that snapshot needs).

The lease is what keeps backups out, and a backup deduplicates against chunks it finds in the
store (a stat, whatever their age): a chunk unreferenced when prune planned may be named by a
snapshot committed after that, by a backup that started because prune's lease had lapsed (the
process stalled past the ttl: a suspended VM, a GC pause, SIGSTOP). So a deletion counts only
if the lease stood throughout, and prune checks both ends of each one:

* before: the lease stands for more than a third of its ttl (the time a deletion may take to
  land), else prune stops. Every FENCE_EVERY deletions (and before the first) it also checks
  the store, without clocks: no newer exclusive generation, and no manifest that was not there
  when it planned (a backup got in: its snapshot is named, and reported broken if it needs a
  chunk already deleted).
* after: a stall between that check and the deletion landing is caught by the lease itself
  (`stands()` is False once it lapsed, even if a refresh landed since: snapshots/leases.py),
  and prune stops at once, naming a snapshot that appeared meanwhile and needs the chunk.

Every stop raises LeaseLapsedError (exit 4: run prune again), or VerificationError (exit 3)
naming a snapshot that needs a deleted chunk; nothing is deleted after it. What remains: a
stall that falls inside the one deletion in flight (milliseconds, against the ttl/3 margin)
can still cost a backup that found that chunk meanwhile, which the stop (or `snapshots
check`) names: back it up again. Reading every chunk before deleting it, to put it back,
would close that too, at the price of downloading all that prune frees; not done. Clocks out
of sync by more than the margin (README: hosts run NTP) are not covered either.

With an `abort` event (the daemon's shutdown), prune stops before its next deletion and raises
Aborted: every chunk it deleted was unreferenced and past the grace period, and the rest wait
for the next prune, so stopping anywhere is safe.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import timedelta

from snapshots.errors import ManifestError, NotFoundError, VerificationError, raise_if_aborted
from snapshots.leases import Lease, LeaseLapsedError
from snapshots.manifest import utcnow
from snapshots.repository import Repository

FENCE_EVERY = 64  # deletions between two checks of the store for another holder


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


class _Fence:
    """What prune checks around its deletions (module docstring)."""

    def __init__(self, repo: Repository, lease: Lease, planned: set[str], report: PruneReport):
        self.repo, self.lease, self.planned, self.report = repo, lease, planned, report
        self.margin = lease.ttl / 3
        self.until_store_check = 0

    def _doing(self) -> str:
        return f"prune (after deleting {self.report.chunks_deleted} unreferenced chunk(s))"

    def before(self) -> None:
        """Raise unless the lease stands long enough for one more deletion to land."""
        if self.until_store_check <= 0:
            self.lease.verify_in_store(doing=self._doing())
            self._no_new_snapshots()
            self.until_store_check = FENCE_EVERY
        self.until_store_check -= 1
        self.lease.confirm(self.margin, doing=self._doing())

    def _no_new_snapshots(self) -> None:
        new = [sid for sid in self.repo.snapshot_ids() if sid not in self.planned]
        if not new:
            return
        deleted, broken = set(self.report.deleted), {}
        for sid in new:
            try:
                missing = self.repo.load_manifest(sid).chunk_ids() & deleted
            except (ManifestError, NotFoundError):
                continue
            if missing:
                broken[sid] = sorted(missing)
        what = (f"{self._doing()} stopped: snapshot(s) {', '.join(new[:5])} appeared while it held the exclusive "
                f"repository lease, so that lease had lapsed")
        if broken:
            raise VerificationError(
                f"{what}; snapshot(s) {', '.join(broken)} name chunk(s) this prune deleted "
                f"(e.g. {next(iter(broken.values()))[0]})", report={"broken_snapshots": broken},
                hint="Run `statevault snapshots check`, forget the broken snapshots and back up again.")
        raise LeaseLapsedError(what)

    def after(self, key: str) -> None:
        """A deletion that landed after the lease lapsed (a stall inside the call): a backup may
        have found the chunk meanwhile. Stop, naming a snapshot that needs it (exit 3) or, when
        none is there yet, as a lapse (exit 4); `snapshots check` tells later."""
        if self.lease.stands():
            return
        self._no_new_snapshots()
        raise LeaseLapsedError(f"{self._doing()} stopped: its exclusive lease {self.lease.state()} while it deleted "
                               f"{key.rsplit('/', 1)[-1]}",
                               hint="Run `statevault snapshots check`: a backup that started meanwhile and needs "
                                    "that chunk is named there (back it up again); then run prune again.")


def prune_repository(repo: Repository, *, grace: timedelta, dry_run: bool = False,
                     abort: threading.Event | None = None) -> PruneReport:
    report = PruneReport(dry_run=dry_run)

    def check_abort() -> None:
        raise_if_aborted(abort, f"prune interrupted after deleting {report.chunks_deleted} unreferenced chunk(s); "
                         "the others stay until the next prune", hint="Nothing referenced was touched.")

    with repo.lease("prune", exclusive=True) as lease:
        manifests = repo.list_snapshots()
        if repo.manifest_errors:
            raise ManifestError("prune refused: " + "; ".join(e.message for e in repo.manifest_errors),
                                hint="Fix or remove the damaged manifest first (see `statevault snapshots check`).")
        fence = _Fence(repo, lease, {m.id for m in manifests}, report)
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
            if not dry_run:
                fence.before()
                repo.store.delete(obj.key)
            report.chunks_deleted += 1
            report.bytes_deleted += obj.size
            report.deleted.append(cid)
            if not dry_run:
                fence.after(obj.key)
        stale = getattr(repo.store, "stale_temp_files", None)
        if stale is not None:
            for path in list(stale()):
                try:
                    if utcnow().timestamp() - path.stat().st_mtime > grace.total_seconds():
                        check_abort()
                        if not dry_run:
                            fence.before()
                            path.unlink()
                        report.stale_files_deleted += 1
                except FileNotFoundError:
                    continue
        if not dry_run:
            _prune_claims(repo, cutoff, fence)
    return report


def _prune_claims(repo: Repository, cutoff, fence: _Fence) -> None:
    """Daemon tick claims are only needed around their tick."""
    for obj in list(repo.store.list("locks/claims")):
        if obj.modified < cutoff - timedelta(days=1):
            fence.before()
            repo.store.delete(obj.key)
