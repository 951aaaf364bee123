"""The daemon against real Redis servers and repositories (local dir, moto S3 over HTTP).

Scheduling semantics run on the controllable clock (`Daemon.run_due(now)`): no minute-long
sleeps. The production path (APScheduler, signals) runs for a few seconds with croniter's
seconds field (`* * * * * *`), in this process or in daemon subprocesses.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from backup.daemon import Daemon
from backup.job import run_backup
from backup.metrics import MetricsServer
from snapshots.check import check_repository
from snapshots.repository import open_repository
from snapshots.settings import Settings
from tests.servers import free_port

ROOT = Path(__file__).resolve().parents[2]
NEVER = "0 0 1 1 *"  # jobs a test does not exercise: their latest tick is far beyond any grace
T0 = datetime(2030, 1, 7, 12, 0, tzinfo=timezone.utc)


def settings_for(repo_url: str, sources: dict, **daemon) -> Settings:
    d = {"prune_schedule": NEVER, "check_schedule": NEVER, "drill_schedule": None, "misfire_grace_seconds": 3600,
         "retry_attempts": 3, "retry_max_wait_seconds": 0.5, "metrics_port": 0, **daemon}
    return Settings(repository={"url": repo_url, "lease_ttl_seconds": 5}, sources=sources, daemon=d)


def redis_source(url: str, schedule: str = "*/15 * * * *", **kw) -> dict:
    return {"kind": "redis", "url": url, "schedule": schedule, **kw}


def seed(url: str, n: int, prefix: str = "history") -> None:
    with redis.Redis.from_url(url) as r:
        pipe = r.pipeline(transaction=False)
        for i in range(n):
            pipe.set(f"{prefix}:u{i}", f"message {i} " + "x" * 40)
            if i % 5000 == 4999:
                pipe.execute()
        pipe.execute()


class Clock:
    def __init__(self, now: datetime):
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def run_at(daemon: Daemon, clock: Clock, now: datetime):
    clock.now = now
    actions = daemon.run_due(now)
    assert daemon.wait_idle(30)
    return actions


def results(daemon: Daemon, job: str) -> list[tuple[datetime, str]]:
    return [(o.tick, o.result) for o in daemon.outcomes if o.job == job]


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def metric(samples, name: str, **labels) -> float | None:
    return samples.get((name, frozenset(labels.items())))


# ---- schedules on the controllable clock ---------------------------------------------------

def test_backup_fires_on_its_ticks_and_not_between(file_repo_url, redis_url):
    seed(redis_url, 20)
    clock = Clock(T0)
    daemon = Daemon(settings_for(file_repo_url, {"hist": redis_source(redis_url)}), clock=clock)
    assert sorted(daemon.jobs) == ["backup-hist", "check", "forget-prune"]
    assert run_at(daemon, clock, T0) == [("backup-hist", T0, "started")]
    assert run_at(daemon, clock, T0 + timedelta(minutes=14, seconds=59)) == []
    assert run_at(daemon, clock, T0 + timedelta(minutes=15)) == [("backup-hist", T0 + timedelta(minutes=15), "started")]
    assert results(daemon, "backup-hist") == [(T0, "ok"), (T0 + timedelta(minutes=15), "ok")]
    repo = open_repository(file_repo_url)
    snaps = repo.list_snapshots(source="hist")
    assert len(snaps) == 2 and all(m.records == 20 for m in snaps)


def test_running_job_makes_the_next_tick_skip_here_and_on_another_daemon(file_repo_url, redis_url):
    """No overlap: the next tick is skipped locally (max_instances) and by a second daemon (lease)."""
    seed(redis_url, 5)
    release, entered = threading.Event(), threading.Event()

    def blocked_backup(*args, **kw):
        entered.set()
        release.wait(30)
        return run_backup(*args, **kw)

    settings = settings_for(file_repo_url, {"hist": redis_source(redis_url)})
    clock_a, clock_b = Clock(T0), Clock(T0)
    a = Daemon(settings, clock=clock_a, backup_fn=blocked_backup, owner="daemon-a")
    b = Daemon(settings, clock=clock_b, owner="daemon-b")
    assert a.run_due(T0) == [("backup-hist", T0, "started")]
    assert entered.wait(10)
    t1 = T0 + timedelta(minutes=15)
    assert a.run_due(t1) == [("backup-hist", t1, "skipped_running")]
    assert run_at(b, clock_b, t1) == [("backup-hist", t1, "started")]   # b claims t1, but a holds the job lease
    assert results(b, "backup-hist") == [(t1, "skipped_locked")]
    release.set()
    assert a.wait_idle(30)
    assert results(a, "backup-hist") == [(t1, "skipped_running"), (T0, "ok")]
    t2 = T0 + timedelta(minutes=30)
    run_at(a, clock_a, t2)
    run_at(b, clock_b, t2)
    assert sorted(r for _, r in results(a, "backup-hist") + results(b, "backup-hist") if _ == t2) == \
        ["ok", "skipped_claimed"]
    assert len(open_repository(file_repo_url).list_snapshots()) == 2   # T0 and t2, nothing for t1
    assert a.metrics.job_runs.labels(job="backup-hist", result="skipped_running")._value.get() == 1
    assert b.metrics.job_runs.labels(job="backup-hist", result="skipped_locked")._value.get() == 1


def test_downtime_coalesces_missed_ticks_and_respects_the_misfire_grace(file_repo_url, redis_url):
    seed(redis_url, 3)
    sources = {"hist": redis_source(redis_url)}
    clock = Clock(T0)
    daemon = Daemon(settings_for(file_repo_url, sources, misfire_grace_seconds=3600), clock=clock)
    run_at(daemon, clock, T0)
    # the process stalls for 5 ticks (12:15 .. 13:15): one run, for the latest tick
    late = T0 + timedelta(minutes=80)
    assert run_at(daemon, clock, late) == [("backup-hist", T0 + timedelta(minutes=75), "started")]
    assert [r for _, r in results(daemon, "backup-hist")] == ["ok", "ok"]

    # a daemon restarted after downtime catches up the latest tick once; a second restart does not
    restarted_at = T0 + timedelta(minutes=100)                       # latest tick 13:30, 10 min ago
    fresh = Daemon(settings_for(file_repo_url, sources, misfire_grace_seconds=3600), clock=Clock(restarted_at))
    assert run_at(fresh, fresh.clock, restarted_at) == [("backup-hist", T0 + timedelta(minutes=90), "started")]
    again = Daemon(settings_for(file_repo_url, sources, misfire_grace_seconds=3600), clock=Clock(restarted_at))
    run_at(again, again.clock, restarted_at + timedelta(seconds=30))
    assert results(fresh, "backup-hist") == [(T0 + timedelta(minutes=90), "ok")]
    assert results(again, "backup-hist") == [(T0 + timedelta(minutes=90), "skipped_claimed")]

    # beyond the grace: nothing runs, the tick is counted as missed
    strict = Daemon(settings_for(file_repo_url, sources, misfire_grace_seconds=60), clock=Clock(T0))
    start = T0 + timedelta(hours=3)
    run_at(strict, strict.clock, start)
    assert run_at(strict, strict.clock, start + timedelta(minutes=80)) == \
        [("backup-hist", start + timedelta(minutes=75), "missed")]
    assert [r for _, r in results(strict, "backup-hist")] == ["ok", "missed"]
    assert len(open_repository(file_repo_url).list_snapshots()) == 4


# ---- retries and failures ------------------------------------------------------------------

class LateProxy:
    """A TCP proxy to a Redis that starts listening only after `delay`: until then connections are
    refused, as when the server is restarting."""

    def __init__(self, upstream: tuple[str, int], delay: float):
        self.upstream, self.port = upstream, free_port()
        self._sock: socket.socket | None = None
        self._timer = threading.Timer(delay, self._listen)
        self._timer.start()

    def _listen(self) -> None:
        self._sock = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.upstream)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._timer.cancel()
        if self._sock is not None:
            self._sock.close()


def test_transient_failure_is_retried_until_it_succeeds(file_repo_url, redis_server, redis_url):
    seed(redis_url, 12)
    db = int(redis_url.rsplit("/", 1)[1])
    proxy = LateProxy((redis_server.host, redis_server.port), delay=1.0)
    try:
        url = f"redis://127.0.0.1:{proxy.port}/{db}"
        settings = settings_for(file_repo_url, {"hist": redis_source(url)}, retry_attempts=20,
                                retry_max_wait_seconds=0.3)
        daemon = Daemon(settings)
        outcome = daemon.run_job("backup-hist", T0)
    finally:
        proxy.close()
    assert outcome.result == "ok", outcome.error
    assert outcome.detail["attempts"] >= 2 and outcome.detail["records"] == 12
    assert daemon.metrics.attempts.labels("hist")._value.get() == outcome.detail["attempts"]
    assert daemon.metrics.failures.labels("hist")._value.get() == 0


def test_permanent_failure_fails_fast_and_is_reported_in_metrics(file_repo_url, redis_server, redis_url):
    seed(redis_url, 3)
    db = int(redis_url.rsplit("/", 1)[1])
    bad_auth = f"redis://nobody:wrong-secret@{redis_server.host}:{redis_server.port}/{db}"
    settings = settings_for(file_repo_url, {"bad": redis_source(bad_auth), "good": redis_source(redis_url)},
                            retry_attempts=5, retry_max_wait_seconds=5)
    daemon = Daemon(settings)
    started = time.monotonic()
    bad = daemon.run_job("backup-bad", T0)
    assert bad.result == "failed" and bad.detail["attempts"] == 1
    assert time.monotonic() - started < 3          # no backoff waits for a permanent error
    assert "authentication failed" in bad.error and "wrong-secret" not in bad.error
    assert daemon.run_job("backup-good", T0).result == "ok"   # one failing source never stops another
    server = MetricsServer(daemon.metrics.registry, daemon.health, port=0)
    try:
        m = scrape(server.port)
    finally:
        server.stop()
    assert metric(m, "statevault_backup_last_status", source="bad") == 0
    assert metric(m, "statevault_backup_failures_total", source="bad") == 1
    assert metric(m, "statevault_backup_last_status", source="good") == 1
    assert metric(m, "statevault_backup_failures_total", source="good") == 0
    assert metric(m, "statevault_job_runs_total", job="backup-bad", result="failed") == 1


# ---- metrics after real runs ---------------------------------------------------------------

def test_metrics_endpoint_exposes_real_runs(s3_repo_url, fresh_redis_url):
    src, scratch = fresh_redis_url(), fresh_redis_url()
    seed(src, 30, "history")
    seed(src, 7, "session")
    sources = {"hist": redis_source(src, patterns=["history:*", "session:*"],
                                    drill={"redis_db": int(scratch.rsplit("/", 1)[1])})}
    settings = settings_for(s3_repo_url, sources, drill_schedule="0 6 * * 0")
    window_start = time.time()
    daemon = Daemon(settings)
    assert "drill" in daemon.jobs
    for job in ("backup-hist", "check", "drill"):
        outcome = daemon.run_job(job, T0)
        assert outcome.result == "ok", (job, outcome.error)
    repo = open_repository(s3_repo_url)
    manifest = repo.resolve("latest", source="hist")
    server = MetricsServer(daemon.metrics.registry, daemon.health, port=0)
    try:
        m = scrape(server.port)
        health = httpx.get(f"http://127.0.0.1:{server.port}/healthz", timeout=10)
    finally:
        server.stop()
    assert health.status_code == 200 and health.json()["status"] == "ok"
    last_success = metric(m, "statevault_backup_last_success_timestamp_seconds", source="hist")
    assert window_start <= last_success <= time.time()
    assert metric(m, "statevault_backup_last_status", source="hist") == 1
    assert metric(m, "statevault_backup_duration_seconds", source="hist") > 0
    assert metric(m, "statevault_backup_attempts", source="hist") == 1
    assert {i.name: i.records for i in manifest.items} == {"history:*": 30, "session:*": 7}
    for item in manifest.items:
        assert metric(m, "statevault_backup_records", source="hist", item=item.name) == item.records
    for name in ("read", "uploaded"):
        assert metric(m, f"statevault_backup_bytes_{name}_total", source="hist") > 0
    assert metric(m, "statevault_backup_bytes_deduplicated_total", source="hist") == 0  # first snapshot
    assert metric(m, "statevault_backup_failures_total", source="hist") == 0
    assert metric(m, "statevault_schedule_expected_interval_seconds", source="hist") == 900
    assert metric(m, "statevault_snapshots_kept", source="hist") == 1
    assert metric(m, "statevault_latest_snapshot_timestamp_seconds", source="hist") == manifest.cut_time.timestamp()
    assert metric(m, "statevault_oldest_recoverable_timestamp_seconds", source="hist") == manifest.cut_time.timestamp()
    assert metric(m, "statevault_check_last_status") == 1
    assert window_start <= metric(m, "statevault_check_last_timestamp_seconds") <= time.time()
    assert metric(m, "statevault_drill_last_status", source="hist") == 1
    assert metric(m, "statevault_drill_rto_seconds", source="hist") > 0
    assert metric(m, "statevault_drill_rpo_seconds", source="hist") >= 0
    assert metric(m, "statevault_job_runs_total", job="backup-hist", result="ok") == 1

    # a second daemon on the same repository exports the same last run (status records), and a
    # second backup of unchanged data is all deduplicated
    other = Daemon(settings)
    other.refresh_metrics()
    assert other.metrics.last_status.labels("hist")._value.get() == 1
    assert other.metrics.records.labels("hist", "history:*")._value.get() == 30
    assert other.metrics.drill_status.labels("hist")._value.get() == 1
    assert other.run_job("backup-hist", T0 + timedelta(minutes=15)).result == "ok"
    assert other.metrics.bytes_dedup.labels("hist")._value.get() > 0
    assert other.metrics.kept.labels("hist")._value.get() == 2


def test_alert_rules_and_dashboard_use_exported_metrics(file_repo_url):
    import re

    import yaml

    exported = set()
    daemon = Daemon(settings_for(file_repo_url, {}))
    for family in daemon.metrics.registry.collect():
        exported.add(family.name)
        exported.update(s.name for s in family.samples)
        if family.type == "counter":
            exported.add(family.name + "_total")
    rules = yaml.safe_load((ROOT / "deploy/prometheus/statevault-alerts.yaml").read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    assert {"StatevaultBackupStale", "StatevaultBackupMissing", "StatevaultBackupFailing", "StatevaultCheckFailed",
            "StatevaultDrillFailed", "StatevaultDrillRTOHigh"} <= alerts
    dashboard = json.loads((ROOT / "deploy/grafana/statevault-dashboard.json").read_text())
    exprs += [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = {name for e in exprs for name in re.findall(r"\bstatevault_[a-z_]+", e)}
    assert used and used <= exported, used - exported
    assert any("absent(" in e for e in exprs)
    for path in ("deploy/kubernetes/daemon-deployment.yaml", "deploy/kubernetes/backup-cronjob.yaml"):
        docs = [d for d in yaml.safe_load_all((ROOT / path).read_text()) if d]
        assert docs and all("kind" in d for d in docs)


# ---- the production path: APScheduler, signals, processes -----------------------------------

def test_apscheduler_runs_each_second_tick_once(file_repo_url, redis_url, tmp_path):
    seed(redis_url, 5)
    settings = settings_for(file_repo_url, {"hist": redis_source(redis_url, schedule="* * * * * *")},
                            misfire_grace_seconds=30)
    daemon = Daemon(settings)
    daemon.start()
    try:
        time.sleep(3.3)
        health = httpx.get(f"http://127.0.0.1:{daemon.server.port}/healthz", timeout=10)
    finally:
        assert daemon.shutdown(timeout=10)
    assert health.status_code == 200
    ran = [(tick, r) for tick, r in results(daemon, "backup-hist")]
    ok_ticks = [tick for tick, r in ran if r == "ok"]
    assert len(ok_ticks) >= 2, ran
    assert all(tick.microsecond == 0 for tick, _ in ran)          # the scheduled tick, not the wall clock
    assert len({tick for tick, _ in ran}) == len(ran)             # no tick twice
    assert {r for _, r in ran} <= {"ok", "skipped_running", "skipped_locked"}
    assert len(open_repository(file_repo_url).list_snapshots()) == len(ok_ticks)


def write_config(path: Path, repo_url: str, redis_url: str, schedule: str = "* * * * * *", **daemon) -> Path:
    d = {"prune_schedule": NEVER, "check_schedule": NEVER, "drill_schedule": NEVER, "misfire_grace_seconds": 30,
         "shutdown_timeout_seconds": 30, "metrics_port": 0, "metrics_refresh_seconds": 3600, **daemon}
    lines = ["[repository]", f'url = "{repo_url}"', "lease_ttl_seconds = 5", "", "[daemon]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in d.items()]
    lines += ["", "[sources.hist]", 'kind = "redis"', f'url = "{redis_url}"', f'schedule = "{schedule}"', ""]
    path.write_text("\n".join(lines))
    return path


class DaemonProcess:
    def __init__(self, args: list[str], log: Path):
        self.log = log
        self._log_file = open(log, "wb")
        self.proc = subprocess.Popen(args, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=self._log_file, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    @classmethod
    def driver(cls, config: Path, log: Path, *extra: str) -> "DaemonProcess":
        return cls([sys.executable, "-m", "tests.integration.daemon_driver", str(config), *extra], log)

    @classmethod
    def cli(cls, config: Path, log: Path, *extra: str) -> "DaemonProcess":
        return cls([sys.executable, "-m", "cli.app", "--config", str(config), "daemon", *extra], log)

    def events(self) -> list[dict]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def wait_for(self, predicate, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for e in self.events():
                if predicate(e):
                    return e
            assert self.proc.poll() is None, f"daemon exited early:\n{self.log.read_text()[-3000:]}"
            time.sleep(0.05)
        raise AssertionError(f"no such event within {timeout}s:\n{self.log.read_text()[-3000:]}")

    def runs(self, job: str = "backup-hist") -> list[tuple[str, str]]:
        return [(e["tick"], e["result"]) for e in self.events()
                if e.get("job") == job and e["event"] in ("job_finished", "job_skipped", "job_missed")]

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self._log_file.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log_file.close()


@pytest.fixture
def processes():
    started: list[DaemonProcess] = []
    yield started
    for p in started:
        p.kill()


def test_two_daemon_processes_run_each_tick_exactly_once(s3_repo_url, redis_url, tmp_path, processes):
    seed(redis_url, 10)
    config = write_config(tmp_path / "statevault.toml", s3_repo_url, redis_url)
    a = DaemonProcess.driver(config, tmp_path / "a.log")
    b = DaemonProcess.driver(config, tmp_path / "b.log")
    processes += [a, b]
    for p in (a, b):
        p.wait_for(lambda e: e["event"] == "daemon_started")
    time.sleep(4.5)
    assert a.stop() == 0 and b.stop() == 0
    runs = a.runs() + b.runs()
    ran = [tick for tick, r in runs if r in ("ok", "failed")]
    assert len(ran) >= 4, runs
    assert len(ran) == len(set(ran)), "a tick ran twice"
    assert all(r in ("ok", "skipped_claimed", "skipped_locked", "skipped_running") for _, r in runs), runs
    # the loser of a tick saw the winner's claim (or was still busy with its own previous run)
    for tick in ran:
        others = [r for t, r in runs if t == tick and r not in ("ok", "failed")]
        assert set(others) <= {"skipped_claimed", "skipped_running"}, (tick, runs)
    assert any(r == "skipped_claimed" for _, r in runs), runs
    repo = open_repository(s3_repo_url)
    assert len(repo.list_snapshots(source="hist")) == len(ran)
    claims = {o.key for o in repo.store.list("locks/claims/backup-hist")}
    assert len(claims) == len({t for t, r in runs if r != "skipped_running"})


def test_killed_daemon_loses_its_lease_and_the_other_takes_over(s3_repo_url, redis_url, tmp_path, processes):
    seed(redis_url, 10)
    config = write_config(tmp_path / "statevault.toml", s3_repo_url, redis_url)
    a = DaemonProcess.driver(config, tmp_path / "a.log", "--backup-delay", "2")
    b = DaemonProcess.driver(config, tmp_path / "b.log", "--backup-delay", "2")
    processes += [a, b]
    for p in (a, b):
        p.wait_for(lambda e: e["event"] == "daemon_started")
    # whichever starts a job first is killed in the middle of it
    deadline = time.monotonic() + 20
    victim = survivor = None
    while victim is None and time.monotonic() < deadline:
        for p, other in ((a, b), (b, a)):
            started = [e for e in p.events() if e["event"] == "job_started"]
            if started:
                victim, survivor, victim_tick = p, other, started[0]["tick"]
                break
        time.sleep(0.05)
    assert victim is not None
    time.sleep(0.5)
    victim.kill()
    killed_at = datetime.now(timezone.utc)
    # the dead daemon's job lease blocks the next ticks until it expires (ttl 5 s), then a tick runs
    survivor.wait_for(lambda e: e["event"] == "job_finished" and e.get("result") == "ok"
                      and datetime.fromisoformat(e["tick"]) > killed_at, timeout=25)
    assert survivor.stop() == 0
    after = [(datetime.fromisoformat(t), r) for t, r in survivor.runs() if datetime.fromisoformat(t) > killed_at]
    first_ok = min(t for t, r in after if r == "ok")
    assert any(r == "skipped_locked" and t < first_ok for t, r in after), after
    assert (first_ok - killed_at).total_seconds() > 1.0
    repo = open_repository(s3_repo_url)
    ok_runs = [t for t, r in victim.runs() + survivor.runs() if r == "ok"]
    assert victim_tick not in ok_runs                       # the killed run never finished
    assert len(repo.list_snapshots(source="hist")) == len(ok_runs)


@pytest.mark.parametrize("signals,expect_snapshot", [(1, True), (2, False)])
def test_sigterm_during_a_backup_exits_cleanly(file_repo_url, redis_url, tmp_path, processes, signals,
                                                expect_snapshot):
    """One SIGTERM: the running backup finishes, then exit 0. Two: it is aborted before its
    manifest, exit 0, and no partial snapshot is visible."""
    seed(redis_url, 20000)
    config = write_config(tmp_path / "statevault.toml", file_repo_url, redis_url, schedule="* * * * * */2")
    p = DaemonProcess.driver(config, tmp_path / "d.log", "--progress-delay", "0.3")
    processes.append(p)
    p.wait_for(lambda e: e["event"] == "job_started", timeout=30)
    time.sleep(0.6)
    for _ in range(signals):
        p.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
    assert p.proc.wait(30) == 0
    events = p.events()
    finished = [e for e in events if e["event"] == "job_finished"]
    assert [e["result"] for e in finished] == (["ok"] if expect_snapshot else ["aborted"])
    order = [e["event"] for e in events if e["event"] in ("job_started", "shutdown_requested", "job_finished")]
    assert order == ["job_started", "shutdown_requested", "job_finished"]   # the signal came mid-backup
    assert any(e["event"] == "daemon_stopped" and e["clean"] for e in p.events())
    repo = open_repository(file_repo_url)
    snaps = repo.list_snapshots()
    assert len(snaps) == (1 if expect_snapshot else 0)
    if expect_snapshot:
        assert snaps[0].records == 20000
    report = check_repository(repo, read_data=True)
    assert report.ok and not repo.manifest_errors


def test_cli_daemon_serves_health_reloads_on_sighup_and_stops_on_sigterm(file_repo_url, redis_url, tmp_path,
                                                                        processes):
    seed(redis_url, 4)
    config = write_config(tmp_path / "statevault.toml", file_repo_url, redis_url, schedule="*/15 * * * *")
    p = DaemonProcess.cli(config, tmp_path / "cli.log")
    processes.append(p)
    port = p.wait_for(lambda e: e["event"] == "metrics_listening")["port"]
    p.wait_for(lambda e: e["event"] == "daemon_started")
    assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code == 200
    m = scrape(port)
    assert metric(m, "statevault_schedule_expected_interval_seconds", source="hist") == 900

    good = config.read_text()
    config.write_text(good.replace('schedule = "*/15 * * * *"', 'schedule = "every day"'))
    p.proc.send_signal(signal.SIGHUP)
    failed = p.wait_for(lambda e: e["event"] == "config_reload_failed")
    assert "schedule" in failed["error"]
    config.write_text(good.replace('schedule = "*/15 * * * *"', 'schedule = "0 * * * *"'))
    p.proc.send_signal(signal.SIGHUP)
    reloaded = p.wait_for(lambda e: e["event"] == "config_reloaded")
    assert reloaded["changed"] == ["backup-hist"]
    assert metric(scrape(port), "statevault_schedule_expected_interval_seconds", source="hist") == 3600
    assert p.stop() == 0
    assert any(e["event"] == "daemon_stopped" and e["clean"] for e in p.events())


def test_cli_daemon_once_runs_what_is_due_and_exits(file_repo_url, redis_url, tmp_path):
    seed(redis_url, 6)
    config = write_config(tmp_path / "statevault.toml", file_repo_url, redis_url, schedule="* * * * * *")
    log = tmp_path / "once.log"
    with open(log, "wb") as err:
        proc = subprocess.run([sys.executable, "-m", "cli.app", "--config", str(config), "daemon", "--once"],
                              cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, timeout=60)
    assert proc.returncode == 0, log.read_text()
    events = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    assert [(e["job"], e["result"]) for e in events if e["event"] == "job_finished"] == [("backup-hist", "ok")]
    assert all("password" not in json.dumps(e) for e in events)
    assert len(open_repository(file_repo_url).list_snapshots()) == 1


def test_shutdown_aborts_check_prune_and_drill_between_steps(file_repo_url, redis_url, monkeypatch):
    """The abort event (set when shutdown_timeout_seconds runs out) stops a check before its
    next chunk read, a prune before its next deletion and a drill before its next restore step
    (its scratch database emptied): the daemon records them as aborted, not failed."""
    import restore.drill as drill_module
    from snapshots.drill_reports import list_drill_reports
    from snapshots.errors import Aborted
    from snapshots.prune import prune_repository

    from snapshots.manifest import RepoConfig, utcnow

    seed(redis_url, 3000)
    seed(redis_url, 3000, prefix="notes")
    sources = {"hist": redis_source(redis_url, NEVER, patterns=["history:*"]),
               "notes": redis_source(redis_url, NEVER, patterns=["notes:*"])}
    settings = settings_for(file_repo_url, sources)
    repo = open_repository(file_repo_url, create=True, config=RepoConfig(
        id="t", created_at=utcnow(), chunk_avg_size=16 << 10, chunk_min_size=4 << 10, chunk_max_size=64 << 10))
    for name in sources:
        assert run_backup(repo, settings, [name]).ok

    # check: the daemon's job reports the abort
    daemon = Daemon(settings, clock=Clock(T0))
    daemon.abort.set()
    outcome = daemon.run_job("check", T0)
    assert outcome.result == "aborted" and "check interrupted" in outcome.error
    with pytest.raises(Aborted):
        check_repository(repo, read_data=True, abort=daemon.abort)
    assert check_repository(repo, read_data=True).ok

    # prune: stops before its next deletion; nothing referenced is touched
    keep = repo.list_snapshots(source="hist")[0]
    repo.delete_snapshot(repo.list_snapshots(source="notes")[0].id)
    orphans = {o.key for o in repo.store.list("data")} - {f"data/{c[:2]}/{c}" for c in keep.chunk_ids()}
    assert len(orphans) >= 3
    stop, deleted, real_delete = threading.Event(), [], repo.store.delete

    def delete(key):
        real_delete(key)
        if key.startswith("data/"):  # (not the lease prune releases)
            deleted.append(key)
            if len(deleted) == 2:
                stop.set()

    monkeypatch.setattr(repo.store, "delete", delete)
    with pytest.raises(Aborted, match="after deleting 2 unreferenced"):
        prune_repository(repo, grace=timedelta(0), abort=stop)
    assert set(deleted) <= orphans and len(deleted) == 2
    assert check_repository(repo, read_data=True).ok  # every chunk of the kept snapshot is still there
    monkeypatch.undo()

    # drill: the abort comes during the first source's restore; that scratch is cleaned up, the
    # second source never starts, no report is saved
    assert run_backup(repo, settings, ["notes"]).ok
    stop = threading.Event()
    scratch_urls = []
    real_restore = drill_module.restore_snapshot

    def restore_then_stop(*args, **kwargs):
        scratch_urls.append(kwargs["to_url"])
        result = real_restore(*args, **kwargs)
        stop.set()
        return result

    monkeypatch.setattr(drill_module, "restore_snapshot", restore_then_stop)
    reports_before = len(list_drill_reports(repo))
    with pytest.raises(Aborted, match="drill interrupted"):
        drill_module.run_drill(repo, settings, ["hist", "notes"], abort=stop)
    assert len(scratch_urls) == 1
    assert redis.Redis.from_url(scratch_urls[0]).dbsize() == 0
    assert len(list_drill_reports(repo)) == reports_before
