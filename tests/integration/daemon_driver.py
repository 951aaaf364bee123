"""A daemon process for the multi-process tests: the real `Daemon.serve_forever` (APScheduler,
signals, leases, metrics), with the backup made slow on purpose so a test can catch it mid-job.

    python -m tests.integration.daemon_driver CONFIG [--backup-delay S] [--progress-delay S]

--backup-delay   the job holds its claim and lease S seconds before the backup starts
                 (interrupted by the abort event, after which the backup aborts as usual)
--progress-delay sleep S seconds at each progress report of the backup (every 5000 records),
                 so a large source takes a while *inside* run_backup

JSON log lines go to stderr; exit code 0 after a clean shutdown, 1 if jobs were left running.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("--backup-delay", type=float, default=0.0)
    parser.add_argument("--progress-delay", type=float, default=0.0)
    args = parser.parse_args()

    from backup.daemon import Daemon
    from backup.job import run_backup
    from backup.logging_json import configure_json_logging
    from snapshots.settings import load_settings

    configure_json_logging("INFO")

    def slow_progress(source: str, item: str, records: int) -> None:
        time.sleep(args.progress_delay)

    def backup_fn(repo, settings, sources, **kw):
        if args.backup_delay:
            kw["abort"].wait(args.backup_delay)
        if args.progress_delay:
            kw["progress"] = slow_progress
        return run_backup(repo, settings, sources, **kw)

    settings = load_settings(args.config)
    daemon = Daemon(settings, reload_settings=lambda: load_settings(args.config), backup_fn=backup_fn,
                    owner=f"driver:{os.getpid()}")
    clean = daemon.serve_forever()
    sys.stderr.flush()
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
