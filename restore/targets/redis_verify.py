"""Checking a Redis restore beyond the digest: expiries, and a classified diff on failure.

Both take the snapshot's records for the plan (filtered by plan.record_filter, in snapshot
order) and return the same report shape:

    {"item": pattern, "ttl_mode": "keep", "checked": keys compared, "ok": keys that match,
     "skipped_expired": keys restore did not write (--ttl keep, expiry before the cutoff),
     "missing" | "expired" | "extra" | "type_differs" | "value_differs" | "ttl_differs":
         {"count": n, "examples": [{"key": name, "detail": text}, ...]},
     "passed": bool}

"expired" are snapshot keys absent from the target whose expiry has passed by now (the TTL
did its job); "missing" are absent keys that should still be there.

In a restore the check compares two ExpiryLogs: the expiries of the records the restore wrote
(filled on their way in) and of the verification's read-back (filled as it is digested). Once
the read-back's count and digest match, both are the same keys in the same order, and only
expiries can differ: a vectorised comparison replaces a second round of TYPE + PEXPIRETIME
lookups, which took two thirds of a 200k-key verification. When the logs disagree, and when
verify_ttls is called on its own, each key is looked up (which names the keys that differ).

TTL rules (TOLERANCE_MS either way): a key without expiry in the snapshot, or any key under
--ttl none, must have none on the target; --ttl keep: the same absolute expiry; --ttl reset:
(expiry - cut time) after a moment between the start and the end of the restore. Hash fields
with their own expiry in the snapshot are held to the same rules, and streams' counters must
be the snapshot's (_StateCheck).
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import blake3
import numpy as np

from backup.sources.redis_client import execute_many, server_time_ms
from backup.sources.redis_records import (canonical, counters_value, dec_bytes, display_key, field_expiries,
                                          record_expiry, record_head, record_key, record_part, stream_counters)
from restore.targets.base import ItemPlan, RestoreOptions
from restore.targets.redis_fields import field_cut, field_expiries_on

TOLERANCE_MS = 2000
EXAMPLES = 20
BATCH = 500
CATEGORIES = ("missing", "expired", "extra", "type_differs", "value_differs", "ttl_differs", "counters_differ")


def expiry_window(details: dict, snap_x, now_ms: int):
    """(lo, hi): where the target's expiry must fall (before TOLERANCE_MS) for a snapshot expiry
    under --ttl keep or reset; `snap_x` is an int, or a numpy array of them."""
    if details.get("ttl_mode", "keep") == "keep":
        return snap_x, snap_x
    ttl = snap_x - details["cut_time_ms"]
    return details.get("restore_started_ms", now_ms) + ttl, details.get("restore_finished_ms", now_ms) + ttl


def ttl_problem(details: dict, snap_x: int | None, actual_x: int | None, now_ms: int) -> str | None:
    """Why the target's expiry is wrong for this key, or None when it is right."""
    mode = details.get("ttl_mode", "keep")
    if snap_x is None or mode == "none":
        return None if actual_x is None else f"expected no expiry, found {actual_x}"
    if actual_x is None:
        return "expected an expiry, found none"
    lo, hi = expiry_window(details, snap_x, now_ms)
    if lo - TOLERANCE_MS <= actual_x <= hi + TOLERANCE_MS:
        return None
    return f"expiry {actual_x} outside [{lo}, {hi}] +/- {TOLERANCE_MS} ms"


@dataclass
class _Report:
    item: str
    ttl_mode: str
    checked: int = 0
    ok: int = 0
    skipped_expired: int = 0
    found: dict = field(default_factory=lambda: {c: {"count": 0, "examples": []} for c in CATEGORIES})

    def add(self, category: str, key: bytes, detail: str = "") -> None:
        entry = self.found[category]
        entry["count"] += 1
        if len(entry["examples"]) < EXAMPLES:
            entry["examples"].append({"key": display_key(key), "detail": detail})

    def to_dict(self) -> dict:
        passed = all(v["count"] == 0 for k, v in self.found.items() if k != "expired")
        return {"item": self.item, "ttl_mode": self.ttl_mode, "checked": self.checked, "ok": self.ok,
                "skipped_expired": self.skipped_expired, **self.found, "passed": passed}


def _report(plan: ItemPlan) -> _Report:
    return _Report(plan.target, plan.details.get("ttl_mode", "keep"))


def _written(target, plan: ItemPlan, records: Iterator[bytes], report: _Report) -> Iterator[bytes]:
    ttl = plan.details.get("ttl_mode", "keep")
    keep = target.written_filter(plan, RestoreOptions(ttl=ttl))
    cut = field_cut(plan, ttl)
    for record in records if cut is None else cut(records):
        if keep is None or keep(record):
            yield record
        elif record_head(record)[2] in (None, 0):
            report.skipped_expired += 1


class ExpiryLog:
    """The expiries of a stream of records, one per key (its first part), in stream order:
    8 bytes a key, spilled to a temp file a block at a time. The restore fills one from the
    records it writes and one from its verification's read-back, so the TTL check compares two
    arrays instead of looking every key up again."""

    BLOCK = 1 << 16

    def __init__(self) -> None:
        self._file = tempfile.TemporaryFile(prefix="statevault-expiries-")
        self._buf: list[int] = []
        self.count = 0
        self.complete = False  # the stream was consumed to its end

    def add(self, records: Iterable[bytes]) -> None:
        buf = self._buf
        for record in records:
            if record_part(record) in (None, 0):
                x = record_expiry(record)
                buf.append(-1 if x is None else x)
        if len(buf) >= self.BLOCK:
            self._flush()

    def tap(self, records: Iterable[bytes]) -> Iterator[bytes]:
        """`records`, logged as they pass."""
        for record in records:
            self.add((record,))
            yield record
        self.finish()

    def finish(self) -> None:
        self._flush()
        self.complete = True

    def _flush(self) -> None:
        if self._buf:
            self._file.write(np.array(self._buf, dtype="<i8").tobytes())
            self.count += len(self._buf)
            self._buf.clear()

    def blocks(self) -> Iterator[np.ndarray]:
        self._file.seek(0)
        while block := self._file.read(8 * self.BLOCK):
            yield np.frombuffer(block, dtype="<i8")

    def close(self) -> None:
        self._file.close()


def verify_ttls(target, plan: ItemPlan, records: Iterator[bytes], read: ExpiryLog | None = None,
                wrote: ExpiryLog | None = None) -> dict:
    """Check each restored key's expiry. With `read` and `wrote`, the expiries of a complete
    read-back whose count and digest matched the snapshot and of the records the restore wrote
    (then both are the same keys in the same order, and only expiries can differ), the check
    compares the two; where they disagree, or without them, it looks up each key's type and
    expiry on the target (no values), which also names the keys."""
    client, info = target.connection()
    report = _report(plan)
    # hash field TTLs and stream counters, where the snapshot has some and the target keeps them
    # (a server without field TTLs takes a restore with --ttl none; 6.2 has no stream counters)
    fields = bool(plan.details.get("field_ttls")) and info.has_field_ttls
    streams = bool(plan.details.get("stream_counters")) and info.has_stream_counters
    state = _StateCheck(client, plan.details, report, fields, streams) if fields or streams else None
    if read is not None and wrote is not None and read.complete and wrote.complete and read.count == wrote.count:
        if not _logs_differ(plan.details, wrote, read, server_time_ms(client)):
            report.checked = report.ok = read.count
            report.skipped_expired = plan.details.get("expired", 0)
            if state is not None:
                state.run(_written(target, plan, records, _report(plan)))
            return report.to_dict()
    batch: list[tuple[bytes, str, int | None]] = []

    def check() -> None:
        pipe = client.pipeline(transaction=False)
        pipe.execute_command("TIME")
        for key, _, _ in batch:
            pipe.execute_command("TYPE", key)
            pipe.execute_command("PEXPIRETIME" if info.has_pexpiretime else "PTTL", key)
        res = pipe.execute()
        now = int(res[0][0]) * 1000 + int(res[0][1]) // 1000
        for i, (key, kind, snap_x) in enumerate(batch):
            actual_kind, t = res[1 + 2 * i].decode(), res[2 + 2 * i]
            actual_x = None if t < 0 else (t if info.has_pexpiretime else now + t)
            report.checked += 1
            if actual_kind == "none":
                report.add("expired" if snap_x is not None and snap_x <= now else "missing", key)
            elif actual_kind != kind:
                report.add("type_differs", key, f"snapshot {kind}, target {actual_kind}")
            elif (problem := ttl_problem(plan.details, snap_x, actual_x, now)) is not None:
                report.add("ttl_differs", key, problem)
            else:
                report.ok += 1
        batch.clear()

    written = _written(target, plan, records, report)
    for record in written if state is None else state.tap(written):
        key, kind, part, x = record_head(record)
        if part in (None, 0):
            batch.append((key, kind, x))
            if len(batch) >= BATCH:
                check()
    if batch:
        check()
    return report.to_dict()


class _StateCheck:
    """What the digest leaves out besides the keys' own expiries, looked up on the target:
    - the expiries of the hash fields that have one in the snapshot ("fx"; HPEXPIRETIME), held
      to ttl_problem's rules: a key with such a problem counts in "ttl_differs" ("ok" counts
      the keys' own expiries). Fields without one are not looked up: the restore wrote them
      into a deleted (or new) key, so they have none;
    - streams' counters ("sx"; XINFO STREAM and GROUPS): "counters_differ"."""

    def __init__(self, client, details: dict, report: _Report, fields: bool, streams: bool):
        self.client, self.details, self.report = client, details, report
        self.fields, self.streams = fields, streams
        self.hashes: list[tuple[bytes, list]] = []
        self.counted: list[tuple[bytes, list]] = []

    def tap(self, records: Iterable[bytes]) -> Iterator[bytes]:
        for record in records:
            self._add(record)
            yield record
        self._check()

    def run(self, records: Iterable[bytes]) -> None:
        for record in records:
            self._add(record)
        self._check()

    def _add(self, record: bytes) -> None:
        if self.fields and (fx := field_expiries(record)) is not None:
            self.hashes.append((record_key(record), fx))
        if self.streams and (sx := stream_counters(record)) is not None:
            self.counted.append((record_key(record), sx))
        if len(self.hashes) + len(self.counted) >= BATCH:
            self._check()

    def _check(self) -> None:
        if self.hashes:
            now = server_time_ms(self.client)
            for (key, fx), actual in zip(self.hashes, field_expiries_on(self.client, self.hashes)):
                for (name, snap_x), found in zip(fx, actual):
                    problem = ("the field is gone" if found == -2 else
                               ttl_problem(self.details, snap_x, None if found < 0 else found, now))
                    if problem is not None:
                        self.report.add("ttl_differs", key, f"field {display_key(dec_bytes(name))}: {problem}")
                        break
        if self.counted:
            replies = execute_many(self.client, [
                c for key, _ in self.counted for c in (("XINFO", "STREAM", key), ("XINFO", "GROUPS", key))])
            for i, (key, sx) in enumerate(self.counted):
                info, groups = replies[2 * i:2 * i + 2]
                if isinstance(info, Exception) or isinstance(groups, Exception):
                    continue  # no such stream (any more): the key's own check reports it
                found = counters_value(info, groups)
                if found != sx:
                    self.report.add("counters_differ", key, f"snapshot {sx}, target {found}")
        self.hashes.clear()
        self.counted.clear()


def _logs_differ(details: dict, wrote: ExpiryLog, read: ExpiryLog, now_ms: int) -> bool:
    """Whether any key's expiry breaks the rules of ttl_problem, array-wise."""
    mode = details.get("ttl_mode", "keep")
    for e, a in zip(wrote.blocks(), read.blocks()):
        none = e < 0
        if mode == "none":
            bad = a >= 0
        else:
            lo, hi = expiry_window(details, e, now_ms)
            bad = np.where(none, a >= 0, (a < 0) | (a < lo - TOLERANCE_MS) | (a > hi + TOLERANCE_MS))
        if bad.any():
            return True
    return False


@dataclass
class _Key:
    key: bytes
    kind: str
    x: int | None
    digest: str


def _summaries(records: Iterator[bytes]) -> Iterator[_Key]:
    """One summary per key (its parts hashed together), in stream order."""
    current, kind, x, h = None, "", None, None
    for record in records:
        key, rkind, _, rx = record_head(record)
        if key != current:
            if current is not None:
                yield _Key(current, kind, x, h.hexdigest())
            current, kind, x, h = key, rkind, rx, blake3.blake3()
        h.update(canonical(record))
    if current is not None:
        yield _Key(current, kind, x, h.hexdigest())


def diff(target, plan: ItemPlan, records: Iterator[bytes]) -> dict:
    """Merge the snapshot's records with the target's read-back (both sorted by key bytes)."""
    client, _ = target.connection()
    report = _report(plan)
    left = _summaries(_written(target, plan, records, report))
    right = _summaries(target.read_back(plan))
    now = server_time_ms(client)
    a, b = next(left, None), next(right, None)
    while a is not None or b is not None:
        if b is None or (a is not None and a.key < b.key):
            report.checked += 1
            expired = a.x is not None and a.x <= server_time_ms(client)
            report.add("expired" if expired else "missing", a.key)
            a = next(left, None)
        elif a is None or b.key < a.key:
            report.add("extra", b.key, f"{b.kind} on the target only")
            b = next(right, None)
        else:
            report.checked += 1
            if a.kind != b.kind:
                report.add("type_differs", a.key, f"snapshot {a.kind}, target {b.kind}")
            elif a.digest != b.digest:
                report.add("value_differs", a.key, f"{a.kind} value differs")
            elif (problem := ttl_problem(plan.details, a.x, b.x, now)) is not None:
                report.add("ttl_differs", a.key, problem)
            else:
                report.ok += 1
            a, b = next(left, None), next(right, None)
    return report.to_dict()
