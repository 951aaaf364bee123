"""Retention: which snapshots a policy keeps, with restic `forget` semantics.

`apply_retention` reproduces restic's `ApplyPolicy` (internal/data/snapshot_policy.go, the
version that labels the oldest-snapshot keep "oldest ..."), so a policy written for restic
means the same here, reasons included. Differences, all deliberate:

* buckets (hour, day, ISO week, month, year) are computed in UTC, not in each snapshot's
  recorded offset;
* an empty policy keeps everything (reason "no policy"); restic's `ApplyPolicy` would
  remove everything and its CLI refuses to run;
* after restic's rules, the newest verified snapshot and the newest snapshot are never
  removed, so a policy can never empty a source.

Pure: no I/O, no clock. The caller deletes what `remove` lists.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Callable, Sequence

from snapshots.errors import UsageError
from snapshots.settings import RetentionPolicy

Duration = tuple[int, int, int, int]  # (years, months, days, hours)

_DURATION = re.compile(r"(?:(\d+)y)?(?:(\d+)m)?(?:(\d+)d)?(?:(\d+)h)?")


def parse_duration(s: str) -> Duration:
    """Parse a restic duration such as `1y2m3d4h` (any subset, in the order y m d h).

    Returns (years, months, days, hours). Raises UsageError for anything else, including "".
    """
    m = _DURATION.fullmatch(s.strip()) if isinstance(s, str) else None
    if not m or not s.strip():
        raise UsageError(f"not a duration: {s!r} (use y/m/d/h like 1y2m3d4h)")
    years, months, days, hours = (int(g) if g else 0 for g in m.groups())
    return years, months, days, hours


def format_duration(d: Duration) -> str:
    """restic's Duration.String(): non-zero parts only, so "1y0m" reads back as "1y"."""
    return "".join(f"{n}{unit}" for n, unit in zip(d, "ymdh") if n)


@dataclass(frozen=True)
class SnapshotRef:
    """What retention needs to know about a snapshot. `time` is normalised to UTC."""

    id: str
    time: datetime
    tags: tuple[str, ...] = ()
    verified: bool = False

    def __post_init__(self) -> None:
        if self.time.tzinfo is None or self.time.utcoffset() is None:
            raise ValueError(f"snapshot {self.id}: time must be timezone-aware, got {self.time!r}")
        # frozen: normalise through object.__setattr__ so every bucket below is a UTC bucket
        object.__setattr__(self, "time", self.time.astimezone(timezone.utc))
        object.__setattr__(self, "tags", tuple(self.tags))


@dataclass(frozen=True)
class Kept:
    snapshot: SnapshotRef
    reasons: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class RetentionResult:
    """`keep` and `remove` are disjoint, cover the input, and are both newest first."""

    keep: list[Kept]
    remove: list[SnapshotRef]


# Bucket functions: two snapshots share a bucket when these return the same value. Same
# encodings as restic (YYYYMMDDHH, YYYYMMDD, ISO YYYYWW, YYYYMM, YYYY); `nr` is the position
# in the newest-first list, which makes every snapshot its own bucket for keep-last.
Bucker = Callable[[datetime, int], int]


def _always(_: datetime, nr: int) -> int:
    return nr


def _hour(t: datetime, _: int) -> int:
    return t.year * 1000000 + t.month * 10000 + t.day * 100 + t.hour


def _day(t: datetime, _: int) -> int:
    return t.year * 10000 + t.month * 100 + t.day


def _week(t: datetime, _: int) -> int:
    # ISO year, not calendar year: 2021-01-03 is in 2020-W53, 2024-12-30 in 2025-W01
    iso = t.isocalendar()
    return iso.year * 100 + iso.week


def _month(t: datetime, _: int) -> int:
    return t.year * 100 + t.month


def _year(t: datetime, _: int) -> int:
    return t.year


@dataclass
class _CountRule:
    count: int  # > 0: keeps left; -1: unlimited
    bucker: Bucker
    reason: str
    last: int = -1  # bucket value of the last snapshot this rule kept; -1 matches no bucket


@dataclass
class _WithinRule:
    duration: Duration
    cutoff: datetime | None  # snapshots strictly after it are within; None: all are
    bucker: Bucker
    reason: str
    last: int = -1


def _subtract(anchor: datetime, d: Duration) -> datetime | None:
    """anchor minus d the way restic does it: Go's AddDate(-y, -m, -d), then minus hours.

    AddDate normalises instead of clamping: 31 March minus one month is "31 February",
    which is 3 March (2 March in a leap year), not 28 February as dateutil would say.
    Returns None when the result falls before year 1 (Go would go on counting years; every
    snapshot is then within).
    """
    years, months, days, hours = d
    total_months = (anchor.year - years) * 12 + (anchor.month - 1) - months
    year, month0 = divmod(total_months, 12)
    try:
        first = anchor.replace(year=year, month=month0 + 1, day=1)
        return first + timedelta(days=anchor.day - 1 - days) - timedelta(hours=hours)
    except (ValueError, OverflowError):
        return None


def _has_tags(snapshot: SnapshotRef, wanted: Sequence[str]) -> bool:
    """restic's Snapshot.HasTags: all of `wanted`; an empty tag matches an untagged snapshot."""
    for tag in wanted:
        if tag == "" and not snapshot.tags:
            return True
        if tag not in snapshot.tags:
            return False
    return True


def _tag_lists(policy: RetentionPolicy) -> list[list[str]]:
    # restic splits each --keep-tag value on "," and strips blanks around every tag
    return [[t.strip() for t in entry.split(",")] for entry in policy.keep_tag]


def _durations(policy: RetentionPolicy) -> dict[str, Duration]:
    names = ("keep_within", "keep_within_hourly", "keep_within_daily", "keep_within_weekly",
             "keep_within_monthly", "keep_within_yearly")
    found = {n: parse_duration(getattr(policy, n)) for n in names if getattr(policy, n) is not None}
    # a zero duration ("0d") is an unused rule in restic, as a count of 0 is
    return {n: d for n, d in found.items() if any(d)}


_COUNTS = (("keep_last", _always, "last snapshot"), ("keep_hourly", _hour, "hourly snapshot"),
           ("keep_daily", _day, "daily snapshot"), ("keep_weekly", _week, "weekly snapshot"),
           ("keep_monthly", _month, "monthly snapshot"), ("keep_yearly", _year, "yearly snapshot"))
_WITHINS = (("keep_within_hourly", _hour, "hourly within"), ("keep_within_daily", _day, "daily within"),
            ("keep_within_weekly", _week, "weekly within"), ("keep_within_monthly", _month, "monthly within"),
            ("keep_within_yearly", _year, "yearly within"))


def is_empty_policy(policy: RetentionPolicy) -> bool:
    """restic's ExpirePolicy.Empty(): no count other than 0, no non-zero duration, no tag list."""
    counts = (getattr(policy, name) for name, _, _ in _COUNTS)
    return all(not c for c in counts) and not _durations(policy) and not policy.keep_tag


def apply_retention(snapshots: Sequence[SnapshotRef], policy: RetentionPolicy, *,
                    now: datetime | None = None) -> RetentionResult:
    """Split `snapshots` into keep (with reasons) and remove, as `restic forget` would.

    Snapshots are sorted newest first (stable: equal times keep the input order, as restic's
    sort.Stable does). keep-within* windows end at the newest snapshot, not at the clock;
    with `now` given, snapshots later than `now` do not count as the newest (restic ignores
    future-dated snapshots there so a skewed clock cannot move the window). Then the
    statevault guarantees: the newest verified snapshot and the newest snapshot are kept.
    Their reasons are added only when restic's rules would have removed them, so every
    other reason list is exactly restic's.
    """
    ordered = sorted(snapshots, key=lambda s: s.time, reverse=True)
    if not ordered:
        return RetentionResult(keep=[], remove=[])
    if is_empty_policy(policy):
        return RetentionResult(keep=[Kept(s, ["no policy"]) for s in ordered], remove=[])

    durations = _durations(policy)
    candidates = [s.time for s in ordered if now is None or s.time < now]
    anchor = max(candidates) if candidates else None

    def cutoff(d: Duration) -> datetime | None:
        # no anchor: restic subtracts from Go's zero time, so every snapshot is within
        return _subtract(anchor, d) if anchor is not None else None

    counts = [_CountRule(getattr(policy, name), bucker, reason) for name, bucker, reason in _COUNTS
              if getattr(policy, name)]
    withins = [_WithinRule(durations[name], cutoff(durations[name]), bucker, reason)
               for name, bucker, reason in _WITHINS if name in durations]
    within_all = durations.get("keep_within")
    within_all_cutoff = cutoff(within_all) if within_all else None
    tag_lists = _tag_lists(policy)

    reasons: list[list[str]] = []
    oldest = len(ordered) - 1
    for nr, snap in enumerate(ordered):
        why: list[str] = []
        # tags are not counted against any rule
        why += [f"has tags [{', '.join(tags)}]" for tags in tag_lists if _has_tags(snap, tags)]
        if within_all and (within_all_cutoff is None or snap.time > within_all_cutoff):
            why.append(f"within {format_duration(within_all)}")
        for rule in counts:
            if rule.count == 0:  # used up; -1 never is
                continue
            val = rule.bucker(snap.time, nr)
            # the newest snapshot of each bucket uses a count; the oldest snapshot is kept too
            # while the rule has counts left, which keeps the longest history the policy allows
            if val != rule.last or nr == oldest:
                prefix = "oldest " if val == rule.last else ""
                why.append(prefix + rule.reason)
                rule.last = val
                if rule.count > 0:
                    rule.count -= 1
        for w in withins:
            if w.cutoff is not None and not snap.time > w.cutoff:
                continue
            val = w.bucker(snap.time, nr)
            if val != w.last or nr == oldest:
                prefix = "oldest " if val == w.last else ""
                why.append(f"{prefix}{w.reason} {format_duration(w.duration)}")
                w.last = val
        reasons.append(why)

    # statevault's guarantees, after restic's rules: a policy can never empty a source, and
    # the newest snapshot known to restore correctly survives whatever the policy says
    newest_verified = next((i for i, s in enumerate(ordered) if s.verified), None)
    if newest_verified is not None and not reasons[newest_verified]:
        reasons[newest_verified].append("newest verified snapshot")
    if not reasons[0]:
        reasons[0].append("newest snapshot")

    keep = [Kept(s, why) for s, why in zip(ordered, reasons) if why]
    remove = [s for s, why in zip(ordered, reasons) if not why]
    return RetentionResult(keep=keep, remove=remove)
