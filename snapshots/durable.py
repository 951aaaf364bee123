"""Durability on local disks: what "written" means for a file, said once.

A rename is only durable once the directory holding it is fsynced; every local writer
(the file store, the offline index writer and pull) goes through here.
"""
from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory's entries (after a rename or link into it)."""
    fd = os.open(Path(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_dir(tmp: Path, final: Path) -> None:
    """Move a fully written directory into place: readers see the old one or the new one.

    The old copy is renamed aside first (a directory cannot be replaced by rename), so a crash
    between the two renames leaves no directory at `final` — never a half-written one.
    """
    import shutil
    import uuid

    fsync_dir(tmp)
    old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:12]}")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)
