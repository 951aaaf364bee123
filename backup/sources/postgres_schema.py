"""PostgreSQL connections, error mapping, and what a table's snapshot schema holds.

Shared by the backup source (backup.sources.postgres) and the restore target
(restore.targets.postgres): both must open sessions with the same output settings and read
tables in the same order, or a restored table would not read back byte for byte.

Session settings (both sides): client_encoding UTF8, DateStyle ISO, IntervalStyle postgres,
TimeZone UTC, extra_float_digits 1 (shortest exact floats), bytea_output hex, xmloption
content, lc_monetary C, search_path '' (every name the catalog prints is schema-qualified),
row_security off (a table hidden by row-level security fails loudly instead of backing up a
subset, as pg_dump does).

Catalog queries rather than SQLAlchemy reflection: `format_type`, `pg_get_expr`,
`pg_get_indexdef` and `pg_get_constraintdef` print exactly what PostgreSQL itself would
need to recreate an object (typmods, array and enum types, identity options, partial and
expression indexes), and they run inside the backup's own REPEATABLE READ transaction, so
the schema is from the same instant as the rows. SQLAlchemy's Inspector would need its own
connection and transaction and maps types to its own (lossier) vocabulary.

Row order ("order_by" in the schema): primary-key columns, or every data column when the
table has no primary key. Each key column has a kind that fixes how it is ordered and how
`record_key` reads it back in Python, so the two agree (diff reports merge on that order):

    int      int2/int4/int8/oid       natural order          int(field)
    numeric  numeric                  natural order          Decimal(field) (NaN last)
    float    float4/float8            natural order          float(field) (NaN last)
    plain    uuid, bytea, bool, date, time, timestamp(tz): their text order is their natural order
    collated text, varchar, char      natural order under a C/POSIX collation, else COLLATE "C"
    text     anything else (jsonb, arrays, ...): ORDER BY (col)::text COLLATE "C"

so rows come in byte order of their keys whatever the server's collation (no drift after a
glibc upgrade, the same order on the restore target). NULLs sort last.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from decimal import Decimal, InvalidOperation
from typing import Any, Iterator
from urllib.parse import urlsplit, urlunsplit

from backup.sources.postgres_objects import describe_objects
from snapshots.errors import NotFoundError, SourceError, StatevaultError
from snapshots.settings import redact_url

SCHEMA_VERSION = 1
FORMAT = "pg-copy-text"
CONNECT_TIMEOUT = 10
LOCK_TIMEOUT = "60s"
SESSION_SETTINGS = {
    "client_encoding": "UTF8", "DateStyle": "ISO, MDY", "IntervalStyle": "postgres", "TimeZone": "UTC",
    "extra_float_digits": "1", "bytea_output": "hex", "xmloption": "content", "lc_monetary": "C",
    "search_path": "", "row_security": "off", "statement_timeout": "0", "lock_timeout": LOCK_TIMEOUT,
    "idle_in_transaction_session_timeout": "0",
}
# schemas statevault itself creates for swap restores; never backed up
STAGING_PREFIX = "statevault_staging_"

_KIND_BY_TYPE = {
    "int2": "int", "int4": "int", "int8": "int", "oid": "int", "numeric": "numeric", "float4": "float",
    "float8": "float", "uuid": "plain", "bytea": "plain", "bool": "plain", "date": "plain", "time": "plain",
    "timestamp": "plain", "timestamptz": "plain", "text": "collated", "varchar": "collated",
    "bpchar": "collated",
}
_AUTH = re.compile(r"authentication failed|no password supplied|pg_hba\.conf|role \".*\" does not exist", re.I)
_TRANSIENT_SQLSTATE = ("08", "53", "57P", "40001", "40P01", "55P03", "57014")


# --------------------------------------------------------------------------- connections

def libpq_url(url: str) -> str:
    """SQLAlchemy-style `postgresql+psycopg://` URLs are accepted; libpq wants `postgresql://`."""
    parts = urlsplit(url)
    if "+" in parts.scheme:
        return urlunsplit(parts._replace(scheme=parts.scheme.split("+", 1)[0]))
    return url


def _scrub(message: str, url: str) -> str:
    password = urlsplit(url).password if "://" in url else None
    return message.replace(password, "***") if password else message


def translate_pg_error(exc: BaseException, what: str, url: str) -> StatevaultError:
    """Map a psycopg exception to ours; never leaks the URL's password.

    Connection refused, timeouts, server restarts, lock and serialization failures are
    retryable; authentication failures, missing databases and SQL errors are not.
    """
    if isinstance(exc, StatevaultError):
        return exc
    import psycopg

    text = _scrub(str(exc).strip(), url)
    first = " ".join(text.splitlines()[:1]).strip() or type(exc).__name__
    sqlstate = getattr(exc, "sqlstate", None) or ""
    where = redact_url(url)
    if isinstance(exc, psycopg.OperationalError) and not sqlstate:
        if _AUTH.search(text):
            return SourceError(f"{what}: authentication failed for {where}: {first}", retryable=False,
                               hint="Check the user and password in the source URL (or PGPASSWORD / .pgpass).")
        if "does not exist" in text:
            return SourceError(f"{what}: {first} ({where})", retryable=False,
                               hint="Check the database name in the URL.")
        return SourceError(f"{what}: cannot reach PostgreSQL at {where}: {first}", retryable=True)
    if sqlstate in ("28P01", "28000"):
        return SourceError(f"{what}: authentication failed for {where}: {first}", retryable=False)
    if sqlstate == "42501":
        return SourceError(f"{what}: permission denied: {first}", retryable=False,
                           hint="The statevault role needs SELECT on the tables and sequences it backs up, "
                                "and CREATE on the schemas it restores into.")
    if sqlstate.startswith(_TRANSIENT_SQLSTATE):
        return SourceError(f"{what}: transient PostgreSQL error [{sqlstate}]: {first}", retryable=True)
    if isinstance(exc, psycopg.InterfaceError):  # e.g. the connection was closed under us
        return SourceError(f"{what}: connection to {where} lost: {first}", retryable=True)
    return SourceError(f"{what}: {type(exc).__name__} [{sqlstate or '-'}]: {first}", retryable=False)


@contextmanager
def pg_errors(what: str, url: str) -> Iterator[None]:
    """Translate psycopg exceptions raised in the block (ours pass through)."""
    import psycopg

    try:
        yield
    except psycopg.Error as exc:
        raise translate_pg_error(exc, what, url) from None


def connect(url: str, application_name: str):
    """An autocommit psycopg connection with the shared session settings applied.

    Transactions are explicit (`with conn.transaction()`), so what commits together is
    visible in the code rather than implied by the driver's implicit BEGIN.
    """
    import psycopg

    with pg_errors("connect", url):
        conn = psycopg.connect(libpq_url(url), autocommit=True, connect_timeout=CONNECT_TIMEOUT,
                               application_name=application_name)
    try:
        with pg_errors("configure session", url):
            names = list(SESSION_SETTINGS)
            conn.execute("SELECT " + ", ".join("set_config(%s, %s, false)" for _ in names),
                         [x for n in names for x in (n, SESSION_SETTINGS[n])])
    except BaseException:
        conn.close()
        raise
    return conn


def default_collation_is_bytewise(conn) -> bool:
    provider = "datlocprovider = 'c' AND " if conn.info.server_version >= 150000 else ""
    row = conn.execute(f"SELECT {provider}datcollate IN ('C', 'POSIX') FROM pg_catalog.pg_database "
                       "WHERE datname = pg_catalog.current_database()").fetchone()
    return bool(row and row[0])


# --------------------------------------------------------------------------- tables

def list_tables(conn) -> list[tuple[int, str, str]]:
    """(oid, schema, table) of every user table, sorted: ordinary tables and partitions, no
    temporary tables, no tables belonging to extensions, none of statevault's staging schemas."""
    rows = conn.execute(
        """SELECT c.oid, n.nspname, c.relname FROM pg_catalog.pg_class c
           JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
           WHERE c.relkind = 'r' AND c.relpersistence <> 't'
             AND n.nspname NOT IN ('pg_catalog', 'information_schema')
             AND n.nspname !~ '^pg_(toast|temp_)' AND n.nspname !~ '^statevault_(staging|old)_'
             AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d WHERE d.classid = 'pg_catalog.pg_class'::regclass
                             AND d.objid = c.oid AND d.deptype = 'e')""").fetchall()
    return sorted(((int(o), s, t) for o, s, t in rows), key=lambda r: (r[1], r[2]))


def find_table(conn, schema: str, name: str) -> tuple[int, str] | None:
    """(oid, relkind) of the relation `schema.name`, or None."""
    row = conn.execute("""SELECT c.oid, c.relkind FROM pg_catalog.pg_class c
                          JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                          WHERE n.nspname = %s AND c.relname = %s""", (schema, name)).fetchone()
    return (int(row[0]), str(row[1])) if row else None


_COLUMNS = """
SELECT a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod), a.attnotnull,
       pg_catalog.pg_get_expr(d.adbin, d.adrelid), a.attidentity, a.attgenerated,
       CASE WHEN a.attcollation <> t.typcollation AND a.attcollation <> 0 THEN
            (SELECT pg_catalog.format('%%I.%%I', cn.nspname, co.collname) FROM pg_catalog.pg_collation co
             JOIN pg_catalog.pg_namespace cn ON cn.oid = co.collnamespace WHERE co.oid = a.attcollation) END,
       bt.typname, a.attcollation,
       (SELECT co.collprovider = 'c' AND co.collcollate IN ('C', 'POSIX') FROM pg_catalog.pg_collation co
        WHERE co.oid = a.attcollation), bt.typnamespace = 'pg_catalog'::regnamespace
FROM pg_catalog.pg_attribute a
JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
JOIN pg_catalog.pg_type bt ON bt.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END
LEFT JOIN pg_catalog.pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum"""

_SEQUENCES = """
WITH used AS (
    SELECT d.objid AS seq FROM pg_catalog.pg_depend d
    WHERE d.classid = 'pg_catalog.pg_class'::regclass AND d.refclassid = 'pg_catalog.pg_class'::regclass
      AND d.refobjid = %(t)s AND d.deptype IN ('a', 'i')
    UNION
    SELECT d.refobjid FROM pg_catalog.pg_depend d JOIN pg_catalog.pg_attrdef ad ON ad.oid = d.objid
    WHERE d.classid = 'pg_catalog.pg_attrdef'::regclass AND d.refclassid = 'pg_catalog.pg_class'::regclass
      AND ad.adrelid = %(t)s)
SELECT sn.nspname, s.relname, pg_catalog.format_type(q.seqtypid, NULL), q.seqstart, q.seqincrement, q.seqmin,
       q.seqmax, q.seqcache, q.seqcycle, o.attname, o.deptype,
       pg_catalog.format('nextval(%%L::regclass)', s.oid::regclass::text),
       pg_catalog.format('%%I.%%I', sn.nspname, s.relname)
FROM used JOIN pg_catalog.pg_class s ON s.oid = used.seq AND s.relkind = 'S'
JOIN pg_catalog.pg_namespace sn ON sn.oid = s.relnamespace
JOIN pg_catalog.pg_sequence q ON q.seqrelid = s.oid
LEFT JOIN LATERAL (SELECT a.attname, od.deptype FROM pg_catalog.pg_depend od
                   JOIN pg_catalog.pg_attribute a ON a.attrelid = od.refobjid AND a.attnum = od.refobjsubid
                   WHERE od.classid = 'pg_catalog.pg_class'::regclass AND od.objid = s.oid
                     AND od.refclassid = 'pg_catalog.pg_class'::regclass AND od.refobjid = %(t)s
                     AND od.deptype IN ('a', 'i')) o ON true
ORDER BY sn.nspname, s.relname"""

_CONSTRAINTS = """
SELECT c.conname, c.contype, pg_catalog.pg_get_constraintdef(c.oid),
       ARRAY(SELECT a.attname FROM unnest(c.conkey) WITH ORDINALITY k(n, i)
             JOIN pg_catalog.pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.n ORDER BY k.i),
       rn.nspname, r.relname,
       CASE WHEN r.oid IS NOT NULL THEN pg_catalog.format('%%I.%%I', rn.nspname, r.relname) END
FROM pg_catalog.pg_constraint c
LEFT JOIN pg_catalog.pg_class r ON r.oid = c.confrelid AND c.contype = 'f'
LEFT JOIN pg_catalog.pg_namespace rn ON rn.oid = r.relnamespace
WHERE c.conrelid = %s AND c.contype IN ('p', 'u', 'c', 'x', 'f')
ORDER BY c.contype <> 'p', c.conname"""

_INDEXES = """
SELECT pg_catalog.format('%%I', ic.relname), ic.relname, i.indisunique, pg_catalog.pg_get_indexdef(i.indexrelid)
FROM pg_catalog.pg_index i JOIN pg_catalog.pg_class ic ON ic.oid = i.indexrelid
WHERE i.indrelid = %s AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_constraint c
                                      WHERE c.conindid = i.indexrelid AND c.conrelid = i.indrelid)
ORDER BY ic.relname"""

_TYPES = """
SELECT DISTINCT t.typtype, n.nspname, t.typname,
       ARRAY(SELECT e.enumlabel FROM pg_catalog.pg_enum e WHERE e.enumtypid = t.oid ORDER BY e.enumsortorder),
       (SELECT x.extname FROM pg_catalog.pg_depend dx JOIN pg_catalog.pg_extension x ON x.oid = dx.refobjid
        WHERE dx.classid = 'pg_catalog.pg_type'::regclass AND dx.objid = t.oid AND dx.deptype = 'e')
FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_type at ON at.oid = a.atttypid
JOIN pg_catalog.pg_type t ON t.oid = CASE WHEN at.typcategory = 'A' THEN at.typelem ELSE at.oid END
JOIN pg_catalog.pg_namespace n ON n.oid = t.typnamespace
WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped AND n.nspname <> 'pg_catalog'"""


def describe_columns(conn, oid: int) -> list[dict[str, Any]]:
    """Every column in attnum order (stored generated ones included and marked).

    Private keys (leading underscore, not stored in the snapshot): `_kind`, the ordering kind,
    and `_bytewise`, whether this server already orders the column in byte order.
    """
    bytewise_default = None
    out = []
    for name, typ, notnull, default, ident, gen, coll, base, collid, coll_c, builtin in conn.execute(_COLUMNS, (oid,)):
        kind = _KIND_BY_TYPE.get(base, "text") if builtin else "text"
        bytewise = kind != "collated"
        if kind == "collated":
            if collid == 100:
                if bytewise_default is None:
                    bytewise_default = default_collation_is_bytewise(conn)
                coll_c = bytewise_default
            bytewise = bool(coll_c)
        out.append({"name": name, "type": typ, "not_null": bool(notnull),
                    "default": None if gen else default,
                    "identity": {"a": "always", "d": "by default"}.get(ident or ""),
                    "generated": default if gen == "s" else None, "collation": coll,
                    "_kind": kind, "_bytewise": bytewise})
    return out


def data_columns(columns: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The columns a record holds: all but stored generated ones (COPY FROM cannot write those)."""
    return [c for c in columns if not c["generated"]]


def bytewise_columns(columns: list[dict[str, Any]]) -> set[str]:
    """Names of the columns this server orders in byte order without COLLATE "C"."""
    return {c["name"] for c in columns if c["_bytewise"]}


def describe_table(conn, oid: int, schema: str, name: str) -> tuple[dict[str, Any], set[str]]:
    """The item schema: everything needed to recreate the table and to read it back in order.

    Returns the schema dict and `bytewise_columns` of this server (for `copy_out_sql`).
    """
    columns = describe_columns(conn, oid)
    persistence = conn.execute("SELECT relpersistence FROM pg_catalog.pg_class WHERE oid = %s", (oid,)).fetchone()[0]
    constraints, foreign_keys, primary_key = [], [], []
    for cname, ctype, definition, cols, ref_schema, ref_name, ref_sql in conn.execute(_CONSTRAINTS, (oid,)):
        if ctype == "f":
            # references_sql: how `definition` spells the referenced table (rewritten for a self-reference)
            foreign_keys.append({"name": cname, "definition": definition,
                                 "references": {"schema": ref_schema, "name": ref_name},
                                 "references_sql": ref_sql})
            continue
        if ctype == "p":
            primary_key = list(cols)
        constraints.append({"name": cname, "type": ctype, "definition": definition})
    qualified = quote_qualified(conn, schema, name)
    indexes = [{"name": iname, "unique": bool(unique), "using": _index_tail(indexdef, quoted, qualified)}
               for quoted, iname, unique, indexdef in conn.execute(_INDEXES, (oid,))]
    sequences = []
    for row in conn.execute(_SEQUENCES, {"t": oid}).fetchall():
        sschema, sname, styp, start, inc, smin, smax, cache, cycle, owner, deptype, nextval, squoted = row
        # not transactional: the value now, at or after the cut, so new ids never collide
        last_value, is_called = conn.execute(f"SELECT last_value, is_called FROM {squoted}").fetchone()
        sequences.append({"schema": sschema, "name": sname, "type": styp, "start": start, "increment": inc,
                          "min": smin, "max": smax, "cache": cache, "cycle": bool(cycle),
                          "last_value": last_value, "is_called": bool(is_called), "owned_by": owner,
                          "identity": deptype == "i"})
        for col in columns:
            if owner == col["name"] and deptype == "a" and col["default"] == nextval:
                # a serial column: restore rebuilds nextval(...) for the (possibly renamed) sequence
                col["default"], col["serial"] = None, sname
    enums, extensions = [], set()
    for typtype, tschema, tname, labels, ext in conn.execute(_TYPES, (oid,)):
        if ext:
            extensions.add(ext)
        elif typtype == "e":
            enums.append({"schema": tschema, "name": tname, "labels": list(labels)})
    data = data_columns(columns)
    if primary_key:
        by_name = {c["name"]: c for c in data}
        order = [by_name[n] for n in primary_key if n in by_name]
    else:
        order = data
    return {
        "schema_version": SCHEMA_VERSION, "table": {"schema": schema, "name": name},
        "unlogged": persistence == "u",
        "columns": [{k: v for k, v in c.items() if not k.startswith("_")} for c in columns],
        "copy_columns": [c["name"] for c in data],
        "primary_key": primary_key,
        "order_by": [{"column": c["name"], "kind": c["_kind"]} for c in order],
        "constraints": constraints, "foreign_keys": foreign_keys, "indexes": indexes,
        "sequences": sequences, "enums": sorted(enums, key=lambda e: (e["schema"], e["name"])),
        "extensions": sorted(extensions),
        **describe_objects(conn, oid, qualified),
    }, bytewise_columns(columns)


def quote_qualified(conn, schema: str, name: str) -> str:
    """`schema.name` quoted exactly as the catalog functions print it."""
    return conn.execute("SELECT pg_catalog.format('%%I.%%I', %s::text, %s::text)", (schema, name)).fetchone()[0]


def _index_tail(indexdef: str, quoted_name: str, qualified_table: str) -> str:
    """`USING btree (a) WHERE ...` from `CREATE [UNIQUE] INDEX name ON [ONLY] tbl USING ...`:
    the part that does not name the table, so it can be recreated under another name."""
    for unique in ("UNIQUE ", ""):
        for only in ("ONLY ", ""):
            prefix = f"CREATE {unique}INDEX {quoted_name} ON {only}{qualified_table} "
            if indexdef.startswith(prefix):
                return indexdef[len(prefix):]
    raise SourceError(f"unexpected index definition, cannot recreate it: {indexdef}")


# --------------------------------------------------------------------------- reading rows

def order_by_sql(order: list[dict[str, str]], bytewise: set[str]):
    """The ORDER BY list for schema["order_by"]; `bytewise` (see `bytewise_columns`) are the
    text columns this server already orders bytewise, which can use their index."""
    from psycopg import sql

    parts = []
    for entry in order:
        col = sql.Identifier(entry["column"])
        if entry["kind"] == "collated" and entry["column"] not in bytewise:
            parts.append(sql.SQL('{} COLLATE "C"').format(col))
        elif entry["kind"] == "text":
            parts.append(sql.SQL('({})::text COLLATE "C"').format(col))
        else:
            parts.append(col)
    return sql.SQL(", ").join(parts)


def copy_out_sql(schema_dict: dict[str, Any], target_schema: str, target_name: str, bytewise: set[str],
                 ordered: bool = True, where=None):
    """COPY (SELECT <copy columns> FROM ONLY tbl [WHERE ...] ORDER BY <key>) TO STDOUT, text.

    `ordered=False` drops the ORDER BY: enough for the order-independent digest, and a plain
    sequential scan instead of a sort or index walk (verification after a restore)."""
    from psycopg import sql

    cols = sql.SQL(", ").join(sql.Identifier(c) for c in schema_dict["copy_columns"])
    tail = sql.SQL("") if where is None else sql.SQL(" WHERE {}").format(where)
    if ordered and schema_dict["order_by"]:
        tail += sql.SQL(" ORDER BY {}").format(order_by_sql(schema_dict["order_by"], bytewise))
    # ONLY: rows of inheritance children are their own tables' items
    return sql.SQL("COPY (SELECT {} FROM ONLY {}{}) TO STDOUT").format(
        cols, sql.Identifier(target_schema, target_name), tail)


_UNESCAPE = re.compile(rb"\\(.)", re.S)
_ESCAPES = {b"n": b"\n", b"r": b"\r", b"t": b"\t", b"b": b"\b", b"f": b"\f", b"v": b"\v"}


def _text_field(raw: bytes) -> str:
    if b"\\" in raw:
        raw = _UNESCAPE.sub(lambda m: _ESCAPES.get(m.group(1), m.group(1)), raw)
    return raw.decode("utf-8", "surrogateescape")


def key_reader(schema_dict: dict[str, Any]):
    """record -> sortable key, ordered like `copy_out_sql`'s ORDER BY (see module docstring)."""
    columns = schema_dict["copy_columns"]
    spec = [(columns.index(e["column"]), e["kind"]) for e in schema_dict["order_by"]]

    def convert(field: bytes, kind: str) -> tuple:
        if field == b"\\N":
            return (2, "")
        if kind == "int":
            return (0, int(field))
        if kind in ("numeric", "float"):
            try:
                value = Decimal(field.decode()) if kind == "numeric" else float(field)
            except (InvalidOperation, ValueError):
                return (1, "")
            return (1, "") if value != value else (0, value)  # NaN sorts after numbers, before NULL
        return (0, _text_field(field))

    def key(record: bytes) -> tuple:
        fields = record.rstrip(b"\n").split(b"\t")
        return tuple(convert(fields[i], kind) for i, kind in spec)

    return key


def resolve_table_name(name: str, default_schema: str = "public") -> tuple[str, str]:
    """'schema.table' or 'table' (in `default_schema`)."""
    if "." in name:
        schema, table = name.split(".", 1)
    else:
        schema, table = default_schema, name
    if not schema or not table:
        raise NotFoundError(f"{name!r} is not a table name (use schema.table or table)")
    return schema, table


def copy_out_rows(conn, stmt) -> Iterator[bytes]:
    """The rows of a `COPY ... TO STDOUT`, read from libpq directly.

    psycopg's Copy iterator runs its generator/wait machinery for every row (~3 µs); this loop
    asks libpq for the next CopyData message in blocking mode and nothing else, which is the
    per-row hot path of both backups and restore verification. An abandoned iteration cancels
    the COPY and drains the connection so it stays usable. Errors become psycopg errors (the
    caller's `pg_errors` translates them).
    """
    import psycopg
    from psycopg import errors, pq

    pgconn = conn.pgconn
    encoding = conn.info.encoding
    query = stmt.as_bytes(conn) if hasattr(stmt, "as_bytes") else str(stmt).encode()
    pgconn.send_query(query)
    res = pgconn.get_result()
    if res is None or res.status != pq.ExecStatus.COPY_OUT:
        while pgconn.get_result() is not None:
            pass
        raise errors.error_from_result(res, encoding=encoding) if res is not None else \
            psycopg.OperationalError("COPY did not start")
    done = False
    try:
        while True:
            n, data = pgconn.get_copy_data(0)
            if n < 0:
                break
            yield bytes(data)
        done = True
    finally:
        if not done:
            (getattr(conn, "cancel_safe", None) or conn.cancel)()
            try:
                while pgconn.get_copy_data(0)[0] >= 0:
                    pass
            except psycopg.Error:
                pass
        final, last = None, pgconn.get_result()
        while last is not None:
            final, last = last, pgconn.get_result()
        if done and final is not None and final.status != pq.ExecStatus.COMMAND_OK:
            raise errors.error_from_result(final, encoding=encoding)
