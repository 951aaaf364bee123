"""`statevault daemon`: scheduled backups, retention, checks and drills, run unattended.

One `Daemon` holds the jobs (daemon_jobs.plan_jobs), runs each tick of each job through
`run_job`, exports metrics and logs JSON events. Two ways to drive it, same job code:

* production: `start()` runs APScheduler 3 (BackgroundScheduler, the configured timezone,
  `coalesce=True`, `max_instances=1`, `misfire_grace_time`), with a croniter trigger (cron
  weekday numbering, see backup/schedule.py) and `TickExecutor`, which hands each run the
  tick APScheduler scheduled it for (APScheduler itself does not pass it to the job).
* tests: `run_due(now)` evaluates the same schedules at a given instant with APScheduler's
  coalescing and misfire rules (`schedule.due_run`) and starts due jobs in threads.

A run of job J for tick T, on any of several daemons sharing a repository:

1. `claim_once(store, J, T)`: a conditional create in the repository. Exactly one daemon wins
   per (job, tick); the others record `skipped_claimed`. The tick, not the wall clock, names
   the run, so daemons whose clocks differ by less than the interval agree.
2. the exclusive lease `job-J` (`acquire_lease`, refreshed every ttl/3 while the job runs):
   if the previous tick's run is still going on any daemon, this tick is `skipped_locked`.
   A daemon killed mid-job stops refreshing; its lease expires after `lease_ttl_seconds` and
   the next tick runs on whichever daemon claims it. Inside one daemon a job still running
   when its next tick comes is `skipped_running` (APScheduler's max_instances).
3. the job body; a LockedError from the repository lease (prune vs backup) is waited out, up
   to the misfire grace, then the tick counts as `skipped_locked`.
4. a status record `daemon/last-run/J.json` for every daemon's metrics (daemon_jobs).

Shutdown (`serve_forever`): the first SIGTERM/SIGINT stops scheduling and waits up to
`shutdown_timeout_seconds` for running jobs, then sets the abort event (backups stop before
their manifest is written: no visible snapshot; check, prune and drill stop before their next
chunk read, deletion or restore step, a drill removing its scratch target); a second signal
aborts at once. SIGHUP
re-reads the config: an invalid one is logged and the running one kept.
"""
from __future__ import annotations

import logging
import secrets
import signal
import threading
import time
from collections import deque
from datetime import datetime, timezone
from traceback import format_exc
from typing import Callable
from zoneinfo import ZoneInfo

from apscheduler.events import EVENT_JOB_MAX_INSTANCES
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

from backup.daemon_jobs import (JOB_BODIES, JobOutcome, JobReport, JobSpec, SnapshotIndex, load_drill, load_status,
                                open_repo, plan_jobs, save_status, status_record)
from backup.metrics import DaemonMetrics, MetricsServer
from backup.schedule import CroniterTrigger, TickExecutor, due_run, initial_next_run, is_misfire
from snapshots.errors import Aborted, LockedError, StatevaultError
from snapshots.leases import acquire_lease, claim_once, default_owner
from snapshots.settings import Settings, redact_url

log = logging.getLogger("statevault.daemon")

ABORT_WAIT_SECONDS = 60  # after the abort event: how long aborted jobs get to unwind
_LAZY = object()


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Daemon:
    """The scheduler-independent core. `settings` are replaced only by `reload()`."""

    def __init__(self, settings: Settings, *, reload_settings: Callable[[], Settings] | None = None,
                 repo_factory: Callable | None = None, backup_fn: Callable | None = None, drill_fn=_LAZY,
                 metrics: DaemonMetrics | None = None, owner: str | None = None,
                 clock: Callable[[], datetime] = _utcnow):
        if backup_fn is None:
            from backup.job import run_backup as backup_fn
        self.backup_fn = backup_fn
        self.drill_fn = load_drill() if drill_fn is _LAZY else drill_fn
        self.repo_factory = repo_factory or open_repo
        self.metrics = metrics or DaemonMetrics()
        self.snapshots = SnapshotIndex()
        self.owner = owner or default_owner()
        self.clock = clock
        self.abort = threading.Event()      # set: running backups stop before committing
        self.stopping = threading.Event()   # set: no new ticks
        self.outcomes: deque[JobOutcome] = deque(maxlen=1000)
        self._reload_settings = reload_settings
        self._cond = threading.Condition()
        self._active: dict[str, datetime] = {}
        self._next_run: dict[str, datetime] = {}
        self._scheduler: BackgroundScheduler | None = None
        self.server: MetricsServer | None = None
        self.settings = settings
        self.jobs: dict[str, JobSpec] = {}
        self._apply_settings(settings)

    # ---- configuration -----------------------------------------------------------------
    def _apply_settings(self, settings: Settings) -> set[str]:
        """Install `settings`; returns the names of jobs that are new or changed."""
        if self.drill_fn is None and settings.daemon.drill_schedule:
            log.info("drill_unavailable", extra={"error": "restore.drill is not installed; no drill job"})
        jobs = {j.name: j for j in plan_jobs(settings, drill_available=self.drill_fn is not None)}
        changed = {n for n, j in jobs.items() if self.jobs.get(n) != j}
        for name in set(self.jobs) - set(jobs) | changed:
            self._next_run.pop(name, None)
        for old in set(self.settings.sources) - set(settings.sources):
            self.metrics.forget_source(old)
        for spec in jobs.values():
            if spec.kind == "backup":
                self.metrics.configure_source(spec.source, spec.schedule.expected_interval())
        self.settings, self.jobs = settings, jobs
        return changed

    def reload(self) -> bool:
        """Re-read the config; keep the running one if the new one is invalid."""
        if self._reload_settings is None:
            log.warning("config_reload_failed", extra={"error": "no config file to reload"})
            return False
        try:
            new = self._reload_settings()
        except StatevaultError as exc:
            log.error("config_reload_failed", extra={"error": exc.message})
            return False
        old = self.settings
        removed = set(self.jobs)
        changed = self._apply_settings(new)
        removed -= set(self.jobs)
        if self._scheduler is not None:
            for name in removed | changed:
                if self._scheduler.get_job(name) is not None:
                    self._scheduler.remove_job(name)
            self._schedule(changed)
        if (old.daemon.metrics_host, old.daemon.metrics_port) != (new.daemon.metrics_host, new.daemon.metrics_port):
            log.warning("config_reload_partial", extra={"error": "the metrics address changes on restart only"})
        log.info("config_reloaded", extra={"jobs": sorted(self.jobs), "changed": sorted(changed),
                                           "removed": sorted(removed)})
        return True

    # ---- one run of one tick -----------------------------------------------------------
    def run_job(self, name: str, tick: datetime) -> JobOutcome:
        """Run job `name` for `tick` in this thread (claim, lease, body, status, metrics)."""
        with self._cond:
            if name in self._active:
                return self._record(JobOutcome(name, tick, "skipped_running"), source=None)
            self._active[name] = tick
        return self._run_marked(name, tick)

    def _run_marked(self, name: str, tick: datetime) -> JobOutcome:
        try:
            return self._execute(name, tick)
        finally:
            with self._cond:
                self._active.pop(name, None)
                self._cond.notify_all()

    def _execute(self, name: str, tick: datetime) -> JobOutcome:
        spec, settings = self.jobs.get(name), self.settings
        if spec is None:  # removed by a reload after it was submitted
            return self._record(JobOutcome(name, tick, "missed", error="job no longer configured"), source=None)
        run_id = secrets.token_hex(6)
        fields = {"job": name, "source": spec.source, "run_id": run_id, "tick": tick.isoformat()}
        started = time.monotonic()
        repo = None
        try:
            repo = self.repo_factory(settings)
            if not claim_once(repo.store, name, tick, owner=self.owner):
                return self._record(JobOutcome(name, tick, "skipped_claimed", run_id), spec.source)
            try:
                lease = acquire_lease(repo.store, f"job-{name}", exclusive=True, ttl=settings.repository.lease_ttl_seconds,
                                      purpose=f"daemon {name} tick {tick.isoformat()}", owner=self.owner)
            except LockedError as exc:
                return self._record(JobOutcome(name, tick, "skipped_locked", run_id, error=exc.message), spec.source)
            log.info("job_started", extra=fields)
            with lease:
                report = self._body_waiting_for_repository(spec, repo, settings, tick)
                if lease.lost:
                    log.warning("lease_lost", extra={**fields, "error": "job lease expired while running"})
        except LockedError as exc:
            return self._record(JobOutcome(name, tick, "skipped_locked", run_id, time.monotonic() - started,
                                           error=exc.message), spec.source)
        except Aborted as exc:  # shutdown: check, prune and drill stop between steps (backups report it)
            report = JobReport(ok=False, error=exc.message, aborted=True)
        except StatevaultError as exc:
            report = JobReport(ok=False, error=exc.message)
        except Exception as exc:  # noqa: BLE001 - one broken job must never stop the daemon
            log.error("job_crashed", extra={**fields, "error": f"{type(exc).__name__}: {exc}",
                                            "traceback": format_exc(limit=8)})
            report = JobReport(ok=False, error=f"unexpected {type(exc).__name__}: {exc}")
        duration = time.monotonic() - started
        if spec.kind == "backup":
            report.detail.setdefault("source", spec.source)
            if not report.ok and not report.aborted and "bytes_read" not in report.detail:
                self.metrics.backup_counters(spec.source, ok=False, bytes_read=0, bytes_uploaded=0,
                                             bytes_deduplicated=0)  # failed before run_backup counted it
        result = "aborted" if report.aborted else ("ok" if report.ok else "failed")
        if result != "aborted":
            record = status_record(spec, tick, report, finished_at=_utcnow(), duration=duration, owner=self.owner,
                                   run_id=run_id)
            self.metrics.apply_status(record)
            if repo is not None:
                try:
                    save_status(repo, record)
                    if spec.kind in ("backup", "retention"):
                        self.metrics.repository_state(self.snapshots.refresh(repo), settings.sources)
                except StatevaultError as exc:
                    log.warning("status_not_saved", extra={**fields, "error": exc.message})
        return self._record(JobOutcome(name, tick, result, run_id, duration, report.error, report.detail), spec.source)

    def _body_waiting_for_repository(self, spec: JobSpec, repo, settings: Settings, tick: datetime) -> JobReport:
        """Run the body; while the repository lease is taken (a prune, or backups for a prune) retry
        until the tick is as late as the misfire grace allows."""
        grace = settings.daemon.misfire_grace_seconds
        poll = max(0.2, min(5.0, settings.repository.lease_ttl_seconds / 3))
        while True:
            try:
                return JOB_BODIES[spec.kind](self, repo, settings, spec)
            except LockedError:
                if is_misfire(tick, self.clock(), grace) or self.stopping.wait(poll):
                    raise

    def record_missed(self, name: str, tick: datetime) -> JobOutcome:
        spec = self.jobs.get(name)
        return self._record(JobOutcome(name, tick, "missed"), spec.source if spec else None)

    def _record(self, outcome: JobOutcome, source: str | None) -> JobOutcome:
        self.outcomes.append(outcome)
        self.metrics.job_run(outcome.job, outcome.result)
        extra = {"job": outcome.job, "source": source, "run_id": outcome.run_id, "tick": outcome.tick.isoformat(),
                 "result": outcome.result, "duration": outcome.duration, "error": outcome.error}
        if outcome.result in ("ok", "failed", "aborted"):
            for key in ("snapshot_id", "attempts", "records", "removed", "problems"):
                if key in outcome.detail:
                    extra[key] = outcome.detail[key]
            level = logging.ERROR if outcome.result == "failed" else logging.INFO
            log.log(level, "job_finished", extra=extra)
        elif outcome.result == "missed":
            log.warning("job_missed", extra=extra)
        else:
            log.info("job_skipped", extra=extra)
        return outcome

    # ---- the controllable clock --------------------------------------------------------
    def run_due(self, now: datetime) -> list[tuple[str, datetime, str]]:
        """Start every job due at `now` (APScheduler semantics); returns (job, tick, started|missed|
        skipped_running). Jobs run in threads: `wait_idle()` waits for them."""
        grace = self.settings.daemon.misfire_grace_seconds
        actions = []
        for spec in list(self.jobs.values()):
            nxt = self._next_run.get(spec.name) or initial_next_run(spec.schedule, now, grace)
            due = due_run(spec.schedule, nxt, now, grace)
            self._next_run[spec.name] = due.next_run
            if due.tick is None:
                continue
            if due.missed:
                self.record_missed(spec.name, due.tick)
                actions.append((spec.name, due.tick, "missed"))
            else:
                actions.append((spec.name, due.tick, self.launch(spec.name, due.tick)))
        return actions

    def launch(self, name: str, tick: datetime) -> str:
        """Run a tick in a daemon thread unless the job is running here already."""
        with self._cond:
            if name in self._active:
                self._record(JobOutcome(name, tick, "skipped_running"), source=None)
                return "skipped_running"
            self._active[name] = tick
        threading.Thread(target=self._run_marked, args=(name, tick), name=f"job-{name}", daemon=True).start()
        return "started"

    def run_once(self, now: datetime | None = None) -> list[JobOutcome]:
        """One scheduling pass: every job whose latest tick is within the misfire grace and not yet
        claimed by any daemon runs now; returns when they are done."""
        now = now or self.clock()
        before = len(self.outcomes)
        self._next_run.clear()
        self.run_due(now)
        self.wait_idle(None)
        return list(self.outcomes)[before:]

    def wait_idle(self, timeout: float | None, interrupt: threading.Event | None = None) -> bool:
        """Wait until no job runs (True), the timeout passes or `interrupt` is set (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._active:
                if interrupt is not None and interrupt.is_set():
                    return False
                left = 0.2 if deadline is None else min(0.2, deadline - time.monotonic())
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def running_jobs(self) -> dict[str, datetime]:
        with self._cond:
            return dict(self._active)

    # ---- metrics -----------------------------------------------------------------------
    def refresh_metrics(self) -> None:
        """Last runs of every job (any daemon) and snapshot counts, from the repository."""
        settings = self.settings
        try:
            repo = self.repo_factory(settings)
            for name in list(self.jobs):
                record = load_status(repo, name)
                if record is not None:
                    self.metrics.apply_status(record)
            self.metrics.repository_state(self.snapshots.refresh(repo), settings.sources)
        except StatevaultError as exc:
            log.warning("metrics_refresh_failed", extra={"error": exc.message})

    def health(self) -> tuple[bool, dict]:
        alive = self._scheduler is None or self._scheduler.running or self.stopping.is_set()
        return alive, {"owner": self.owner, "jobs": sorted(self.jobs), "stopping": self.stopping.is_set(),
                       "running": {k: v.isoformat() for k, v in self.running_jobs().items()}}

    # ---- production: APScheduler -------------------------------------------------------
    def start(self, *, serve_metrics: bool = True) -> None:
        d = self.settings.daemon
        self.refresh_metrics()
        if serve_metrics:
            self.server = MetricsServer(self.metrics.registry, self.health, d.metrics_host, d.metrics_port)
            log.info("metrics_listening", extra={"host": self.server.host, "port": self.server.port})
        self._scheduler = BackgroundScheduler(
            timezone=ZoneInfo(d.timezone),
            executors={"default": TickExecutor(self.clock, self.record_missed), "plain": ThreadPoolExecutor(1)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": d.misfire_grace_seconds})
        self._scheduler.add_listener(self._on_max_instances, EVENT_JOB_MAX_INSTANCES)
        self._schedule(set(self.jobs))
        self._scheduler.add_job(self.refresh_metrics, IntervalTrigger(seconds=d.metrics_refresh_seconds),
                                id="metrics-refresh", executor="plain", coalesce=True, max_instances=1)
        self._scheduler.start()
        log.info("daemon_started", extra={"owner": self.owner, "jobs": sorted(self.jobs),
                                          "timezone": d.timezone,
                                          "repository": redact_url(self.settings.repository.url)})

    def _schedule(self, names: set[str]) -> None:
        now, grace = self.clock(), self.settings.daemon.misfire_grace_seconds
        for name in sorted(names):
            spec = self.jobs[name]
            self._scheduler.add_job(self._scheduled, CroniterTrigger(spec.schedule), args=[name], id=name, name=name,
                                    next_run_time=initial_next_run(spec.schedule, now, grace), coalesce=True,
                                    max_instances=1, misfire_grace_time=grace, replace_existing=True)

    def _scheduled(self, name: str, tick: datetime | None = None) -> JobOutcome:
        # tick defaults only to satisfy APScheduler's signature check: TickExecutor always passes it
        return self.run_job(name, tick or self.clock())

    def _on_max_instances(self, event) -> None:
        self._record(JobOutcome(event.job_id, event.scheduled_run_times[-1], "skipped_running"),
                     source=getattr(self.jobs.get(event.job_id), "source", None))

    def shutdown(self, timeout: float | None = None) -> bool:
        """Stop scheduling; let running jobs finish up to the timeout, then abort them.
        True when no job was left running."""
        self.stopping.set()
        if self._scheduler is not None and self._scheduler.running:
            self._scheduler.shutdown(wait=False)
        running = sorted(self.running_jobs())
        timeout = self.settings.daemon.shutdown_timeout_seconds if timeout is None else timeout
        if running:
            log.info("shutdown_waiting", extra={"jobs": running, "timeout": timeout})
        clean = self.wait_idle(timeout, interrupt=self.abort)
        if not clean:
            log.warning("shutdown_abort", extra={"jobs": sorted(self.running_jobs())})
            self.abort.set()
            clean = self.wait_idle(ABORT_WAIT_SECONDS)
        if self.server is not None:
            self.server.stop()
        log.info("daemon_stopped", extra={"clean": clean, "left_running": sorted(self.running_jobs())})
        return clean

    def serve_forever(self, *, install_signals: bool = True) -> bool:
        """Run until SIGTERM/SIGINT (twice: abort); SIGHUP reloads. Returns `shutdown()`'s answer."""
        stop, reload_wanted, signals = threading.Event(), threading.Event(), [0]

        def on_stop(signum, frame):  # flags only: logging from a signal handler can deadlock
            signals[0] += 1
            (stop if signals[0] == 1 else self.abort).set()

        if install_signals:
            signal.signal(signal.SIGTERM, on_stop)
            signal.signal(signal.SIGINT, on_stop)
            signal.signal(signal.SIGHUP, lambda signum, frame: reload_wanted.set())
        self.start()
        while not stop.wait(0.25):
            if reload_wanted.is_set():
                reload_wanted.clear()
                self.reload()
        log.info("shutdown_requested", extra={"running": sorted(self.running_jobs())})
        return self.shutdown()
