"""Qdrant target: recreate collections from a snapshot, replace them, or swap them in atomically.

Records are "qdrant-points-jsonl-v2" (or -v1) lines (backup/sources/qdrant_records.py documents the
formats); each becomes a PointStruct, upserted in batches with wait=True (idempotent by id, so a
transient failure is retried). To a server over REST the batches go as JSON made straight from
the records (backup/sources/qdrant_rest.py `upsert_points`: no pydantic model per point). The collection is created from the item's schema (vectors,
sparse vectors, hnsw/optimizer/wal/quantization settings, shards), payload indexes after the
data. Reading back uses the source's own encoder, so a faithful restore reads back the very
bytes of the snapshot.

Modes (`plan` refuses before any write):
- new: the collection must not exist or be empty (else TargetNotEmptyError).
- replace: delete the collection, recreate it, upsert. NOT atomic: until the restore ends,
  clients see a missing or partly filled collection. The orchestrator takes a pre-restore
  snapshot of it first (backup_selector). Aliases pointing at it are recreated.
- swap (preferred): restore into a new physical collection `<name>__sv_<UTC yyyymmddHHMMSS><4 hex>`,
  let the orchestrator verify it (read_back), then `switch`:
    * `<name>` is already an alias (every swap after the first): one `update_collection_aliases`
      call deletes and recreates the alias, which Qdrant applies atomically. The previous
      physical collection is kept for an instant rollback (point the alias back) and removed by a
      later swap once it is more than a day old.
    * `<name>` is a real collection (the first swap): an alias cannot take a collection's name,
      so the switch deletes that collection and then creates the alias. Between those two calls
      (milliseconds) the name does not exist; if the process dies right there, the restored data
      is intact in the staging collection: create the alias by hand or run the swap again. The
      old collection's data is gone from Qdrant after this step: take a pre-restore snapshot
      (the plan's backup_selector names it).
    * `<name>` does not exist: the alias is created.
  A swap that fails or does not verify before its switch leaves the live collection untouched
  and drops its staging collection (`undo` after a failed write, `close` after a failed
  verification or any other stop before the switch). A swap KILLED before the switch leaves
  the half-filled staging collection behind (no alias points at it, the source does not back
  it up); the next swap of that name deletes it once more than a day old.

A restore that fails (rather than being killed) undoes what it wrote: `undo` drops a
collection mode new created and a swap's staging collection, and deletes the points mode new
wrote into a collection that existed empty (their ids are logged to a temp file before each
batch goes out).

Vector layout gate: an existing target collection whose vector names, sizes, distances,
datatypes or sparse vector names differ from the snapshot's is refused (IncompatibleTargetError)
in every mode; restore `--into` a new name instead.

Local mode (qdrant-client `path`): a store is created when a restore first writes to it; `plan`
(and so a dry run) takes a path without a store for an empty one and creates nothing. Local
mode re-normalises Cosine vectors on every upsert, so a snapshot taken from a *server* and
restored into local mode may differ in the last bit of some Cosine vector components; the plan
says so, and `classify` names such differences in diff reports.
"""
from __future__ import annotations

import logging
import re
import secrets
import tempfile
import warnings
from datetime import datetime, timedelta, timezone
from typing import Any, Iterator

import orjson

from backup.sources.qdrant import (ITEM_KIND, STAGING_MARK, QdrantHandle, connect_qdrant, iter_collection_records,
                                   local_store_exists, qdrant_call)
from backup.sources.qdrant_config import (SCHEMA_FORMAT, collection_schema, create_collection_kwargs,
                                          describe_difference, payload_index_ops, signature, vector_layout)
from backup.sources.qdrant_records import FORMATS, decode_record
from backup.sources.qdrant_rest import rest_api, upsert_points
from restore.targets.base import ItemPlan, RestoreOptions
from snapshots.errors import IncompatibleTargetError, NotFoundError, TargetNotEmptyError, UsageError
from snapshots.manifest import Item, Manifest, utcnow
from snapshots.retries import retry_call

UPSERT_BATCH = 256
MAX_BATCH_BYTES = 8 << 20
STALE_AFTER = timedelta(days=1)
_STAMP = re.compile(re.escape(STAGING_MARK) + r"(\d{14})[0-9a-f]{4}$")
log = logging.getLogger("statevault.restore.qdrant")


def staging_age(name: str, now: datetime) -> timedelta | None:
    """How old a staging collection is, from its name; None for other names."""
    m = _STAMP.search(name)
    if m is None:
        return None
    made = datetime.strptime(m.group(1), "%Y%m%d%H%M%S").replace(tzinfo=timezone.utc)
    return now - made


class QdrantTarget:
    kind = "qdrant"
    supports_swap = True
    canonical_is_identity = True  # records read back equal the snapshot's byte for byte

    def __init__(self, url: str | None = None, path: str | None = None, api_key: str | None = None):
        if bool(url) == bool(path):
            raise UsageError("a Qdrant target needs exactly one of url or path")
        self.url, self.path, self.api_key = url, path, api_key
        self._handle: QdrantHandle | None = None
        # collections restore() created, for undo; a swap's staging copy until its switch, for close
        self._created: list[tuple[ItemPlan, str]] = []
        self._written: list[tuple[ItemPlan, str, Any]] = []  # (plan, collection, ids file): mode new, existing

    # ---- connection ----------------------------------------------------------------------
    @property
    def handle(self) -> QdrantHandle:
        if self._handle is None:
            self._handle = connect_qdrant(self.url, self.path, self.api_key)
        return self._handle

    @property
    def client(self) -> Any:
        return self.handle.client

    def close(self) -> None:
        """Drop the staging collections of swaps that were never switched in (their verification
        failed, or the run stopped before the switch: no alias points at them), then let go of
        the client. Collections a mode-new restore created are kept."""
        try:
            self._discard_staging()
        finally:
            self._forget_writes()
            if self._handle is not None:
                self._handle.close()
                self._handle = None

    def _discard_staging(self) -> None:
        """Best effort: never mask the error that brought us here (a later swap of the name
        drops a left-over once it is more than a day old)."""
        for plan, name in self._created:
            if plan.action != "swap":
                continue
            try:
                with qdrant_call(f"drop staging collection {name!r}"):
                    self.client.delete_collection(name)
            except Exception as exc:  # noqa: BLE001 - see the docstring
                log.warning("the staging collection %s of a swap that was not switched in is left behind (%s); "
                            "no alias points at it: delete it, or a later swap of %r does", name, exc, plan.target)
            else:
                log.info("dropped the staging collection %s of a swap that was not switched in", name)

    def _store_missing(self) -> bool:
        """A local-mode path without a store: opening it would create one (directory included)."""
        return self.path is not None and self._handle is None and not local_store_exists(self.path)

    def _aliases(self) -> dict[str, str]:
        with qdrant_call("list aliases"):
            return {a.alias_name: a.collection_name for a in self.client.get_aliases().aliases}

    def _collections(self) -> set[str]:
        with qdrant_call("list collections"):
            return {c.name for c in self.client.get_collections().collections}

    # ---- plan ----------------------------------------------------------------------------
    def plan(self, manifest: Manifest, *, only: list[str], into: str | None, mode: str,
             ttl: str = "keep") -> list[ItemPlan]:
        if mode not in ("new", "replace", "swap"):
            raise UsageError(f"unknown mode {mode!r}: use new, replace or swap")
        items = [i for i in manifest.items if i.kind == ITEM_KIND]
        if only:
            names = {i.name for i in items}
            unknown = [o for o in only if o not in names]
            if unknown:
                raise NotFoundError(f"snapshot {manifest.id} has no collection {', '.join(map(repr, unknown))} "
                                    f"(collections: {', '.join(sorted(names)) or 'none'})")
            items = [i for i in items if i.name in set(only)]
        if into is not None and len(items) != 1:
            raise UsageError("--into names one collection: give exactly one --only")
        missing = self._store_missing()  # planned as an empty store, not opened: a dry run creates nothing
        aliases, physical = ({}, set()) if missing else (self._aliases(), self._collections())
        plans = [self._plan_item(item, into or item.name, mode, aliases, physical) for item in items]
        if missing:
            for plan in plans:
                plan.notes.append(f"no Qdrant local store at {self.path} yet: the restore creates it")
        return plans

    def _plan_item(self, item: Item, name: str, mode: str, aliases: dict[str, str], physical: set[str]) -> ItemPlan:
        if item.format not in FORMATS:
            raise IncompatibleTargetError(f"item {item.name!r} has record format {item.format!r}; "
                                          f"this statevault restores {', '.join(FORMATS)}")
        if int(item.schema.get("format", 1)) > SCHEMA_FORMAT:
            raise IncompatibleTargetError(f"item {item.name!r} has a collection config from a newer statevault")
        if not name or "/" in name or STAGING_MARK in name:
            raise UsageError(f"{name!r} cannot be a collection name here ('/' and {STAGING_MARK!r} are reserved)")
        is_alias = name in aliases
        phys = aliases[name] if is_alias else (name if name in physical else None)
        live = None
        notes: list[str] = []
        if phys is not None:
            with qdrant_call(f"inspect collection {name!r}"):
                info = self.client.get_collection(name)
                live = self.client.count(name, exact=True).count
            want, have = signature(item.schema), signature(collection_schema(info, local=self.handle.local))
            if want != have:
                raise IncompatibleTargetError(
                    f"collection {name!r} on the target has another vector layout than snapshot item "
                    f"{item.name!r}: {describe_difference(want, have)}")
        notes += self._local_notes(item)
        details: dict[str, Any] = {"collection": name, "alias": is_alias, "physical": phys, "write_to": name}
        selector = [name] if live else []
        if mode == "new":
            if live:
                raise TargetNotEmptyError(f"collection {name!r} holds {live} points")
            if phys is not None:
                notes.append(f"{name!r} exists and is empty: points are added to it as it is")
            return ItemPlan(item=item, target=name, action="create", live_records=live, notes=notes, details=details)
        if mode == "replace":
            if phys is None:
                return ItemPlan(item=item, target=name, action="create", live_records=None, notes=notes,
                                details=details)
            details["write_to"] = phys
            notes.append(f"replace deletes {phys!r} and recreates it: not atomic, clients see a missing or "
                         "partly filled collection until the restore ends; --mode swap restores beside it "
                         "and switches an alias atomically")
            return ItemPlan(item=item, target=name, action="replace", live_records=live, backup_selector=selector,
                            notes=notes, details=details)
        return self._plan_swap(item, name, is_alias, phys, live, physical, aliases, notes, details, selector)

    def _plan_swap(self, item, name, is_alias, phys, live, physical, aliases, notes, details, selector) -> ItemPlan:
        now = utcnow()
        staging = f"{name}{STAGING_MARK}{now:%Y%m%d%H%M%S}{secrets.token_hex(2)}"
        in_use = set(aliases.values())
        stale = sorted(c for c in physical if c.startswith(name + STAGING_MARK) and c not in in_use
                       and (staging_age(c, now) or timedelta(0)) > STALE_AFTER)
        details.update(write_to=staging, staging=staging, stale=stale, drops_live=phys is not None and not is_alias)
        if is_alias:
            notes.append(f"atomic: one alias update points {name!r} from {phys!r} to {staging!r}; {phys!r} is "
                         "kept for rollback and removed by a later swap once older than a day")
        elif phys is not None:
            notes.append(f"first swap: {name!r} is a real collection, not an alias. After the verified copy is in "
                         f"{staging!r}, {name!r} is DELETED and recreated as an alias of it; between those two "
                         "calls (milliseconds) the name does not exist. Later swaps are one atomic alias update.")
        else:
            notes.append(f"{name!r} does not exist: the collection is created as {staging!r} with alias {name!r}")
        if stale:
            notes.append(f"removes stale staging collections left by interrupted restores: {', '.join(stale)}")
        return ItemPlan(item=item, target=name, action="swap", live_records=live, backup_selector=selector,
                        notes=notes, details=details)

    def _local_notes(self, item: Item) -> list[str]:
        if self.path is None:  # a server (the handle's `local`, without opening it)
            return []
        notes = []
        cosine = any(p.get("distance") == "Cosine" for p in (item.schema.get("vectors") or {}).values())
        if cosine and item.schema.get("source_mode") == "server":
            notes.append("local mode re-normalises Cosine vectors on upsert: vectors of this server snapshot may "
                         "read back with a different last bit (verification reports them as vector-low-bits)")
        if item.schema.get("payload_indexes"):
            notes.append("local mode keeps no payload indexes; they are recreated on a Qdrant server only")
        return notes

    # ---- restore -------------------------------------------------------------------------
    def restore(self, plan: ItemPlan, records: Iterator[bytes], options: RestoreOptions) -> None:
        d, schema = plan.details, plan.item.schema
        write_to = d["write_to"]
        if plan.action == "swap":
            for stale in d.get("stale", []):
                with qdrant_call(f"delete stale staging collection {stale!r}"):
                    self.client.delete_collection(stale)
            self._create(write_to, schema)
            self._created.append((plan, write_to))
        elif plan.action == "replace":
            keep_aliases = [a for a, t in self._aliases().items() if t == write_to]
            with qdrant_call(f"delete collection {write_to!r}"):
                self.client.delete_collection(write_to)
            self._create(write_to, schema)
            if keep_aliases:
                self._alias_ops([_create_alias(a, write_to) for a in keep_aliases], f"restore aliases of {write_to!r}")
        elif d["physical"] is None:
            self._create(write_to, schema)
            self._created.append((plan, write_to))
        else:  # mode new into an existing, empty collection: undo deletes the points written
            self._written.append((plan, write_to, tempfile.TemporaryFile(prefix="statevault-ids-")))
        self._upsert_all(write_to, records, schema, plan.item.format, options)
        self._payload_indexes(write_to, schema)

    def undo(self, plans: list[ItemPlan]) -> str | None:
        """After a failed restore: drop the collections a restore of `plans` created (a new
        collection, or a swap's staging copy: the live one is untouched until the switch), and
        delete the points it wrote into a collection that was empty (mode new)."""
        from qdrant_client import models

        said = []
        dropped = [name for plan, name in self._created if any(plan is p for p in plans)]
        for name in dropped:
            with qdrant_call(f"drop collection {name!r} of the failed restore"):
                self.client.delete_collection(name)
        if dropped:
            said.append(f"the collection(s) it had created were dropped: {', '.join(dropped)}")
        for plan, name, ids in self._written:
            if any(plan is p for p in plans):
                ids.seek(0)
                for line in ids:
                    with qdrant_call(f"delete the points the failed restore wrote into {name!r}"):
                        self.client.delete(name, points_selector=models.PointIdsList(points=orjson.loads(line)),
                                           wait=True)
                said.append(f"the points it had written into {name!r} were deleted")
        self._forget_writes()
        return "; ".join(said) or None

    def _forget_writes(self) -> None:
        """Forget what undo would remove (closing the id logs)."""
        for _, _, ids in self._written:
            ids.close()
        self._created, self._written = [], []

    def _create(self, name: str, schema: dict) -> None:
        from qdrant_client.http.exceptions import UnexpectedResponse

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # local mode warns about options it ignores
                self.client.create_collection(name, **create_collection_kwargs(schema))
        except UnexpectedResponse as exc:
            if exc.status_code in (400, 422):
                raise IncompatibleTargetError(f"the target refused to create collection {name!r}: "
                                              f"{exc.content[:300].decode(errors='replace')}") from None
            raise _translate(exc, f"create collection {name!r}") from exc
        except Exception as exc:  # noqa: BLE001 - translated
            raise _translate(exc, f"create collection {name!r}") from exc

    def _upsert_all(self, name: str, records: Iterator[bytes], schema: dict, fmt: str,
                    options: RestoreOptions) -> None:
        layout = vector_layout(schema)
        sparse = set(layout.sparse)
        limit = max(1, min(options.batch_size, UPSERT_BATCH))
        api = rest_api(self.client)  # a server over REST: JSON straight from the records
        batch: list = []
        size = 0
        for record in records:
            rec = decode_record(record, layout, fmt, arrays=api is not None)
            batch.append(rec if api is not None else point_from_record(rec, sparse))
            size += len(record)
            if len(batch) >= limit or size >= MAX_BATCH_BYTES:
                self._upsert(name, batch, api)
                batch, size = [], 0
        if batch:
            self._upsert(name, batch, api)

    def _upsert(self, name: str, points: list, api: Any | None) -> None:
        """Upsert one batch: record dicts through `api` (the REST ApiClient), else PointStructs
        through the client."""
        for _, written_to, ids in self._written:
            if written_to == name:  # the ids, before the points go out
                ids.write(orjson.dumps([p["id"] if api else p.id for p in points]) + b"\n")

        def upsert():
            with qdrant_call(f"upsert {len(points)} points into {name!r}"):
                if api is not None:
                    upsert_points(api, name, points)
                else:
                    self.client.upsert(name, points=points, wait=True)

        retry_call(upsert, attempts=4, multiplier=0.5, max_wait=10)

    def _payload_indexes(self, name: str, schema: dict) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # local mode: "payload indexes have no effect"
            for field, field_schema in payload_index_ops(schema):
                with qdrant_call(f"create payload index {field!r} on {name!r}"):
                    self.client.create_payload_index(name, field, field_schema=field_schema, wait=True)

    # ---- switch (swap) -------------------------------------------------------------------
    def switch(self, plans: list[ItemPlan]) -> None:
        """Point each swap plan's name at its verified staging collection (see module doc)."""
        from qdrant_client import models

        for plan in plans:
            if plan.action != "swap":
                continue
            d = plan.details
            name, staging = d["collection"], d["staging"]
            # from here the staging copy is, or may become, what the name points at: close keeps it
            self._created = [(p, c) for p, c in self._created if p is not plan]
            if d["alias"]:
                self._alias_ops([models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=name)),
                                 _create_alias(name, staging)], f"switch alias {name!r} to {staging!r}")
                continue
            if d["drops_live"]:
                with qdrant_call(f"delete collection {name!r} to make way for its alias"):
                    self.client.delete_collection(name)
            self._alias_ops([_create_alias(name, staging)], f"create alias {name!r} -> {staging!r}")

    def _alias_ops(self, ops: list, what: str) -> None:
        with qdrant_call(what):
            self.client.update_collection_aliases(change_aliases_operations=ops)

    # ---- verification --------------------------------------------------------------------
    def read_back(self, plan: ItemPlan, ordered: bool = True) -> Iterator[bytes]:
        # scroll / sorted key order costs nothing extra here: `ordered` changes nothing
        return iter_collection_records(self.client, plan.details["write_to"], plan.item.schema, self.handle.local,
                                       fmt=plan.item.format)

    def canonical(self, item: Item, record: bytes) -> bytes:
        return record

    def record_key(self, item: Item, record: bytes) -> Any:
        """(0, int id) or (1, uuid text): Qdrant's scroll order, integers before UUIDs."""
        raw = record[6:record.index(b",", 6)]  # records start with {"id":<id>, and ids hold no comma
        return (1, raw.decode()[1:-1]) if raw.startswith(b'"') else (0, int(raw))

    def classify(self, item: Item, expected: bytes, actual: bytes) -> str:
        """Name a difference for diff reports: payload, vector, or vector-low-bits (float32 last-bit
        changes, as local mode's Cosine re-normalisation makes)."""
        layout = vector_layout(item.schema)
        e, a = decode_record(expected, layout, item.format), decode_record(actual, layout, item.format)
        if e["payload"] != a["payload"]:
            return "payload"
        return "vector-low-bits" if _close(e["vector"], a["vector"]) else "vector"


def _close(x: Any, y: Any) -> bool:
    if isinstance(x, dict) and isinstance(y, dict):
        return x.keys() == y.keys() and all(_close(x[k], y[k]) for k in x)
    if isinstance(x, list) and isinstance(y, list):
        return len(x) == len(y) and all(_close(p, q) for p, q in zip(x, y))
    if isinstance(x, float) or isinstance(y, float):
        return abs(x - y) <= 1e-6 * max(1.0, abs(x), abs(y))
    return x == y


def _create_alias(alias: str, collection: str) -> Any:
    from qdrant_client import models

    return models.CreateAliasOperation(create_alias=models.CreateAlias(collection_name=collection, alias_name=alias))


def _translate(exc: BaseException, what: str):
    from backup.sources.qdrant import translate_qdrant_error

    return translate_qdrant_error(exc, what)


def point_from_record(rec: dict, sparse: set[str]) -> Any:
    """A PointStruct from a parsed record line (sparse vectors become SparseVector models)."""
    from qdrant_client import models

    vector = rec["vector"]
    if isinstance(vector, dict) and sparse:
        vector = {name: models.SparseVector(indices=v["indices"], values=v["values"]) if name in sparse else v
                  for name, v in vector.items()}
    return models.PointStruct(id=rec["id"], vector=vector, payload=rec["payload"])
