"""Hash fields with their own TTL (HEXPIRE: Valkey 9, Redis 7.4+) in a Redis restore.

A `redis-jsonl-v3` hash record lists its fields' expiries in "fx" (redis_records.py); the
digest covers neither them nor the key's. Under each --ttl mode they are written like the
key's own expiry:
- keep: HPEXPIREAT the absolute expiry. A field expiring at or before the plan's cutoff is
  not written (as a key expiring by then is not): `ExpiredFieldCut` takes it out of the
  records before they are written and digested, so the verification expects the hash without
  it. A hash all of whose fields expire so is not written at all.
- reset: HPEXPIRE with the TTL the field had at the cut.
- none: no field expiries.
A target without field TTLs (Redis < 7.4, Valkey < 9) cannot hold them: the plan refuses a
snapshot that has any, unless --ttl none.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import orjson

from backup.sources.redis_client import execute_many, raise_first_error
from backup.sources.redis_records import _FX, dec, dec_bytes, encode_record, field_expiries, record_part

_HASH = b'"t":"hash"'


def field_ttl_commands(key: bytes, fx: list, ttl: str, cut_ms: int) -> list[tuple]:
    """The commands giving `fx`'s fields ([[field, ms], ...]) their expiries under `ttl`, one
    per distinct expiry."""
    if ttl == "none" or not fx:
        return []
    by_time: dict[int, list] = {}
    for field, ms in fx:
        by_time.setdefault(ms, []).append(dec(field))
    if ttl == "keep":
        return [("HPEXPIREAT", key, ms, "FIELDS", len(fields), *fields) for ms, fields in by_time.items()]
    return [("HPEXPIRE", key, max(1, ms - cut_ms), "FIELDS", len(fields), *fields) for ms, fields in by_time.items()]


class ExpiredFieldCut:
    """--ttl keep: the records without the hash fields that expire at or before `cutoff_ms`
    (see the module docstring), re-encoded as the target's read-back will encode the hash:
    a split hash is gathered whole (one key's fields, as the backup held them) and split again
    into parts of `part_size` fields. Records of other keys pass unchanged. With `plan`, what
    was left out goes into its details and notes once the records are through."""

    def __init__(self, cutoff_ms: int, part_size: int, plan=None):
        self.cutoff, self.part, self.plan = cutoff_ms, part_size, plan
        self.fields = 0  # fields not written
        self.keys = 0    # hashes not written at all (every field expired)

    def __call__(self, records: Iterable[bytes]) -> Iterator[bytes]:
        held: list[bytes] = []  # the parts of a split hash, until its last one
        for record in records:
            part = record_part(record)
            hash_part = part is not None and _HASH in record  # `"t":"hash"` is only ever structural
            if held and not (hash_part and part):
                yield from self._cut(held)  # the held hash ended: this is another key
                held = []
            if hash_part:
                held.append(record)
            elif _FX in record:
                yield from self._cut([record])
            else:
                yield record
        if held:
            yield from self._cut(held)
        if self.plan is not None and self.fields:
            self.plan.details.update(expired_fields=self.fields, expired_field_keys=self.keys)
            self.plan.notes.append(f"{self.fields} hash field(s) not restored: they expire before "
                                   f"{self.cutoff} (ms) under --ttl keep"
                                   + (f" ({self.keys} hash(es) had no other field)" if self.keys else ""))

    def _cut(self, parts: list[bytes]) -> list[bytes]:
        """One hash key's records, without its expired fields."""
        expired = set()
        for record in parts:
            for field, ms in field_expiries(record) or ():
                if ms <= self.cutoff:
                    expired.add(orjson.dumps(field))
        if not expired:
            return parts
        decoded = [orjson.loads(r) for r in parts]
        rows = [row for r in decoded for row in r["v"] if orjson.dumps(row[0]) not in expired]
        fx = {orjson.dumps(f): ms for r in decoded for f, ms in r.get("fx", ()) if ms > self.cutoff}
        self.fields += len(expired)
        if not rows:
            self.keys += 1
            return []
        first = decoded[0]
        key, x, n = dec_bytes(first["k"]), first["x"], self.part
        pieces = [rows[i:i + n] for i in range(0, len(rows), n)]
        return [encode_record(key, "hash", piece, x, p if len(pieces) > 1 else None,
                              [[f, fx[k]] for f, _ in piece if (k := orjson.dumps(f)) in fx])[0]
                for p, piece in enumerate(pieces)]


def field_cut(plan, ttl: str, *, report: bool = False) -> ExpiredFieldCut | None:
    """The ExpiredFieldCut a restore of `plan` applies under `ttl`, or None; with `report`,
    the one the restore itself runs (it reports into the plan)."""
    if ttl != "keep" or not plan.details.get("field_ttls"):
        return None
    return ExpiredFieldCut(plan.details["expiry_cutoff_ms"], plan.details["part_size"], plan if report else None)


def field_expiries_on(client, batch: list[tuple[bytes, list]]) -> list[list[int]]:
    """Each (key, fx)'s fields' HPEXPIRETIME on the server (-1 none, -2 no such field)."""
    return raise_first_error(execute_many(client, [
        ("HPEXPIRETIME", key, "FIELDS", len(fx), *(dec(f) for f, _ in fx)) for key, fx in batch]))
