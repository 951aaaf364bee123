"""Restoring a snapshot: plan, protect live data, write, verify.

    result = restore_snapshot(repo, settings, "memory", "latest", mode="replace")

1. Resolve the snapshot (`latest`, an id or prefix, or `at` a point in time).
2. Ask the target for a plan. It refuses *before writing anything* when the target holds live
   data and no mode says what to do, or when it cannot hold the snapshot (version gate).
3. `replace` or `swap` onto live data: take a pre-restore snapshot of exactly what will be overwritten
   (tagged `pre-restore`), so the restore itself can be undone.
4. Stream the records (chunk hashes checked on read) into the target.
5. `swap`: the target restored beside the live data; verify the staged copy, then switch.
6. Verify: the target read back must give the manifest's count and digest (or, for a partial
   restore, those of the selected records); otherwise VerificationError with a diff report.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime
from itertools import compress
from typing import Any, Callable, Iterator

from backup.job import snapshot_source
from restore.targets import open_target
from restore.targets.base import ItemPlan, RestoreOptions
from restore.verify import ItemCheck, diff_sorted, digest_concurrently, digest_of
from snapshots.codec import RecordDigest, batched
from snapshots.errors import CorruptChunkError, StatevaultError, UsageError, VerificationError
from snapshots.manifest import Manifest
from snapshots.repository import Repository
from snapshots.settings import Settings, redact_url

MODES = ("new", "replace", "swap")
TTL_MODES = ("keep", "reset", "none")


@dataclass
class RestoreResult:
    source: str
    snapshot_id: str
    cut_time: datetime
    mode: str
    dry_run: bool
    plans: list[dict[str, Any]] = field(default_factory=list)
    pre_restore_snapshot: str | None = None
    checks: list[ItemCheck] = field(default_factory=list)
    records_restored: int = 0
    bytes_restored: int = 0
    restore_seconds: float = 0.0
    verify_seconds: float = 0.0
    to_url: str | None = None   # --to, --to-path: where the restore went (and its undo must go)
    to_path: str | None = None

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def undo_command(self) -> str | None:
        """The command that puts back what a replace or swap overwrote, onto the same target (a
        password in --to shows as ***: put it back in)."""
        if not self.pre_restore_snapshot:
            return None
        where = (f" --to {redact_url(self.to_url)}" if self.to_url else "") + \
                (f" --to-path {self.to_path}" if self.to_path else "")
        return f"statevault restore {self.pre_restore_snapshot} --source {self.source}{where} --mode replace"

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "snapshot_id": self.snapshot_id, "cut_time": self.cut_time.isoformat(),
                "mode": self.mode, "dry_run": self.dry_run, "plan": self.plans,
                "pre_restore_snapshot": self.pre_restore_snapshot, "undo_command": self.undo_command,
                "verified": self.ok and not self.dry_run,
                "checks": [c.to_dict() for c in self.checks], "records_restored": self.records_restored,
                "bytes_restored": self.bytes_restored, "restore_seconds": round(self.restore_seconds, 3),
                "verify_seconds": round(self.verify_seconds, 3)}


class _Tee:
    """The records of one plan, filtered, digested on the way into the target.

    Works a chunk at a time: filters and the digest run over each block with C-level loops, so
    the per-record cost on the way into the target is one generator step. The digest covers
    only records the target will actually write: `written` (a target's `written_filter`, e.g.
    Redis keys already expired under --ttl keep) excludes the rest.
    """

    def __init__(self, blocks: Iterator[list[bytes]], plan: ItemPlan, canonical: Callable[[bytes], bytes] | None,
                 written: Callable[[bytes], bool] | None, log=None, transformed: bool = False):
        self._blocks, self._plan, self._canonical, self._written = blocks, plan, canonical, written
        self.log = log  # a target's ttl_log: the expiries of the records written, for its TTL check
        self.digest = RecordDigest(plan.item.digest_algo)
        self.bytes = 0
        self.filtered = plan.record_filter is not None or written is not None or transformed
        # every record of the item, when the target skips some (Redis: keys expired under --ttl
        # keep): what the manifest's count and digest are checked against. Not when the target
        # rewrites records on their way (`written_records`: hash fields expired under --ttl keep)
        self.whole = (RecordDigest(plan.item.digest_algo)
                      if plan.record_filter is None and written and not transformed else None)

    @property
    def item_digest(self) -> RecordDigest | None:
        """The digest of all the item's records as read, or None when the tee sees a selection
        (--only) or rewritten records."""
        return self.whole if self.filtered else self.digest

    def __iter__(self) -> Iterator[bytes]:
        keep, written, canonical = self._plan.record_filter, self._written, self._canonical
        whole = self.whole
        for records in self._blocks:
            if keep is not None:
                records = list(filter(keep, records))
            if whole is not None:
                canon = records if canonical is None else list(map(canonical, records))
                whole.update(canon)
                kept = list(map(written, records))
                counted = list(compress(records, kept))
                self.digest.update(compress(canon, kept))
            else:
                counted = records if written is None else list(filter(written, records))
                self.digest.update(counted if canonical is None else map(canonical, counted))
            self.bytes += sum(map(len, counted))
            if self.log is not None:
                self.log.add(counted)
            yield from records
        if self.log is not None:
            self.log.finish()


def _check_options(mode: str, ttl: str, only: list[str], into: str | None, jobs: int) -> None:
    if jobs < 1:
        raise UsageError(f"--jobs {jobs}: give at least 1 (connections loading one big PostgreSQL table at once)")
    if mode not in MODES:
        raise UsageError(f"unknown mode {mode!r}: use one of {', '.join(MODES)}")
    if ttl not in TTL_MODES:
        raise UsageError(f"unknown --ttl {ttl!r}: use one of {', '.join(TTL_MODES)}")
    if into is not None and len(only) > 1:
        raise UsageError("--into renames one item: give exactly one --only")


def restore_snapshot(repo: Repository, settings: Settings, source: str, ref: str = "latest", *,
                     at: datetime | None = None, only: list[str] | tuple[str, ...] = (), to_url: str | None = None,
                     to_path: str | None = None, into: str | None = None, mode: str = "new", ttl: str = "keep",
                     dry_run: bool = False, progress: Callable[[str, int], None] | None = None,
                     jobs: int = 2) -> RestoreResult:
    only = list(only)
    _check_options(mode, ttl, only, into, jobs)
    cfg = settings.source(source)
    manifest = repo.resolve(ref, source=source, at=at)
    result = RestoreResult(source=source, snapshot_id=manifest.id, cut_time=manifest.cut_time, mode=mode,
                           dry_run=dry_run, to_url=to_url, to_path=to_path)
    options = RestoreOptions(mode=mode, ttl=ttl, jobs=jobs)  # type: ignore[arg-type]

    target = open_target(cfg, url=to_url, path=to_path)
    try:
        plans = target.plan(manifest, only=only, into=into, mode=mode, ttl=ttl)  # refuses before any write
        result.plans = [p.to_dict() for p in plans]
        if dry_run:
            return result
        with repo.lease(f"restore {source} {manifest.id}"):
            if mode in ("replace", "swap") and any(p.live_records for p in plans):
                # the target may hold an exclusive handle (Qdrant local mode): release it while we read
                target.close()
                selector = sorted({s for p in plans if p.live_records for s in p.backup_selector})
                pre, _ = snapshot_source(repo, source, cfg, tags=["pre-restore", f"restore-of-{manifest.id}"],
                                         only=selector, url=to_url, path=to_path)
                result.pre_restore_snapshot = pre.id
                target = open_target(cfg, url=to_url, path=to_path)
                plans = target.plan(manifest, only=only, into=into, mode=mode, ttl=ttl)
                result.plans = [p.to_dict() for p in plans]  # what is actually done (e.g. a swap's staging name)
            started = time.monotonic()
            tees = []
            try:
                _write(repo, target, plans, options, manifest, source, result, tees, progress)
            except BaseException as exc:
                _after_failed_write(target, plans[:len(tees) + 1], exc, result)
                raise
            finish = getattr(target, "finish", None)
            if finish is not None:  # foreign keys: a violation keeps the data (the error names them)
                finish(plans, options)
            result.restore_seconds = time.monotonic() - started
            started = time.monotonic()
            result.checks = [_verify(repo, target, plan, tee, jobs) for plan, tee in zip(plans, tees)]
            result.verify_seconds = time.monotonic() - started
            switch = getattr(target, "switch", None)
            if mode == "swap" and result.ok and switch is not None:
                switch(plans)
    finally:
        target.close()
    if not result.ok:
        bad = [c for c in result.checks if not c.ok]
        names = ", ".join(f"{c.item} -> {c.target}" for c in bad)
        raise VerificationError(
            f"restore of {source} snapshot {manifest.id} did not verify: {names}",
            report=result.to_dict(),
            hint="The target differs from the snapshot; see the report. "
                 + (f"Undo with: {result.undo_command}" if result.undo_command else ""))
    return result


def _write(repo: Repository, target, plans: list[ItemPlan], options: RestoreOptions, manifest: Manifest,
           source: str, result: RestoreResult, tees: list, progress) -> None:
    """Write every plan's records, teeing their digests into `tees`."""
    for plan in plans:
        canon = None if getattr(target, "canonical_is_identity", False) else _canonical(target, plan)
        written = getattr(target, "written_filter", None)
        ttl_log = getattr(target, "ttl_log", None)
        blocks, transformed = _written_blocks(repo, target, plan, options)
        tee = _Tee(blocks, plan, canon, written(plan, options) if written else None,
                   ttl_log() if ttl_log else None, transformed)
        try:
            target.restore(plan, iter(tee), options)
        except CorruptChunkError as exc:
            # name the restore point and item: the operator's next step is an older snapshot
            raise CorruptChunkError(
                f"snapshot {manifest.id} item {plan.item.name}: {exc.message}", chunk_id=exc.chunk_id,
                hint=f"This snapshot is damaged: restore an older one (statevault snapshots list --source "
                     f"{source}) and run `statevault snapshots check --read-data`.") from exc
        read = tee.item_digest
        if read is not None and (read.count, read.hexdigest) != (plan.item.records, plan.item.digest):
            # chunk hashes matched but the records do not add up: the manifest itself is wrong.
            # Raised here, inside the write, so the runner undoes it and names the pre-restore snapshot.
            raise VerificationError(f"snapshot {manifest.id} item {plan.item.name} does not match its manifest: "
                                    f"{_differs(read, plan.item)}",
                                    hint=f"The manifest was damaged or edited: run `statevault snapshots check "
                                         f"--read-data`, and restore an older snapshot (statevault snapshots list "
                                         f"--source {source}).")
        tees.append(tee)
        result.records_restored += tee.digest.count
        result.bytes_restored += tee.bytes
        if progress is not None:
            progress(plan.item.name, tee.digest.count)


def _written_blocks(repo: Repository, target, plan: ItemPlan, options: RestoreOptions
                    ) -> tuple[Iterator[list[bytes]], bool]:
    """The item's record blocks, through the target's `written_records` transform if it has one
    (and whether it had)."""
    transform = getattr(target, "written_records", None)
    cut = transform(plan, options) if transform is not None else None
    blocks = repo.iter_record_blocks(plan.item)
    if cut is None:
        return blocks, False
    return batched(cut(record for block in blocks for record in block), 4096), True


def _differs(digest: RecordDigest, item) -> str:
    """What the records read say against what the manifest records, in words."""
    said = []
    if digest.count != item.records:
        said.append(f"{digest.count:,} records read, {item.records:,} recorded")
    if digest.hexdigest != item.digest:
        said.append(f"content digest {digest.hexdigest[:16]}… read, {item.digest[:16]}… recorded")
    return "; ".join(said)


def _after_failed_write(target, plans: list[ItemPlan], exc: BaseException, result: RestoreResult) -> None:
    """A restore failed after writing began: the target undoes what it can (a store without a
    transaction: Redis removes the keys a mode-new restore wrote, Qdrant drops the collections it
    created), and the error says so, or what is left and how to put the replaced data back."""
    said = []
    undo = getattr(target, "undo", None)
    if undo is not None:
        try:
            done = undo(plans)
        except Exception as undo_exc:  # noqa: BLE001 - the first error is the one to raise
            said.append(f"undoing it failed too ({undo_exc}): the target holds part of the snapshot")
        else:
            if done:
                said.append(f"{done}; the target is as the plan found it")
    if result.pre_restore_snapshot:
        said.append(f"the replaced data is in pre-restore snapshot {result.pre_restore_snapshot}")
    if not said:
        return
    if not isinstance(exc, StatevaultError):
        exc.add_note(f"restore stopped: {'; '.join(said)}")
        return
    exc.message = f"{exc.message} (restore stopped: {'; '.join(said)})"
    exc.args = (exc.message,)
    if result.pre_restore_snapshot:
        exc.hint = f"{exc.hint} Put the replaced data back with: {result.undo_command}".strip()
        if isinstance(exc, VerificationError):  # --json: the id and the command as fields too
            exc.report = {**exc.report, "pre_restore_snapshot": result.pre_restore_snapshot,
                          "undo_command": result.undo_command}


def _canonical(target, plan: ItemPlan) -> Callable[[bytes], bytes]:
    item = plan.item
    return lambda r: target.canonical(item, r)


def _verify(repo: Repository, target, plan: ItemPlan, tee: _Tee, jobs: int = 2) -> ItemCheck:
    item = plan.item
    if tee.filtered:
        exp_count, exp_digest = tee.digest.count, tee.digest.hexdigest
    else:
        exp_count, exp_digest = item.records, item.digest  # the tee's equal them (_write checked)
    canon = _canonical(target, plan)
    identity = getattr(target, "canonical_is_identity", False)
    parts = getattr(target, "read_back_parts", None)
    streams = parts(plan, jobs) if parts is not None else None
    ttl_check = getattr(target, "verify_ttls", None)
    # Redis: the read-back's expiries, logged as it is digested, against those the tee logged on the way in
    log = target.ttl_log() if ttl_check is not None and hasattr(target, "ttl_log") else None
    try:
        if streams:  # read concurrently by several server processes (PostgreSQL, big tables)
            count, digest = digest_concurrently(streams, None if identity else canon, algo=item.digest_algo)
        else:
            back = target.read_back(plan, ordered=False)
            count, digest = digest_of(back if log is None else log.tap(back), None if identity else canon,
                                      algo=item.digest_algo)
        check = ItemCheck(item.name, plan.target, exp_count, exp_digest, count, digest)
        if ttl_check is not None and check.ok:
            keep = plan.record_filter
            records = (r for r in repo.iter_records(item) if keep is None or keep(r))
            ttls = ttl_check(plan, records) if log is None else ttl_check(plan, records, log, tee.log)
            if not ttls.get("passed", True):
                check.problems.append("; ".join(f"{name.replace('_', ' ')}: {found['count']} key(s)"
                                                for name, found in ttls.items() if name != "expired"
                                                and isinstance(found, dict) and found.get("count")))
                check.diff = {"ttl": ttls}
    finally:
        for used in (log, tee.log):
            if used is not None:
                used.close()
    if not check.ok and not check.diff:
        custom = getattr(target, "diff", None)
        keep = plan.record_filter
        expected = (r for r in repo.iter_records(item) if keep is None or keep(r))
        if custom is not None:
            check.diff = custom(plan, expected)
        else:
            classify = getattr(target, "classify", None)
            check.diff = diff_sorted(expected, target.read_back(plan), key=lambda r: target.record_key(item, r),
                                     canonical=canon,
                                     classify=None if classify is None else lambda e, a: classify(item, e, a))
    return check

