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
