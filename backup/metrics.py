"""The daemon's Prometheus metrics and its HTTP endpoint (`/metrics`, `/healthz`).

Each `DaemonMetrics` owns its CollectorRegistry (never the process-global one), so several
daemons can live in one process (tests). Series, all prefixed `statevault_`:

    backup_last_success_timestamp_seconds{source}  newest successful backup: own runs, other
                                                   daemons' runs (status records) and the
                                                   repository's newest snapshot, whichever is newer
    backup_last_status{source}                     1 ok / 0 failed, last run by any daemon
    backup_duration_seconds{source}                last run's duration
    backup_attempts{source}                        attempts the last run needed (retries + 1)
    backup_records{source,item}                    records per item in the last snapshot
    backup_bytes_read_total / _uploaded_total / _deduplicated_total {source}   this daemon's runs
    backup_failures_total{source}                  this daemon's failed runs
    schedule_expected_interval_seconds{source}     seconds between two ticks of the schedule
    snapshots_kept{source}                         snapshots in the repository
    oldest_recoverable_timestamp_seconds{source}   cut time of the oldest snapshot
    latest_snapshot_timestamp_seconds{source}      cut time of the newest snapshot
    check_last_status / check_last_timestamp_seconds / check_problems
    drill_last_status{source} / drill_rto_seconds{source} / drill_rpo_seconds{source}
    drill_last_timestamp_seconds
    job_runs_total{job,result}                     ok|failed|aborted|skipped_claimed|
                                                   skipped_locked|skipped_running|missed
    job_last_status{job} / job_last_run_timestamp_seconds{job}

Gauges describing "the last run" are fed from status records (`apply_status`), which the daemon
that ran the job also writes to the repository: every daemon sharing a repository then exports
the same last status, whichever of them won the tick. Counters count this daemon's own work.
"""
from __future__ import annotations

import threading
from datetime import datetime
from socketserver import ThreadingMixIn
from typing import Callable, Iterable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, make_wsgi_app

from snapshots.errors import ConfigError

SOURCE_SERIES = (
    "statevault_backup_last_success_timestamp_seconds", "statevault_backup_last_status",
    "statevault_backup_duration_seconds", "statevault_backup_attempts", "statevault_backup_records",
    "statevault_schedule_expected_interval_seconds", "statevault_snapshots_kept",
    "statevault_oldest_recoverable_timestamp_seconds", "statevault_latest_snapshot_timestamp_seconds",
    "statevault_drill_last_status", "statevault_drill_rto_seconds", "statevault_drill_rpo_seconds",
)


def _ts(value: str | datetime | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.timestamp()


class DaemonMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        s, si = ["source"], ["source", "item"]
        self.last_success = Gauge("statevault_backup_last_success_timestamp_seconds",
                                  "Unix time of the newest successful backup of the source.", s, registry=r)
        self.last_status = Gauge("statevault_backup_last_status", "1 if the last backup run succeeded, else 0.",
                                 s, registry=r)
        self.duration = Gauge("statevault_backup_duration_seconds", "Duration of the last backup run.", s, registry=r)
        self.attempts = Gauge("statevault_backup_attempts", "Attempts the last backup run needed.", s, registry=r)
        self.records = Gauge("statevault_backup_records", "Records per item in the last snapshot.", si, registry=r)
        self.bytes_read = Counter("statevault_backup_bytes_read_total", "Uncompressed bytes read from sources.",
                                  s, registry=r)
        self.bytes_uploaded = Counter("statevault_backup_bytes_uploaded_total",
                                      "Compressed bytes written to the repository.", s, registry=r)
        self.bytes_dedup = Counter("statevault_backup_bytes_deduplicated_total",
                                   "Uncompressed bytes of chunks already in the repository.", s, registry=r)
        self.failures = Counter("statevault_backup_failures_total", "Failed backup runs of this daemon.", s,
                                registry=r)
        self.interval = Gauge("statevault_schedule_expected_interval_seconds",
                              "Seconds between two scheduled backups of the source.", s, registry=r)
        self.kept = Gauge("statevault_snapshots_kept", "Snapshots of the source in the repository.", s, registry=r)
        self.oldest = Gauge("statevault_oldest_recoverable_timestamp_seconds",
                            "Cut time of the oldest snapshot of the source.", s, registry=r)
        self.latest = Gauge("statevault_latest_snapshot_timestamp_seconds",
                            "Cut time of the newest snapshot of the source.", s, registry=r)
        self.check_status = Gauge("statevault_check_last_status", "1 if the last repository check passed.",
                                  registry=r)
        self.check_ts = Gauge("statevault_check_last_timestamp_seconds", "Unix time of the last check.", registry=r)
        self.check_problems = Gauge("statevault_check_problems", "Problems the last check found.", registry=r)
        self.drill_status = Gauge("statevault_drill_last_status", "1 if the last drill of the source passed.",
                                  s, registry=r)
        self.drill_rto = Gauge("statevault_drill_rto_seconds", "Restore time measured by the last drill.", s,
                               registry=r)
        self.drill_rpo = Gauge("statevault_drill_rpo_seconds", "Data age at the last drill (now - snapshot cut).",
                               s, registry=r)
        self.drill_ts = Gauge("statevault_drill_last_timestamp_seconds", "Unix time of the last drill.", registry=r)
        self.job_runs = Counter("statevault_job_runs_total", "Job ticks handled by this daemon, by result.",
                                ["job", "result"], registry=r)
        self.job_status = Gauge("statevault_job_last_status", "1 if the job's last run succeeded.", ["job"],
                                registry=r)
        self.job_last_run = Gauge("statevault_job_last_run_timestamp_seconds", "Unix time the job last finished.",
                                  ["job"], registry=r)
        self._lock = threading.Lock()
        self._applied: dict[str, str] = {}      # job -> tick of the newest status record applied
        self._success: dict[str, float] = {}    # source -> newest success timestamp seen
        self._items: dict[str, set[str]] = {}   # source -> item labels exported

    # ---- this daemon's own runs --------------------------------------------------------
    def job_run(self, job: str, result: str) -> None:
        self.job_runs.labels(job=job, result=result).inc()

    def backup_counters(self, source: str, *, ok: bool, bytes_read: int, bytes_uploaded: int,
                        bytes_deduplicated: int) -> None:
        self.bytes_read.labels(source).inc(bytes_read)
        self.bytes_uploaded.labels(source).inc(bytes_uploaded)
        self.bytes_dedup.labels(source).inc(bytes_deduplicated)
        if not ok:
            self.failures.labels(source).inc()

    def configure_source(self, source: str, expected_interval: float) -> None:
        """A configured source: its schedule's interval, and its counters exported from 0 on
        (so `increase()` sees the first failure)."""
        self.interval.labels(source).set(expected_interval)
        for counter in (self.bytes_read, self.bytes_uploaded, self.bytes_dedup, self.failures):
            counter.labels(source)

    def _success_at(self, source: str, ts: float | None) -> None:
        if ts is not None and ts > self._success.get(source, 0.0):
            self._success[source] = ts
            self.last_success.labels(source).set(ts)

    # ---- last runs, from any daemon ----------------------------------------------------
    def apply_status(self, record: dict) -> bool:
        """Set the last-run gauges from a status record (see daemon_jobs.status_record).

        Records older than one already applied for the job are ignored. Returns whether applied.
        """
        job, tick = record["job"], record["tick"]
        with self._lock:
            if self._applied.get(job, "") > tick:
                return False
            self._applied[job] = tick
            ok = record["result"] == "ok"
            finished = _ts(record.get("finished_at"))
            self.job_status.labels(job).set(1 if ok else 0)
            if finished is not None:
                self.job_last_run.labels(job).set(finished)
            detail = record.get("detail") or {}
            kind = record.get("kind")
            if kind == "backup":
                self._apply_backup(detail, ok, finished, record.get("duration_seconds"))
            elif kind == "check":
                self.check_status.set(1 if ok else 0)
                self.check_problems.set(detail.get("problems", 0))
                if finished is not None:
                    self.check_ts.set(finished)
            elif kind == "drill":
                self._apply_drill(detail, finished)
        return True

    def _apply_backup(self, detail: dict, ok: bool, finished: float | None, duration: float | None) -> None:
        source = detail["source"]
        self.last_status.labels(source).set(1 if ok else 0)
        if duration is not None:
            self.duration.labels(source).set(duration)
        self.attempts.labels(source).set(detail.get("attempts", 0))
        if ok:
            self._success_at(source, finished)
            items = detail.get("records_per_item") or {}
            for gone in self._items.get(source, set()) - set(items):
                self.records.remove(source, gone)
            for item, n in items.items():
                self.records.labels(source, item).set(n)
            self._items[source] = set(items)

    def _apply_drill(self, detail: dict, finished: float | None) -> None:
        if finished is not None:
            self.drill_ts.set(finished)
        for entry in detail.get("sources", []):
            source = entry.get("source")
            if not source:
                continue
            self.drill_status.labels(source).set(1 if entry.get("ok") else 0)
            if entry.get("rto_seconds") is not None:
                self.drill_rto.labels(source).set(entry["rto_seconds"])
            if entry.get("rpo_seconds") is not None:
                self.drill_rpo.labels(source).set(entry["rpo_seconds"])

    # ---- the repository's state --------------------------------------------------------
    def repository_state(self, manifests: Iterable, sources: Iterable[str]) -> None:
        """Snapshots kept, oldest and newest point per configured source, from snapshot summaries
        (anything with source, cut_time, finished_at), oldest cut first."""
        by_source: dict[str, list] = {name: [] for name in sources}
        for m in manifests:
            if m.source in by_source:
                by_source[m.source].append(m)
        with self._lock:
            for source, ms in by_source.items():
                self.kept.labels(source).set(len(ms))
                if ms:
                    self.oldest.labels(source).set(ms[0].cut_time.timestamp())
                    self.latest.labels(source).set(ms[-1].cut_time.timestamp())
                    self._success_at(source, max(m.finished_at for m in ms).timestamp())

    def forget_source(self, source: str) -> None:
        """Drop a source's series (it was removed from the config)."""
        with self._lock:
            for metric in (self.last_success, self.last_status, self.duration, self.attempts, self.interval,
                           self.kept, self.oldest, self.latest, self.drill_status, self.drill_rto, self.drill_rpo):
                try:
                    metric.remove(source)
                except KeyError:
                    pass
            for item in self._items.pop(source, set()):
                self.records.remove(source, item)
            for counter in (self.bytes_read, self.bytes_uploaded, self.bytes_dedup, self.failures):
                try:
                    counter.remove(source)
                except KeyError:
                    pass
            self._success.pop(source, None)


# ---- HTTP ------------------------------------------------------------------------------

class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - scrapes every 15 s are not log events
        pass


def metrics_app(registry: CollectorRegistry, health: Callable[[], tuple[bool, dict]]):
    """WSGI app: /metrics (Prometheus text format), /healthz (200 alive, 503 stopping or stuck)."""
    prometheus = make_wsgi_app(registry)

    def app(environ, start_response):
        path = environ.get("PATH_INFO") or "/"
        if path == "/healthz":
            ok, info = health()
            body = orjson.dumps({"status": "ok" if ok else "unhealthy", **info}, default=str)
            start_response("200 OK" if ok else "503 Service Unavailable",
                           [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]
        if path in ("/metrics", "/"):
            return prometheus(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found: try /metrics or /healthz\n"]

    return app


class MetricsServer:
    """Serves `metrics_app` from a daemon thread. Port 0 binds a free port; `port` tells which."""

    def __init__(self, registry: CollectorRegistry, health: Callable[[], tuple[bool, dict]],
                 host: str = "127.0.0.1", port: int = 9108):
        try:
            self._httpd = make_server(host, port, metrics_app(registry, health), server_class=_Server,
                                      handler_class=_QuietHandler)
        except (OSError, OverflowError) as exc:  # in use, not ours to bind, no such address
            raise ConfigError(f"cannot serve metrics on {host}:{port}: {exc}",
                              hint="Another process may listen there: set daemon.metrics_port (or "
                                   "--metrics-port) to a free port, 0 for any.") from None
        self.host, self.port = host, self._httpd.server_port
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="metrics-http", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
