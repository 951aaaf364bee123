"""`statevault drill` and `statevault drill history`."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from cli.context import console, emit_json, state, with_repository
from snapshots.errors import StatevaultError, VerificationError

app = typer.Typer(help="DR drills: restore into scratch targets, verify, measure RTO/RPO, report.",
                  invoke_without_command=True)


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="drill")


@app.callback()
def drill(ctx: typer.Context,
          source: Annotated[Optional[list[str]], typer.Option("--source", "-s", help="Sources (default all).")] = None,
          snapshot: Annotated[str, typer.Option("--snapshot", help="Snapshot id or `latest`.")] = "latest",
          report: Annotated[Path, typer.Option("--report", help="Directory for the Markdown/HTML report.")] = Path("drill-reports"),
          keep_scratch: Annotated[bool, typer.Option("--keep-scratch", help="Leave scratch targets for inspection.")] = False,
          json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Run a drill. Exit 0 pass, 3 a restore did not verify, 1 error."""
    if ctx.invoked_subcommand is not None:
        return
    from restore.drill import run_drill
    from restore.drill_render import to_html, to_markdown
    from snapshots.drill_reports import list_drill_reports

    settings = state(ctx).settings
    with with_repository(ctx) as repo:
        result = run_drill(repo, settings, source, snapshot=snapshot, keep_scratch=keep_scratch)
        history = list_drill_reports(repo)
    data = result.to_dict()
    report.mkdir(parents=True, exist_ok=True)
    md, page = report / f"drill-{result.id}.md", report / f"drill-{result.id}.html"
    md.write_text(to_markdown(data), encoding="utf-8")
    page.write_text(to_html(data, history), encoding="utf-8")
    if json:
        emit_json({**data, "report_files": [str(md), str(page)]})
    else:
        table = Table("source", "snapshot", "result", "RTO", "RPO", "records", "error", title=f"drill {result.id}")
        for s in result.sources:
            table.add_row(s.source, s.snapshot_id or "-", "[green]pass[/]" if s.ok else f"[red]{s.status}[/]",
                          "-" if s.rto_seconds is None else f"{s.rto_seconds:.1f}s",
                          "-" if s.rpo_seconds is None else f"{s.rpo_seconds:.0f}s", f"{s.records:,}", s.error or "")
        console.print(table)
        for s in result.sources:
            if s.scratch and not s.cleaned_up:
                console.print(f"scratch kept for {s.source}: {s.scratch} (remove it when done)")
        console.print(f"report: {md} and {page}")
    if result.status == "verification_failed":
        raise VerificationError(f"drill {result.id}: a restore did not verify", report=data)
    if not result.ok:
        raise StatevaultError(f"drill {result.id} failed: "
                              + "; ".join(f"{s.source}: {s.error}" for s in result.sources if not s.ok))


@app.command()
def history(ctx: typer.Context, json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Past drills, oldest first."""
    from snapshots.drill_reports import list_drill_reports

    with with_repository(ctx) as repo:
        reports = list_drill_reports(repo)
    if json:
        emit_json([{k: r.get(k) for k in ("id", "started_at", "status", "ok", "rto_seconds", "rpo_seconds")}
                   for r in reports])
        return
    table = Table("drill", "started", "result", "RTO", "worst RPO", "sources")
    for r in reports:
        table.add_row(r["id"], r["started_at"], r["status"], f"{r.get('rto_seconds', 0):.1f}s",
                      f"{r.get('rpo_seconds', 0):.0f}s", ", ".join(s["source"] for s in r.get("sources", [])))
    console.print(table)
