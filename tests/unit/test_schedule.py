"""Cron ticks, coalescing and misfire rules of the daemon (backup/schedule.py): pure logic."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from apscheduler.triggers.cron import CronTrigger

from backup.schedule import CronSchedule, CroniterTrigger, due_run, initial_next_run, is_misfire

UTC = timezone.utc


def t(h, m, s=0, us=0, day=1):
    return datetime(2026, 6, day, h, m, s, us, tzinfo=UTC)


def test_ticks_at_or_before_and_after():
    s = CronSchedule("*/15 * * * *")
    assert s.latest_at_or_before(t(12, 15)) == t(12, 15)          # on the tick: that tick
    assert s.latest_at_or_before(t(12, 14, 59, 999999)) == t(12, 0)
    assert s.next_after(t(12, 15)) == t(12, 30)                    # strictly after
    assert s.next_after(t(12, 14, 59, 500000)) == t(12, 15)
    assert s.first_at_or_after(t(12, 15)) == t(12, 15)
    assert s.first_at_or_after(t(12, 15, 0, 1)) == t(12, 30)


@pytest.mark.parametrize("expr,seconds", [
    ("*/15 * * * *", 900), ("0 * * * *", 3600), ("30 3 * * *", 86400), ("0 5 * * 0", 7 * 86400),
    ("0 9 * * 1-5", 3 * 86400),   # Friday -> Monday: the longest gap, so a stale alert ignores weekends
    ("* * * * * */2", 2),          # croniter's seconds field (tests)
])
def test_expected_interval(expr, seconds):
    assert CronSchedule(expr).expected_interval() == seconds


def test_weekday_numbering_is_crons_not_apschedulers():
    """`0 5 * * 0` is Sunday in cron; APScheduler 3's from_crontab would say Monday."""
    monday = datetime(2026, 6, 1, tzinfo=UTC)
    assert monday.strftime("%A") == "Monday"
    ours = CroniterTrigger(CronSchedule("0 5 * * 0")).get_next_fire_time(None, monday)
    assert ours.strftime("%A") == "Sunday" and ours.hour == 5
    theirs = CronTrigger.from_crontab("0 5 * * 0", timezone=UTC).get_next_fire_time(None, monday)
    assert theirs.strftime("%A") == "Monday"  # the bug our trigger avoids


def test_trigger_matches_apscheduler_cron_for_other_fields():
    s = CronSchedule("7,37 */2 * * *")
    ours, theirs = CroniterTrigger(s), CronTrigger.from_crontab("7,37 */2 * * *", timezone=UTC)
    a = b = None
    for _ in range(20):
        now = a or t(0, 0)  # APScheduler asks again once the previous fire time has come
        a, b = ours.get_next_fire_time(a, now), theirs.get_next_fire_time(b, now)
        assert a == b


def test_timezone_and_dst():
    berlin = CronSchedule("30 2 * * *", "Europe/Berlin")
    # 2026-03-29: 02:00 -> 03:00 in Berlin, so 02:30 does not exist that day: it fires at the jump
    ticks = []
    at = datetime(2026, 3, 27, tzinfo=UTC)
    for _ in range(4):
        at = berlin.next_after(at)
        ticks.append(at)
    assert [(x.day, x.hour, x.minute) for x in ticks] == [(27, 2, 30), (28, 2, 30), (29, 3, 0), (30, 2, 30)]
    assert ticks[0].utcoffset() == timedelta(hours=1) and ticks[3].utcoffset() == timedelta(hours=2)
    assert ticks[0].tzinfo == ZoneInfo("Europe/Berlin")
    assert ticks[0].astimezone(UTC).hour == 1 and ticks[3].astimezone(UTC).hour == 0


def test_due_run_on_time_and_not_early():
    s = CronSchedule("*/15 * * * *")
    d = due_run(s, t(12, 15), t(12, 14, 59), 60)
    assert d.tick is None and d.next_run == t(12, 15)
    d = due_run(s, t(12, 15), t(12, 15), 60)
    assert d.tick == t(12, 15) and not d.missed and d.next_run == t(12, 30)


def test_due_run_coalesces_missed_ticks_into_one():
    s = CronSchedule("*/15 * * * *")
    # down from 12:15 to 13:20: five ticks (12:15 .. 13:15) became due; one run, for the latest
    d = due_run(s, t(12, 15), t(13, 20), 3600)
    assert d.tick == t(13, 15) and not d.missed and d.next_run == t(13, 30)


def test_due_run_beyond_grace_is_missed():
    s = CronSchedule("*/15 * * * *")
    d = due_run(s, t(12, 15), t(13, 20), 60)  # latest tick 13:15 is 5 min old, grace 1 min
    assert d.tick == t(13, 15) and d.missed and d.next_run == t(13, 30)
    assert is_misfire(t(13, 15), t(13, 16), 60) is False
    assert is_misfire(t(13, 15), t(13, 16, 0, 1), 60) is True


def test_initial_next_run_catches_up_within_grace_only():
    s = CronSchedule("*/15 * * * *")
    assert initial_next_run(s, t(13, 20), 3600) == t(13, 15)   # catch up the latest tick once
    assert initial_next_run(s, t(13, 20), 60) == t(13, 30)     # too late: wait for the next
    assert initial_next_run(s, t(13, 15), 0) == t(13, 15)      # exactly on a tick


def test_naive_datetimes_are_refused():
    with pytest.raises(ValueError):
        CronSchedule("* * * * *").next_after(datetime(2026, 1, 1))
    with pytest.raises(ValueError):
        CronSchedule("not cron")


# ---- the daemon's JSON log lines (backup/logging_json.py) -------------------------------------

def test_json_log_lines_carry_fields_and_never_secrets():
    import io
    import json
    import logging

    from backup.logging_json import JsonFormatter, redact_text

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("statevault.test.jsonlog")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.error("job_finished", extra={
            "job": "backup-memory", "source": "memory", "run_id": "abc123", "duration": 1.23456, "result": "failed",
            "error": "cannot reach postgresql://agent:hunter2@db:5432/mem?sslmode=require&password=p4ss"})
    finally:
        logger.removeHandler(handler)
    line = stream.getvalue()
    assert line.count("\n") == 1
    event = json.loads(line)
    assert event["event"] == "job_finished" and event["level"] == "error" and event["ts"].endswith("Z")
    assert (event["job"], event["source"], event["run_id"], event["duration"]) == ("backup-memory", "memory", "abc123",
                                                                                   1.235)
    assert "hunter2" not in line and "p4ss" not in line
    assert "postgresql://agent:***@db:5432/mem?sslmode=require&password=***" in event["error"]
    assert redact_text("redis://:s3cret@h:6379/0 and s3://bucket/prefix") == "redis://:***@h:6379/0 and s3://bucket/prefix"
