"""Manifest and repository-config models: the repository's only metadata, stored as JSON.

A snapshot exists exactly when `snapshots/<id>.json` exists. Everything needed to restore
and verify an item without the live system is here: record count, digest, ordered chunks,
and the schema or collection config to recreate it (opaque to this package; each source
kind defines its own `schema` dict).
"""
from __future__ import annotations

import re
import secrets
from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from snapshots.errors import ManifestError

FORMAT_VERSION = 1
TOOL = "statevault 0.1.0"
_ID = re.compile(r"^[0-9]{8}T[0-9]{6}Z-[0-9a-f]{8}$")
_CHUNK = re.compile(r"^[0-9a-f]{64}$")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def new_snapshot_id(at: datetime | None = None) -> str:
    """Sortable by time: 20261126T030000Z-1a2b3c4d."""
    at = (at or utcnow()).astimezone(timezone.utc)
    return at.strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(4)


def is_snapshot_id(value: str) -> bool:
    return bool(_ID.match(value))


def snapshot_id_time(snapshot_id: str) -> datetime | None:
    """The time an id encodes (its writer's start, UTC, to the second), or None for a
    malformed id. Readable without the manifest: how an unreadable one is placed in time."""
    if not is_snapshot_id(snapshot_id):
        return None
    return datetime.strptime(snapshot_id[:16], "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ChunkRef(Model):
    id: str
    size: int          # uncompressed bytes
    stored: int        # compressed bytes as stored
    records: int

    @field_validator("id")
    @classmethod
    def _hex(cls, v: str) -> str:
        if not _CHUNK.match(v):
            raise ValueError(f"chunk id {v!r} is not a 64-hex-digit hash")
        return v


class Item(Model):
    """One table, collection, key pattern, or offline-index part of a snapshot."""

    name: str
    kind: str                      # "table" | "collection" | "keys" | "offline-vectors" | "offline-points"
    format: str                    # record format, documented in README ("Open format")
    records: int
    digest: str
    digest_algo: str = "xxh3-128-sum128"  # snapshots.codec.DIGEST_ALGO; older items say "blake3-sum128"
    bytes: int                     # uncompressed
    stored_bytes: int
    chunks: list[ChunkRef]
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @property
    def schema(self) -> dict[str, Any]:  # noqa: D401 - a plain accessor
        return self.schema_


class Manifest(Model):
    format_version: int = FORMAT_VERSION
    id: str
    source: str
    kind: str
    tool: str = TOOL
    started_at: datetime
    finished_at: datetime
    cut_time: datetime             # the consistent point in time the data is from
    tags: list[str] = Field(default_factory=list)
    backup_set: str | None = None  # links the snapshots of one `statevault backup` run
    items: list[Item]
    offline_index: list[Item] = Field(default_factory=list)
    source_info: dict[str, Any] = Field(default_factory=dict)  # server version etc., no secrets

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not _ID.match(v):
            raise ValueError(f"snapshot id {v!r} is malformed")
        return v

    @field_validator("format_version")
    @classmethod
    def _version(cls, v: int) -> int:
        if v > FORMAT_VERSION or v < 1:
            raise ValueError(f"manifest format version {v} is not supported (this statevault reads {FORMAT_VERSION})")
        return v

    def item(self, name: str) -> Item:
        for it in self.items:
            if it.name == name:
                return it
        from snapshots.errors import NotFoundError

        names = ", ".join(i.name for i in self.items) or "none"
        raise NotFoundError(f"snapshot {self.id} has no item {name!r} (items: {names})")

    @property
    def records(self) -> int:
        return sum(i.records for i in self.items)

    @property
    def bytes(self) -> int:
        return sum(i.bytes for i in self.items)

    @property
    def stored_bytes(self) -> int:
        return sum(i.stored_bytes for i in self.items + self.offline_index)

    def chunk_ids(self) -> set[str]:
        return {c.id for it in self.items + self.offline_index for c in it.chunks}

    def to_json(self) -> bytes:
        return self.model_dump_json(indent=1, by_alias=True).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> "Manifest":
        try:
            return cls.model_validate_json(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(str(x) for x in first["loc"])
            raise ManifestError(f"{where}: invalid manifest ({loc}: {first['msg']})") from None


class RepoConfig(Model):
    """`config.json`: written once at init; chunking and compression for every writer."""

    format_version: int = FORMAT_VERSION
    id: str
    created_at: datetime
    chunk_avg_size: int = 1 << 20
    chunk_min_size: int = 256 << 10
    chunk_max_size: int = 4 << 20
    compression: str = "zstd"
    hash: str = "blake3"
