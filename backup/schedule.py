"""Cron schedules for the daemon: one computation shared by APScheduler and the test clock.

A *tick* is the instant a cron expression fires (in the daemon's timezone). Ticks name job
runs across daemons: every daemon computes the same tick for the same expression, and the
tick is what `claim_once` claims in the repository, so which daemon fires first (or whose clock
runs a second fast) does not matter.

Why croniter and not APScheduler's `CronTrigger.from_crontab`: APScheduler 3 numbers weekdays
from Monday = 0 (its issue 286, fixed only in 4.x), cron and our config from Sunday = 0, so
`0 5 * * 0` would run on Mondays. `CroniterTrigger` plugs croniter into APScheduler, and the
controllable-clock path (`due_run`) uses the very same `CronSchedule`, so both paths agree on
every tick. A sixth field is croniter's seconds (`* * * * * */2`: every 2 s), used by tests.

The semantics of `due_run` are APScheduler 3's with `coalesce=True`: of all ticks between the
job's next run time and now only the latest runs, and it runs only if it is at most
`misfire_grace_time` old; otherwise it is *missed*. `initial_next_run` adds what a memory job
store lacks: after downtime the latest tick within the grace runs once on start (the claim in
the repository turns it into a no-op if it had run).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo
from traceback import format_exc
from typing import Callable
from zoneinfo import ZoneInfo

from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_EXECUTED, JobExecutionEvent
from apscheduler.executors.base import BaseExecutor
from apscheduler.triggers.base import BaseTrigger
from croniter import croniter

# enough consecutive fires to see a schedule's longest regular gap (weekends, month ends, DST)
_INTERVAL_SAMPLE = 64


class CronSchedule:
    """A cron expression in a timezone. All returned datetimes are aware, in that timezone."""

    def __init__(self, expr: str, tz: str | tzinfo = "UTC"):
        if not croniter.is_valid(expr):
            raise ValueError(f"not a valid cron expression: {expr!r}")
        self.expr = expr
        self.tz = ZoneInfo(tz) if isinstance(tz, str) else tz

    def __repr__(self) -> str:
        return f"CronSchedule({self.expr!r}, {self.tz})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CronSchedule) and (self.expr, str(self.tz)) == (other.expr, str(other.tz))

    def __hash__(self) -> int:
        return hash((self.expr, str(self.tz)))

    def _local(self, t: datetime) -> datetime:
        if t.tzinfo is None:
            raise ValueError("naive datetime: pass an aware one")
        return t.astimezone(self.tz)

    def next_after(self, t: datetime) -> datetime:
        """The first tick strictly after `t`."""
        return croniter(self.expr, self._local(t)).get_next(datetime)

    def latest_at_or_before(self, t: datetime) -> datetime:
        """The last tick at or before `t` (croniter's get_prev is strictly before)."""
        t = self._local(t)
        prev = croniter(self.expr, t).get_prev(datetime)
        following = croniter(self.expr, prev).get_next(datetime)
        return following if following <= t else prev

    def first_at_or_after(self, t: datetime) -> datetime:
        latest = self.latest_at_or_before(t)
        return latest if latest == self._local(t) else self.next_after(t)

    def expected_interval(self, reference: datetime | None = None) -> float:
        """Seconds between two consecutive ticks; for irregular schedules the longest gap seen
        over the next few dozen ticks (a staleness alert must not fire every weekend)."""
        from datetime import timezone

        t = self._local(reference or datetime(2025, 1, 1, tzinfo=timezone.utc))
        it = croniter(self.expr, t)
        prev = it.get_next(datetime)
        longest = 0.0
        for _ in range(_INTERVAL_SAMPLE):
            nxt = it.get_next(datetime)
            longest = max(longest, (nxt - prev).total_seconds())
            prev = nxt
        return longest


def is_misfire(tick: datetime, now: datetime, grace_seconds: float) -> bool:
    """APScheduler's rule (executors/base.py run_job): late by more than the grace -> missed."""
    return (now - tick) > timedelta(seconds=grace_seconds)


@dataclass(frozen=True)
class Due:
    tick: datetime | None     # the coalesced run time, None when nothing is due
    missed: bool              # the tick is older than the misfire grace: it does not run
    next_run: datetime        # the job's next run time after this evaluation


def due_run(schedule: CronSchedule, next_run: datetime, now: datetime, grace_seconds: float) -> Due:
    """What APScheduler 3 does at `now` for a job with `coalesce=True` (schedulers/base.py
    `_process_jobs`): every tick in [next_run, now] is pending, only the latest is kept, the
    next run time moves past it, and the run is missed if the tick is beyond the grace."""
    if next_run > now:
        return Due(None, False, next_run)
    tick = schedule.latest_at_or_before(now)  # == the last of APScheduler's run_times, without the loop
    return Due(tick, is_misfire(tick, now, grace_seconds), schedule.next_after(tick))


def initial_next_run(schedule: CronSchedule, now: datetime, grace_seconds: float) -> datetime:
    """Where a job starts: the latest tick if it is within the grace (catch up once after
    downtime), else the first tick from now on."""
    latest = schedule.latest_at_or_before(now)
    if not is_misfire(latest, now, grace_seconds):
        return latest
    return schedule.first_at_or_after(now)


class CroniterTrigger(BaseTrigger):
    """An APScheduler 3 trigger firing on a `CronSchedule`'s ticks (cron weekday numbering)."""

    __slots__ = ("schedule",)

    def __init__(self, schedule: CronSchedule):
        self.schedule = schedule

    def get_next_fire_time(self, previous_fire_time, now):
        if previous_fire_time is None:
            return self.schedule.first_at_or_after(now)
        return self.schedule.next_after(previous_fire_time)

    def __str__(self) -> str:
        return f"cron[{self.schedule.expr}]"

    def __repr__(self) -> str:
        return f"<CroniterTrigger {self.schedule.expr!r} {self.schedule.tz}>"


class TickExecutor(BaseExecutor):
    """An APScheduler executor calling `job.func(*job.args, tick)` in a daemon thread per run.

    The tick is APScheduler's scheduled run time (the last of `run_times`: coalescing), checked
    against the misfire grace as APScheduler's own `run_job` does; a late one goes to
    `on_missed(job_id, tick)` instead. Daemon threads: a job stuck in a network call cannot keep
    the process alive after shutdown gave up on it.
    """

    def __init__(self, clock: Callable[[], datetime], on_missed: Callable[[str, datetime], object]):
        super().__init__()
        self._clock, self._on_missed = clock, on_missed

    def _do_submit_job(self, job, run_times):
        threading.Thread(target=self._run, args=(job, run_times), name=f"job-{job.id}", daemon=True).start()

    def _run(self, job, run_times) -> None:
        events = []
        for run_time in run_times:
            try:
                if job.misfire_grace_time is not None and is_misfire(run_time, self._clock(), job.misfire_grace_time):
                    self._on_missed(job.id, run_time)
                    continue
                job.func(*job.args, run_time)
                events.append(JobExecutionEvent(EVENT_JOB_EXECUTED, job.id, job._jobstore_alias, run_time))
            except BaseException as exc:  # noqa: BLE001 - reported as APScheduler's error event
                events.append(JobExecutionEvent(EVENT_JOB_ERROR, job.id, job._jobstore_alias, run_time,
                                                exception=exc, traceback=format_exc()))
        self._run_job_success(job.id, events)
