"""PostgreSQL target: tables back from "pg-copy-text" items (see backup.sources.postgres).

Plan (no writes): `only` names items ("schema.table", or "table" for public.table; unknown ->
NotFoundError listing the items); `into` restores one item as "schema.table" (or "table" in
the item's schema). Per item and mode:

    target table   mode new                       mode replace                 mode swap
    missing        create                         create                       create
    empty          load into it (same columns)    replace (truncate+load)      swap
    holds rows     TargetNotEmptyError            replace: truncate+load, or   swap
                                                  recreate if columns differ

A table that exists with other columns or types than the snapshot's is an
IncompatibleTargetError in mode new (the version gate), before anything is written; so is a
missing type or extension, a relation that is not a table, a recreate or swap of a table
that views depend on (they would be dropped with it) or that is part of a partition or
inheritance tree, and a table whose row-level security applies to the restoring role (COPY
FROM refuses it and the read-back could not see every row: restore as superuser or
BYPASSRLS). replace and swap plans carry `backup_selector = [target]` for the pre-restore
snapshot.

Restore, one explicit transaction per item on one connection (autocommit is on between
them, so nothing is ever committed implicitly; a failure rolls back to what was there, and
`undo` drops what earlier items of the restore created: tables, and the schemas, types,
extensions and shared sequences that did not exist before them; live.Created):
- create: enum types, extensions and sequences, CREATE TABLE, COPY FROM STDIN in batches,
  then constraints and indexes (faster after the load), OWNED BY, setval, then comments,
  row-level security, policies, replica identity and triggers (after the load: they must not
  fire for restored rows). A trigger whose function or a policy whose roles are missing is
  skipped with a note. A big table (postgres_load.MIN_BYTES of records) is built as a swap
  builds it, in a staging schema committed before the load, so that `options.jobs`
  connections can COPY into it at once; the transaction that completes it also moves it into
  place. Readers see it whole or not at all, as with one transaction; a failure drops the
  staging schema, and `undo` what was created for the table.
- load / truncate: LOCK the live table, detach the foreign keys touching it, (TRUNCATE),
  switch its enabled triggers off, COPY, switch them back to their exact state, set its
  sequences, re-attach the keys NOT VALID. The live definition (indexes, constraints,
  privileges, triggers, policies, views) stays. A role that does not own the table cannot
  switch triggers off: they fire for the loaded rows (a plan note says so).
- sequences: those the table owns are set to the snapshot's position; shared sequences its
  defaults call are only moved forward (other tables draw from them).
- recreate: capture privileges and publication memberships, DROP the live table and create
  it from the snapshot.
- swap: build the table in a staging schema `statevault_staging_<run>_<n>` and commit it;
  nothing live is touched. `switch(plans)` then moves, in ONE transaction, each live table
  into `statevault_old_<run>_<n>`, the staged one into its place (owned sequences follow),
  carries over privileges and inbound foreign keys, and drops the old tables. A restore
  killed before the switch leaves the live tables as they were; its staging schemas are
  dropped by the next swap restore on that database (the dead run's session advisory lock is
  gone) or by `DROP SCHEMA statevault_staging_... CASCADE`.

Foreign keys of the snapshot are added after all items are loaded: `finish(plans, options)`
(create/load/replace) and `switch(plans)` (swap) add them NOT VALID and then VALIDATE each;
a violation is a SourceError naming the constraints (the data stays, the constraint stays
NOT VALID). An FK to a table that is neither restored nor present is skipped (a plan note);
so are FKs to other tables for a restore --into.

read_back: the restored table (the staged one until the switch) through the same COPY and
ORDER BY as the backup, so equal data gives equal bytes; `record_key` is the order key.
"""
from __future__ import annotations

import logging
import secrets
from typing import Any, Iterator

from psycopg import sql

from backup.sources.postgres_schema import (bytewise_columns, connect, copy_out_rows, copy_out_sql,
                                            describe_columns, find_table, key_reader, pg_errors, resolve_table_name)
from restore.targets import postgres_ddl as ddl
from restore.targets import postgres_live as live
from restore.targets import postgres_load as load
from restore.targets.base import ItemPlan, Mode, RestoreOptions
from restore.targets.postgres_parallel import parallel_reads
from restore.targets.postgres_plan import check_item, plan_item, select_items
from restore.targets.postgres_swap import Staging
from snapshots.errors import NotFoundError, SourceError, StatevaultError, TargetNotEmptyError, UsageError
from snapshots.manifest import Item, Manifest
from snapshots.settings import redact_url

log = logging.getLogger("statevault.restore.postgres")


class PostgresTarget:
    kind = "postgres"
    supports_swap = True
    canonical_is_identity = True  # records read back equal the snapshot's byte for byte

    def __init__(self, url: str):
        self.url = url
        self._conn = None
        self._run = secrets.token_hex(4)
        self._created = live.Created()  # what committed items created, for undo
        self._staging = Staging(self._run)
        self._pending_fks: list[tuple[ItemPlan, dict]] = []
        self._to_validate: list[tuple[str, str]] = []
        self._keys: dict[str, Any] = {}
        self._may_create_schemas: bool | None = None

    @property
    def conn(self):
        if self._conn is None:
            self._conn = connect(self.url, "statevault restore")
        return self._conn

    def _errors(self, what: str):
        return pg_errors(what, self.url)

    # ---- plan ---------------------------------------------------------------------------
    def plan(self, manifest: Manifest, *, only: list[str], into: str | None, mode: Mode,
             ttl: str = "keep") -> list[ItemPlan]:
        if mode not in ("new", "replace", "swap"):
            raise UsageError(f"unknown restore mode {mode!r}: use new, replace or swap")
        items = select_items(manifest, only)
        if into is not None and len(items) != 1:
            raise UsageError(f"--into renames one table; {len(items)} are selected (use --only)")
        targets = {}
        for item in items:
            check_item(item)
            orig = item.schema["table"]
            targets[item.name] = resolve_table_name(into, orig["schema"]) if into else (orig["schema"], orig["name"])
        plans, not_empty = [], []
        with self._errors(f"plan the restore into {redact_url(self.url)}"):
            for item in items:
                plan = plan_item(self.conn, item, targets, mode, into is not None)
                if plan is None:
                    not_empty.append(".".join(targets[item.name]))
                else:
                    plans.append(plan)
        if not_empty:
            raise TargetNotEmptyError(f"{', '.join(not_empty)} already hold rows; mode 'new' only restores into "
                                      "missing or empty tables (choose --mode replace or swap, or --into)")
        return plans

    # ---- restore ------------------------------------------------------------------------
    def restore(self, plan: ItemPlan, records: Iterator[bytes], options: RestoreOptions) -> None:
        d = plan.details
        place = ddl.Placement(d["schema"], d["table"], plan.item.schema["table"]["name"])
        saved = (list(self._pending_fks), list(self._to_validate))
        try:
            with self._errors(f"restore {plan.item.name} into {plan.target}"):
                if d["method"] == "stage" or (d["method"] == "create" and self._loads_in_parallel(plan, options)):
                    self._build_staged(plan, place, records, options)
                else:
                    with self.conn.transaction():
                        if d["method"] == "create":
                            self._create(plan, place, records, options)
                        elif d["method"] == "recreate":
                            self._recreate(plan, place, records, options)
                        else:
                            self._load_existing(plan, place, records, options)
                if d["method"] == "create":
                    self._pending_fks += [(plan, fk) for fk in d["foreign_keys"]]
                    self._created.commit(plan)  # committed: `undo` drops it if a later item fails
        except BaseException:
            # rolled back: forget the constraint work queued for it
            self._pending_fks, self._to_validate = saved
            raise
        finally:
            self._created.forget_item()  # rolled back, staged, or a recreate of a live table: not undone

    def _create(self, plan: ItemPlan, place: ddl.Placement, records: Iterator[bytes], options: RestoreOptions) -> None:
        self._create_table(plan, place)
        self._created.add("TABLE", place.table, place.qualified)
        self._copy_in(plan, place.table, records, options)
        self._complete_table(plan, place)

    def _create_table(self, plan: ItemPlan, place: ddl.Placement) -> None:
        """The table's dependencies and its bare columns, before the load."""
        spec, conn, d = plan.item.schema, self.conn, plan.details
        self._created.ensure_dependencies(conn, spec, d, place)
        for seq in ddl.owned_sequences(spec):
            if not seq["identity"]:
                conn.execute(ddl.create_sequence(seq, place))
        conn.execute(ddl.create_table(spec, place, conn))

    def _complete_table(self, plan: ItemPlan, place: ddl.Placement) -> None:
        """After the load: constraints and indexes, sequences, then what must not fire for
        (or slow down) the restored rows."""
        spec, conn, d = plan.item.schema, self.conn, plan.details
        for stmt in ddl.after_load(spec, place):
            conn.execute(stmt)
        for seq in ddl.owned_sequences(spec):
            live.setval(conn, ddl.sequence_ident(seq, place), seq["last_value"], seq["is_called"])
        self._advance_shared(spec, place)
        for stmt in ddl.table_objects(spec, place, skip_triggers=frozenset(d.get("skip_triggers", ())),
                                      skip_policies=frozenset(d.get("skip_policies", ()))):
            conn.execute(stmt)

    def _load_existing(self, plan: ItemPlan, place: ddl.Placement, records: Iterator[bytes],
                       options: RestoreOptions) -> None:
        spec, conn = plan.item.schema, self.conn
        conn.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(place.table))
        oid = _oid(conn, place)
        if plan.details["method"] == "load" and conn.execute(
                sql.SQL("SELECT EXISTS (SELECT 1 FROM ONLY {})").format(place.table)).fetchone()[0]:
            raise TargetNotEmptyError(f"{plan.target} received rows since the plan; nothing was written")
        fks = live.foreign_keys_touching(conn, oid)
        live.detach(conn, fks)
        if plan.details["method"] == "truncate":
            conn.execute(sql.SQL("TRUNCATE ONLY {}").format(place.table))
        triggers, owner = live.live_triggers(conn, oid)
        if not owner:
            triggers = []
        for name, _ in triggers:  # as pg_restore --disable-triggers; nobody sees it (we hold the lock)
            conn.execute(ddl.trigger_state(place.table, name, "D"))
        self._copy_in(plan, place.table, records, options)
        for name, state in triggers:
            conn.execute(ddl.trigger_state(place.table, name, state))
        table_sql = place.table.as_string(conn)
        for seq in ddl.owned_sequences(spec):
            name = live.serial_sequence(conn, table_sql, seq["owned_by"])
            if name is not None:
                live.setval(conn, name, seq["last_value"], seq["is_called"])
        self._advance_shared(spec, place)
        self._to_validate += live.reattach(conn, fks)

    def _recreate(self, plan: ItemPlan, place: ddl.Placement, records: Iterator[bytes],
                  options: RestoreOptions) -> None:
        conn = self.conn
        conn.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(place.table))
        oid = _oid(conn, place)
        privs = live.privileges(conn, oid)
        inbound = live.foreign_keys_touching(conn, oid, inbound_only=True)
        live.detach(conn, inbound)
        conn.execute(sql.SQL("DROP TABLE {}").format(place.table))
        self._create(plan, place, records, options)
        plan.notes.extend(live.apply_privileges(conn, place.table, privs))
        self._to_validate += live.reattach(conn, inbound)
        self._pending_fks += [(plan, fk) for fk in plan.details["foreign_keys"]]

    def _advance_shared(self, spec: dict, place: ddl.Placement) -> None:
        for seq in ddl.used_sequences(spec):
            live.advance(self.conn, ddl.sequence_ident(seq, place), seq)

    def _copy_in(self, plan: ItemPlan, table: sql.Identifier, records: Iterator[bytes],
                 options: RestoreOptions) -> None:
        load.copy_in(self.conn, ddl.copy_in(plan.item.schema, table), records, options.batch_size)

    # ---- swap ---------------------------------------------------------------------------
    def _build_staged(self, plan: ItemPlan, place: ddl.Placement, records: Iterator[bytes],
                      options: RestoreOptions) -> None:
        """The table built in a staging schema of its own: created and committed, loaded
        (a big one over several connections at once: postgres_load), then completed. A swap
        leaves it there for `switch`; a create moves it into place in the completing
        transaction, so the table appears whole or not at all, as in one transaction. A
        failure drops the staging schema; a kill leaves it to the next run (postgres_swap)."""
        conn, swap = self.conn, plan.details["method"] == "stage"
        staged = self._staging.reserve(conn, plan.target, place)
        try:
            with conn.transaction():
                conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(staged.schema)))
                if not swap:
                    self._created.ensure_schema(conn, place.schema)
                self._create_table(plan, staged)
            if not swap:
                self._created.commit(plan)  # committed: `undo` drops the types, schemas, ... it created
            self._load(plan, staged.table, records, options)
            with conn.transaction():
                self._complete_table(plan, staged)
                if not swap:
                    conn.execute(sql.SQL("ALTER TABLE {} SET SCHEMA {}").format(staged.table,
                                                                                sql.Identifier(place.schema)))
                    conn.execute(sql.SQL("DROP SCHEMA {}").format(sql.Identifier(staged.schema)))
        except BaseException:
            self._staging.drop(conn, staged.schema)
            raise
        if swap:
            self._staging.tables[plan.target] = staged
        else:
            self._created.add("TABLE", place.table, place.qualified)

    def _loads_in_parallel(self, plan: ItemPlan, options: RestoreOptions) -> bool:
        """Whether a new table is to be built staged and loaded over several connections: it is
        big, more than one job was asked for, and this role may create the staging schema
        (CREATE on the database). If not, it is loaded in place in one transaction."""
        if plan.item.bytes < load.MIN_BYTES or options.jobs < 2:
            return False
        if self._may_create_schemas is None:
            self._may_create_schemas = live.may_create_schemas(self.conn)
            if not self._may_create_schemas:
                log.info("big tables load over one connection: this role may not create a staging schema "
                         "(CREATE on the database)")
        return self._may_create_schemas

    def _load(self, plan: ItemPlan, table: sql.Identifier, records: Iterator[bytes], options: RestoreOptions) -> None:
        """COPY into a committed table: over `options.jobs` connections at once when the item
        is big and the server takes the extra connections, else over this one."""
        statement = ddl.copy_in(plan.item.schema, table)
        helpers: list = []
        try:
            while plan.item.bytes >= load.MIN_BYTES and len(helpers) < options.jobs - 1:
                helpers.append(connect(self.url, "statevault restore"))
        except StatevaultError as exc:  # e.g. max_connections reached: load over fewer
            log.warning("loading %s over %d connection(s): another one was refused (%s)", plan.target,
                        len(helpers) + 1, exc.message)
        try:
            load.parallel_copy_in([self.conn, *helpers], statement, records, options.batch_size)
        finally:
            for c in helpers:
                c.close()

    def undo(self, plans: list[ItemPlan]) -> str | None:
        """After a failed restore: drop the tables items of `plans` created and committed, and
        the schemas, extensions, types and shared sequences they created (live.Created; `close`
        drops staged tables)."""
        with self._errors("undo the failed restore"):
            return self._created.drop(self.conn, plans)

    def switch(self, plans: list[ItemPlan]) -> None:
        """Swap every staged table into place in ONE transaction, then validate foreign keys.

        Call after the staged tables verified; without a switch, `close` drops them."""
        swaps = [p for p in plans if p.target in self._staging.tables]
        if not swaps:
            return
        conn = self.conn
        pending = list(self._pending_fks)
        try:
            with self._errors(f"switch {', '.join(p.target for p in swaps)}"), conn.transaction():
                inbound = self._staging.switch(conn, swaps)
                self._pending_fks += [(plan, fk) for plan in swaps for fk in plan.details["foreign_keys"]]
                added = self._add_pending_fks(switched={p.target for p in swaps}) + live.reattach(conn, inbound)
        except BaseException:
            self._pending_fks = pending
            raise
        self._staging.forget(swaps)
        self._to_validate += added
        with self._errors("validate foreign keys"):
            self._validate()

    # ---- finish -------------------------------------------------------------------------
    def finish(self, plans: list[ItemPlan], options: RestoreOptions) -> None:
        """After every item is loaded: add the snapshot's foreign keys and validate those
        detached during the load. Idempotent. Keys to or of staged tables wait for `switch`."""
        with self._errors("add foreign keys"):
            with self.conn.transaction():
                self._to_validate += self._add_pending_fks()
            self._validate()

    def _add_pending_fks(self, switched: set[str] = frozenset()) -> list[tuple[str, str]]:
        """Add pending snapshot FKs NOT VALID (in the caller's transaction), except those of or
        to a table still waiting in staging (`switched`: those being switched in now)."""
        waiting = set(self._staging.tables) - set(switched)
        staged = {self._staging.finals[t] for t in waiting}
        keep, added = [], []
        for plan, fk in self._pending_fks:
            ref = (fk["references"]["schema"], fk["references"]["name"])
            if plan.target in waiting or ref in staged:
                keep.append((plan, fk))
                continue
            place = ddl.Placement(plan.details["schema"], plan.details["table"], plan.item.schema["table"]["name"])
            self.conn.execute(ddl.foreign_key(fk, plan.item.schema, place, self.conn))
            comment = (plan.item.schema.get("comments") or {}).get("constraints", {}).get(fk["name"])
            if comment is not None:
                self.conn.execute(ddl.constraint_comment(place, fk["name"], comment))
            added.append((place.table.as_string(self.conn), place.object_name(fk["name"])))
        self._pending_fks = keep
        return added

    def _validate(self) -> None:
        pending, self._to_validate = self._to_validate, []
        failures = live.validate(self.conn, pending)
        if failures:
            raise SourceError("the restored rows violate foreign keys (left NOT VALID, still enforced for new "
                              "rows): " + "; ".join(failures),
                              hint="Restore the referenced tables from the same snapshot too, or fix the rows.")

    # ---- verification -------------------------------------------------------------------
    def _restored_table(self, plan: ItemPlan) -> tuple[ddl.Placement, int, set[str]]:
        """(where the item's table is now (the staged one until the switch), its oid, the
        columns this server orders bytewise)."""
        d = plan.details
        place = self._staging.tables.get(plan.target) or ddl.Placement(d["schema"], d["table"], d["table"])
        found = find_table(self.conn, place.schema, place.name)
        if found is None:
            raise NotFoundError(f"{place.qualified} does not exist on the target")
        return place, found[0], bytewise_columns(describe_columns(self.conn, found[0]))

    def read_back(self, plan: ItemPlan, ordered: bool = True) -> Iterator[bytes]:
        with self._errors(f"read back {plan.target}"):
            place, _, bytewise = self._restored_table(plan)
            stmt = copy_out_sql(plan.item.schema, place.schema, place.name, bytewise, ordered=ordered)
            yield from copy_out_rows(self.conn, stmt)

    def read_back_parts(self, plan: ItemPlan, parts: int = 2) -> list[Iterator[bytes]] | None:
        """`read_back(plan, ordered=False)` as page ranges to read concurrently (each on its
        own connection, one snapshot), or None for one COPY (postgres_parallel)."""
        with self._errors(f"read back {plan.target}"):
            place, oid, bytewise = self._restored_table(plan)

            def read(conn, where) -> Iterator[bytes]:
                with self._errors(f"read back {plan.target}"):
                    yield from copy_out_rows(conn, copy_out_sql(plan.item.schema, place.schema, place.name,
                                                                bytewise, ordered=False, where=where))

            return parallel_reads(self.conn, lambda: connect(self.url, "statevault verify"), oid, read, parts)

    def canonical(self, item: Item, record: bytes) -> bytes:
        return record

    def record_key(self, item: Item, record: bytes) -> Any:
        reader = self._keys.get(item.name)
        if reader is None:
            reader = self._keys[item.name] = key_reader(item.schema)
        return reader(record)

    def close(self) -> None:
        """Drop staged tables that were never switched in; close the connection."""
        if self._conn is None:
            return
        try:
            self._staging.discard(self._conn)  # best effort: it never raises
        finally:
            self._conn.close()
            self._conn = None


def _oid(conn, place: ddl.Placement) -> int:
    found = find_table(conn, place.schema, place.name)
    if found is None:
        raise NotFoundError(f"{place.qualified} disappeared from the target since the plan")
    return found[0]
