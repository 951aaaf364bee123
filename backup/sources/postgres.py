"""PostgreSQL source: every selected table at one consistent point in time.

    with PostgresSource(settings).open() as cut:        # one REPEATABLE READ READ ONLY transaction
        for item in cut.items():                        # "schema.table", sorted
            cut.backup_item(item, writer)               # COPY (SELECT ... ORDER BY key) TO STDOUT

Selection: `settings.tables` and `settings.exclude` are fnmatch globs. A pattern with a dot
matches "schema.table"; one without a dot matches the table name in any schema (so the
default "*" is every user table). System schemas, temporary tables, tables that belong to
an extension and statevault's own staging schemas are never selected; partitioned parents
are not items, their partitions are (each restores as a standalone table). `open(only=...)`
names tables exactly ("schema.table", or "table" for public.table) and overrides the
config's selection: a pre-restore snapshot must cover what a restore replaces even when that
table is outside the configured patterns. An `only` name that is not a table is a NotFoundError.

The cut: the first statement of the transaction takes the snapshot; `cut_time` is that
statement's `statement_timestamp()` (UTC), taken a hair before the snapshot: every row
committed before `cut_time` is in the snapshot, nothing committed after the snapshot is.
Every selected table is then locked ACCESS SHARE (as pg_dump does) so a concurrent DROP or
ALTER waits for the backup instead of breaking it; the wait is bounded by lock_timeout
(a retryable error). Sequences are not transactional: their values are read when the table
is described, at or after the cut, which is what a restore needs (new ids never collide).

Record format "pg-copy-text" (item kind "table"): each record is one row exactly as
PostgreSQL's `COPY ... TO STDOUT` text format prints it under the session settings of
backup.sources.postgres_schema (UTF-8, ISO dates, UTC, hex bytea, shortest exact floats):
the columns of schema["copy_columns"] in that order, separated by a tab, NULL as `\\N`,
backslash and control characters (tab, newline, carriage return, ...) backslash-escaped,
terminated by "\\n". Stored generated columns are not in the records (restore recomputes
them); rows of inheritance children are not either (`FROM ONLY`: each child is its own item).
Rows come in the order of schema["order_by"] (the primary key, or every column when the
table has none; numbers numerically, text in byte order, NULLs last: see postgres_schema),
so an unchanged table gives the same bytes, hence the same chunks, on every backup. A
chunk is a valid COPY input: `zstd -dc <chunks> | psql -c "COPY t (<copy_columns>) FROM
STDIN"` reloads a table without statevault.

The item schema (JSON, "schema_version": 1):

    table          {"schema", "name"} as backed up;  unlogged  bool
    columns        [{"name", "type" (format_type), "not_null", "default" (expression or null),
                     "identity" ("always" | "by default" | null), "generated" (expression of a
                     stored generated column, or null), "collation" (when not the type's),
                     "serial" (only on serial columns: the owned sequence behind the default)}]
    copy_columns   the record's columns;  primary_key  column names ([] when none)
    order_by       [{"column", "kind"}]: int | numeric | float | plain | collated | text
    constraints    [{"name", "type" (p, u, c, x), "definition" (pg_get_constraintdef)}]
    foreign_keys   [{"name", "definition", "references": {"schema", "name"}, "references_sql"}]
    indexes        [{"name", "unique", "using" (pg_get_indexdef after "ON <table> ")}]
    sequences      [{"schema", "name", "type", "start", "increment", "min", "max", "cache",
                     "cycle", "last_value", "is_called", "owned_by" (column or null: a shared
                     sequence a default calls), "identity"}]
    enums          [{"schema", "name", "labels" (in sort order)}];  extensions  [name]
"""
from __future__ import annotations

import fnmatch
from contextlib import contextmanager
from datetime import timezone
from typing import Any, Iterator

from backup.sources.base import ItemSpec
from backup.sources.postgres_schema import (FORMAT, connect, copy_out_rows, copy_out_sql, describe_table, list_tables, pg_errors,
                                            resolve_table_name)
from snapshots.errors import NotFoundError, SourceError
from snapshots.settings import PostgresSource as PostgresSettings
from snapshots.settings import redact_url
from snapshots.writer import SnapshotWriter


def _matches(pattern: str, schema: str, table: str) -> bool:
    if "." in pattern:
        return fnmatch.fnmatchcase(f"{schema}.{table}", pattern)
    return fnmatch.fnmatchcase(table, pattern)


def select_tables(tables: list[tuple[int, str, str]], patterns: list[str], exclude: list[str],
                  only: list[str] | None) -> list[tuple[int, str, str]]:
    """Apply the config's globs, or `only`'s exact names (see module docstring)."""
    if only:
        wanted = {resolve_table_name(n) for n in only}
        chosen = [t for t in tables if (t[1], t[2]) in wanted]
        missing = wanted - {(t[1], t[2]) for t in chosen}
        if missing:
            names = ", ".join(f"{s}.{t}" for s, t in sorted(missing))
            known = ", ".join(f"{s}.{t}" for _, s, t in tables[:20]) + (" ..." if len(tables) > 20 else "")
            raise NotFoundError(f"no table {names} in the database (tables: {known or 'none'})")
        return chosen
    return [t for t in tables
            if any(_matches(p, t[1], t[2]) for p in patterns) and not any(_matches(p, t[1], t[2]) for p in exclude)]


class PostgresCut:
    """One open REPEATABLE READ READ ONLY transaction; see the module docstring."""

    def __init__(self, conn, url: str, tables: list[tuple[int, str, str]], cut_time, source_info: dict[str, Any]):
        self._conn, self._url = conn, url
        self.cut_time = cut_time
        self.source_info = source_info
        self._items: list[ItemSpec] = []
        self._bytewise: dict[str, set[str]] = {}
        with pg_errors("read table definitions", url):
            for oid, schema, name in tables:
                spec, bytewise = describe_table(conn, oid, schema, name)
                item = ItemSpec(name=f"{schema}.{name}", kind="table", format=FORMAT, schema=spec)
                self._items.append(item)
                self._bytewise[item.name] = bytewise

    def items(self) -> list[ItemSpec]:
        return list(self._items)

    def records(self, item: ItemSpec) -> Iterator[bytes]:
        """The table's rows as COPY text lines, in key order, streamed (one row in memory)."""
        table = item.schema["table"]
        stmt = copy_out_sql(item.schema, table["schema"], table["name"], self._bytewise[item.name])
        with pg_errors(f"read {item.name}", self._url):
            yield from copy_out_rows(self._conn, stmt)  # one CopyData message per row: one record

    def backup_item(self, item: ItemSpec, writer: SnapshotWriter) -> None:
        # the generator-free loop: this is the per-row hot path of every backup
        table = item.schema["table"]
        stmt = copy_out_sql(item.schema, table["schema"], table["name"], self._bytewise[item.name])
        with writer.item(item.name, item.kind, item.format, item.schema) as w:
            add = w.add
            with pg_errors(f"read {item.name}", self._url):
                for row in copy_out_rows(self._conn, stmt):
                    add(row)


class PostgresSource:
    kind = "postgres"

    def __init__(self, settings: PostgresSettings):
        self.settings = settings

    @contextmanager
    def open(self, only: list[str] | None = None) -> Iterator[PostgresCut]:
        """Open the consistent cut; raises SourceError (retryable when transient) if the server
        cannot be reached, NotFoundError for an `only` name that is not a table."""
        import psycopg
        from psycopg import IsolationLevel, sql

        url = self.settings.url
        conn = connect(url, "statevault backup")
        try:
            conn.isolation_level = IsolationLevel.REPEATABLE_READ
            conn.read_only = True
            # pg_errors also covers the transaction's own exit (a ROLLBACK on a lost connection)
            with pg_errors(f"backup of {redact_url(url)}", url), conn.transaction(force_rollback=True):
                # the first statement takes the snapshot
                cut_time, version, version_num, database, snapshot = conn.execute(
                    "SELECT pg_catalog.statement_timestamp(), pg_catalog.current_setting('server_version'), "
                    "pg_catalog.current_setting('server_version_num')::int, pg_catalog.current_database(), "
                    "pg_catalog.txid_current_snapshot()::text").fetchone()
                tables = select_tables(list_tables(conn), self.settings.tables, self.settings.exclude, only)
                if tables:
                    try:
                        conn.execute(sql.SQL("LOCK TABLE {} IN ACCESS SHARE MODE").format(
                            sql.SQL(", ").join(sql.Identifier(s, t) for _, s, t in tables)))
                    except psycopg.errors.UndefinedTable:
                        raise SourceError("a table was dropped while the backup started", retryable=True) from None
                info = {"server_version": version, "server_version_num": version_num, "database": database,
                        "snapshot": snapshot}
                yield PostgresCut(conn, url, tables, cut_time.astimezone(timezone.utc), info)
        finally:
            conn.close()
