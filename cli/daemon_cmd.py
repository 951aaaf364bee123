"""`statevault daemon`: run the schedules unattended (backup/daemon.py does the work)."""
from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from cli.context import state
from snapshots.errors import UsageError
from snapshots.settings import Settings, load_settings


def register(app: typer.Typer) -> None:
    app.command()(daemon)


def _with_overrides(settings: Settings, metrics_port: int | None, metrics_host: str | None) -> Settings:
    update = {k: v for k, v in (("metrics_port", metrics_port), ("metrics_host", metrics_host)) if v is not None}
    if not update:
        return settings
    # validated like the file: a bad port is a usage error, not a crash at bind time
    daemon_section = type(settings.daemon).model_validate({**settings.daemon.model_dump(), **update})
    return settings.model_copy(update={"daemon": daemon_section})


def daemon(ctx: typer.Context,
           metrics_port: Annotated[Optional[int], typer.Option(
               "--metrics-port", min=0, max=65535, help="Port for /metrics and /healthz (default from config, 9108; "
                                                        "0 picks a free one, logged as metrics_listening).")] = None,
           metrics_host: Annotated[Optional[str], typer.Option(
               "--metrics-host", help="Address to bind the metrics endpoint (default from config, 127.0.0.1).")] = None,
           once: Annotated[bool, typer.Option(
               "--once", help="One scheduling pass: run what is due now (latest tick within the misfire grace, "
                              "not yet run by any daemon), then exit. Exit 1 if a job failed.")] = False,
           log_level: Annotated[str, typer.Option("--log-level", help="debug, info, warning or error.")] = "info") -> None:
    """Run backups, forget+prune, checks and drills on their schedules, with metrics and JSON logs.

    Signals: SIGTERM/SIGINT stop scheduling and let running jobs finish (up to
    daemon.shutdown_timeout_seconds), a second one aborts them; SIGHUP reloads the config file.
    """
    from backup.daemon import Daemon
    from backup.logging_json import configure_json_logging

    if log_level.lower() not in ("debug", "info", "warning", "error"):
        raise UsageError(f"--log-level {log_level!r}: use debug, info, warning or error")
    app_state = state(ctx)
    settings = _with_overrides(app_state.settings, metrics_port, metrics_host)
    configure_json_logging(log_level.upper())

    def reload_settings() -> Settings:
        return _with_overrides(load_settings(app_state.config), metrics_port, metrics_host)

    daemon_ = Daemon(settings, reload_settings=reload_settings)
    if once:
        outcomes = daemon_.run_once()
        if any(o.result == "failed" for o in outcomes):
            raise typer.Exit(1)
        return
    clean = daemon_.serve_forever()
    sys.stderr.flush()
    if not clean:
        raise typer.Exit(1)
