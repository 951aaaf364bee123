"""What every command needs: the settings (read once), the repository (opened and closed in
one place), and output (JSON for scripts, rich for people)."""
from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import orjson
import typer
from rich.console import Console

from snapshots.repository import Repository, open_repository
from snapshots.settings import Settings, load_settings

console = Console(stderr=False, highlight=False)
err_console = Console(stderr=True, highlight=False)


@dataclass
class AppState:
    config: str | None = None
    _settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings(self.config)
        return self._settings


def state(ctx: typer.Context) -> AppState:
    root = ctx.find_root()
    if root.obj is None:
        root.obj = AppState()
    return root.obj


@contextmanager
def with_repository(ctx: typer.Context, *, create: bool = False) -> Iterator[Repository]:
    """Open the configured repository for one command (borg's `with_repository`)."""
    repo = open_repository(state(ctx).settings.repository, create=create)
    yield repo


_emitted = [False]


def json_emitted() -> bool:
    """Whether this process already wrote its JSON document (errors then do not add another)."""
    return _emitted[0]


def emit_json(data: Any) -> None:
    _emitted[0] = True
    sys.stdout.buffer.write(orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS,
                                         default=str) + b"\n")
    sys.stdout.flush()


def human_bytes(n: int | float | None) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def fmt_time(t) -> str:
    return t.strftime("%Y-%m-%d %H:%M:%SZ") if t else "-"


@contextmanager
def stopped_by_signals(requested: threading.Event | None = None) -> Iterator[None]:
    """SIGTERM (systemd, Kubernetes, `timeout`) and Ctrl-C raise Aborted where the command is,
    so a restore undoes what it wrote and says so before the process exits (killed by the
    signal, it could not). The previous handlers come back afterwards.

    With `requested`, the first signal only sets that event, for a command that stops at its
    own next safe point (a backup: between blocks of records, before its manifest), and a
    second one raises Aborted at once."""
    from snapshots.errors import Aborted

    def stop(signum, frame) -> None:
        name = signal.Signals(signum).name
        if requested is not None and not requested.is_set():
            requested.set()
            err_console.print(f"{name}: stopping before the next commit (send it again to stop at once)")
            return
        raise Aborted(f"interrupted by {name}", hint="Run the command again when ready.")

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
