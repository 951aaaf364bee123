"""Running the real `statevault` entry point inside the test process (fast; e2e tests that need a
separate process use subprocess instead)."""
from __future__ import annotations

import cli.app as cli_app
import cli.context


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `statevault ARGS`, exactly as main() exits."""
    cli.context._emitted[0] = False
    capsys.readouterr()
    try:
        cli_app.main(list(args))
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err
