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
So is a configured selection that backs up nothing (the source fails, as with a Qdrant
`collections` typo, instead of committing an empty snapshot that would become `latest`): a
`tables` entry without glob characters that names no table, or a selection (after `exclude`)
that matches no table at all, including the default on a database without user tables. A glob
that matches nothing beside entries that match something is fine.

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
from typing import Any, Callable, Iterator

from backup.sources.base import ItemSpec
from backup.sources.postgres_schema import (FORMAT, connect, copy_out_rows, copy_out_sql, describe_table, find_table,
                                            list_tables, pg_errors, resolve_table_name)
from snapshots.errors import NotFoundError, SourceError
from snapshots.settings import PostgresSource as PostgresSettings
from snapshots.settings import redact_url
from snapshots.writer import SnapshotWriter


def _matches(pattern: str, schema: str, table: str) -> bool:
    if "." in pattern:
        return fnmatch.fnmatchcase(f"{schema}.{table}", pattern)
    return fnmatch.fnmatchcase(table, pattern)


_GLOB_CHARS = frozenset("*?[")
SELECTION_HINT = ("Check `tables` (and `exclude`) in the source config: schema.table globs, or a table name in "
                  "any schema; default every user table. Only ordinary tables and partitions are backed up.")


def _known(tables: list[tuple[int, str, str]], limit: int = 20) -> str:
    names = ", ".join(f"{s}.{t}" for _, s, t in tables[:limit]) + (" ..." if len(tables) > limit else "")
    return names or "none"


def select_tables(tables: list[tuple[int, str, str]], patterns: list[str], exclude: list[str],
                  only: list[str] | None, explain: Callable[[str], str | None] | None = None
                  ) -> list[tuple[int, str, str]]:
    """Apply the config's globs, or `only`'s exact names (see module docstring).

    A selection that backs up nothing is a NotFoundError rather than an empty snapshot that
    would become `latest`: a configured name without glob characters that is no table (a
    typo), or a whole selection that matches no table (globs matching nothing beside others
    that match are fine). `explain(pattern)` may say what a missing exact name is instead
    (a view, a partitioned parent)."""
    if only:
        wanted = {resolve_table_name(n) for n in only}
        chosen = [t for t in tables if (t[1], t[2]) in wanted]
        missing = wanted - {(t[1], t[2]) for t in chosen}
        if missing:
            names = ", ".join(f"{s}.{t}" for s, t in sorted(missing))
            raise NotFoundError(f"no table {names} in the database (tables: {_known(tables)})")
        return chosen
    patterns = list(dict.fromkeys(patterns))
    unmatched = [p for p in patterns if not any(_matches(p, s, t) for _, s, t in tables)]
    typos = [p for p in unmatched if not _GLOB_CHARS.intersection(p)]
    if typos:
        notes = [f"{p!r} is {note}" for p in typos if (note := explain(p) if explain else None)]
        raise NotFoundError(f"tables selector{'s' if len(typos) > 1 else ''} {', '.join(map(repr, typos))} "
                            f"match{'' if len(typos) > 1 else 'es'} no table in the database"
                            + (f" ({'; '.join(notes)})" if notes else "") + f" (tables: {_known(tables)})",
                            hint=SELECTION_HINT)
    matched = [t for t in tables if any(_matches(p, t[1], t[2]) for p in patterns)]
    chosen = [t for t in matched if not any(_matches(p, t[1], t[2]) for p in exclude)]
    if chosen:
        return chosen
    if not tables:
        raise NotFoundError("the database has no user tables: nothing to back up", hint=SELECTION_HINT)
    if matched:
        raise NotFoundError(f"every table that tables = {patterns!r} selects is excluded by exclude = {exclude!r}: "
                            f"nothing to back up (selected: {_known(matched)})", hint=SELECTION_HINT)
    raise NotFoundError(f"tables = {patterns!r} matches no table in the database: nothing to back up "
                        f"(tables: {_known(tables)})", hint=SELECTION_HINT)


def _explain_missing(conn) -> Callable[[str], str | None]:
    """What a configured exact name that is no selectable table is, when it is something."""
    kinds = {"p": "a partitioned table: its partitions are the items (select them, e.g. with a glob)",
             "v": "a view", "m": "a materialized view", "f": "a foreign table", "S": "a sequence", "i": "an index"}

    def explain(pattern: str) -> str | None:
        if "." not in pattern:
            return None
        found = find_table(conn, *pattern.split(".", 1))
        return kinds.get(found[1], f"not an ordinary table (relkind {found[1]!r})") if found else None

    return explain


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
        cannot be reached, NotFoundError for an `only` name that is not a table and for a
        config selection that backs up nothing (see select_tables)."""
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
                tables = select_tables(list_tables(conn), self.settings.tables, self.settings.exclude, only,
                                       _explain_missing(conn))
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
