"""`forget`: apply each source's retention policy and delete the manifests it does not keep.

Chunks are not deleted here: `prune` removes what no manifest references any more. The
policy decision is the pure `apply_retention`; this module only does the I/O around it.

A source's backups and its `pre-restore` snapshots (what a `replace`/`swap` restore
overwrote, often of a few items only) are retained as two groups, each under the source's
policy, as restic's `--group-by tags` would: counted together, a partial pre-restore snapshot
taken after the day's backup would take that day's `keep_daily` slot and the full backup of
the day would be removed (and `keep_last = N` would keep fewer than N backups after N
restores).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from backup.retention import SnapshotRef, apply_retention
from snapshots.drill_reports import verified_snapshot_ids
from snapshots.repository import PRE_RESTORE_TAG, Repository
from snapshots.settings import RetentionPolicy, Settings


@dataclass
class ForgetResult:
    dry_run: bool
    sources: dict[str, dict] = field(default_factory=dict)  # source -> {"keep": [...], "remove": [...]}

    @property
    def removed(self) -> int:
        return sum(len(s["remove"]) for s in self.sources.values())

    def to_dict(self) -> dict:
        return {"dry_run": self.dry_run, "removed": self.removed, "sources": self.sources}


def forget_snapshots(repo: Repository, settings: Settings, *, sources: list[str] | None = None,
                     policy: RetentionPolicy | None = None, dry_run: bool = False) -> ForgetResult:
    """Apply retention per source (config policy, or `policy` for all given sources)."""
    result = ForgetResult(dry_run=dry_run)
    manifests = repo.list_snapshots()
    names = sources or sorted({m.source for m in manifests} | set(settings.sources))
    verified = verified_snapshot_ids(repo)
    with repo.lease("forget", exclusive=True):
        for name in names:
            rule = policy
            if rule is None:
                cfg = settings.sources.get(name)
                if cfg is None:
                    continue  # a source no longer configured: keep its snapshots until told otherwise
                rule = cfg.retention
            groups: dict[str, list[SnapshotRef]] = {}
            for m in manifests:
                if m.source == name:
                    group = PRE_RESTORE_TAG if PRE_RESTORE_TAG in m.tags else "backups"
                    groups.setdefault(group, []).append(
                        SnapshotRef(id=m.id, time=m.cut_time, tags=tuple(m.tags), verified=m.id in verified))
            if not groups:
                continue
            keep, remove = [], []
            for group, refs in sorted(groups.items()):
                decision = apply_retention(refs, rule)
                keep += [{"id": k.snapshot.id, "time": k.snapshot.time, "reasons": k.reasons, "group": group}
                         for k in decision.keep]
                remove += [{"id": r.id, "time": r.time, "group": group} for r in decision.remove]
            for entries in (keep, remove):
                entries.sort(key=lambda e: e["time"], reverse=True)
                for e in entries:
                    e["time"] = e["time"].isoformat()
            result.sources[name] = {"keep": keep, "remove": remove}
            if not dry_run:
                for r in remove:
                    repo.delete_snapshot(r["id"])
    return result
