"""The object-store protocol every repository backend implements, and `open_store`.

Keys are relative, '/'-separated, and never contain '..' or start with '/': a store refuses
them (a tampered manifest naming `../../etc/passwd` is a ManifestError upstream, and a
UsageError here). Implementations translate their library's exceptions into ours.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Iterator, Protocol
from urllib.parse import urlsplit

from snapshots.errors import UsageError

_KEY = re.compile(r"^[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*$")


def check_key(key: str) -> str:
    if not _KEY.match(key) or any(part in (".", "..") for part in key.split("/")):
        raise UsageError(f"refusing object key {key!r}: not a plain relative path")
    return key


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    modified: datetime  # UTC


class ObjectStore(Protocol):
    """Seven operations over whole objects.

    - put: write (or overwrite) an object atomically: readers see the old or the new bytes.
    - create: write only if the key does not exist; returns False if it did (conditional create).
    - get: the object's bytes; NotFoundError if absent.
    - exists / stat: presence and metadata without reading.
    - list: every object under a prefix (recursively), in no promised order.
    - delete: remove; deleting an absent key is not an error.
    """

    url: str

    def put(self, key: str, data: bytes) -> None: ...
    def create(self, key: str, data: bytes) -> bool: ...
    def get(self, key: str) -> bytes: ...
    def exists(self, key: str) -> bool: ...
    def stat(self, key: str) -> ObjectInfo: ...
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]: ...
    def delete(self, key: str) -> None: ...


def open_store(url: str, *, endpoint_url: str | None = None, region: str | None = None) -> ObjectStore:
    """The store for a repository URL; backends are imported only when used."""
    scheme = urlsplit(url).scheme
    if scheme == "file":
        from snapshots.stores.local import LocalStore

        return LocalStore.from_url(url)
    if scheme == "s3":
        from snapshots.stores.s3 import S3Store

        return S3Store.from_url(url, endpoint_url=endpoint_url, region=region)
    raise UsageError(f"unsupported repository URL scheme {scheme!r}: use file:///path or s3://bucket/prefix")
