"""`forget`: apply each source's retention policy and delete the manifests it does not keep.

Chunks are not deleted here: `prune` removes what no manifest references any more. The
policy decision is the pure `apply_retention`; this module only does the I/O around it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from backup.retention import SnapshotRef, apply_retention
from snapshots.drill_reports import verified_snapshot_ids
from snapshots.repository import Repository
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
            refs = [SnapshotRef(id=m.id, time=m.cut_time, tags=tuple(m.tags), verified=m.id in verified)
                    for m in manifests if m.source == name]
            if not refs:
                continue
            decision = apply_retention(refs, rule)
            result.sources[name] = {
                "keep": [{"id": k.snapshot.id, "time": k.snapshot.time.isoformat(), "reasons": k.reasons}
                         for k in decision.keep],
                "remove": [{"id": r.id, "time": r.time.isoformat()} for r in decision.remove],
            }
            if not dry_run:
                for r in decision.remove:
                    repo.delete_snapshot(r.id)
    return result
