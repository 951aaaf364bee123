"""The `redis-jsonl-v3` record format: one Redis key per JSON line, portable across versions.

Records are NOT `DUMP` payloads: those carry an RDB version and do not restore into older
servers (a Redis 7 dump is refused by 6.2). Instead every key is written out as plain data
that plain commands (SET, RPUSH, HSET, SADD, ZADD, XADD, XGROUP, XCLAIM) recreate on
Redis >= 6.2 and Valkey.

A record is one line of UTF-8 JSON, terminated by "\\n", with the fields in exactly this order:

    {"k": KEY, "t": TYPE, ["p": PART,] "v": VALUE, "x": EXPIRY[, "fx": FIELD EXPIRIES | "sx": COUNTERS]}

- KEY and every element below are *binary-safe strings*: a JSON string when the bytes are
  valid UTF-8, else an object {"b64": "<standard base64 with padding>"}.
- TYPE is one of "string", "list", "hash", "set", "zset", "stream".
- EXPIRY is the key's absolute expiry as unix time in milliseconds (an integer), or null for a
  key without a TTL. Only "fx" or "sx" may follow it, and the remaining TTL at backup time is NOT
  stored (it changes with every backup and would defeat dedup); `--ttl reset` derives it as
  EXPIRY minus the snapshot's cut time.
- FIELD EXPIRIES (hash records only, and only when some of the record's fields have their own
  TTL: HEXPIRE on Valkey 9 / Redis 7.4+): [[field, expiry ms], ...] for those fields, in the
  record's field order, as absolute unix milliseconds like EXPIRY.
- COUNTERS (a stream's only record or part 0, from Redis 7+ / Valkey servers, which keep
  them): [entries-added, max-deleted-entry-id, [[group, entries-read or null], ...] sorted
  by group name]: what XINFO GROUPS computes a group's lag from. A 6.2 target has no such
  counters and ignores them.
- VALUE by type:
    string  the value (a binary-safe string)
    list    the elements, in list order
    hash    [[field, value], ...] sorted by the field's raw bytes
    set     [member, ...] sorted by raw bytes
    zset    [[member, score], ...] in Redis order (score, then member bytes); score is a JSON
            string: Python's repr of the double ("0.1", "1e+300", "inf", "-inf"), so it is exact
            and the same whatever text format the server used
    stream  {"entries": [[id, [field, value, field, value, ...]], ...] in id order,
             "last_id": the stream's last-generated-id,
             "groups": [[name, last-delivered-id, [consumer, ...]], ...] sorted by name, each
                       group's consumers sorted by raw bytes}
            then, when any group has pending entries, parts holding the pending entry lists:
            {"pending": [[group, id, consumer, deliveries], ...]} sorted by group, then id.
            A pending entry whose message is gone from the stream (XDEL, XTRIM) is left out:
            no command can recreate it, and Redis 7 drops such entries itself on XAUTOCLAIM.
            Not stored: a pending entry's idle time (it restarts at the restore: the entry
            looks freshly delivered, to the same consumer with the same delivery count) and a
            consumer's idle/seen time. The 7.0 counters a group's lag comes from are in "sx".
- Large collections are split so no record holds more than PART_SIZE elements (list
  elements, hash pairs, set members, zset pairs, stream entries, pending entries): a key with
  more than PART_SIZE elements becomes consecutive records with "p": 0, 1, 2, ... holding
  elements [p*PART_SIZE, (p+1)*PART_SIZE) of the order above; every part repeats "k", "t" and
  "x"; a stream's "last_id" and "groups" are only in part 0, its pending parts follow its
  entry parts, and a stream with pending entries always has parts. A key that fits in one
  record has no "p".
- Within an item, records are sorted by the key's raw bytes, then by part.

Earlier formats restore as before: `redis-jsonl-v2` is v3 without "fx" and "sx" (snapshots
taken before hash field TTLs and stream counters were kept: their fields were stored without expiry, and the snapshot's
source_info says how many keys had them); `redis-jsonl-v1` (before consumer state was kept)
is v2 without consumers (groups are [name, last-delivered-id]) and without pending parts, and
its verification reads the target back in v1 form.

Not kept: module types (skipped and counted by the source), the key's LRU/LFU data and
encoding.

The digest covers the *canonical* record: the record without its `,"x":...` field and what
follows (key and field TTLs: a TTL read back from a server cannot always be compared exactly,
and --ttl reset / none change them on purpose; stream counters: a 6.2 server has none).
`canonical()` cuts them off without parsing: "fx" and "sx" hold arrays, of numbers and
[string, number] pairs, where a `,"x":` cannot occur.

Example (a string with a TTL, a binary list, a zset):

    {"k":"history:u42","t":"string","v":"hello","x":1795696330104}
    {"k":{"b64":"/w=="},"t":"list","v":["a",{"b64":"gA=="}],"x":null}
    {"k":"rank","t":"zset","v":[["o","-inf"],["m","0.1"],["n","inf"]],"x":null}
"""
from __future__ import annotations

import base64
from typing import Any

import numpy as np
import orjson

FORMAT = "redis-jsonl-v3"
FORMAT_V2 = "redis-jsonl-v2"  # no field TTLs
FORMAT_V1 = "redis-jsonl-v1"  # no consumers, no pending parts
FORMATS = (FORMAT_V1, FORMAT_V2, FORMAT)
TYPES = ("string", "list", "hash", "set", "zset", "stream")
PART_SIZE = 10_000

_X = b',"x":'
_P = b',"p":'
_FX = b',"fx":'
_SX = b',"sx":'
_K_STR = b'{"k":"'
_K_B64 = b'{"k":{"b64":"'
_K_END = b'","t":"'


def enc(data: bytes) -> str | dict[str, str]:
    """A binary-safe string: the text when `data` is UTF-8, else {"b64": ...}."""
    try:
        return data.decode()
    except UnicodeDecodeError:
        return {"b64": base64.b64encode(data).decode("ascii")}


def dec(value: str | dict[str, str]) -> str | bytes:
    """The inverse of `enc`, in a form redis-py sends as the original bytes (str as UTF-8)."""
    if value.__class__ is str:
        return value
    return base64.b64decode(value["b64"])


def dec_bytes(value: str | dict[str, str]) -> bytes:
    if value.__class__ is str:
        return value.encode()
    return base64.b64decode(value["b64"])


def encode_record(key: bytes, kind: str, value: Any, expiry_ms: int | None, part: int | None = None,
                  field_expiries: list | None = None, counters: list | None = None) -> tuple[bytes, bytes]:
    """(record, canonical) for one key or one part of a split key; `field_expiries`: a hash
    record's [[field, ms], ...], `counters` a stream's (see the module docstring), None or
    empty for none."""
    if part is None:
        body = orjson.dumps({"k": enc(key), "t": kind, "v": value})
    else:
        body = orjson.dumps({"k": enc(key), "t": kind, "p": part, "v": value})
    tail = b',"x":null' if expiry_ms is None else b',"x":%d' % expiry_ms
    if field_expiries:
        tail += _FX + orjson.dumps(field_expiries)
    if counters:
        tail += _SX + orjson.dumps(counters)
    return body[:-1] + tail + b"}\n", body + b"\n"


def canonical(record: bytes) -> bytes:
    """The record without its expiry. "x" is the last field and its value is a number or
    null, so the last `,"x":` in the line is the top-level one (a nested object key "x" would
    come before it)."""
    i = record.rfind(_X)
    if i < 0:
        return record
    return record[:i] + b"}\n"


def record_expiry(record: bytes) -> int | None:
    """The record's "x" without parsing the value."""
    i = record.rfind(_X)
    if i < 0:
        return None
    i += len(_X)
    j = record.find(b",", i)  # "fx" follows
    raw = record[i:].rstrip(b"}\n \r") if j < 0 else record[i:j]
    return None if raw == b"null" else int(raw)


def _after_expiry(record: bytes, tag: bytes) -> list | None:
    """The value of the field `tag` (`,"fx":` or `,"sx":`) that follows "x", or None."""
    i = record.rfind(tag)
    if i < 0 or i < record.rfind(_X):
        return None
    return orjson.loads(record[i + len(tag):record.rindex(b"}")])


def stream_counters(record: bytes) -> list | None:
    """A stream record's "sx" ([entries-added, max-deleted-id, [[group, entries-read], ...]]),
    None without it."""
    return _after_expiry(record, _SX)


def field_expiries(record: bytes) -> list | None:
    """A hash record's "fx" ([[field, ms], ...], fields as in the record), None without it."""
    return _after_expiry(record, _FX)


def record_key(record: bytes) -> bytes:
    """The record's key as raw bytes, decoding only the key.

    In orjson's output a quote inside a string is always escaped, so the first `","t":"`
    after the opening `{"k":"` is where the key string ends.
    """
    if record.startswith(_K_STR):
        end = record.find(_K_END, len(_K_STR))
        if end > 0:
            raw = record[len(_K_STR):end]
            if b"\\" not in raw:
                return raw
            return orjson.loads(record[len(_K_STR) - 1:end + 1]).encode()
    elif record.startswith(_K_B64):
        end = record.find(b'"}', len(_K_B64))
        if end > 0:
            return base64.b64decode(record[len(_K_B64):end])
    return dec_bytes(orjson.loads(record)["k"])


def record_part(record: bytes) -> int | None:
    """The record's "p", None for a key in one record (the first `,"p":` is the top-level one:
    quotes inside strings are escaped)."""
    j = record.find(_P)
    if j < 0:
        return None
    j += len(_P)
    return int(record[j:record.find(b",", j)])


def record_head(record: bytes) -> tuple[bytes, str, int | None, int | None]:
    """(key, type, part or None, expiry) without parsing the value. The first `"t":"` is the
    top-level one: its middle quote follows a `t`, so it is not inside a string."""
    i = record.find(b'"t":"') + 5
    j = record.find(b'"', i)
    return record_key(record), record[i:j].decode(), record_part(record), record_expiry(record)


def display_key(key: bytes) -> str:
    """A key for reports and `record_key`: the text when UTF-8, else "b64:<base64>"."""
    try:
        return key.decode()
    except UnicodeDecodeError:
        return "b64:" + base64.b64encode(key).decode("ascii")


def decode_record(record: bytes) -> dict[str, Any]:
    return orjson.loads(record)


# ---- values: raw RESP2 replies (bytes) to the JSON values above --------------------------

# Each has a fast path for all-UTF-8 data (bytes.decode in a comprehension, no call to `enc`
# per element) and falls back to `enc` per element on the first undecodable one.

def json_bodies(raw: list[bytes]) -> list[bytes]:
    """orjson.dumps(r.decode()) without its quotes, for each r of a non-empty list (raises
    UnicodeDecodeError when one is not UTF-8).

    ASCII without control characters, the common case (JSON text, key names), is escaped as
    orjson escapes it (a backslash before each backslash and quote) on the whole list joined
    by NULs, then split at them: no str per value. Anything else goes through orjson."""
    blob = b"\x00".join(raw)
    if blob.isascii() and np.count_nonzero(np.frombuffer(blob, dtype=np.uint8) < 0x20) == len(raw) - 1:
        return blob.replace(b"\\", b"\\\\").replace(b'"', b'\\"').split(b"\x00")
    return json_strings([r.decode() for r in raw])


def json_strings(texts: list[str]) -> list[bytes]:
    """orjson.dumps(t) without its quotes, for each t of a non-empty list: one dumps of the
    whole list, cut at the '","' between elements. A quote inside a JSON string is always
    escaped ('\\"'), so a '","' whose quote follows a backslash may lie inside a string; when
    there is one, encode one by one instead. The separators are found with numpy among the
    quotes: bytes.split and `in` crawl through JSON values full of quotes (~1 GB/s)."""
    data = orjson.dumps(texts)
    if len(texts) == 1:
        return [data[2:-2]]
    arr = np.frombuffer(data, dtype=np.uint8)
    quotes = np.flatnonzero(arr[:-2] == 0x22)
    seps = quotes[(arr[quotes + 1] == 0x2C) & (arr[quotes + 2] == 0x22)]
    if len(seps) == len(texts) - 1 and not (arr[seps - 1] == 0x5C).any():
        cuts = seps.tolist()
        return [data[a:b] for a, b in zip([2, *(c + 3 for c in cuts)], [*cuts, len(data) - 2])]
    dumps = orjson.dumps
    return [dumps(t)[1:-1] for t in texts]


def list_value(items: list[bytes]) -> list:
    try:
        return [e.decode() for e in items]
    except UnicodeDecodeError:
        return [enc(e) for e in items]


def pairs_value(rows: list[tuple[bytes, bytes]]) -> list:
    """[(field, value), ...] to [[field, value], ...] (hash rows, already sorted)."""
    try:
        return [[f.decode(), v.decode()] for f, v in rows]
    except UnicodeDecodeError:
        return [[enc(f), enc(v)] for f, v in rows]


def sorted_pairs_value(pairs: dict[bytes, bytes]) -> list:
    return pairs_value(sorted(pairs.items()))


def field_expiry_pairs(rows: list[tuple[bytes, bytes]], times: list[int]) -> list | None:
    """A hash record's "fx": [[field, ms], ...] of its rows whose field has an expiry (ms >= 0),
    None when none has."""
    fx = [[enc(f), t] for (f, _), t in zip(rows, times) if t >= 0]
    return fx or None


def set_value(members) -> list:
    return list_value(sorted(members))


def zset_value(flat: list[bytes]) -> list:
    """ZRANGE ... WITHSCORES (member, score, member, score, ...) to [[member, score], ...].

    The score goes through float() and repr(): exact, and independent of whether the server
    printed "0.10000000000000001" (%.17g, Redis <= 7.0) or "0.1" (shortest, later servers).
    """
    try:
        return [[m.decode(), repr(float(s))] for m, s in zip(flat[::2], flat[1::2])]
    except UnicodeDecodeError:
        return [[enc(m), repr(float(s))] for m, s in zip(flat[::2], flat[1::2])]


def stream_entries(entries: list) -> list:
    return [[eid.decode("ascii"), [enc(f) for f in fields]] for eid, fields in entries]


def flat_to_dict(flat: list) -> dict:
    """XINFO-style [name, value, name, value, ...] to a dict with str names."""
    return {flat[i].decode() if isinstance(flat[i], bytes) else flat[i]: flat[i + 1]
            for i in range(0, len(flat) - 1, 2)}


def stream_groups(raw_groups: list, consumers: dict[bytes, list[bytes]] | None = None) -> list:
    """XINFO GROUPS to the record's groups, sorted by name; with `consumers` (name -> the
    group's consumer names) in the v2 form, else in the v1 form."""
    groups = []
    for g in raw_groups:
        d = flat_to_dict(g)
        groups.append((d["name"], d["last-delivered-id"]))
    if consumers is None:
        return [[enc(name), last.decode("ascii")] for name, last in sorted(groups)]
    return [[enc(name), last.decode("ascii"), [enc(c) for c in sorted(consumers.get(name, ()))]]
            for name, last in sorted(groups)]


def counters_value(info: list, raw_groups: list) -> list | None:
    """XINFO STREAM and XINFO GROUPS to a stream record's "sx"; None from a server that does
    not keep the counters (6.2)."""
    d = flat_to_dict(info)
    if "entries-added" not in d:
        return None
    reads = sorted((g["name"], g.get("entries-read")) for g in map(flat_to_dict, raw_groups))
    return [int(d["entries-added"]), d["max-deleted-entry-id"].decode("ascii"), [[enc(n), r] for n, r in reads]]


def pending_value(rows: list[tuple[bytes, bytes, bytes, int]]) -> dict:
    """(group, id, consumer, deliveries) rows, in order, to a pending part's value."""
    return {"pending": [[enc(g), i.decode("ascii"), enc(c), int(n)] for g, i, c, n in rows]}
