"""Redis / Valkey target: writes `redis-jsonl-v3` (and v2, v1) records back with plain commands.

No RESTORE/DUMP: values are recreated with SET, RPUSH, HSET, SADD, ZADD and XADD (explicit
ids, then XSETID, XGROUP CREATE and CREATECONSUMER, and XCLAIM ... FORCE for each pending
entry), so a snapshot of Redis 7 or Valkey 9 restores into 6.2.

Scope. Each snapshot item (a key pattern) covers, on the target, the keys matching its pattern
and no earlier item's pattern, restricted to `only` when given (and to the snapshot's own
`only` if it was a partial backup). `plan` checks that scope; `read_back` lists it.

Modes
- new: refused with TargetNotEmptyError when any key already exists in the scope (nothing is
  written). A full restore into an empty DB takes a DBSIZE == 0 fast path. Every key is
  recorded (spilled to temp files past a bound) before its commands go out; if the restore
  fails (a damaged chunk, a lost connection), `undo` UNLINKs exactly those keys.
- replace: every restored key is DEL'd and rewritten (one MULTI/EXEC per pipelined batch, so
  readers never see a key half written), then keys of the scope that are not in the snapshot are
  UNLINKed: afterwards the scope equals the snapshot, which is what verification checks. The
  orchestrator takes a pre-restore snapshot of `backup_selector` first.
- swap: UsageError. Redis cannot switch a keyspace atomically. `into` (key renaming) is not
  supported either; use --to with another DB index or server.

TTLs (`RestoreOptions.ttl`)
- keep: PEXPIREAT the absolute expiry. Keys expiring at or before plan.details
  ["expiry_cutoff_ms"] are NOT written: the cutoff is frozen in `plan` as the target's clock plus
  a margin (default 300 s + 0.2 ms per record of the item, or `expiry_margin_s`) meant to cover
  the pre-restore snapshot, the restore and the verification, so no restored key expires before
  it is verified. `written_filter(plan, options)` is that predicate on records: the orchestrator
  must build the expected count/digest from records passing plan.record_filter AND it.
  Skips are reported in details["expired"] (count) and details["expired_examples"].
- reset: PEXPIRE with the TTL the key had at the cut (expiry minus the snapshot's cut time).
  Nothing is skipped; a key whose TTL is shorter than restore + verification can expire before
  read-back and then shows as missing (diff labels it "expired").
- none: no expiry.
A string key is one command with its expiry folded in (SET ... PXAT / PX, Redis 6.2+), the
other types PEXPIREAT / PEXPIRE after their values. Hash fields with their own TTL (v3 "fx")
follow the same mode: restore/targets/redis_fields.py. Stream counters (v3 "sx") are restored
on Redis 7+ / Valkey (XSETID ... ENTRIESADDED, XGROUP CREATE ... ENTRIESREAD).

`verify_ttls` and `diff` (restore/targets/redis_verify.py) check expiries and classify
differences; the digest (canonical records, without "x") never covers TTLs.
"""
from __future__ import annotations

import orjson
from typing import Callable, Iterator

from backup.sources.redis import KeyReader, read_scope, recorded_scope
from backup.sources.redis_client import (ReplyPipe, _pack, bulk, connect, execute_many, raise_first_error, redis_errors,
                                         server_info, server_time_ms)
from backup.sources.redis_keys import KeyMatcher, NameSorter, Scope, selector_may_match, sorted_minus
from backup.sources.redis_records import (FORMAT_V1, FORMATS, PART_SIZE, canonical, dec, dec_bytes, display_key,
                                          record_expiry, record_key)
from restore.targets.base import ItemPlan, RestoreOptions
from restore.targets.redis_fields import ExpiredFieldCut, field_cut, field_ttl_commands
from snapshots.errors import IncompatibleTargetError, TargetNotEmptyError, UsageError
from snapshots.manifest import Item, Manifest
from snapshots.settings import redact_url

DEFAULT_MARGIN_S = 300.0
MARGIN_PER_RECORD_S = 0.0002
EXAMPLES = 10
_MAX_ARGS = 200_000          # flush a pipeline past this many elements, whatever the key count
_TMP_GROUP = b"__statevault_tmp__"
_MULTI, _EXEC = _pack([("MULTI",)]), _pack([("EXEC",)])
_PXAT, _PX = bulk("PXAT"), bulk("PX")


class KeyFilter:
    """`ItemPlan.record_filter` for `only`: decodes just the record's key and matches it."""

    def __init__(self, selectors: list[str]):
        self.selectors = list(selectors)
        self._match = KeyMatcher(selectors)

    def __call__(self, record: bytes) -> bool:
        return self._match(record_key(record))


class ExpiryFilter:
    """`written_filter` for --ttl keep: records whose key `restore` writes."""

    def __init__(self, cutoff_ms: int):
        self.cutoff_ms = cutoff_ms

    def __call__(self, record: bytes) -> bool:
        x = record_expiry(record)
        return x is None or x > self.cutoff_ms


class RedisTarget:
    kind = "redis"
    supports_swap = False

    def __init__(self, url: str, *, expiry_margin_s: float | None = None):
        self.url = url
        self.expiry_margin_s = expiry_margin_s
        self.what = f"redis target {redact_url(url)}"
        self._client = None
        self._info = None
        self._created: list[tuple[ItemPlan, NameSorter]] = []  # mode new: the keys each restore wrote

    def connection(self):
        """(client, ServerInfo), connecting on first use."""
        if self._client is None:
            client = connect(self.url)
            try:
                with redis_errors(self.what):
                    self._info = server_info(client, self.url)
            except BaseException:
                client.close()
                raise
            self._client = client
        return self._client, self._info

    def close(self) -> None:
        for _, keys in self._created:
            keys.close()
        self._created = []
        if self._client is not None:
            self._client.close()
            self._client = None

    # ---- plan ----------------------------------------------------------------------------
    def plan(self, manifest: Manifest, *, only: list[str], into: str | None, mode: str,
             ttl: str = "keep") -> list[ItemPlan]:
        if mode == "swap":
            raise UsageError("Redis has no atomic switch for a keyspace, so --mode swap is not supported",
                             hint="Use --mode replace: it first takes a pre-restore snapshot of the keys it "
                                  "overwrites, so the restore can be undone.")
        if into:
            raise UsageError("--into is not supported for Redis (keys are restored under their own names)",
                             hint="Restore into another DB index or server with --to redis://host:port/N.")
        for item in manifest.items:
            if item.format not in FORMATS:
                raise IncompatibleTargetError(f"item {item.name!r} has format {item.format!r}; the Redis "
                                              f"target restores {' and '.join(FORMATS)}")
        selectors = list(only or [])
        client, info = self.connection()
        field_ttls = int(manifest.source_info.get("hash_field_ttls") or 0)
        if field_ttls and ttl != "none" and not info.has_field_ttls:
            raise IncompatibleTargetError(
                f"snapshot {manifest.id} has {field_ttls} hash(es) whose fields have their own TTL, and "
                f"{self.what} ({info.flavour} {info.version}) cannot hold field TTLs; nothing was written",
                hint="Restore into Valkey >= 9 or Redis >= 7.4, or pass --ttl none to restore every key "
                     "and field without expiry.")
        plans: list[ItemPlan] = []
        with redis_errors(self.what):
            now = server_time_ms(client)
            empty = int(client.execute_command("DBSIZE")) == 0
            for index, item in enumerate(manifest.items):
                schema = item.schema
                pattern, earlier, within = recorded_scope(manifest.items, index)
                if selectors and not any(selector_may_match(s, pattern, earlier) for s in selectors):
                    continue  # every selected key belongs to another item
                scope = Scope(pattern, earlier, selectors or None, within=within)
                live, examples = 0, []
                if not empty:
                    for key in scope.keys(client):
                        live += 1
                        if len(examples) < EXAMPLES:
                            examples.append(display_key(key))
                margin = self.expiry_margin_s
                if margin is None:
                    margin = DEFAULT_MARGIN_S + item.records * MARGIN_PER_RECORD_S
                details = {
                    "pattern": pattern, "earlier_patterns": earlier, "only": selectors or None, "within": within,
                    "part_size": schema.get("part_size", PART_SIZE),
                    "cut_time_ms": schema.get("cut_time_ms", int(manifest.cut_time.timestamp() * 1000)),
                    "expiry_cutoff_ms": now + int(margin * 1000), "live_examples": examples,
                    "server": info.to_dict(), "field_ttls": field_ttls,
                    "stream_counters": int(manifest.source_info.get("stream_counters") or 0),
                }
                plans.append(ItemPlan(item=item, target=pattern, action="create" if mode == "new" else "replace",
                                      live_records=live, record_filter=KeyFilter(selectors) if selectors else None,
                                      backup_selector=selectors or within or [pattern], details=details))
        if mode == "new":
            busy = [p for p in plans if p.live_records]
            if busy:
                total = sum(p.live_records for p in busy)
                names = ", ".join(repr(n) for p in busy for n in p.details["live_examples"][:5])
                raise TargetNotEmptyError(
                    f"{total} key(s) the restore would cover already exist on {self.what} "
                    f"(items {', '.join(repr(p.target) for p in busy)}; e.g. {names}); nothing was written")
        return plans

    def written_filter(self, plan: ItemPlan, options: RestoreOptions) -> Callable[[bytes], bool] | None:
        """Which records `restore` writes, besides plan.record_filter; None: all of them."""
        if options.ttl != "keep":
            return None
        return ExpiryFilter(plan.details["expiry_cutoff_ms"])

    def written_records(self, plan: ItemPlan, options: RestoreOptions) -> ExpiredFieldCut | None:
        """A transform of the records `restore` is given and the digest covers (after
        plan.record_filter, before written_filter); None: none. --ttl keep drops the hash
        fields expiring before the cutoff (redis_fields.py), and notes how many in the plan."""
        return field_cut(plan, options.ttl, report=True)

    def scope(self, plan: ItemPlan) -> Scope:
        d = plan.details
        return Scope(d["pattern"], d["earlier_patterns"], d["only"], within=d["within"])

    # ---- restore -------------------------------------------------------------------------
    def restore(self, plan: ItemPlan, records: Iterator[bytes], options: RestoreOptions) -> None:
        """Write the records (already filtered by plan.record_filter), consuming all of them."""
        client, _ = self.connection()
        d = plan.details
        replace = plan.action == "replace"
        with redis_errors(f"{self.what}, item {plan.item.name!r}"):
            d["ttl_mode"] = options.ttl
            d["restore_started_ms"] = server_time_ms(client)
            # every key, recorded before its commands go out: replace deletes the scope's other
            # keys with it; new removes exactly these if the restore fails (undo)
            written = NameSorter()
            if not replace:
                self._created.append((plan, written))
            writer = _KeyWriter(client, transaction=replace, ttl=options.ttl, cutoff=d["expiry_cutoff_ms"],
                                cut_ms=d["cut_time_ms"], batch_size=max(1, options.batch_size),
                                on_key=written.add, counters=self.connection()[1].has_stream_counters)
            writer.run(records)
            d.update(written=writer.written, expired=writer.skipped, expired_examples=writer.skipped_examples)
            if replace:
                d["deleted_extra"] = self._delete_extras(client, plan, written)
            d["restore_finished_ms"] = server_time_ms(client)
        if writer.skipped:
            plan.notes.append(f"{writer.skipped} key(s) not restored: they expire before "
                              f"{d['expiry_cutoff_ms']} (ms) under --ttl keep")

    def _delete_extras(self, client, plan: ItemPlan, written: NameSorter) -> int:
        """UNLINK scope keys the snapshot does not hold (both name streams sorted)."""
        deleted = _unlink(client, sorted_minus(self.scope(plan).keys(client), written))
        if deleted:
            plan.notes.append(f"{deleted} key(s) in the scope but not in the snapshot were deleted")
        return deleted

    def undo(self, plans: list[ItemPlan]) -> str | None:
        """After a failed restore: UNLINK every key a mode-new restore of `plans` wrote (their
        scope was empty when planned), so the target is as the plan found it. Replaced keys
        cannot be undone here: their pre-restore snapshot holds them."""
        client, _ = self.connection()
        removed = 0
        with redis_errors(f"{self.what}, undo"):
            for plan, keys in self._created:
                if any(plan is p for p in plans):
                    removed += _unlink(client, keys)
        self._created = []
        return f"the {removed} key(s) it had written were removed" if removed else None

    # ---- verification --------------------------------------------------------------------
    def read_back(self, plan: ItemPlan, ordered: bool = True) -> Iterator[bytes]:
        # scroll / sorted key order costs nothing extra here: `ordered` changes nothing
        client, info = self.connection()
        reader = KeyReader(client, info, part_size=plan.details["part_size"],
                           group_state=plan.item.format != FORMAT_V1)
        with redis_errors(f"{self.what}, reading back {plan.item.name!r}"):
            for record, _ in read_scope(client, info, self.scope(plan), reader):
                yield record

    def canonical(self, item: Item, record: bytes) -> bytes:
        return canonical(record)

    def record_key(self, item: Item, record: bytes) -> str:
        """The key name: text when UTF-8, else "b64:<base64>" (JSON-safe, for reports)."""
        return display_key(record_key(record))

    def verify_ttls(self, plan: ItemPlan, records: Iterator[bytes], read=None, wrote=None) -> dict:
        from restore.targets.redis_verify import verify_ttls

        return verify_ttls(self, plan, records, read, wrote)

    def ttl_log(self):
        """An ExpiryLog, for the records a restore writes and for its read-back (verify_ttls)."""
        from restore.targets.redis_verify import ExpiryLog

        return ExpiryLog()

    def diff(self, plan: ItemPlan, records: Iterator[bytes]) -> dict:
        from restore.targets.redis_verify import diff

        return diff(self, plan, records)


class _KeyWriter:
    """Pipelines the commands recreating each record's key (a key's parts arrive in order)."""

    def __init__(self, client, *, transaction: bool, ttl: str, cutoff: int, cut_ms: int, batch_size: int,
                 on_key: Callable[[bytes], None] | None, counters: bool = False):
        self.client, self.transaction, self.ttl = client, transaction, ttl
        self.counters = counters  # the target keeps stream counters (Redis 7+, Valkey): restore "sx"
        self.cutoff, self.cut_ms, self.batch_size, self.on_key = cutoff, cut_ms, batch_size, on_key
        self.written = 0
        self.skipped = 0
        self.skipped_examples: list[str] = []

    def run(self, records: Iterator[bytes]) -> None:
        """Write every record's key, a batch a request, each request going out before the
        previous one's replies are read (the server runs a batch while the next is packed)."""
        with ReplyPipe(self.client) as pipe:
            self._pipe, self._waiting = pipe, None
            self._run(records)
            self._check()

    def _run(self, records: Iterator[bytes]) -> None:
        commands: list[bytes] = []  # packed
        packed = commands.append

        def cmd(args: tuple) -> None:
            packed(_pack((args,)))

        current, skip, stream_meta = None, False, None
        nrec = nargs = 0
        for record in records:
            r = orjson.loads(record)
            key, kind, v = dec_bytes(r["k"]), r["t"], r["v"]
            if key != current:
                if stream_meta is not None:
                    self._finish_stream(cmd, current, stream_meta)
                    stream_meta = None
                current, first = key, True
                x = r["x"]
                skip = self.ttl == "keep" and x is not None and x <= self.cutoff
                if skip:
                    self.skipped += 1
                    if len(self.skipped_examples) < EXAMPLES:
                        self.skipped_examples.append(display_key(key))
                    continue
                self.written += 1
                if self.on_key is not None:
                    self.on_key(key)
                if kind != "string":  # SET replaces a key of any type, and its expiry
                    cmd(("DEL", key))
            elif skip:
                continue
            else:
                first = False
            if kind == "string":
                # one command, the expiry folded in (SET ... PXAT: Redis 6.2+): the commonest
                # key costs the server a third of DEL + SET + PEXPIREAT
                packed(self._set(key, dec_bytes(v), r["x"]))
            elif kind == "list":
                cmd(("RPUSH", key, *[dec(e) for e in v]))
            elif kind == "hash":
                cmd(("HSET", key, *[dec(s) for pair in v for s in pair]))
                for c in field_ttl_commands(key, r.get("fx"), self.ttl, self.cut_ms):
                    cmd(c)
            elif kind == "set":
                cmd(("SADD", key, *[dec(m) for m in v]))
            elif kind == "zset":
                cmd(("ZADD", key, *[a for member, score in v for a in (score, dec(member))]))
            elif kind == "stream" and "pending" in v:
                # pending parts follow the entry parts: the groups must exist first
                if stream_meta is not None:
                    self._finish_stream(cmd, current, stream_meta)
                    stream_meta = None
                for group, eid, consumer, deliveries in v["pending"]:
                    # FORCE creates the PEL entry, JUSTID leaves the count at RETRYCOUNT
                    cmd(("XCLAIM", key, dec(group), dec(consumer), 0, eid, "RETRYCOUNT", deliveries, "FORCE",
                         "JUSTID"))
            elif kind == "stream":
                for eid, fields in v["entries"]:
                    cmd(("XADD", key, eid, *[dec(f) for f in fields]))
                if first:
                    if not v["entries"]:  # an empty stream still exists: create it through a group
                        cmd(("XGROUP", "CREATE", key, _TMP_GROUP, "0", "MKSTREAM"))
                        cmd(("XGROUP", "DESTROY", key, _TMP_GROUP))
                    stream_meta = (v["last_id"], v["groups"], r.get("sx") if self.counters else None)
            else:
                raise IncompatibleTargetError(f"record for key {display_key(key)!r} has unknown type {kind!r}")
            if first and kind != "string":
                x = r["x"]
                if x is not None and self.ttl == "keep":
                    cmd(("PEXPIREAT", key, x))
                elif x is not None and self.ttl == "reset":
                    cmd(("PEXPIRE", key, max(1, x - self.cut_ms)))
            nrec += 1
            if kind == "stream":
                nargs += len(v.get("entries") or v.get("pending") or ())
            else:  # a string is one value, not len(v) characters
                nargs += 1 if kind == "string" else len(v)
            if nrec >= self.batch_size or nargs >= _MAX_ARGS:
                self._execute(commands)
                nrec = nargs = 0
        if stream_meta is not None:
            self._finish_stream(cmd, current, stream_meta)
        self._execute(commands)

    def _set(self, key: bytes, value: bytes, x: int | None) -> bytes:
        """SET key value [PXAT x | PX ttl], packed (no per-argument loop)."""
        if x is None or self.ttl == "none":
            return b"*3\r\n$3\r\nSET\r\n" + bulk(key) + bulk(value)
        opt, n = (_PXAT, x) if self.ttl == "keep" else (_PX, max(1, x - self.cut_ms))
        return b"".join((b"*5\r\n$3\r\nSET\r\n", bulk(key), bulk(value), opt, bulk(n)))

    def _execute(self, commands: list[bytes]) -> None:
        if not commands:
            return
        count = len(commands)
        if self.transaction:  # MULTI/EXEC: no key seen half written
            commands.insert(0, _MULTI)
            commands.append(_EXEC)
            count += 2
        ticket = self._pipe.send(b"".join(commands), count)
        commands.clear()
        self._check()
        self._waiting = ticket

    def _check(self) -> None:
        """Read the request in flight's replies; raise its first error (EXEC's too)."""
        if self._waiting is not None:
            replies = raise_first_error(self._pipe.recv(self._waiting))
            self._waiting = None
            if self.transaction:
                raise_first_error(replies[-1])

    @staticmethod
    def _finish_stream(cmd, key: bytes, meta: tuple[str, list, list | None]) -> None:
        last_id, groups, counters = meta
        reads: dict = {}
        if counters:  # v3 "sx": entries-added, max-deleted-entry-id, each group's entries-read
            added, max_deleted, group_reads = counters
            cmd(("XSETID", key, last_id, "ENTRIESADDED", added, "MAXDELETEDID", max_deleted))
            reads = {orjson.dumps(name): n for name, n in group_reads if n is not None}
        else:
            cmd(("XSETID", key, last_id))
        for name, delivered, *consumers in groups:  # v1: [name, id]; v2: [name, id, [consumer, ...]]
            n = reads.get(orjson.dumps(name))
            cmd(("XGROUP", "CREATE", key, dec(name), delivered, *(() if n is None else ("ENTRIESREAD", n))))
            for consumer in (consumers[0] if consumers else ()):
                cmd(("XGROUP", "CREATECONSUMER", key, dec(name), dec(consumer)))


def _unlink(client, keys: Iterator[bytes] | NameSorter) -> int:
    """UNLINK `keys`, 1000 to a request; returns how many were asked for."""
    count = 0
    batch: list[tuple] = []
    for key in keys:
        batch.append(("UNLINK", key))
        count += 1
        if len(batch) >= 1000:
            raise_first_error(execute_many(client, batch))
            batch = []
    raise_first_error(execute_many(client, batch))
    return count
