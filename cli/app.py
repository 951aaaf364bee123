"""The `statevault` command: thin commands over backup/, restore/ and snapshots/.

Only this package exits. `main` runs the typer app and turns every StatevaultError into its
message, a hint and the documented exit code: 0 ok, 1 failed, 2 bad usage/config/input,
3 verification failed, 4 blocked by a lease.
"""
from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from rich.markup import escape

from cli import backup_cmd, retention_cmd, snapshots_cmd
from cli.context import AppState, emit_json, err_console, json_emitted
from snapshots.errors import StatevaultError

app = typer.Typer(name="statevault", no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Backup, export and verified recovery of AI agents' state "
                       "(Redis history, PostgreSQL memory, Qdrant knowledge).")


@app.callback()
def _root(ctx: typer.Context,
          config: Annotated[Optional[str], typer.Option("--config", "-c", envvar="STATEVAULT_CONFIG",
                                                        help="Config file (default ./statevault.toml).")] = None):
    ctx.obj = AppState(config=config)


backup_cmd.register(app)
app.add_typer(snapshots_cmd.app, name="snapshots")
app.add_typer(snapshots_cmd.locks_app, name="locks")
app.add_typer(retention_cmd.app, name="retention")
for _optional in ("offline_cmd", "daemon_cmd", "drill_cmd", "demo_cmd"):
    try:
        _mod = __import__(f"cli.{_optional}", fromlist=["register"])
    except ModuleNotFoundError as _exc:  # command groups land one issue at a time
        if _exc.name != f"cli.{_optional}":
            raise
    else:
        _mod.register(app)


def main(argv: list[str] | None = None) -> None:
    json_wanted = "--json" in (argv if argv is not None else sys.argv)
    try:
        if json_wanted:
            _run_for_json(argv)
        else:
            app(args=argv, standalone_mode=True)
    except StatevaultError as exc:
        if json_wanted and not json_emitted():
            emit_json(exc.to_dict())
        err_console.print(f"[bold red]error:[/] {escape(exc.message)}", markup=True, soft_wrap=True)
        if exc.hint:
            err_console.print(f"[yellow]hint:[/] {escape(exc.hint)}", markup=True, soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted; nothing was committed after the last completed step")
        sys.exit(1)


def _run_for_json(argv: list[str] | None) -> None:
    """The app with click's own handling of usage errors (a missing option, a bad value) off,
    so that with --json they too are one JSON document on stdout, as every other error is."""
    try:
        code = app(args=argv, standalone_mode=False)  # typer.Exit(n) comes back as n
    except typer.Abort:
        raise KeyboardInterrupt from None
    except typer.TyperException as exc:  # typer's click: a usage error (ClickException)
        code = getattr(exc, "exit_code", 2)
        emit_json({"error": "UsageError", "message": exc.format_message(), "hint": "See --help.",
                   "exit_code": code, "retryable": False})
        exc.show()
        sys.exit(code)
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
