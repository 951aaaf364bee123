"""Redis / Valkey source: every key matching the configured patterns, as `redis-jsonl-v1`
records (see redis_records.py for the format), one snapshot item per pattern.

How a cut is read
- Items: one per configured pattern (settings.patterns, default ["*"]), named by the pattern,
  kind "keys". A key matching several patterns belongs to the first. `open(only=[...])`
  further restricts every item to keys matching one of the selectors (globs, or exact keys).
- Order: an item's key names are listed with SCAN MATCH (names only), de-duplicated and sorted
  by raw bytes (redis_keys.sorted_unique: in memory up to 1M names, ~100 bytes each, then
  sorted runs spilled to temp files), so records come in a deterministic order and unchanged
  keys dedup.
- Values: batches of BATCH_SIZE keys, two pipelined round trips per batch (redis_client.
  execute_many, which packs and parses RESP2 itself for speed): TYPE + expiry
  (PEXPIRETIME on Redis >= 7 / Valkey; on 6.2 PTTL bracketed by TIME, retried until both TIMEs
  fall in the same millisecond so the absolute expiry is exact), then the value by type (GET,
  LRANGE, HSCAN, SSCAN, ZRANGE WITHSCORES, XRANGE + XINFO). Lists, zsets and streams longer
  than PART_SIZE are fetched and emitted in PART_SIZE pieces (one record per piece); hashes
  and sets are scanned whole and sorted in memory (one key's fields at a time), then split.
- A key that vanishes between SCAN and fetch is skipped; one that changes type meanwhile is
  read again (twice at most). Keys of module types (ReJSON-RL, ...) are skipped, logged and
  counted in source_info["skipped_keys"].

Consistency: Redis has no snapshot isolation for a live SCAN. The cut is "keys as seen during
the scan window": cut_time is the server's TIME when the cut opened; source_info records
scan_started_at and scan_finished_at (updated as each item finishes). A key written during the
window may or may not be included, and a split collection may mix states of the window.
"""
from __future__ import annotations

import contextlib
import logging
from datetime import datetime, timezone
from typing import Iterable, Iterator

from backup.sources.base import ItemSpec
from backup.sources.redis_client import (ServerInfo, connect, execute_many, raise_first_error, redis_errors,
                                         server_info, server_time_ms)
from backup.sources.redis_keys import Scope
from backup.sources.redis_records import (FORMAT, PART_SIZE, TYPES, encode_record, enc, flat_to_dict,
                                          list_value, stream_entries, stream_groups, zset_value)
from snapshots.errors import SourceError
from snapshots.settings import RedisSource as RedisSourceSettings, redact_url
from snapshots.writer import SnapshotWriter

log = logging.getLogger("statevault.backup.redis")

BATCH_SIZE = 500
_TTL_GROUP = 100       # PTTLs bracketed by one pair of TIMEs on Redis 6.2
_TTL_ATTEMPTS = 5
_RETRIES = 2           # re-reads of a key whose type changed under us

Record = tuple[bytes, bytes]  # (record, canonical)


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat().replace("+00:00", "Z")


class KeyReader:
    """Turns sorted key names into records, a pipelined batch at a time.

    Shared by the source and by the Redis target's read-back, so both sides produce the same
    canonical records from the same data."""

    def __init__(self, client, info: ServerInfo, *, batch_size: int = BATCH_SIZE, part_size: int | None = None):
        self.client, self.info = client, info
        self.batch_size, self.part = batch_size, part_size or PART_SIZE
        self.skipped: dict[str, int] = {}

    def read(self, keys: Iterable[bytes]) -> Iterator[Record]:
        batch: list[bytes] = []
        for key in keys:
            batch.append(key)
            if len(batch) >= self.batch_size:
                yield from self._batch(batch)
                batch = []
        if batch:
            yield from self._batch(batch)

    # ---- round trip 1: types and absolute expiries -------------------------------------
    def _types_and_expiries(self, keys: list[bytes]) -> tuple[list[str], list[int | None]]:
        n = len(keys)
        commands = [("TYPE", key) for key in keys]
        if self.info.has_pexpiretime:
            commands += [("PEXPIRETIME", key) for key in keys]
            res = raise_first_error(execute_many(self.client, commands))
            return [t.decode() for t in res[:n]], [x if x >= 0 else None for x in res[n:]]
        groups = [keys[i:i + _TTL_GROUP] for i in range(0, n, _TTL_GROUP)]
        for group in groups:
            commands += self._pttl_commands(group)
        res = raise_first_error(execute_many(self.client, commands))
        types = [t.decode() for t in res[:n]]
        expiries: list[int | None] = []
        pos = n
        for group in groups:
            reply = res[pos:pos + len(group) + 2]
            pos += len(group) + 2
            expiries.extend(self._exact_expiries(group, reply))
        return types, expiries

    @staticmethod
    def _pttl_commands(group: list[bytes]) -> list[tuple]:
        return [("TIME",), *(("PTTL", key) for key in group), ("TIME",)]

    def _exact_expiries(self, group: list[bytes], reply: list) -> list[int | None]:
        """expiry = now + PTTL is exact only if `now` is the millisecond PTTL ran in: retry
        until the TIMEs before and after the group agree (else keep the last estimate)."""
        for attempt in range(_TTL_ATTEMPTS):
            before, after = reply[0], reply[-1]
            t0 = int(before[0]) * 1000 + int(before[1]) // 1000
            t1 = int(after[0]) * 1000 + int(after[1]) // 1000
            if t0 == t1 or attempt == _TTL_ATTEMPTS - 1:
                break
            reply = raise_first_error(execute_many(self.client, self._pttl_commands(group)))
        return [t0 + p if p >= 0 else None for p in reply[1:-1]]

    # ---- round trip 2: values ----------------------------------------------------------
    def _value_commands(self, key: bytes, kind: str) -> list[tuple]:
        n = self.part
        if kind == "string":
            return [("GET", key)]
        if kind == "list":
            return [("LRANGE", key, 0, n)]    # n + 1 elements: tells whether the key must be split
        if kind == "zset":
            return [("ZRANGE", key, 0, n, "WITHSCORES")]
        if kind == "hash":
            return [("HSCAN", key, 0, "COUNT", n)]
        if kind == "set":
            return [("SSCAN", key, 0, "COUNT", n)]
        return [("XINFO", "STREAM", key), ("XINFO", "GROUPS", key), ("XRANGE", key, "-", "+", "COUNT", n + 1)]

    def _batch(self, keys: list[bytes], attempt: int = 0) -> Iterator[Record]:
        types, expiries = self._types_and_expiries(keys)
        commands: list[tuple] = []
        todo = []
        for key, kind, x in zip(keys, types, expiries):
            if kind == "none":
                continue  # vanished since SCAN
            if kind not in TYPES:
                self.skipped[kind] = self.skipped.get(kind, 0) + 1
                log.warning("skipping key %r of unsupported type %s", key, kind)
                continue
            fetch = self._value_commands(key, kind)
            commands += fetch
            todo.append((key, kind, x, len(fetch)))
        results = execute_many(self.client, commands)
        pos = 0
        for key, kind, x, n in todo:
            reply = results[pos:pos + n]
            pos += n
            errors = [r for r in reply if isinstance(r, Exception)]
            if errors:
                # WRONGTYPE / no such key: the key changed since TYPE; read it once more
                if attempt >= _RETRIES:
                    raise errors[0]
                yield from self._batch([key], attempt + 1)
                continue
            yield from self._records(key, kind, x, reply)

    def _records(self, key: bytes, kind: str, x: int | None, reply: list) -> Iterator[Record]:
        n = self.part
        if kind == "string":
            if reply[0] is not None:
                yield encode_record(key, kind, enc(reply[0]), x)
        elif kind == "list":
            yield from self._ranged(key, kind, x, reply[0], 1, lambda s, e: ("LRANGE", key, s, e), list_value)
        elif kind == "zset":
            yield from self._ranged(key, kind, x, reply[0], 2,
                                    lambda s, e: ("ZRANGE", key, s, e, "WITHSCORES"), zset_value)
        elif kind in ("hash", "set"):
            items = self._scan_all(key, kind, reply[0])
            if items:
                rows = sorted(items.items()) if kind == "hash" else sorted(items)
                enc_row = (lambda r: [enc(r[0]), enc(r[1])]) if kind == "hash" else enc
                parts = [rows[i:i + n] for i in range(0, len(rows), n)]
                for p, rows_p in enumerate(parts):
                    yield encode_record(key, kind, [enc_row(r) for r in rows_p], x, p if len(parts) > 1 else None)
        else:
            yield from self._stream(key, x, *reply)

    def _ranged(self, key, kind, x, first: list, width: int, command, value) -> Iterator[Record]:
        """A list or zset: by index/rank in pieces of `part` elements (`width` reply items each)."""
        n = self.part
        if not first:
            return
        if len(first) <= n * width:
            yield encode_record(key, kind, value(first), x)
            return
        yield encode_record(key, kind, value(first[:n * width]), x, 0)
        p = 1
        while True:
            piece = self.client.execute_command(*command(p * n, (p + 1) * n - 1))
            if not piece:
                return
            yield encode_record(key, kind, value(piece), x, p)
            if len(piece) < n * width:
                return
            p += 1

    def _scan_all(self, key: bytes, kind: str, first: list):
        cursor, flat = first
        if kind == "hash":
            items: dict | set = dict(zip(flat[::2], flat[1::2]))
        else:
            items = set(flat)
        command = "HSCAN" if kind == "hash" else "SSCAN"
        while cursor != b"0":
            cursor, flat = self.client.execute_command(command, key, cursor, "COUNT", self.part)
            if kind == "hash":
                items.update(zip(flat[::2], flat[1::2]))
            else:
                items.update(flat)
        return items

    def _stream(self, key: bytes, x: int | None, info: list, groups: list, entries: list) -> Iterator[Record]:
        n = self.part
        meta = {"last_id": flat_to_dict(info)["last-generated-id"].decode("ascii"), "groups": stream_groups(groups)}
        if len(entries) <= n:
            yield encode_record(key, "stream", {"entries": stream_entries(entries), **meta}, x)
            return
        entries = entries[:n]
        yield encode_record(key, "stream", {"entries": stream_entries(entries), **meta}, x, 0)
        p = 1
        while entries:
            last = entries[-1][0]
            entries = self.client.execute_command("XRANGE", key, b"(" + last, "+", "COUNT", n)
            if entries:
                yield encode_record(key, "stream", {"entries": stream_entries(entries)}, x, p)
            if len(entries) < n:
                return
            p += 1


def read_scope(client, info: ServerInfo, scope: Scope, reader: KeyReader | None = None) -> Iterator[Record]:
    """Every key of `scope` on the server, as (record, canonical), sorted by key."""
    reader = reader or KeyReader(client, info)
    yield from reader.read(scope.keys(client))


class RedisCut:
    def __init__(self, client, info: ServerInfo, url: str, patterns: list[str], only: list[str] | None,
                 now_ms: int):
        self.client, self.info, self._what = client, info, f"redis source {redact_url(url)}"
        self.patterns = list(dict.fromkeys(patterns))
        self.only = list(only) if only else None
        self.cut_ms = now_ms
        self.cut_time = datetime.fromtimestamp(now_ms / 1000, timezone.utc)
        self.reader = KeyReader(client, info)
        self.source_info = {
            **info.to_dict(),
            "consistency": "keys as seen during the scan window (no snapshot isolation)",
            "scan_started_at": _iso(now_ms),
            "scan_finished_at": None,
            "skipped_keys": {},
        }

    def items(self) -> list[ItemSpec]:
        return [ItemSpec(name=p, kind="keys", format=FORMAT,
                         schema={"pattern": p, "earlier_patterns": self.patterns[:i], "only": self.only,
                                 "cut_time_ms": self.cut_ms, "part_size": self.reader.part,
                                 "server": self.info.to_dict()})
                for i, p in enumerate(self.patterns)]

    def _stream(self, item: ItemSpec) -> Iterator[Record]:
        s = item.schema
        scope = Scope(s["pattern"], s["earlier_patterns"], s["only"])
        with redis_errors(f"{self._what}, item {item.name!r}"):
            yield from read_scope(self.client, self.info, scope, self.reader)
            self.source_info["scan_finished_at"] = _iso(server_time_ms(self.client))
        self.source_info["skipped_keys"] = dict(self.reader.skipped)

    def records(self, item: ItemSpec) -> Iterator[bytes]:
        for record, _ in self._stream(item):
            yield record

    def backup_item(self, item: ItemSpec, writer: SnapshotWriter) -> None:
        with writer.item(item.name, item.kind, item.format, item.schema) as w:
            add = w.add
            for record, canon in self._stream(item):
                add(record, canonical=canon)


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
            yield RedisCut(client, info, url, self.settings.patterns, only, now)
        finally:
            client.close()
