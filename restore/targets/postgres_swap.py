"""Swap restores: build beside the live table, switch in one transaction.

Each swapped table is built in its own schema `statevault_staging_<run>_<n>` (own schema, so
index and constraint names never collide with the live ones or with each other) and
committed there; the live table is not touched. `switch` then, inside the caller's single
transaction, locks the live tables, moves each into `statevault_old_<run>_<n>`, moves the
staged one into the live schema (owned and identity sequences move with their table),
carries over privileges, owner and publication memberships, detaches the foreign keys other
tables have to the old table (the caller re-attaches them to the new one, comments included), and drops the emptied staging schemas
and the old tables, all in that same transaction. Killed at any point before the
commit, the live tables are as they were.

Leftovers: a run holds a session advisory lock (class "statevault-staging", key = its run
id) for as long as its connection lives. The next swap restore on the database drops every
staging schema whose run's lock is free: that run is dead. `close` drops a run's own
staging schemas when it never switched (verification failed or the run was interrupted).
"""
from __future__ import annotations

from psycopg import sql

from backup.sources.postgres_schema import STAGING_PREFIX, find_table
from restore.targets import postgres_live as live
from restore.targets.postgres_ddl import Placement

LOCK_CLASS = "statevault-staging"
OLD_PREFIX = "statevault_old_"


class Staging:
    def __init__(self, run: str):
        self.run = run
        self.tables: dict[str, Placement] = {}   # plan target -> where it waits for the switch
        self.finals: dict[str, tuple[str, str]] = {}  # plan target -> (schema, table) once switched
        self._locked = False
        self._count = 0

    def reserve(self, conn, target: str, place: Placement) -> Placement:
        """Where `target` is staged; on first use, lock our run and drop dead runs' leftovers."""
        if not self._locked:
            conn.execute("SELECT pg_catalog.pg_advisory_lock(pg_catalog.hashtext(%s), pg_catalog.hashtext(%s))",
                         (LOCK_CLASS, self.run))
            self._locked = True
            drop_stale_staging(conn, self.run)
        self._count += 1
        self.finals[target] = (place.schema, place.name)
        return place.moved(f"{STAGING_PREFIX}{self.run}_{self._count}")

    def switch(self, conn, plans) -> list[dict]:
        """Move the staged tables of `plans` into place and drop the old tables, in the
        caller's transaction; `forget(plans)` after it committed.

        Returns the foreign keys detached from the old tables, for the caller to re-attach."""
        lives = {}
        for plan in plans:
            found = find_table(conn, plan.details["schema"], plan.details["table"])
            if found:
                lives[plan.target] = found[0]
                conn.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(
                    sql.Identifier(plan.details["schema"], plan.details["table"])))
        inbound: list[dict] = []
        doomed = []
        for plan in plans:
            staged = self.tables[plan.target]
            final = staged.moved(plan.details["schema"])
            doomed.append(staged.schema)
            privs = None
            if plan.target in lives:
                oid = lives[plan.target]
                privs = live.privileges(conn, oid)
                # keys declared on tables that are swapped too leave with those tables
                fks = live.foreign_keys_touching(conn, oid, inbound_only=True, skip_tables=frozenset(lives.values()))
                live.detach(conn, fks)
                inbound += fks
                old = OLD_PREFIX + staged.schema[len(STAGING_PREFIX):]
                doomed.append(old)
                conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(old)))
                conn.execute(sql.SQL("ALTER TABLE {} SET SCHEMA {}").format(final.table, sql.Identifier(old)))
            conn.execute(sql.SQL("ALTER TABLE {} SET SCHEMA {}").format(staged.table, sql.Identifier(final.schema)))
            if privs is not None:
                plan.notes.extend(live.apply_privileges(conn, final.table, privs))
        for schema in doomed:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
        return inbound

    def forget(self, plans) -> None:
        for plan in plans:
            self.tables.pop(plan.target, None)

    def drop(self, conn, schema: str) -> None:
        """Drop one staging schema, best effort (a build that failed; the next run drops it too)."""
        try:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
        except Exception:  # noqa: BLE001 - never mask the error that brought us here
            pass

    def discard(self, conn) -> None:
        """Drop what was staged but never switched (best effort: the next run drops it too)."""
        for place in list(self.tables.values()):
            self.drop(conn, place.schema)
        self.tables.clear()


def drop_stale_staging(conn, own_run: str) -> list[str]:
    """Drop staging schemas of restores whose session is gone (their advisory lock is free)."""
    dropped = []
    rows = conn.execute("SELECT nspname FROM pg_catalog.pg_namespace WHERE starts_with(nspname, %s) "
                        "OR starts_with(nspname, %s) ORDER BY 1", (STAGING_PREFIX, OLD_PREFIX)).fetchall()
    for (schema,) in rows:
        prefix = STAGING_PREFIX if schema.startswith(STAGING_PREFIX) else OLD_PREFIX
        run = schema[len(prefix):].rsplit("_", 1)[0]
        if run == own_run:
            continue
        with conn.transaction():
            free = conn.execute("SELECT pg_catalog.pg_try_advisory_xact_lock(pg_catalog.hashtext(%s), "
                                "pg_catalog.hashtext(%s))", (LOCK_CLASS, run)).fetchone()[0]
            if free:
                conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
                dropped.append(schema)
    return dropped
