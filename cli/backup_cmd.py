"""`statevault init | backup | restore | verify`."""
from __future__ import annotations

import contextlib
import sys
import threading
from datetime import datetime, timezone
from typing import Annotated, Optional

import typer
from rich.table import Table

from cli.context import (console, emit_json, err_console, fmt_time, human_bytes, state, stopped_by_signals,
                         with_repository)
from snapshots.errors import StatevaultError, UsageError, VerificationError
from snapshots.settings import check_tags

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output on stdout.")]


def register(app: typer.Typer) -> None:
    app.command()(init)
    app.command()(backup)
    app.command()(restore)
    app.command()(verify)


def init(ctx: typer.Context, json: JsonOpt = False) -> None:
    """Create the repository (a first backup also does)."""
    with with_repository(ctx, create=True) as repo:
        info = {"repository": repo.url, "id": repo.config.id, "created_at": repo.config.created_at.isoformat()}
    if json:
        emit_json(info)
    else:
        console.print(f"repository {info['repository']} ready (id {info['id']})")


def _progress_printer():
    if not sys.stderr.isatty():
        return None
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), TextColumn("{task.completed:,} records"),
                        TimeElapsedColumn(), console=err_console, transient=True)
    tasks: dict[tuple[str, str], int] = {}

    def update(source: str, item: str, records: int) -> None:
        key = (source, item)
        if key not in tasks:
            tasks[key] = progress.add_task(f"{source}: {item}", total=None)
        progress.update(tasks[key], completed=records)

    return progress, update


def backup(ctx: typer.Context,
           sources: Annotated[Optional[list[str]], typer.Argument(help="Sources to back up (default: all).")] = None,
           tag: Annotated[Optional[list[str]], typer.Option("--tag", help="Tag the snapshots.")] = None,
           json: JsonOpt = False) -> None:
    """One snapshot per source, linked as one backup set. Exit 1 if any source failed."""
    from backup.job import run_backup

    settings = state(ctx).settings
    if not settings.sources:
        raise UsageError("no sources configured", hint="Add [sources.NAME] tables to the config file.")
    try:
        check_tags(tag or [])
    except ValueError as exc:
        raise UsageError(f"--tag {exc}") from None
    sources = list(dict.fromkeys(sources)) if sources else sources  # `backup memory memory`: one snapshot
    printer = None if json else _progress_printer()
    # SIGTERM / Ctrl-C: the running source stops before its manifest (no snapshot, lease released)
    # and the rest do not start; a second signal stops at once
    stop = threading.Event()
    with with_repository(ctx, create=True) as repo, stopped_by_signals(stop):
        with printer[0] if printer else contextlib.nullcontext():
            result = run_backup(repo, settings, sources, tags=tag or [], progress=printer[1] if printer else None,
                                retry_attempts=settings.daemon.retry_attempts,
                                retry_max_wait=settings.daemon.retry_max_wait_seconds, abort=stop)
    stopped = None
    if stop.is_set():
        started = {r.source for r in result.results}
        stopped = {"stopped_by_signal": True,
                   "not_started": [n for n in (sources or sorted(settings.sources)) if n not in started]}
    if json:
        emit_json({**result.to_dict(), **(stopped or {})})
    else:
        table = Table("source", "kind", "status", "snapshot", "items", "records", "read", "uploaded", "time")
        for r in result.results:
            status = "[green]ok[/]" if r.ok else f"[red]failed[/] {r.error.message if r.error else ''}"
            table.add_row(r.source, r.kind, status, r.snapshot_id or "-", str(r.items), f"{r.records:,}",
                          human_bytes(r.bytes_read), human_bytes(r.bytes_uploaded), f"{r.duration_seconds:.1f}s")
        console.print(table)
        for r in result.results:
            if r.error and r.error.hint:
                err_console.print(f"hint ({r.source}): {r.error.hint}")
        if stopped:
            skipped = stopped["not_started"]
            err_console.print("stopped by a signal" + (f"; not started: {', '.join(skipped)}" if skipped else ""))
    if not result.ok or (stopped and stopped["not_started"]):
        raise typer.Exit(1)


def _parse_at(at: str | None) -> datetime | None:
    if at is None:
        return None
    try:
        t = datetime.fromisoformat(at.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"--at {at!r} is not an ISO-8601 time (e.g. 2026-11-20T03:00Z)") from None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def restore(ctx: typer.Context,
            snapshot: Annotated[Optional[str], typer.Argument(
                help="Snapshot id, prefix or `latest` (may be left out with --at).")] = None,
            source: Annotated[str, typer.Option("--source", "-s", help="The source whose snapshot to restore.")] = ...,
            at: Annotated[Optional[str], typer.Option("--at", help="Newest snapshot cut at or before this time (UTC unless an offset is given; a time in "
                                      "whole seconds includes that whole second, so a time from `snapshots list` works).")] = None,
            only: Annotated[Optional[list[str]], typer.Option(
                "--only", help="One table (public.memories), collection, or Redis key/pattern (history:u42).")] = None,
            to: Annotated[Optional[str], typer.Option("--to", help="Restore onto another server (URL).")] = None,
            to_path: Annotated[Optional[str], typer.Option("--to-path", help="Qdrant local-mode path to restore into.")] = None,
            into: Annotated[Optional[str], typer.Option("--into", help="Restore one item under a new name.")] = None,
            mode: Annotated[str, typer.Option(
                "--mode", help="new: target must be empty (default). replace: take a pre-restore snapshot, then "
                               "overwrite. swap: restore beside the live data and switch atomically (PostgreSQL: "
                               "staging schema + renames in one transaction; Qdrant: new collection + alias switch; "
                               "Redis has no atomic switch and refuses swap).")] = "new",
            ttl: Annotated[str, typer.Option("--ttl", help="Redis TTLs, of keys and of hash fields: keep "
                                                            "(absolute expiry), reset (original duration from now), "
                                                            "none (persist).")] = "keep",
            jobs: Annotated[int, typer.Option(
                "--jobs", "-j", help="PostgreSQL: connections that load a big table (64 MiB+) at once, and read "
                                     "it back for verification; 1 loads it in place in one transaction.")] = 2,
            dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan; write nothing.")] = False,
            yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask before replacing live data.")] = False,
            json: JsonOpt = False) -> None:
    """Restore a snapshot, verified: counts and digests must match or the exit code is 3."""
    from restore.run import restore_snapshot

    if snapshot is None:
        if at is None:
            raise UsageError("name the snapshot to restore: an id, `latest`, or --at TIME")
        snapshot = "latest"  # `--at T` alone: the newest snapshot cut at or before T
    elif at is not None and snapshot != "latest":
        raise UsageError(f"give a snapshot id or --at, not both (got {snapshot} and --at {at})")
    settings = state(ctx).settings
    with with_repository(ctx) as repo:
        if mode in ("replace", "swap") and not (yes or dry_run):
            if json or not sys.stdin.isatty():  # --json: stdout is for the one JSON document, not a question
                why = "--json does not ask" if json else "no terminal to ask on"
                raise UsageError(f"--mode {mode} changes live data: pass --yes to confirm ({why})")
            if not typer.confirm(f"Restore {snapshot} of {source} with --mode {mode} (live data is replaced)?"):
                raise typer.Exit(1)
        try:
            with stopped_by_signals():  # an interrupted restore undoes what it wrote (restore/run.py)
                result = restore_snapshot(repo, settings, source, snapshot, at=_parse_at(at), only=only or [],
                                          to_url=to, to_path=to_path, into=into, mode=mode, ttl=ttl,
                                          dry_run=dry_run, jobs=jobs)
        except VerificationError as exc:
            if json and exc.report:  # the report (what differs, the pre-restore snapshot), and the error
                emit_json({**exc.report, **{k: v for k, v in exc.to_dict().items() if k != "report"}})
            raise
    if json:
        emit_json(result.to_dict())
        return
    title = f"{'plan for ' if dry_run else ''}restore of {source} snapshot {result.snapshot_id} (cut {fmt_time(result.cut_time)})"
    table = Table("item", "target", "action", "records", "size", "live records now", "notes", title=title)
    for p in result.plans:
        table.add_row(p["item"], p["target"], p["action"], f"{p['records']:,}", human_bytes(p["bytes"]),
                      "-" if p["live_records"] is None else f"{p['live_records']:,}",
                      "; ".join((["partial: only the --only records of this item"] if p.get("partial") else [])
                                + p["notes"]))
    console.print(table)
    if dry_run:
        console.print("dry run: nothing was written")
        return
    if result.pre_restore_snapshot:
        console.print(f"pre-restore snapshot: [bold]{result.pre_restore_snapshot}[/] (undo with "
                      f"`{result.undo_command}`)", soft_wrap=True)
    for c in result.checks:
        console.print(f"[green]verified[/] {c.item} -> {c.target}: {c.actual_records:,} records, digest {c.actual_digest[:16]}")
    console.print(f"restored {result.records_restored:,} records in {result.restore_seconds:.1f}s, "
                  f"verified in {result.verify_seconds:.1f}s")


def verify(ctx: typer.Context,
           snapshot: Annotated[str, typer.Argument(help="Snapshot id, prefix or `latest`.")],
           source: Annotated[str, typer.Option("--source", "-s")],
           json: JsonOpt = False) -> None:
    """Compare the live store with a snapshot (counts and digests per item): drift detection, read-only."""
    from restore.drift import verify_live

    settings = state(ctx).settings
    with with_repository(ctx) as repo:
        snapshot_id, checks = verify_live(repo, settings, source, snapshot)
    data = {"source": source, "snapshot_id": snapshot_id, "in_sync": all(c.ok for c in checks),
            "items": [c.to_dict() for c in checks]}
    if json:
        emit_json(data)
    else:
        table = Table("item", "snapshot records", "live records", "state", title=f"{source} vs {snapshot_id}")
        for c in checks:
            table.add_row(c.item, f"{c.expected_records:,}", f"{c.actual_records:,}",
                          "[green]same[/]" if c.ok else "[red]drifted[/]")
        console.print(table)
    if not data["in_sync"]:
        raise VerificationError(f"live {source} differs from snapshot {snapshot_id}: "
                                + ", ".join(c.item for c in checks if not c.ok),
                                report=data, hint="Inspect the drift, or restore the snapshot if the live data is wrong.")


__all__ = ["register", "StatevaultError"]
