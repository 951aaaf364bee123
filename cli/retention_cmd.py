"""`statevault retention explain`: what a retention policy would keep and remove, and why.

A what-if over plain timestamps, no repository needed: the operator tries `--keep-*` flags
on a list of times before putting them in the config. Parsing and rendering live here; the
decision is `backup.retention.apply_retention`. Bad input raises UsageError (exit 2 through
the top-level handler).
"""
from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from pydantic import ValidationError

from backup.retention import RetentionResult, SnapshotRef, apply_retention
from snapshots.errors import UsageError
from snapshots.settings import RetentionPolicy

app = typer.Typer(help="Try retention policies (restic `forget` rules) on a list of snapshot times.",
                  no_args_is_help=True)


@app.callback()
def _group() -> None:
    """Retention policies: restic's --keep-* rules, plus never removing the newest snapshot."""
    # an explicit callback keeps `explain` a subcommand even while it is the only one


_UNITS = {"last": "snapshots", "hourly": "hours", "daily": "days", "weekly": "ISO weeks",
          "monthly": "months", "yearly": "years"}


def _count(unit: str) -> Any:
    what = ("the last N snapshots" if unit == "last"
            else f"the newest snapshot of each of the N newest {_UNITS[unit]} that have one")
    return typer.Option(f"--keep-{unit}", metavar="N", help=f"Keep {what}; -1 = unlimited.")


def _within(unit: str | None) -> Any:
    flag = f"--keep-within-{unit}" if unit else "--keep-within"
    what = (f"the newest snapshot of each {_UNITS[unit][:-1]}" if unit else "every snapshot")
    return typer.Option(flag, metavar="DUR", help=f"Keep {what} within DUR (e.g. 1y2m3d4h) of the newest snapshot.")


@app.command()
def explain(
    times: Annotated[str, typer.Option("--times", metavar="FILE",
                                       help="JSON array of ISO-8601 times or {time, tags, verified} "
                                            "objects; naive times are UTC; '-' reads stdin.")],
    keep_last: Annotated[Optional[int], _count("last")] = None,
    keep_hourly: Annotated[Optional[int], _count("hourly")] = None,
    keep_daily: Annotated[Optional[int], _count("daily")] = None,
    keep_weekly: Annotated[Optional[int], _count("weekly")] = None,
    keep_monthly: Annotated[Optional[int], _count("monthly")] = None,
    keep_yearly: Annotated[Optional[int], _count("yearly")] = None,
    keep_within: Annotated[Optional[str], _within(None)] = None,
    keep_within_hourly: Annotated[Optional[str], _within("hourly")] = None,
    keep_within_daily: Annotated[Optional[str], _within("daily")] = None,
    keep_within_weekly: Annotated[Optional[str], _within("weekly")] = None,
    keep_within_monthly: Annotated[Optional[str], _within("monthly")] = None,
    keep_within_yearly: Annotated[Optional[str], _within("yearly")] = None,
    keep_tag: Annotated[Optional[list[str]], typer.Option(
        "--keep-tag", metavar="TAGS",
        help="Keep snapshots carrying all of these comma-separated tags; repeatable.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Show which snapshots a policy keeps (with restic's reasons) and which it removes."""
    # the keep_* parameters are RetentionPolicy's fields by name; unset flags stay unset
    flags = {k: v for k, v in locals().items() if k.startswith("keep_") and v is not None}
    policy = build_policy(flags)
    snapshots = parse_snapshots(_read(times))
    result = apply_retention(snapshots, policy)
    if as_json:
        typer.echo(json.dumps(result_to_json(result)))
    else:
        _print_table(result)


def build_policy(flags: dict[str, Any]) -> RetentionPolicy:
    """RetentionPolicy from CLI values; a pydantic error becomes a UsageError naming the flag."""
    try:
        return RetentionPolicy(**flags)
    except ValidationError as exc:
        # "Value error, " is pydantic's prefix for a validator's ValueError; the flag name says more
        lines = [f"--{str(e['loc'][0]).replace('_', '-')}: {e['msg'].removeprefix('Value error, ')}"
                 for e in exc.errors()]
        raise UsageError("invalid retention policy:\n  " + "\n  ".join(lines)) from None


def _read(source: str) -> str:
    if source == "-":
        return sys.stdin.read()
    try:
        return Path(source).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise UsageError(f"{source}: cannot read: {reason}") from None


def _parse_time(value: Any, where: str) -> datetime:
    if not isinstance(value, str):
        raise UsageError(f"{where}: time must be an ISO-8601 string, got {value!r}")
    try:
        t = datetime.fromisoformat(value)
    except ValueError:
        raise UsageError(f"{where}: not an ISO-8601 time: {value!r}") from None
    # a time without offset is taken as UTC, the zone every bucket is computed in
    return t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t.astimezone(timezone.utc)


def parse_snapshots(text: str) -> list[SnapshotRef]:
    """The --times document as SnapshotRefs, ids "#0", "#1"... in file order unless given."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--times: not valid JSON: {exc}") from None
    if not isinstance(doc, list):
        raise UsageError("--times: expected a JSON array of times or {time, tags, verified} objects")
    snapshots = []
    for i, item in enumerate(doc):
        where = f"--times item {i}"
        if isinstance(item, str):
            snapshots.append(SnapshotRef(id=f"#{i}", time=_parse_time(item, where)))
            continue
        if not isinstance(item, dict) or "time" not in item:
            raise UsageError(f"{where}: expected a time string or an object with a 'time' key")
        unknown = set(item) - {"id", "time", "tags", "verified"}
        if unknown:
            raise UsageError(f"{where}: unknown keys {sorted(unknown)} (allowed: id, time, tags, verified)")
        tags = item.get("tags", [])
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise UsageError(f"{where}: 'tags' must be a list of strings")
        verified = item.get("verified", False)
        if not isinstance(verified, bool):
            raise UsageError(f"{where}: 'verified' must be true or false")
        snapshots.append(SnapshotRef(id=str(item.get("id", f"#{i}")), time=_parse_time(item["time"], where),
                                     tags=tuple(tags), verified=verified))
    return snapshots


def format_time(t: datetime) -> str:
    """ISO-8601 in UTC with a Z suffix, e.g. 2026-11-20T03:00:00Z."""
    return t.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def result_to_json(result: RetentionResult) -> dict:
    return {
        "keep": [{"time": format_time(k.snapshot.time), "reasons": list(k.reasons)} for k in result.keep],
        "remove": [{"time": format_time(s.time)} for s in result.remove],
    }


def _print_table(result: RetentionResult) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    # escape: "has tags [a, b]" would otherwise be read as rich markup and vanish
    rows = [(k.snapshot, "keep", escape(", ".join(k.reasons))) for k in result.keep]
    rows += [(s, "remove", "") for s in result.remove]
    rows.sort(key=lambda r: r[0].time, reverse=True)
    table = Table(title=f"keep {len(result.keep)}, remove {len(result.remove)}")
    table.add_column("time")
    table.add_column("action")
    table.add_column("reasons")
    for snap, action, why in rows:
        table.add_row(format_time(snap.time), f"[green]{action}[/]" if action == "keep" else f"[red]{action}[/]", why)
    Console().print(table)
