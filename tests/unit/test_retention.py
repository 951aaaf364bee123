"""Retention: restic `forget` semantics (golden cases ported from restic) and statevault's guarantees."""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest
from typer.testing import CliRunner

from backup.retention import (SnapshotRef, apply_retention, format_duration, is_empty_policy,
                              parse_duration)
from cli.retention_cmd import app
from snapshots.errors import UsageError
from snapshots.settings import RetentionPolicy

UTC = timezone.utc


def t(s: str) -> datetime:
    """'2016-01-18 12:02:03' or any ISO-8601 string; naive means UTC."""
    d = datetime.fromisoformat(s.replace(" ", "T"))
    return d if d.tzinfo else d.replace(tzinfo=UTC)


def snaps(*times: str, **kw) -> list[SnapshotRef]:
    return [SnapshotRef(id=f"s{i}", time=t(x), **kw) for i, x in enumerate(times)]


def run(snapshots, **policy):
    return apply_retention(snapshots, RetentionPolicy(**policy))


def kept(result) -> list[tuple[datetime, list[str]]]:
    return [(k.snapshot.time, k.reasons) for k in result.keep]


def kept_times(result) -> list[datetime]:
    return [k.snapshot.time for k in result.keep]


# --- restic's own fixture: internal/data/snapshot_policy_test.go, TestApplyPolicy -------------
# Same times, same order (order matters for equal times), same tags.
_RESTIC = """
2014-09-01 10:20:30|2014-09-02 10:20:30|2014-09-05 10:20:30|2014-09-06 10:20:30|2014-09-08 10:20:30
2014-09-09 10:20:30|2014-09-10 10:20:30|2014-09-11 10:20:30|2014-09-20 10:20:30|2014-09-22 10:20:30
2014-08-08 10:20:30|2014-08-10 10:20:30|2014-08-12 10:20:30|2014-08-13 10:20:30|2014-08-13 10:20:30.1
2014-08-15 10:20:30|2014-08-18 10:20:30|2014-08-20 10:20:30|2014-08-21 10:20:30|2014-08-22 10:20:30
2014-10-01 10:20:30 foo|2014-10-02 10:20:30 foo|2014-10-05 10:20:30 foo|2014-10-06 10:20:30 foo
2014-10-08 10:20:30 foo|2014-10-09 10:20:30 foo|2014-10-10 10:20:30 foo|2014-10-11 10:20:30 foo
2014-10-20 10:20:30 foo|2014-10-22 10:20:30 foo|2014-11-08 10:20:30 foo|2014-11-10 10:20:30 foo
2014-11-12 10:20:30 foo|2014-11-13 10:20:30 foo|2014-11-13 10:20:30.1 bar|2014-11-15 10:20:30 foo,bar
2014-11-18 10:20:30|2014-11-20 10:20:30|2014-11-21 10:20:30|2014-11-22 10:20:30
2015-09-01 10:20:30|2015-09-02 10:20:30|2015-09-05 10:20:30|2015-09-06 10:20:30|2015-09-08 10:20:30
2015-09-09 10:20:30|2015-09-10 10:20:30|2015-09-11 10:20:30|2015-09-20 10:20:30|2015-09-22 10:20:30
2015-08-08 10:20:30|2015-08-10 10:20:30|2015-08-12 10:20:30|2015-08-13 10:20:30|2015-08-13 10:20:30.1
2015-08-15 10:20:30|2015-08-18 10:20:30|2015-08-20 10:20:30|2015-08-21 10:20:30|2015-08-22 10:20:30
2015-10-01 10:20:30|2015-10-02 10:20:30|2015-10-05 10:20:30|2015-10-06 10:20:30|2015-10-08 10:20:30
2015-10-09 10:20:30|2015-10-10 10:20:30|2015-10-11 10:20:30|2015-10-20 10:20:30|2015-10-22 10:20:30
2015-10-22 10:20:30|2015-10-22 10:20:30 foo,bar|2015-10-22 10:20:30 foo,bar|2015-10-22 10:20:30 foo,bar
2015-11-08 10:20:30|2015-11-10 10:20:30|2015-11-12 10:20:30|2015-11-13 10:20:30|2015-11-13 10:20:30.1
2015-11-15 10:20:30|2015-11-18 10:20:30|2015-11-20 10:20:30|2015-11-21 10:20:30|2015-11-22 10:20:30
2016-01-01 01:02:03|2016-01-01 01:03:03|2016-01-01 07:08:03|2016-01-03 07:02:03|2016-01-04 10:23:03
2016-01-04 11:23:03|2016-01-04 12:23:03|2016-01-04 12:24:03|2016-01-04 12:28:03|2016-01-04 12:30:03
2016-01-04 16:23:03|2016-01-05 09:02:03|2016-01-06 08:02:03|2016-01-07 10:02:03|2016-01-08 20:02:03
2016-01-09 21:02:03|2016-01-12 21:02:03|2016-01-12 21:08:03|2016-01-18 12:02:03
"""


def restic_fixture() -> list[SnapshotRef]:
    out = []
    for i, entry in enumerate(_RESTIC.replace("\n", "|").strip("|").split("|")):
        day, clock, *tags = entry.split(" ")
        out.append(SnapshotRef(id=f"r{i}", time=t(f"{day} {clock}"),
                               tags=tuple(tags[0].split(",")) if tags else ()))
    return out


def test_restic_fixture_is_complete():
    assert len(restic_fixture()) == 103


def _expect(spec: str) -> list[tuple[datetime, list[str]]]:
    """'time = reason; reason' per line, as restic's golden files list them (newest first)."""
    out = []
    for line in spec.strip().splitlines():
        when, reasons = line.split("=")
        out.append((t(when.strip()), [r.strip() for r in reasons.split(";")]))
    return out


_DAILY30 = ["2016-01-18 12:02:03", "2016-01-12 21:08:03", "2016-01-09 21:02:03", "2016-01-08 20:02:03",
            "2016-01-07 10:02:03", "2016-01-06 08:02:03", "2016-01-05 09:02:03", "2016-01-04 16:23:03",
            "2016-01-03 07:02:03", "2016-01-01 07:08:03", "2015-11-22 10:20:30", "2015-11-21 10:20:30",
            "2015-11-20 10:20:30", "2015-11-18 10:20:30", "2015-11-15 10:20:30", "2015-11-13 10:20:30.1",
            "2015-11-12 10:20:30", "2015-11-10 10:20:30", "2015-11-08 10:20:30", "2015-10-22 10:20:30",
            "2015-10-20 10:20:30", "2015-10-11 10:20:30", "2015-10-10 10:20:30", "2015-10-09 10:20:30",
            "2015-10-08 10:20:30", "2015-10-06 10:20:30", "2015-10-05 10:20:30", "2015-10-02 10:20:30",
            "2015-10-01 10:20:30", "2015-09-22 10:20:30"]

# (restic golden file number, policy, expected keeps). Each expectation was read from
# restic/restic internal/data/testdata/policy_keep_snapshots_N (N=35: internal/restic/testdata).
RESTIC_GOLDEN = [
    (8, dict(keep_daily=30), [(t(x), ["daily snapshot"]) for x in _DAILY30]),
    (15, dict(keep_daily=2, keep_weekly=2, keep_monthly=6), _expect("""
        2016-01-18 12:02:03 = daily snapshot; weekly snapshot; monthly snapshot
        2016-01-12 21:08:03 = daily snapshot; weekly snapshot
        2015-11-22 10:20:30 = monthly snapshot
        2015-10-22 10:20:30 = monthly snapshot
        2015-09-22 10:20:30 = monthly snapshot
        2015-08-22 10:20:30 = monthly snapshot
        2014-11-22 10:20:30 = monthly snapshot""")),
    (16, dict(keep_yearly=10), _expect("""
        2016-01-18 12:02:03 = yearly snapshot
        2015-11-22 10:20:30 = yearly snapshot
        2014-11-22 10:20:30 = yearly snapshot
        2014-08-08 10:20:30 = oldest yearly snapshot""")),
    (27, dict(keep_within="13d23h"), _expect("""
        2016-01-18 12:02:03 = within 13d23h
        2016-01-12 21:08:03 = within 13d23h
        2016-01-12 21:02:03 = within 13d23h
        2016-01-09 21:02:03 = within 13d23h
        2016-01-08 20:02:03 = within 13d23h
        2016-01-07 10:02:03 = within 13d23h
        2016-01-06 08:02:03 = within 13d23h
        2016-01-05 09:02:03 = within 13d23h
        2016-01-04 16:23:03 = within 13d23h""")),
    (32, dict(keep_within_weekly="1y2m3d3h"), [(t(x), ["weekly within 1y2m3d3h"]) for x in (
        "2016-01-18 12:02:03", "2016-01-12 21:08:03", "2016-01-09 21:02:03", "2016-01-03 07:02:03",
        "2015-11-22 10:20:30", "2015-11-15 10:20:30", "2015-11-08 10:20:30", "2015-10-22 10:20:30",
        "2015-10-11 10:20:30", "2015-10-02 10:20:30", "2015-09-22 10:20:30", "2015-09-20 10:20:30",
        "2015-09-11 10:20:30", "2015-09-06 10:20:30", "2015-08-22 10:20:30", "2015-08-15 10:20:30",
        "2015-08-08 10:20:30", "2014-11-22 10:20:30", "2014-11-15 10:20:30")]),
    (33, dict(keep_within_monthly="1y2m3d3h"), [(t(x), ["monthly within 1y2m3d3h"]) for x in (
        "2016-01-18 12:02:03", "2015-11-22 10:20:30", "2015-10-22 10:20:30", "2015-09-22 10:20:30",
        "2015-08-22 10:20:30", "2014-11-22 10:20:30")]),
    (35, dict(keep_within="1h", keep_within_hourly="1d", keep_within_daily="7d", keep_within_weekly="1m",
              keep_within_monthly="1y", keep_within_yearly="9999y"), _expect("""
        2016-01-18 12:02:03 = within 1h; hourly within 1d; daily within 7d; weekly within 1m; \
                              monthly within 1y; yearly within 9999y
        2016-01-12 21:08:03 = daily within 7d; weekly within 1m
        2016-01-09 21:02:03 = weekly within 1m
        2016-01-03 07:02:03 = weekly within 1m
        2015-11-22 10:20:30 = monthly within 1y; yearly within 9999y
        2015-10-22 10:20:30 = monthly within 1y
        2015-09-22 10:20:30 = monthly within 1y
        2015-08-22 10:20:30 = monthly within 1y
        2014-11-22 10:20:30 = yearly within 9999y
        2014-08-08 10:20:30 = oldest yearly within 9999y""")),
    (39, dict(keep_daily=3, keep_weekly=2, keep_monthly=-1, keep_yearly=-1), _expect("""
        2016-01-18 12:02:03 = daily snapshot; weekly snapshot; monthly snapshot; yearly snapshot
        2016-01-12 21:08:03 = daily snapshot; weekly snapshot
        2016-01-09 21:02:03 = daily snapshot
        2015-11-22 10:20:30 = monthly snapshot; yearly snapshot
        2015-10-22 10:20:30 = monthly snapshot
        2015-09-22 10:20:30 = monthly snapshot
        2015-08-22 10:20:30 = monthly snapshot
        2014-11-22 10:20:30 = monthly snapshot; yearly snapshot
        2014-10-22 10:20:30 = monthly snapshot
        2014-09-22 10:20:30 = monthly snapshot
        2014-08-22 10:20:30 = monthly snapshot
        2014-08-08 10:20:30 = oldest monthly snapshot; oldest yearly snapshot""")),
]


@pytest.mark.parametrize("number,policy,expected", RESTIC_GOLDEN, ids=[f"restic-{n}" for n, _, _ in RESTIC_GOLDEN])
def test_restic_golden_cases(number, policy, expected):
    result = run(restic_fixture(), **policy)
    assert kept(result) == expected
    assert len(result.keep) + len(result.remove) == 103


def test_restic_golden_19_tags_plus_newest_guarantee():
    # restic keeps the four snapshots tagged foo AND bar and removes the newest; statevault
    # keeps the newest too, so the source is never emptied of its latest state
    result = run(restic_fixture(), keep_tag=["foo,bar"])
    got = [(k.snapshot.time, k.snapshot.tags, k.reasons) for k in result.keep]
    assert got == [(t("2016-01-18 12:02:03"), (), ["newest snapshot"])] + [
        (t(x), ("foo", "bar"), ["has tags [foo, bar]"])
        for x in ("2015-10-22 10:20:30",) * 3 + ("2014-11-15 10:20:30",)]


def test_equal_times_keep_input_order_like_sort_stable():
    # five snapshots share 2015-10-22 10:20:30; restic's golden #39 keeps the first of them
    # (the untagged one), which only a stable sort gives
    result = run(restic_fixture(), keep_monthly=-1)
    oct22 = [k.snapshot for k in result.keep if k.snapshot.time == t("2015-10-22 10:20:30")]
    assert [s.id for s in oct22] == ["r69"] and oct22[0].tags == ()


# --- durations -------------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("1y2m3d4h", (1, 2, 3, 4)), ("5d", (0, 0, 5, 0)), ("2m2h", (0, 2, 0, 2)), ("9999y", (9999, 0, 0, 0)),
    ("0d", (0, 0, 0, 0)), ("48h", (0, 0, 0, 48)),
])
def test_parse_duration(text, expected):
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "1x", "d", "1d1y", "-1d", "1.5d", "1 d", "1dd"])
def test_parse_duration_rejects(text):
    with pytest.raises(UsageError):
        parse_duration(text)


def test_format_duration_drops_zero_parts_like_restic():
    assert format_duration((1, 0, 3, 0)) == "1y3d"
    assert format_duration((0, 2, 0, 2)) == "2m2h"


# --- count rules -----------------------------------------------------------------------------

def test_keep_last():
    s = snaps("2026-01-05 10:00", "2026-01-04 10:00", "2026-01-03 10:00", "2026-01-02 10:00", "2026-01-01 10:00")
    result = run(s, keep_last=3)
    assert kept(result) == [(x.time, ["last snapshot"]) for x in s[:3]]
    assert result.remove == s[3:]


def test_hourly_keeps_newest_per_hour():
    s = snaps("2026-03-01 11:10", "2026-03-01 10:50", "2026-03-01 10:05", "2026-03-01 09:59")
    result = run(s, keep_hourly=2)
    assert kept_times(result) == [t("2026-03-01 11:10"), t("2026-03-01 10:50")]


def test_daily_with_gaps_reaches_further_back():
    # keep-daily counts days that HAVE a snapshot: missing days do not use up the count
    days = ["2026-02-20", "2026-02-19", "2026-02-15", "2026-02-14", "2026-02-10", "2026-02-09",
            "2026-02-05", "2026-02-01", "2026-01-20"]
    s = snaps(*(f"{d} 03:00" for d in days))
    result = run(s, keep_daily=7)
    assert kept_times(result) == [t(f"{d} 03:00") for d in days[:7]]
    assert [x.time for x in result.remove] == [t("2026-02-01 03:00"), t("2026-01-20 03:00")]


def test_weekly_uses_iso_weeks_across_new_year():
    # 2021-01-03 (Sunday) and 2020-12-31 are both ISO week 2020-W53; 2021-01-04 opens 2021-W01
    s = snaps("2021-01-04 08:00", "2021-01-03 08:00", "2020-12-31 08:00", "2020-12-20 08:00", "2020-12-01 08:00")
    result = run(s, keep_weekly=3)
    assert kept(result) == [(t("2021-01-04 08:00"), ["weekly snapshot"]), (t("2021-01-03 08:00"), ["weekly snapshot"]),
                            (t("2020-12-20 08:00"), ["weekly snapshot"])]


def test_weekly_week_one_starts_in_previous_december():
    # 2026-01-01 is in 2026-W01 together with Monday 2025-12-29; Sunday 2025-12-28 is 2025-W52
    s = snaps("2026-01-01 08:00", "2025-12-29 08:00", "2025-12-28 08:00", "2025-12-20 08:00", "2025-12-01 08:00")
    result = run(s, keep_weekly=3)
    assert kept_times(result) == [t("2026-01-01 08:00"), t("2025-12-28 08:00"), t("2025-12-20 08:00")]


def test_yearly_uses_calendar_year_not_iso_year():
    # 2021-01-03 is ISO year 2020 but calendar year 2021
    s = snaps("2021-06-01 00:00", "2021-01-03 00:00", "2020-12-31 00:00", "2019-05-05 00:00")
    result = run(s, keep_yearly=2)
    assert kept_times(result) == [t("2021-06-01 00:00"), t("2020-12-31 00:00")]


def test_monthly():
    s = snaps("2026-03-02 00:00", "2026-03-01 00:00", "2026-02-28 23:59", "2026-02-01 00:00", "2026-01-31 00:00")
    result = run(s, keep_monthly=2)
    assert kept(result) == [(t("2026-03-02 00:00"), ["monthly snapshot"]),
                            (t("2026-02-28 23:59"), ["monthly snapshot"])]


def test_unlimited_count_keeps_every_bucket():
    s = snaps(*(f"2026-01-{d:02d} {h:02d}:00" for d in range(10, 0, -1) for h in (20, 8)))
    result = run(s, keep_daily=-1)
    assert kept_times(result) == [t(f"2026-01-{d:02d} 20:00") for d in range(10, 0, -1)] + [t("2026-01-01 08:00")]
    assert [x.time.hour for x in result.remove] == [8] * 9
    assert kept(result)[-1][1] == ["oldest daily snapshot"]  # -1 never runs out, so the oldest stays


def test_overlapping_rules_list_every_reason_in_restic_order():
    s = snaps("2026-05-10 12:00", "2026-05-10 06:00", "2026-05-09 13:00", "2026-04-30 12:00", tags=("pinned",))
    result = run(s, keep_last=1, keep_daily=2, keep_monthly=2, keep_within="1h", keep_within_daily="1d",
                 keep_tag=["pinned"])
    assert kept(result)[0] == (t("2026-05-10 12:00"), [
        "has tags [pinned]", "within 1h", "last snapshot", "daily snapshot", "monthly snapshot", "daily within 1d"])
    assert kept(result)[2] == (t("2026-05-09 13:00"), ["has tags [pinned]", "daily snapshot", "daily within 1d"])
    assert kept(result)[3] == (t("2026-04-30 12:00"), ["has tags [pinned]", "monthly snapshot"])


# --- the oldest-snapshot rule ----------------------------------------------------------------

def test_oldest_snapshot_kept_while_counts_are_left():
    s = snaps("2026-01-02 10:00", "2026-01-01 20:00", "2026-01-01 08:00")
    result = run(s, keep_daily=5)
    assert kept(result) == [(t("2026-01-02 10:00"), ["daily snapshot"]), (t("2026-01-01 20:00"), ["daily snapshot"]),
                            (t("2026-01-01 08:00"), ["oldest daily snapshot"])]


def test_oldest_snapshot_removed_once_counts_are_used_up():
    s = snaps("2026-01-02 10:00", "2026-01-01 20:00", "2026-01-01 08:00")
    result = run(s, keep_daily=2)
    assert [x.time for x in result.remove] == [t("2026-01-01 08:00")]


def test_oldest_in_a_new_bucket_is_a_plain_keep():
    s = snaps("2026-01-02 10:00", "2026-01-01 08:00")
    assert kept(run(s, keep_daily=5))[-1] == (t("2026-01-01 08:00"), ["daily snapshot"])


# --- keep-within -----------------------------------------------------------------------------

def test_keep_within_is_anchored_on_newest_snapshot_not_now():
    # backups stopped in 2019: a clock-based window would remove everything, restic's keeps 2 days
    s = snaps("2019-06-10 12:00", "2019-06-09 13:00", "2019-06-08 12:00", "2019-06-01 12:00")
    result = run(s, keep_within="2d")
    assert kept(result) == [(t("2019-06-10 12:00"), ["within 2d"]), (t("2019-06-09 13:00"), ["within 2d"])]
    assert t("2019-06-08 12:00") in [x.time for x in result.remove]  # exactly at the cutoff: not "after"


def test_keep_within_months_normalise_like_go_adddate():
    # 31 March minus 1 month is Go's "31 February" = 2 March 2016 (leap year), not 29 February
    s = snaps("2016-03-31 12:00", "2016-03-02 12:00:01", "2016-03-02 12:00", "2016-03-01 13:00")
    assert kept_times(run(s, keep_within="1m")) == [t("2016-03-31 12:00"), t("2016-03-02 12:00:01")]


def test_keep_within_years_and_hours():
    # 2016-02-29 minus 1y is 2015-02-29 = 2015-03-01; then minus 2h is 2015-02-28 22:00
    s = snaps("2016-02-29 00:00", "2015-02-28 22:00:01", "2015-02-28 22:00")
    assert kept_times(run(s, keep_within="1y2h")) == [t("2016-02-29 00:00"), t("2015-02-28 22:00:01")]


def test_keep_within_ignores_future_snapshots_when_now_is_given():
    s = snaps("2099-01-01 00:00", "2026-01-10 00:00", "2026-01-09 12:00", "2026-01-01 00:00")
    policy = RetentionPolicy(keep_within="1d")
    with_now = apply_retention(s, policy, now=t("2026-01-10 06:00"))
    assert kept_times(with_now) == [t("2099-01-01 00:00"), t("2026-01-10 00:00"), t("2026-01-09 12:00")]
    assert kept_times(apply_retention(s, policy)) == [t("2099-01-01 00:00")]


def test_keep_within_daily_keeps_newest_per_day_inside_window():
    s = snaps("2026-04-10 18:00", "2026-04-10 06:00", "2026-04-09 18:00", "2026-04-08 18:00", "2026-04-07 12:00",
              "2026-04-01 00:00")
    result = run(s, keep_within_daily="3d")
    assert kept(result) == [(t(x), ["daily within 3d"]) for x in ("2026-04-10 18:00", "2026-04-09 18:00",
                                                                   "2026-04-08 18:00")]


def test_keep_within_hourly_and_oldest_within():
    s = snaps("2026-04-10 18:30", "2026-04-10 18:10", "2026-04-10 17:45", "2026-04-10 17:05")
    assert kept(run(s, keep_within_hourly="1d")) == [
        (t("2026-04-10 18:30"), ["hourly within 1d"]), (t("2026-04-10 17:45"), ["hourly within 1d"]),
        (t("2026-04-10 17:05"), ["oldest hourly within 1d"])]


# --- keep-tag --------------------------------------------------------------------------------

def test_keep_tag_entry_needs_all_its_tags():
    s = [SnapshotRef("a", t("2026-01-04 00:00")), SnapshotRef("b", t("2026-01-03 00:00"), ("x", "y")),
         SnapshotRef("c", t("2026-01-02 00:00"), ("x",)), SnapshotRef("d", t("2026-01-01 00:00"), ("y", "z"))]
    result = run(s, keep_tag=["x, y"])  # restic strips the blanks around each tag
    assert [(k.snapshot.id, k.reasons) for k in result.keep] == [("a", ["newest snapshot"]), ("b", ["has tags [x, y]"])]
    either = run(s, keep_tag=["x", "y"])
    assert [(k.snapshot.id, k.reasons) for k in either.keep] == [
        ("a", ["newest snapshot"]), ("b", ["has tags [x]", "has tags [y]"]), ("c", ["has tags [x]"]),
        ("d", ["has tags [y]"])]


def test_keep_tag_empty_matches_untagged():
    s = [SnapshotRef("a", t("2026-01-04 00:00"), ("x",)), SnapshotRef("b", t("2026-01-03 00:00"))]
    assert [(k.snapshot.id, k.reasons) for k in run(s, keep_tag=[""]).keep] == [
        ("a", ["newest snapshot"]), ("b", ["has tags []"])]


# --- empty policy and statevault guarantees --------------------------------------------------

@pytest.mark.parametrize("policy", [{}, {"keep_last": 0}, {"keep_within": "0d", "keep_daily": 0}])
def test_empty_policy_keeps_everything(policy):
    s = snaps("2026-01-03 00:00", "2026-01-02 00:00", "2026-01-01 00:00")
    assert is_empty_policy(RetentionPolicy(**policy))
    result = run(s, **policy)
    assert kept(result) == [(x.time, ["no policy"]) for x in s] and result.remove == []


def test_empty_input():
    result = run([], keep_last=3)
    assert result.keep == [] and result.remove == []


def test_never_removes_newest_snapshot():
    s = snaps("2026-01-03 00:00", "2026-01-02 00:00")
    result = run(s, keep_tag=["nothing-has-this"])
    assert kept(result) == [(t("2026-01-03 00:00"), ["newest snapshot"])]


def test_never_removes_newest_verified_snapshot():
    s = [SnapshotRef("new", t("2026-01-04 00:00")), SnapshotRef("mid", t("2026-01-03 00:00")),
         SnapshotRef("ok", t("2026-01-02 00:00"), verified=True),
         SnapshotRef("old-ok", t("2026-01-01 00:00"), verified=True)]
    result = run(s, keep_last=1)
    assert [(k.snapshot.id, k.reasons) for k in result.keep] == [
        ("new", ["last snapshot"]), ("ok", ["newest verified snapshot"])]
    assert [x.id for x in result.remove] == ["mid", "old-ok"]


def test_verified_snapshot_kept_by_policy_gets_no_extra_reason():
    s = [SnapshotRef("new", t("2026-01-04 00:00"), verified=True), SnapshotRef("old", t("2026-01-03 00:00"))]
    assert [k.reasons for k in run(s, keep_last=1).keep] == [["last snapshot"]]


# --- time zones ------------------------------------------------------------------------------

def test_offsets_are_converted_to_utc_before_bucketing():
    late = SnapshotRef("late", datetime(2026, 11, 19, 23, 30, tzinfo=timezone(timedelta(hours=-2))))
    assert late.time == t("2026-11-20 01:30") and late.time.tzinfo == UTC
    s = [SnapshotRef("morning", t("2026-11-20 03:00")), late, SnapshotRef("prev", t("2026-11-19 20:00"))]
    result = run(s, keep_daily=2)
    # 23:30-02:00 is 01:30 UTC on the 20th: same day as "morning", so it is the one removed
    assert [x.id for x in result.remove] == ["late"]


def test_naive_time_is_rejected():
    with pytest.raises(ValueError):
        SnapshotRef("x", datetime(2026, 1, 1))


# --- CLI -------------------------------------------------------------------------------------

runner = CliRunner()


def invoke(*args, input=None):
    return runner.invoke(app, ["explain", *args], input=input)


@pytest.fixture
def times_file(tmp_path):
    def write(doc) -> str:
        p = tmp_path / "times.json"
        p.write_text(doc if isinstance(doc, str) else json.dumps(doc), encoding="utf-8")
        return str(p)
    return write


def test_cli_json_output(times_file):
    path = times_file(["2026-11-18T10:00:00Z", "2026-11-20T03:00:00Z", "2026-11-19T23:30:00-02:00",
                       {"time": "2026-11-17T10:00:00", "tags": ["a", "b"]}, "2026-11-16T10:00:00Z"])
    result = invoke("--times", path, "--keep-daily", "2", "--keep-tag", "a,b", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {
        "keep": [{"time": "2026-11-20T03:00:00Z", "reasons": ["daily snapshot"]},
                 {"time": "2026-11-18T10:00:00Z", "reasons": ["daily snapshot"]},
                 {"time": "2026-11-17T10:00:00Z", "reasons": ["has tags [a, b]"]}],
        "remove": [{"time": "2026-11-20T01:30:00Z"}, {"time": "2026-11-16T10:00:00Z"}],
    }


def test_cli_reads_stdin_and_honours_verified():
    doc = json.dumps([{"time": "2026-01-03T00:00:00Z"}, {"time": "2026-01-02T00:00:00Z", "verified": True},
                      "2026-01-01T00:00:00Z"])
    result = invoke("--times", "-", "--keep-last", "1", "--json", input=doc)
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["keep"][1] == {"time": "2026-01-02T00:00:00Z", "reasons": ["newest verified snapshot"]}
    assert out["remove"] == [{"time": "2026-01-01T00:00:00Z"}]


def test_cli_table(times_file):
    path = times_file(["2026-01-03T00:00:00Z", {"time": "2026-01-02T00:00:00Z", "tags": ["a", "b"]},
                       "2026-01-01T00:00:00Z"])
    result = invoke("--times", path, "--keep-last", "1", "--keep-tag", "a,b")
    assert result.exit_code == 0, result.output
    assert "has tags [a, b]" in result.output  # not swallowed as rich markup
    assert "keep 2, remove 1" in result.output
    assert "2026-01-01T00:00:00Z" in result.output and "remove" in result.output


@pytest.mark.parametrize("doc,flags,fragment", [
    ("[not json", [], "not valid JSON"),
    ('{"time": "2026-01-01T00:00:00Z"}', [], "JSON array"),
    ('["yesterday"]', [], "not an ISO-8601 time"),
    ('[{"time": "2026-01-01T00:00:00Z", "tag": ["a"]}]', [], "unknown keys"),
    ('[{"time": "2026-01-01T00:00:00Z", "verified": "yes"}]', [], "'verified'"),
    ('["2026-01-01T00:00:00Z"]', ["--keep-within", "1w"], "--keep-within: not a duration"),
    ('["2026-01-01T00:00:00Z"]', ["--keep-daily", "-2"], "--keep-daily"),
])
def test_cli_bad_input_raises_usage_error(times_file, doc, flags, fragment):
    result = invoke("--times", times_file(doc), *flags, "--json")
    assert isinstance(result.exception, UsageError), result.output
    assert fragment in result.exception.message
    assert result.output == ""  # nothing half-rendered before the error


def test_cli_unreadable_file_raises_usage_error(tmp_path):
    result = invoke("--times", str(tmp_path / "missing.json"), "--keep-last", "1")
    assert isinstance(result.exception, UsageError)
    assert "missing.json" in result.exception.message
