"""Reading keys into `redis-jsonl-v2` records (redis_records.py), a pipelined batch at a time
(`group_state=False`: v1 streams, to verify a v1 snapshot).

Shared by the Redis source and the Redis target's read-back, so both sides produce the same
canonical records from the same data.

Per batch of BATCH_SIZE sorted key names, two requests on one connection (ReplyPipe):
1. TYPE of every key, then its absolute expiry: PEXPIRETIME on Redis >= 7 / Valkey; on 6.2
   PTTL bracketed by TIME, re-asked until both TIMEs fall in the same millisecond so
   TIME + PTTL is exact;
2. the values, in segments of at most _COLLECTIONS_PER_TRIP collections: every string of the
   segment by one MGET, each collection by its own commands (LRANGE, HSCAN, SSCAN,
   ZRANGE WITHSCORES, XINFO + XRANGE). Lists, zsets and streams longer than PART_SIZE are
   fetched and emitted in PART_SIZE pieces; hashes and sets are scanned whole and sorted in
   memory (one key's fields at a time), then split.
Requests go out one step ahead: while a segment's records are encoded, the server already
computes the next batch's types and the next segment's values.

A key that vanishes between SCAN and fetch is skipped; one that changes type meanwhile is read
again (twice at most; MGET answers nil for both, so a nil string is re-read). Keys of module
types (ReJSON-RL, ...) are skipped, logged and counted in `skipped`.

Commands are packed here from each key's RESP bulk string (`$len\\r\\nkey\\r\\n`, built once
per key) and fixed per-command prefixes: joining those is C work, where a generic packer
spends a Python loop per argument.
"""
from __future__ import annotations

import logging
from itertools import islice
from typing import Iterable, Iterator, NamedTuple

import orjson

from backup.sources.redis_client import (ServerInfo, ReplyPipe, _pack, bulk, execute_many, execute_packed,
                                         raise_first_error)
from backup.sources.redis_records import (PART_SIZE, TYPES, counters_value, encode_record, enc, field_expiry_pairs,
                                          flat_to_dict, json_bodies, list_value, pairs_value, pending_value,
                                          stream_entries, stream_groups, zset_value)
from snapshots.codec import batched

log = logging.getLogger("statevault.backup.redis")

# keys per TYPE/expiry request. Small enough that a request (~80 bytes a key) fits in the
# socket buffers: a bigger one blocks the sender while the server parses it (it reads a
# client ~16 KB per event-loop turn), which stalls the pipeline; and a batch's values
# (~1 KB a key) are parsed and encoded while still in the CPU's cache. Backup of 200k keys,
# medians of A/Bs in one process: 2000 keys 1.79 s, 700 1.62 s, 500 1.58-1.61 s, 200-350
# 1.55 s; with today's pipeline, eight alternating rounds twice: 150 1.47 s, 250 1.33 / 1.41 s,
# 350 1.35 s, 500 1.41 / 1.55 s. Over a network, the encoding of one batch (~1.2 ms of CPU
# for 250 keys here) is what hides the round trip of the next one's request.
BATCH_SIZE = 250
_COLLECTIONS_PER_TRIP = 500  # collections per value request (each up to PART_SIZE elements)
_TTL_GROUP = 100             # PTTLs bracketed by one pair of TIMEs on Redis 6.2
_TTL_ATTEMPTS = 5
_RETRIES = 2                 # re-reads of a key whose type changed under us

Record = tuple[bytes, bytes]  # (record, canonical)


class RecordBlock(NamedTuple):
    """The records of one value request, in key order, with their canonical forms."""
    records: list[bytes]
    canonicals: list[bytes]

_TYPE = b"*2\r\n$4\r\nTYPE\r\n"
_PEXPIRETIME = b"*2\r\n$11\r\nPEXPIRETIME\r\n"
_PTTL = b"*2\r\n$4\r\nPTTL\r\n"
_TIME = b"*1\r\n$4\r\nTIME\r\n"
_STRING = b"string"
_COLLECTIONS = frozenset(t.encode() for t in TYPES if t != "string")
_NULL_TAIL = b',"x":null}\n'


def _bulks(keys: list[bytes]) -> list[bytes]:
    """Each key's RESP bulk string."""
    return [b"$%d\r\n%b\r\n" % (len(k), k) for k in keys]


class Segment(NamedTuple):
    keys: list[bytes]
    kinds: list[bytes]
    expiries: list[int | None]
    payload: bytes
    count: int                        # commands in payload
    plan: list[tuple[str, int]]       # (kind, commands) of each collection, in order


class KeyReader:
    """Turns sorted key names into records (see the module docstring)."""

    def __init__(self, client, info: ServerInfo, *, batch_size: int = BATCH_SIZE, part_size: int | None = None,
                 group_state: bool = True, field_ttls: bool = False):
        self.client, self.info = client, info
        self.batch_size, self.part = batch_size, part_size or PART_SIZE
        self.group_state = group_state  # False: redis-jsonl-v1 streams (no consumers, no pending parts)
        # True: hash records carry their fields' own TTLs ("fx"), one HPEXPIRETIME per hash (only
        # asked for when the server has such fields: the digest never covers them)
        self.field_ttls = field_ttls
        self.keys_with_field_ttls = 0
        self.streams_with_counters = 0
        self._field_expiry: dict[bytes, dict[bytes, int]] = {}  # a segment's hashes read whole: field -> ms
        self.skipped: dict[str, int] = {}
        self.dropped_pending = 0  # pending entries of messages gone from their stream
        n = self.part
        # (prefix, suffix) around a collection key's bulk string: its one fetch command
        self._fetch = {
            b"list": (b"*4\r\n" + bulk("LRANGE"), bulk(0) + bulk(n)),
            b"zset": (b"*5\r\n" + bulk("ZRANGE"), bulk(0) + bulk(n) + bulk("WITHSCORES")),
            b"hash": (b"*5\r\n" + bulk("HSCAN"), bulk(0) + bulk("COUNT") + bulk(n)),
            b"set": (b"*5\r\n" + bulk("SSCAN"), bulk(0) + bulk("COUNT") + bulk(n)),
        }

    def read(self, keys: Iterable[bytes]) -> Iterator[Record]:
        """Records of `keys` (sorted, unique), in order."""
        for block in self.read_blocks(keys):
            yield from zip(block.records, block.canonicals)

    def read_blocks(self, keys: Iterable[bytes]) -> Iterator[RecordBlock]:
        """`read` a value request's records at a time (no Python call per record).

        On the wire, a batch's value requests go before the next batch's types request, so
        the many small types replies reach hiredis after the big values reply, not in front
        of it: hiredis moves the unread rest of its buffer down each time it has consumed
        1 KB, and a batch's values (~0.5 MB for 500 keys of 1 KB) waiting behind the next
        thousand small replies made that ~10 moves of ~0.5 MB per batch (perf: 6% of the
        backup's CPU in `sdsrange`; the read loop's CPU medians 1.00 -> 0.90 s per 200k keys,
        then ~0.76 s with hiredis fed 64 KB at a time: redis_client._HiredisReplies)."""
        it = iter(keys)
        batch = list(islice(it, self.batch_size))
        if not batch:
            return
        with ReplyPipe(self.client) as pipe:
            bulks = _bulks(batch)
            types = pipe.send(*self._types_request(batch, bulks))
            previous = None  # (segment, ticket): values asked for, records not encoded yet
            while batch:
                kinds, expiries = self._types_reply(batch, bulks, pipe.recv(types))
                following = list(islice(it, self.batch_size))
                sent = [(segment, pipe.send(segment.payload, segment.count))
                        for segment in self._segments(batch, bulks, kinds, expiries)]
                if following:  # asked after the values: see the docstring
                    next_bulks = _bulks(following)
                    types = pipe.send(*self._types_request(following, next_bulks))
                for segment, ticket in sent:
                    if previous is not None:
                        yield self._emit_block(previous[0], pipe.recv(previous[1]))
                    previous = segment, ticket
                if following:
                    batch, bulks = following, next_bulks
                else:
                    batch = following
            if previous is not None:
                yield self._emit_block(previous[0], pipe.recv(previous[1]))

    def _reread(self, keys: list[bytes], attempt: int) -> Iterator[Record]:
        """`keys` read again, synchronously (a key that changed type or vanished under us)."""
        bulks = _bulks(keys)
        res = execute_packed(self.client, *self._types_request(keys, bulks))
        kinds, expiries = self._types_reply(keys, bulks, res)
        for segment in self._segments(keys, bulks, kinds, expiries):
            yield from self._emit(segment, execute_packed(self.client, segment.payload, segment.count), attempt)

    # ---- request 1: types and absolute expiries ----------------------------------------
    def _types_request(self, keys: list[bytes], bulks: list[bytes]) -> tuple[bytes, int]:
        """TYPE of every key, then PEXPIRETIME of every key (Redis >= 7, Valkey), or groups
        of TIME, PTTL..., TIME (6.2); as (payload, number of commands)."""
        n = len(keys)
        payload = _TYPE + _TYPE.join(bulks)
        if self.info.has_pexpiretime:
            return payload + _PEXPIRETIME + _PEXPIRETIME.join(bulks), 2 * n
        groups = [bulks[i:i + _TTL_GROUP] for i in range(0, n, _TTL_GROUP)]
        return b"".join([payload, *map(_pttl_payload, groups)]), n + sum(len(g) + 2 for g in groups)

    def _types_reply(self, keys: list[bytes], bulks: list[bytes], res: list) -> tuple[list[bytes], list[int | None]]:
        n = len(keys)
        raise_first_error(res)
        if self.info.has_pexpiretime:
            return res[:n], [x if x >= 0 else None for x in res[n:]]
        expiries: list[int | None] = []
        pos = n
        for i in range(0, n, _TTL_GROUP):
            group = bulks[i:i + _TTL_GROUP]
            reply = res[pos:pos + len(group) + 2]
            pos += len(group) + 2
            expiries.extend(self._exact_expiries(group, reply))
        return res[:n], expiries

    def _exact_expiries(self, group: list[bytes], reply: list) -> list[int | None]:
        """expiry = now + PTTL is exact only if `now` is the millisecond PTTL ran in: retry
        until the TIMEs before and after the group agree (else keep the last estimate). From
        the second retry on, the group is asked in halves: a smaller group spans a millisecond
        boundary less often, which matters on a busy host (a 100-key group failing five times
        in a row made unchanged keys look changed)."""
        for attempt in range(_TTL_ATTEMPTS):
            before, after = reply[0], reply[-1]
            t0 = int(before[0]) * 1000 + int(before[1]) // 1000
            t1 = int(after[0]) * 1000 + int(after[1]) // 1000
            if t0 == t1 or attempt == _TTL_ATTEMPTS - 1:
                break
            if attempt >= 1 and len(group) > 1:
                half = len(group) // 2
                return [x for part in (group[:half], group[half:])
                        for x in self._exact_expiries(part, self._pttl_group(part))]
            reply = self._pttl_group(group)
        return [t0 + p if p >= 0 else None for p in reply[1:-1]]

    def _pttl_group(self, group: list[bytes]) -> list:
        return raise_first_error(execute_packed(self.client, _pttl_payload(group), len(group) + 2))

    # ---- request 2: values -------------------------------------------------------------
    def _segments(self, keys: list[bytes], bulks: list[bytes], kinds: list[bytes],
                  expiries: list[int | None]) -> list[Segment]:
        """The value requests of a batch: runs of keys with at most _COLLECTIONS_PER_TRIP
        collections (bounds the memory of one request's replies)."""
        out = []
        start, collections = 0, 0
        for i, kind in enumerate(kinds):
            if kind in _COLLECTIONS:
                collections += 1
                if collections > _COLLECTIONS_PER_TRIP:
                    out.append(self._segment(keys[start:i], bulks[start:i], kinds[start:i], expiries[start:i]))
                    start, collections = i, 1
        out.append(self._segment(keys[start:], bulks[start:], kinds[start:], expiries[start:]))
        return out

    def _segment(self, keys: list[bytes], bulks: list[bytes], kinds: list[bytes],
                 expiries: list[int | None]) -> Segment:
        """Every string by one MGET (first), then each collection's commands."""
        strings = [b for b, t in zip(bulks, kinds) if t == _STRING]
        parts = [b"*%d\r\n$4\r\nMGET\r\n" % (len(strings) + 1), *strings] if strings else []
        plan: list[tuple[str, int]] = []
        count = 1 if strings else 0
        for key, key_bulk, kind in zip(keys, bulks, kinds):
            if kind in _COLLECTIONS:
                fetch = self._fetch.get(kind)
                if fetch is not None:
                    parts += (fetch[0], key_bulk, fetch[1])
                    n = 1
                else:  # stream
                    n = self.part
                    commands = [("XINFO", "STREAM", key), ("XINFO", "GROUPS", key),
                                ("XRANGE", key, "-", "+", "COUNT", n + 1)]
                    parts.append(_pack(commands))
                    n = len(commands)
                count += n
                plan.append((kind.decode(), n))
        return Segment(keys, kinds, expiries, b"".join(parts), count, plan)

    def _string_records(self, keys: list[bytes], values: list, expiries: list[int | None]) -> RecordBlock | None:
        """The records of a segment's strings, encoded together (the hot path: most keys of
        an agent's state are strings); None if a key or value is not UTF-8 or a value is nil.
        Same bytes as encode_record(key, "string", enc(value), x)."""
        if None in values:
            return None
        try:
            ks = json_bodies(keys)
            vs = json_bodies(values)
        except UnicodeDecodeError:
            return None
        # each line built by one formatting (not a body plus tails: 2 copies of ~1 KB less a key)
        return RecordBlock([b'{"k":"%b","t":"string","v":"%b","x":null}\n' % (k, v) if x is None else
                            b'{"k":"%b","t":"string","v":"%b","x":%d}\n' % (k, v, x)
                            for k, v, x in zip(ks, vs, expiries)],
                           [b'{"k":"%b","t":"string","v":"%b"}\n' % kv for kv in zip(ks, vs)])

    def _emit_block(self, segment: Segment, results: list) -> RecordBlock:
        """The records of one value request, as a block."""
        if not segment.plan and _STRING in segment.kinds and all(k == _STRING for k in segment.kinds):
            values = raise_first_error(results[:1])[0]
            fast = self._string_records(segment.keys, values, segment.expiries)
            if fast is not None:
                return fast
        pairs = list(self._emit(segment, results, 0))
        return RecordBlock([r for r, _ in pairs], [c for _, c in pairs])

    def _emit(self, segment: Segment, results: list, attempt: int) -> Iterator[Record]:
        """The records of one value request, in key order."""
        keys, kinds, expiries, _, _, plan = segment
        fast = None
        pos = 0
        if _STRING in kinds:
            pos = 1
            values = raise_first_error(results[:1])[0]
            block = self._string_records([k for k, t in zip(keys, kinds) if t == _STRING], values,
                                         [x for x, t in zip(expiries, kinds) if t == _STRING])
            fast = None if block is None else zip(*block)
            values = iter(values)
        steps = iter(plan)
        if self.field_ttls and plan:
            self._field_expiry = self._segment_field_expiries(segment, results, pos)
        dumps = orjson.dumps
        for key, kind, x in zip(keys, kinds, expiries):
            if kind == _STRING:
                if fast is not None:
                    yield next(fast)
                    continue
                value = next(values)
                if value is None:  # gone, or no longer a string (MGET says nil for both)
                    if attempt < _RETRIES:
                        yield from self._reread([key], attempt + 1)
                    continue
                body = b'{"k":%b,"t":"string","v":%b' % (dumps(enc(key)), dumps(enc(value)))
                yield (body + (_NULL_TAIL if x is None else b',"x":%d}\n' % x)), body + b"}\n"
            elif kind in _COLLECTIONS:
                kind_s, n = next(steps)
                reply = results[pos:pos + n]
                pos += n
                errors = [r for r in reply if isinstance(r, Exception)]
                if errors:
                    # WRONGTYPE / no such key: the key changed since TYPE; read it once more
                    if attempt >= _RETRIES:
                        raise errors[0]
                    yield from self._reread([key], attempt + 1)
                    continue
                yield from self._records(key, kind_s, x, reply)
            elif kind != b"none":  # b"none": vanished since SCAN
                name = kind.decode(errors="replace")
                self.skipped[name] = self.skipped.get(name, 0) + 1
                log.warning("skipping key %r of unsupported type %s", key, name)

    def _records(self, key: bytes, kind: str, x: int | None, reply: list) -> Iterator[Record]:
        n = self.part
        if kind == "list":
            yield from self._ranged(key, kind, x, reply[0], 1, lambda s, e: ("LRANGE", key, s, e), list_value)
        elif kind == "zset":
            yield from self._ranged(key, kind, x, reply[0], 2,
                                    lambda s, e: ("ZRANGE", key, s, e, "WITHSCORES"), zset_value)
        elif kind in ("hash", "set"):
            items = self._scan_all(key, kind, reply[0])
            if items:
                rows = sorted(items.items()) if kind == "hash" else sorted(items)
                expiries = None
                if kind == "hash" and self.field_ttls:
                    rows, expiries = self._with_field_expiries(key, rows)
                value = pairs_value if kind == "hash" else list_value
                parts = [rows[i:i + n] for i in range(0, len(rows), n)]
                for p, rows_p in enumerate(parts):
                    fx = None if expiries is None else field_expiry_pairs(rows_p, expiries[p * n:(p + 1) * n])
                    yield encode_record(key, kind, value(rows_p), x, p if len(parts) > 1 else None, fx)
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

    # ---- hash field TTLs (Valkey 9, Redis 7.4+) ------------------------------------------
    def _segment_field_expiries(self, segment: Segment, results: list, pos: int) -> dict[bytes, dict[bytes, int]]:
        """HPEXPIRETIME of every field of the segment's hashes that came whole in their first
        HSCAN page, in one request (a round trip per hash would dominate a remote backup)."""
        wanted: list[tuple[bytes, list[bytes]]] = []
        steps = iter(segment.plan)
        for key, kind in zip(segment.keys, segment.kinds):
            if kind not in _COLLECTIONS:
                continue
            kind_s, n = next(steps)
            reply = results[pos]
            pos += n
            if kind_s == "hash" and not isinstance(reply, Exception) and reply[0] == b"0" and reply[1]:
                wanted.append((key, reply[1][::2]))
        if not wanted:
            return {}
        commands = [("HPEXPIRETIME", key, "FIELDS", len(fields), *fields) for key, fields in wanted]
        replies = execute_many(self.client, commands)
        return {key: dict(zip(fields, times)) for (key, fields), times in zip(wanted, replies)
                if not isinstance(times, Exception)}

    def _with_field_expiries(self, key: bytes, rows: list[tuple[bytes, bytes]]) -> tuple[list, list[int]]:
        """(rows, each row's field expiry: ms, or -1 for none), without fields that are gone
        since HSCAN (expired or deleted meanwhile: HPEXPIRETIME says -2)."""
        known = self._field_expiry.pop(key, None)
        if known is not None and len(known) == len(rows):
            times = [known.get(f, -2) for f, _ in rows]
        else:  # scanned in several pages, or re-read: one request per PART_SIZE fields
            n = self.part
            replies = execute_many(self.client, [
                ("HPEXPIRETIME", key, "FIELDS", len(rows[i:i + n]), *(f for f, _ in rows[i:i + n]))
                for i in range(0, len(rows), n)])
            times = []
            for i, reply in zip(range(0, len(rows), n), replies):
                # an error (the key is no hash any more): the values read stand, without field TTLs
                times += [-1] * len(rows[i:i + n]) if isinstance(reply, Exception) else reply
        if -2 in times:
            kept = [(row, t) for row, t in zip(rows, times) if t != -2]
            rows, times = [r for r, _ in kept], [t for _, t in kept]
        if any(t >= 0 for t in times):
            self.keys_with_field_ttls += 1
        return rows, times

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
        consumers, pending, piece = None, iter(()), None
        if self.group_state:
            consumers = {}
            for g in groups:
                name = flat_to_dict(g)["name"]
                consumers[name] = [flat_to_dict(c)["name"] for c in
                                   self.client.execute_command("XINFO", "CONSUMERS", key, name)]
            # the first piece decides whether the stream has parts (pending entries of deleted
            # messages are left out, so XINFO's pending counts cannot)
            pending = batched(self._pending(key, sorted(consumers)), n)
            piece = next(pending, None)
        meta = {"last_id": flat_to_dict(info)["last-generated-id"].decode("ascii"),
                "groups": stream_groups(groups, consumers)}
        sx = counters_value(info, groups) if self.group_state else None
        self.streams_with_counters += sx is not None
        if len(entries) <= n and piece is None:
            yield encode_record(key, "stream", {"entries": stream_entries(entries), **meta}, x, counters=sx)
            return
        more, entries = len(entries) > n, entries[:n]
        yield encode_record(key, "stream", {"entries": stream_entries(entries), **meta}, x, 0, counters=sx)
        p = 1
        while more:
            entries = self.client.execute_command("XRANGE", key, b"(" + entries[-1][0], "+", "COUNT", n)
            if entries:
                yield encode_record(key, "stream", {"entries": stream_entries(entries)}, x, p)
                p += 1
            more = len(entries) == n
        while piece is not None:
            yield encode_record(key, "stream", pending_value(piece), x, p)
            p += 1
            piece = next(pending, None)

    def _pending(self, key: bytes, groups: list[bytes]) -> Iterator[tuple[bytes, bytes, bytes, int]]:
        """(group, id, consumer, deliveries) of every pending entry whose message still exists,
        by group then id: XPENDING a page at a time, each page's ids checked with XRANGE."""
        n = self.part
        for group in groups:
            start = b"-"
            while True:
                page = self.client.execute_command("XPENDING", key, group, start, "+", n)
                if not page:
                    break
                found = execute_many(self.client, [("XRANGE", key, row[0], row[0]) for row in page])
                for row, hit in zip(page, raise_first_error(found)):
                    if hit:
                        yield group, row[0], row[1], row[3]
                    else:
                        self.dropped_pending += 1
                if len(page) < n:
                    break
                start = b"(" + page[-1][0]


def _pttl_payload(bulks: list[bytes]) -> bytes:
    """TIME, PTTL of each key, TIME (Redis 6.2: see KeyReader._exact_expiries)."""
    return _TIME + _PTTL + _PTTL.join(bulks) + _TIME
