"""A repository on a local (or mounted) directory: file:///path.

Writes are temp file + fsync + rename (+ fsync of the directory), so a crash leaves either
the old object or the new one, never a torn one. Conditional create uses link(2), which fails
atomically when the name exists.
"""
from __future__ import annotations

import os
import stat
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator
from urllib.parse import unquote, urlsplit

from snapshots.durable import fsync_dir
from snapshots.errors import NotFoundError, translate_store_error
from snapshots.stores.base import ObjectInfo, check_key

_TMP_SUFFIX = ".sv-tmp"


class LocalStore:
    def __init__(self, root: Path):
        self.root = root
        self.url = "file://" + str(root)

    @classmethod
    def from_url(cls, url: str) -> "LocalStore":
        parts = urlsplit(url)
        # file:///abs/path, and file://./relative for the embedded default
        raw = unquote(parts.netloc + parts.path) if parts.netloc in ("", ".", "..") else unquote(parts.path)
        return cls(Path(raw).expanduser().absolute())

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _write_tmp(self, path: Path, data: bytes) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}{_TMP_SUFFIX}")
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        return tmp

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        try:
            tmp = self._write_tmp(path, data)
            os.replace(tmp, path)
            fsync_dir(path.parent)
        except OSError as exc:
            raise translate_store_error(exc, f"write {key}") from exc

    def create(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        try:
            tmp = self._write_tmp(path, data)
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
            fsync_dir(path.parent)
            return True
        except OSError as exc:
            raise translate_store_error(exc, f"create {key}") from exc

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise NotFoundError(f"{key}: not in repository {self.url}") from None
        except OSError as exc:
            raise translate_store_error(exc, f"read {key}") from exc

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def stat(self, key: str) -> ObjectInfo:
        path = self._path(key)
        try:
            st = path.stat()
        except FileNotFoundError:
            raise NotFoundError(f"{key}: not in repository {self.url}") from None
        except OSError as exc:
            raise translate_store_error(exc, f"stat {key}") from exc
        if not stat.S_ISREG(st.st_mode):  # a directory level is not an object (as on S3)
            raise NotFoundError(f"{key}: not in repository {self.url}")
        return ObjectInfo(key, st.st_size, datetime.fromtimestamp(st.st_mtime, timezone.utc))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        # the same key rules as every other operation: a prefix never walks outside the root
        base = self.root / check_key(prefix.rstrip("/")) if prefix else self.root
        if not base.exists():
            return
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                if name.endswith(_TMP_SUFFIX):
                    continue  # an interrupted write: invisible, removed by prune
                full = Path(dirpath) / name
                try:
                    st = full.stat()
                except FileNotFoundError:
                    continue  # deleted while listing
                key = full.relative_to(self.root).as_posix()
                yield ObjectInfo(key, st.st_size, datetime.fromtimestamp(st.st_mtime, timezone.utc))

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink(missing_ok=True)
        except OSError as exc:
            raise translate_store_error(exc, f"delete {key}") from exc

    def stale_temp_files(self) -> Iterator[Path]:
        """Temp files left by writers that were killed; prune removes the old ones."""
        if self.root.exists():
            yield from self.root.rglob(f"*{_TMP_SUFFIX}")
