"""`statevault snapshots ...` and `statevault locks ...`: the repository as operators see it."""
from __future__ import annotations

import re
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from cli import retention_cmd
from cli.context import console, emit_json, fmt_time, human_bytes, state, with_repository
from snapshots.check import check_repository
from snapshots.errors import ManifestError, NotFoundError, UsageError, VerificationError
from snapshots.leases import list_leases
from snapshots.manifest import is_snapshot_id
from snapshots.prune import prune_repository
from snapshots.settings import approx_timedelta

app = typer.Typer(help="List, inspect, check, forget and prune snapshots.", no_args_is_help=True)
locks_app = typer.Typer(help="Leases held on the repository.", no_args_is_help=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output on stdout.")]
SourceOpt = Annotated[Optional[str], typer.Option("--source", "-s", help="Only this source.")]
SHOW_CHECKED = 20  # snapshots whose digest-checked items `check --read-data-subset` lists


def _check_source(ctx: typer.Context, repo, source: str) -> None:
    """A --source that is neither configured nor in the repository is a typo: NotFoundError
    (exit 2), rather than an empty answer. A source dropped from the config keeps its snapshots."""
    configured = state(ctx).settings.sources
    if source not in configured and not repo.list_snapshots(source=source):
        raise NotFoundError(f"no source {source!r}: it is not in the config and has no snapshots in {repo.url}",
                            hint=f"Sources in the config: {', '.join(sorted(configured)) or 'none'}.")


@app.command("list")
def list_(ctx: typer.Context, source: SourceOpt = None, json: JsonOpt = False) -> None:
    """Every snapshot, oldest first. Cut times are shown in UTC to the second (--json: in full); a
    listed time given to `restore --at` picks that snapshot, as --at in whole seconds means the
    end of that second."""
    with with_repository(ctx) as repo:
        manifests = repo.list_snapshots(source=source)
        errors = [e.message for e in repo.manifest_errors]
        if source and not manifests:
            _check_source(ctx, repo, source)
    if json:
        emit_json({"snapshots": [_summary(m) for m in manifests], "manifest_errors": errors})
        return
    table = Table("id", "source", "kind", "cut time", "items", "records", "size", "stored", "tags")
    for m in manifests:
        table.add_row(m.id, m.source, m.kind, fmt_time(m.cut_time), str(len(m.items)), f"{m.records:,}",
                      human_bytes(m.bytes), human_bytes(m.stored_bytes), ",".join(m.tags))
    console.print(table)
    for e in errors:
        console.print(f"[red]unreadable manifest:[/] {e}")


def _summary(m) -> dict:
    return {"id": m.id, "source": m.source, "kind": m.kind, "cut_time": m.cut_time.isoformat(),
            "started_at": m.started_at.isoformat(), "finished_at": m.finished_at.isoformat(),
            "items": len(m.items), "records": m.records, "bytes": m.bytes, "stored_bytes": m.stored_bytes,
            "tags": m.tags, "backup_set": m.backup_set}


@app.command()
def show(ctx: typer.Context, snapshot: Annotated[str, typer.Argument(help="Snapshot id, prefix or `latest`.")],
         source: SourceOpt = None, json: JsonOpt = False) -> None:
    """One snapshot's manifest: items, counts, digests, chunks."""
    with with_repository(ctx) as repo:
        m = repo.resolve(snapshot, source=source)
    if json:
        emit_json(m.model_dump(mode="json", by_alias=True))
        return
    console.print(f"[bold]{m.id}[/]  source={m.source} kind={m.kind} cut={fmt_time(m.cut_time)} "
                  f"took={(m.finished_at - m.started_at).total_seconds():.1f}s tags={','.join(m.tags) or '-'}")
    table = Table("item", "kind", "format", "records", "size", "stored", "chunks", "digest")
    for it in m.items + m.offline_index:
        table.add_row(it.name, it.kind, it.format, f"{it.records:,}", human_bytes(it.bytes),
                      human_bytes(it.stored_bytes), str(len(it.chunks)), it.digest[:16])
    console.print(table)


def _subset(value: str | None) -> float | None:
    if value is None:
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)%?", value.strip())
    if not m or not 0 < float(m.group(1)) <= 100:
        raise UsageError(f"--read-data-subset {value!r}: give a percentage like 5%")
    return float(m.group(1))


@app.command()
def check(ctx: typer.Context,
          read_data: Annotated[bool, typer.Option(
              "--read-data", help="Re-read and re-hash every chunk, and recompute every item's record count and "
                                  "digest from its records.")] = False,
          read_data_subset: Annotated[Optional[str], typer.Option(
              "--read-data-subset", metavar="N%", help="Re-read a random N% of chunks (instead of --read-data); "
                                                       "items whose chunks were all read get their count and "
                                                       "digest recomputed.")] = None,
          json: JsonOpt = False) -> None:
    """Prove every snapshot's chunks exist (and are intact, and add up to each item's count and digest).
    Exit 3 names what is broken."""
    if read_data and read_data_subset is not None:
        raise UsageError("--read-data and --read-data-subset are mutually exclusive: every chunk, or a subset",
                         hint="Give one of them; nothing was read.")
    subset = _subset(read_data_subset)
    with with_repository(ctx) as repo:
        report = check_repository(repo, read_data=read_data, subset_percent=subset)
    if json:
        emit_json(report.to_dict())
    else:
        _print_check(report, subset)
    if not report.ok:
        raise VerificationError(
            f"check found {len(report.problems)} damaged or missing chunks, {len(report.item_problems)} items whose "
            f"manifest does not match their data and {len(report.manifest_errors)} unreadable manifests; broken "
            f"snapshots: {', '.join(report.broken_snapshots) or 'none'}",
            report=report.to_dict(),
            hint="Restore from an unbroken snapshot. To repair: forget the broken snapshots, run `statevault "
                 "snapshots prune --grace 0h` (deletes the damaged chunks nothing references any more), then a new "
                 "backup uploads them again.")


def _print_check(report, subset: float | None) -> None:
    console.print(f"{report.snapshots} snapshots, {report.chunks_referenced} chunks referenced, "
                  f"{report.chunks_read} read ({human_bytes(report.bytes_read)})")
    if report.chunks_read or report.digest_checked:
        checked = report.items_digest_checked
        console.print(f"record counts and digests recomputed for {checked} of {report.items} items"
                      + (" (those whose every chunk was read)" if subset is not None and subset < 100 else ""))
        if subset is not None and subset < 100:
            shown = list(report.digest_checked.items())
            for sid, names in shown[:SHOW_CHECKED]:
                console.print(f"  {sid}: {escape(', '.join(names))}", soft_wrap=True)
            if len(shown) > SHOW_CHECKED:
                console.print(f"  ... and {len(shown) - SHOW_CHECKED} more snapshots (all in --json: digest_checked)")
    for p in report.problems:
        console.print(f"[red]{p['problem']} chunk[/] {p['chunk']} breaks snapshots: {', '.join(p['snapshots'])}")
    for p in report.item_problems:
        exp, act = p["expected"], p["actual"]
        found = f"; the data holds {act['records']:,} records, digest {act['digest']}" if act else ""
        console.print(f"[red]item mismatch[/] snapshot {p['snapshot']} item {escape(p['item'])}: "
                      + escape(f"{p['problem']} (manifest: {exp['records']:,} records, digest {exp['digest']}{found})"),
                      soft_wrap=True)
    for e in report.manifest_errors:
        console.print(f"[red]unreadable manifest:[/] {e}")
    if report.ok:
        console.print("[green]no problems found[/]")


@app.command()
def forget(ctx: typer.Context,
           snapshot_ids: Annotated[Optional[list[str]], typer.Argument(
               metavar="ID", help="Forget exactly these snapshots (ids or unique prefixes, e.g. the broken ones "
                                       "`check` names) instead of applying a retention policy.")] = None,
           source: SourceOpt = None,
           dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would be removed.")] = False,
           keep_last: Annotated[Optional[int], retention_cmd._count("last")] = None,
           keep_hourly: Annotated[Optional[int], retention_cmd._count("hourly")] = None,
           keep_daily: Annotated[Optional[int], retention_cmd._count("daily")] = None,
           keep_weekly: Annotated[Optional[int], retention_cmd._count("weekly")] = None,
           keep_monthly: Annotated[Optional[int], retention_cmd._count("monthly")] = None,
           keep_yearly: Annotated[Optional[int], retention_cmd._count("yearly")] = None,
           keep_within: Annotated[Optional[str], retention_cmd._within(None)] = None,
           keep_tag: Annotated[Optional[list[str]], typer.Option("--keep-tag", metavar="TAGS")] = None,
           json: JsonOpt = False) -> None:
    """Remove snapshots that the retention policy (config, or these flags) does not keep, or the given IDs."""
    from backup.forget import forget_snapshots

    flags = dict(keep_last=keep_last, keep_hourly=keep_hourly, keep_daily=keep_daily, keep_weekly=keep_weekly,
                 keep_monthly=keep_monthly, keep_yearly=keep_yearly, keep_within=keep_within,
                 keep_tag=keep_tag or [])
    policy = retention_cmd.build_policy(flags) if any(v not in (None, []) for v in flags.values()) else None
    if snapshot_ids and (policy is not None or source):
        raise UsageError("give snapshot IDs, or a policy (--source / --keep-*), not both")
    settings = state(ctx).settings
    with with_repository(ctx) as repo:
        if snapshot_ids:
            result = _forget_ids(repo, snapshot_ids, dry_run)
        else:
            if source:
                _check_source(ctx, repo, source)
            result = forget_snapshots(repo, settings, sources=[source] if source else None, policy=policy,
                                      dry_run=dry_run)
    if json:
        emit_json(result.to_dict())
        return
    for name, decision in result.sources.items():
        # backups and pre-restore snapshots are retained as two groups (backup/forget.py)
        table = Table("snapshot", "time", "group", "decision", "reasons", title=f"source {name}")
        for k in decision["keep"]:
            table.add_row(k["id"], k["time"], k.get("group", ""), "[green]keep[/]", ", ".join(k["reasons"]))
        for r in decision["remove"]:
            table.add_row(r["id"], r["time"], r.get("group", ""), "[red]remove[/]" + (" (dry run)" if dry_run else ""), "")
        console.print(table)
    console.print(f"{result.removed} snapshots {'would be ' if dry_run else ''}removed; run "
                  "`statevault snapshots prune` to free their chunks")


def _forget_ids(repo, refs: list[str], dry_run: bool):
    """Delete exactly the named manifests (the operator's explicit choice: no retention rule applies).

    A full id whose manifest is unreadable can still be forgotten: that is how a damaged one goes.
    """
    from backup.forget import ForgetResult

    chosen: dict[str, tuple[str, str | None]] = {}
    for ref in refs:
        if ref == "latest":
            raise UsageError("forget takes snapshot ids (from `statevault snapshots list`), not `latest`")
        if is_snapshot_id(ref) and repo.store.exists(f"snapshots/{ref}.json"):
            try:
                m = repo.load_manifest(ref)
                chosen[m.id] = (m.source, m.cut_time.isoformat())
            except ManifestError:
                chosen[ref] = ("(unreadable manifest)", None)
        else:
            m = repo.resolve(ref)
            chosen[m.id] = (m.source, m.cut_time.isoformat())
    result = ForgetResult(dry_run=dry_run)
    with repo.lease("forget", exclusive=True):
        for sid, (src, cut) in chosen.items():
            result.sources.setdefault(src, {"keep": [], "remove": []})["remove"].append({"id": sid, "time": cut})
            if not dry_run:
                repo.delete_snapshot(sid)
    return result


@app.command()
def prune(ctx: typer.Context,
          dry_run: Annotated[bool, typer.Option("--dry-run", help="Count, delete nothing.")] = False,
          grace: Annotated[Optional[str], typer.Option("--grace", metavar="DUR",
                                                       help="Keep unreferenced chunks younger than this "
                                                            "(default: repository.prune_grace).")] = None,
          json: JsonOpt = False) -> None:
    """Delete chunks no snapshot references (older than the grace period), under an exclusive lease."""
    settings = state(ctx).settings
    with with_repository(ctx) as repo:
        report = prune_repository(repo, grace=approx_timedelta(grace or settings.repository.prune_grace),
                                  dry_run=dry_run)
    if json:
        emit_json(report.to_dict())
        return
    verb = "would delete" if dry_run else "deleted"
    console.print(f"{report.chunks_total} chunks, {report.chunks_unreferenced} unreferenced, {verb} "
                  f"{report.chunks_deleted} ({human_bytes(report.bytes_deleted)}); {report.chunks_in_grace} "
                  f"kept within the grace period")


@locks_app.command("list")
def locks_list(ctx: typer.Context, json: JsonOpt = False) -> None:
    """Leases in the repository; expired ones are taken over automatically."""
    with with_repository(ctx) as repo:
        leases = list_leases(repo.store)
    if json:
        emit_json([lease.to_dict() for lease in leases])
        return
    table = Table("lease", "kind", "owner", "purpose", "since", "expires", "state")
    for lease in leases:
        table.add_row(lease.name, "exclusive" if lease.exclusive else "shared", lease.owner, lease.purpose,
                      fmt_time(lease.created), fmt_time(lease.expires), "expired" if lease.expired else "live")
    console.print(table)
