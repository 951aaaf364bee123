"""What the daemon's jobs do, and the status record each run leaves in the repository.

Jobs (names are also claim and lease names in the repository):

    backup-<source>   run_backup for that one source, with the daemon's retries and abort event
    forget-prune      forget_snapshots (each source's retention) then prune_repository
    check             check_repository reading a random subset of chunks (daemon.check_subset)
    drill             restore.drill.run_drill over every source (only when that module exists)

Each body takes (daemon, repo, settings, spec) and returns a `JobReport`; it raises only for
errors that make the whole run fail (repository unreachable, LockedError from the repository
lease, which the daemon reports as skipped_locked).

Status record (`daemon/last-run/<job>.json`, overwritten by whichever daemon ran the tick; JSON):

    {"job": "backup-memory", "kind": "backup", "tick": "2026-11-26T03:00:00+00:00",
     "result": "ok" | "failed", "finished_at": ISO time, "duration_seconds": 4.2,
     "owner": "host:pid", "run_id": "9f2c1a0b7e44", "error": null | "message",
     "detail": {"source": "memory", "snapshot_id": ..., "attempts": 1,
                "records_per_item": {"public.memories": 1200}}}        # kind backup
     "detail": {"problems": 0, "chunks_read": 31, "snapshots": 12}      # kind check
     "detail": {"sources": [{"source", "ok", "rto_seconds", "rpo_seconds"}, ...]}   # kind drill
     "detail": {"removed": 3, "chunks_deleted": 40}                     # kind retention
"""
from __future__ import annotations

import importlib
import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Callable

from backup.schedule import CronSchedule
from snapshots.errors import Aborted, NotFoundError, StatevaultError
from snapshots.settings import Settings, approx_timedelta

if TYPE_CHECKING:
    from backup.daemon import Daemon
    from snapshots.repository import Repository

log = logging.getLogger("statevault.daemon")

RETENTION_JOB, CHECK_JOB, DRILL_JOB = "forget-prune", "check", "drill"
STATUS_PREFIX = "daemon/last-run"


def backup_job_name(source: str) -> str:
    return f"backup-{source}"


@dataclass(frozen=True)
class JobSpec:
    name: str
    kind: str                   # backup | retention | check | drill
    schedule: CronSchedule
    source: str | None = None


@dataclass(frozen=True)
class JobOutcome:
    """What happened to one tick of one job on this daemon."""

    job: str
    tick: datetime
    result: str            # ok | failed | aborted | skipped_claimed | skipped_locked | skipped_running | missed
    run_id: str = "-"
    duration: float = 0.0
    error: str | None = None
    detail: dict = field(default_factory=dict)


@dataclass
class JobReport:
    ok: bool
    error: str | None = None
    aborted: bool = False
    detail: dict = field(default_factory=dict)


def open_repo(settings: Settings) -> "Repository":
    from snapshots.repository import open_repository

    return open_repository(settings.repository, create=True)


def load_drill() -> Callable | None:
    """restore.drill.run_drill, or None while that module does not exist."""
    try:
        module = importlib.import_module("restore.drill")
    except ModuleNotFoundError as exc:
        if exc.name not in ("restore.drill", "restore"):
            raise
        return None
    return getattr(module, "run_drill", None)


def plan_jobs(settings: Settings, *, drill_available: bool) -> list[JobSpec]:
    d = settings.daemon
    tz = d.timezone
    jobs = [JobSpec(backup_job_name(name), "backup", CronSchedule(cfg.schedule, tz), source=name)
            for name, cfg in sorted(settings.sources.items())]
    jobs.append(JobSpec(RETENTION_JOB, "retention", CronSchedule(d.prune_schedule, tz)))
    jobs.append(JobSpec(CHECK_JOB, "check", CronSchedule(d.check_schedule, tz)))
    if d.drill_schedule and drill_available and settings.sources:
        jobs.append(JobSpec(DRILL_JOB, "drill", CronSchedule(d.drill_schedule, tz)))
    return jobs


# ---- job bodies ----------------------------------------------------------------------------

def run_backup_job(daemon: "Daemon", repo: "Repository", settings: Settings, spec: JobSpec) -> JobReport:
    d = settings.daemon
    result = daemon.backup_fn(repo, settings, [spec.source], retry_attempts=d.retry_attempts,
                              retry_max_wait=d.retry_max_wait_seconds, abort=daemon.abort)
    sr = result.results[0]
    aborted = isinstance(sr.error, Aborted)
    if not aborted:
        daemon.metrics.backup_counters(spec.source, ok=sr.ok, bytes_read=sr.bytes_read,
                                       bytes_uploaded=sr.bytes_uploaded, bytes_deduplicated=sr.bytes_deduplicated)
    detail = {"source": spec.source, "snapshot_id": sr.snapshot_id, "attempts": sr.attempts,
              "records": sr.records, "records_per_item": sr.records_per_item, "bytes_read": sr.bytes_read,
              "bytes_uploaded": sr.bytes_uploaded, "bytes_deduplicated": sr.bytes_deduplicated}
    return JobReport(ok=sr.ok, error=sr.error.message if sr.error else None, aborted=aborted, detail=detail)


def run_retention_job(daemon: "Daemon", repo: "Repository", settings: Settings, spec: JobSpec) -> JobReport:
    from backup.forget import forget_snapshots
    from snapshots.prune import prune_repository

    forgotten = forget_snapshots(repo, settings)
    pruned = prune_repository(repo, grace=approx_timedelta(settings.repository.prune_grace), abort=daemon.abort)
    return JobReport(ok=True, detail={"removed": forgotten.removed, "chunks_deleted": pruned.chunks_deleted,
                                      "bytes_deleted": pruned.bytes_deleted})


def run_check_job(daemon: "Daemon", repo: "Repository", settings: Settings, spec: JobSpec) -> JobReport:
    from snapshots.check import check_repository

    report = check_repository(repo, subset_percent=float(settings.daemon.check_subset[:-1]), abort=daemon.abort)
    problems = len(report.problems) + len(report.manifest_errors) + len(report.item_problems)
    error = None if report.ok else (f"{problems} problem(s); broken snapshots: "
                                    + ", ".join(report.broken_snapshots[:10]))
    return JobReport(ok=report.ok, error=error, detail={"problems": problems, "chunks_read": report.chunks_read,
                                                        "snapshots": report.snapshots,
                                                        "broken_snapshots": report.broken_snapshots[:100]})


def run_drill_job(daemon: "Daemon", repo: "Repository", settings: Settings, spec: JobSpec) -> JobReport:
    result = daemon.drill_fn(repo, settings, sources=None, abort=daemon.abort)
    data = result.to_dict()
    sources = [{"source": s.get("source"), "ok": bool(s.get("ok")), "rto_seconds": s.get("rto_seconds"),
                "rpo_seconds": s.get("rpo_seconds"), "error": s.get("error")} for s in data.get("sources", [])]
    failed = [s["source"] for s in sources if not s["ok"]]
    return JobReport(ok=bool(result.ok), error=("drill failed for " + ", ".join(failed)) if failed else None,
                     detail={"id": data.get("id"), "sources": sources})


JOB_BODIES: dict[str, Callable[..., JobReport]] = {
    "backup": run_backup_job, "retention": run_retention_job, "check": run_check_job, "drill": run_drill_job,
}


# ---- status records ------------------------------------------------------------------------

def status_record(spec: JobSpec, tick: datetime, report: JobReport, *, finished_at: datetime, duration: float,
                  owner: str, run_id: str) -> dict:
    # ticks in UTC: records from daemons in other timezones must compare as strings
    return {"job": spec.name, "kind": spec.kind, "tick": tick.astimezone(timezone.utc).isoformat(),
            "result": "ok" if report.ok else "failed", "finished_at": finished_at.isoformat(),
            "duration_seconds": round(duration, 3), "owner": owner, "run_id": run_id, "error": report.error,
            "detail": report.detail}


def save_status(repo: "Repository", record: dict) -> None:
    repo.store.put(f"{STATUS_PREFIX}/{record['job']}.json", json.dumps(record, default=str).encode())


def load_status(repo: "Repository", job: str) -> dict | None:
    """The last run record of `job`, None if there is none or it is unreadable."""
    try:
        record = json.loads(repo.store.get(f"{STATUS_PREFIX}/{job}.json"))
    except NotFoundError:
        return None
    except (StatevaultError, ValueError) as exc:
        log.warning("status_unreadable", extra={"job": job, "error": str(exc)})
        return None
    return record if isinstance(record, dict) and "tick" in record and "job" in record else None


# ---- the repository's snapshots, for metrics -----------------------------------------------

@dataclass(frozen=True)
class SnapshotSummary:
    id: str
    source: str
    cut_time: datetime
    finished_at: datetime


class SnapshotIndex:
    """Source, cut and finish time of every snapshot in the repository, for the metrics.

    Manifests never change once written, so each is read once per process: a refresh costs one
    listing plus the manifests that are new since the last one (a daemon refreshing every few
    minutes must not re-read thousands of manifests each time).
    """

    def __init__(self) -> None:
        self._known: dict[str, SnapshotSummary] = {}
        self._lock = threading.Lock()

    def refresh(self, repo: "Repository") -> list[SnapshotSummary]:
        """Every readable snapshot, oldest cut first. Unreadable manifests are left out."""
        ids = set(repo.snapshot_ids())
        with self._lock:
            missing = sorted(ids - set(self._known))

        def load(snapshot_id: str) -> SnapshotSummary | None:
            try:
                m = repo.load_manifest(snapshot_id)
            except StatevaultError:
                return None  # damaged (check reports it) or forgotten meanwhile
            return SnapshotSummary(m.id, m.source, m.cut_time, m.finished_at)

        with ThreadPoolExecutor(max_workers=8) as pool:
            loaded = [s for s in pool.map(load, missing) if s is not None]
        with self._lock:
            for summary in loaded:
                self._known[summary.id] = summary
            for gone in set(self._known) - ids:
                del self._known[gone]
            return sorted(self._known.values(), key=lambda s: (s.cut_time, s.id))
