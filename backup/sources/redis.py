"""Redis / Valkey source: every key matching the configured patterns, as `redis-jsonl-v3`
records (see redis_records.py for the format), one snapshot item per pattern.

How a cut is read
- Items: one per configured pattern (settings.patterns, default ["*"]), named by the pattern,
  kind "keys". A key matching several patterns belongs to the first. `open(only=[...])`
  further restricts every item to keys matching one of the selectors (globs, or exact keys).
- Order: an item's key names are listed with SCAN MATCH (names only), de-duplicated and sorted
  by raw bytes (redis_keys.sorted_unique: in memory up to 100k names, ~100 bytes each, then
  sorted runs spilled to temp files), so records come in a deterministic order and unchanged
  keys dedup.
- Values: redis_reader.KeyReader, BATCH_SIZE keys at a time, two pipelined requests per batch
  (TYPE + exact absolute expiry, then the values: one MGET for the batch's strings, commands
  per collection; huge collections in PART_SIZE pieces). A key that vanishes between SCAN and
  fetch is skipped; one that changes type meanwhile is read again (twice at most). Keys of
  module types (ReJSON-RL, ...) are skipped, logged and counted in
  source_info["skipped_keys"].

Consistency: Redis has no snapshot isolation for a live SCAN. The cut is "keys as seen during
the scan window": cut_time is the server's TIME when the cut opened; source_info records
scan_started_at and scan_finished_at (updated as each item finishes). A key written during the
window may or may not be included, and a split collection may mix states of the window.
"""
from __future__ import annotations

import contextlib
from datetime import datetime, timezone
from typing import Iterator

from backup.sources.base import ItemSpec
from backup.sources.redis_client import (ServerInfo, connect, keys_with_field_ttls, redis_errors, server_info,
                                         server_time_ms)
from backup.sources.redis_keys import Scope
from backup.sources.redis_reader import KeyReader, Record  # KeyReader: also the Redis target's
from backup.sources.redis_records import FORMAT, PART_SIZE
from snapshots.errors import SourceError
from snapshots.settings import RedisSource as RedisSourceSettings, redact_url
from snapshots.writer import SnapshotWriter

def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat().replace("+00:00", "Z")


def read_scope(client, info: ServerInfo, scope: Scope, reader: KeyReader | None = None) -> Iterator[Record]:
    """Every key of `scope` on the server, as (record, canonical), sorted by key."""
    reader = reader or KeyReader(client, info, part_size=PART_SIZE)
    yield from reader.read(scope.keys(client))


def recorded_scope(items: list, index: int) -> tuple[str, list[str], list[str] | None]:
    """(pattern, earlier items' patterns, `only` selectors) of a snapshot's `items[index]` as
    its schema records them (RedisCut.items), with the defaults older snapshots need: what a
    restore and a verify of that item read."""
    item = items[index]
    schema = item.schema or {}
    return (schema.get("pattern", item.name), schema.get("earlier_patterns", [i.name for i in items[:index]]),
            schema.get("only") or None)


class RedisCut:
    def __init__(self, client, info: ServerInfo, url: str, patterns: list[str], only: list[str] | None,
                 now_ms: int, field_ttls: int = 0):
        self.client, self.info, self._what = client, info, f"redis source {redact_url(url)}"
        self.patterns = list(dict.fromkeys(patterns))
        self.only = list(only) if only else None
        self.cut_ms = now_ms
        self.cut_time = datetime.fromtimestamp(now_ms / 1000, timezone.utc)
        # PART_SIZE looked up now: tests patch it. Field TTLs are asked for only when the server
        # says it holds some (INFO keyspace), so other servers pay nothing for them.
        self.reader = KeyReader(client, info, part_size=PART_SIZE, field_ttls=field_ttls > 0)
        self.source_info = {
            **info.to_dict(),
            "consistency": "keys as seen during the scan window (no snapshot isolation)",
            "scan_started_at": _iso(now_ms),
            "scan_finished_at": None,
            "skipped_keys": {},
        }
        if field_ttls:
            self.source_info["hash_field_ttls"] = 0  # keys whose records carry "fx", counted as read

    def items(self) -> list[ItemSpec]:
        return [ItemSpec(name=p, kind="keys", format=FORMAT,
                         schema={"pattern": p, "earlier_patterns": self.patterns[:i], "only": self.only,
                                 "cut_time_ms": self.cut_ms, "part_size": self.reader.part,
                                 "server": self.info.to_dict()})
                for i, p in enumerate(self.patterns)]

    def _stream(self, item: ItemSpec, blocks: bool = False) -> Iterator:
        """The item's records (Record), or blocks of them (RecordBlock)."""
        s = item.schema
        scope = Scope(s["pattern"], s["earlier_patterns"], s["only"])
        with redis_errors(f"{self._what}, item {item.name!r}"):
            keys = scope.keys(self.client)
            yield from (self.reader.read_blocks(keys) if blocks else self.reader.read(keys))
            self.source_info["scan_finished_at"] = _iso(server_time_ms(self.client))
        self.source_info["skipped_keys"] = dict(self.reader.skipped)
        if self.reader.field_ttls:
            self.source_info["hash_field_ttls"] = self.reader.keys_with_field_ttls
        if self.reader.streams_with_counters:  # verification looks their counters up
            self.source_info["stream_counters"] = self.reader.streams_with_counters
        if self.reader.dropped_pending:
            self.source_info["dropped_pending_entries"] = self.reader.dropped_pending

    def records(self, item: ItemSpec) -> Iterator[bytes]:
        for record, _ in self._stream(item):
            yield record

    def backup_item(self, item: ItemSpec, writer: SnapshotWriter) -> None:
        with writer.item(item.name, item.kind, item.format, item.schema) as w:
            for block in self._stream(item, blocks=True):
                w.add_many(block.records, block.canonicals)


class RedisSource:
    kind = "redis"

    def __init__(self, settings: RedisSourceSettings):
        self.settings = settings

    @contextlib.contextmanager
    def open(self, only: list[str] | None = None) -> Iterator[RedisCut]:
        """Open a cut on the server; SourceError(retryable=True) when it cannot be reached."""
        url = self.settings.url
        if not self.settings.patterns:
            raise SourceError("redis source has no patterns", hint="Set patterns (default [\"*\"]).")
        client = connect(url)
        try:
            with redis_errors(f"redis source {redact_url(url)}"):
                info = server_info(client, url)
                now = server_time_ms(client)
                field_ttls = keys_with_field_ttls(client, info.db)
            yield RedisCut(client, info, url, self.settings.patterns, only, now, field_ttls)
        finally:
            client.close()
