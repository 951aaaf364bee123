"""Reading a big table back in page ranges, one server process per range, under one snapshot.

A restore's verification reads every restored row back (COPY ... TO STDOUT) and is bound by
the server formatting rows (jsonb, timestamptz, ... to text), which one backend does on one
CPU. Split by `ctid` page ranges (a TID Range Scan: PostgreSQL 14+), several backends format
their ranges at once, and the order-independent digest adds the ranges' digests up
(restore.verify.digest_concurrently). All ranges read one snapshot: the first connection
exports it (pg_export_snapshot, as `pg_dump -j` does) and the others import it, so every row
version is seen exactly once even if the table is written to meanwhile.

Measured on 2 CPUs with the bench's 1M-row memory table (330 MB): read back and digested
alone, one range 1.37-2.31 s, two ranges 1.15-1.72 s; as the verification of a restore
(restore.run, the first read of freshly loaded pages, which also sets their hint bits),
medians of six restores each 2.00 s with one range, 1.79 s with two. The client's hashing
shares the GIL, so more ranges than CPUs buy nothing here; a server with more CPUs gains more.
"""
from __future__ import annotations

import logging
from typing import Callable, Iterator

from psycopg import sql

from snapshots.errors import StatevaultError

log = logging.getLogger("statevault.restore.postgres")

MIN_BYTES = 64 << 20      # smaller tables are read back by one COPY: setup costs more than it saves
MIN_SERVER_VERSION = 140000


def page_ranges(pages: int, parts: int) -> list[tuple[int, int | None]]:
    """[lo, hi) page ranges covering the table; the last one is open-ended."""
    bounds = [pages * i // parts for i in range(parts)]
    return [(lo, bounds[i + 1] if i + 1 < parts else None) for i, lo in enumerate(bounds)]


def range_filter(lo: int, hi: int | None) -> sql.Composed:
    """WHERE condition of the rows stored in pages [lo, hi)."""
    cond = sql.SQL("ctid >= {}::tid").format(sql.Literal(f"({lo},0)"))
    if hi is not None:
        cond += sql.SQL(" AND ctid < {}::tid").format(sql.Literal(f"({hi},0)"))
    return cond


def parallel_reads(conn, connect: Callable[[], object], oid: int,
                   read: Callable[[object, sql.Composable], Iterator[bytes]], parts: int = 2
                   ) -> list[Iterator[bytes]] | None:
    """Record streams covering table `oid` (`parts` page ranges, each on a new connection from
    `connect`), or None when one COPY is as good: a server before 14, a table under
    MIN_BYTES, or one part. `read(connection, condition)` yields the rows matching `condition`. Each
    stream closes its connection when exhausted or closed."""
    if parts < 2 or conn.info.server_version < MIN_SERVER_VERSION:
        return None
    size, block = conn.execute("SELECT pg_catalog.pg_relation_size(%s), "
                               "pg_catalog.current_setting('block_size')::int", (oid,)).fetchone()
    if size < MIN_BYTES:
        return None
    conns = []
    try:
        for _ in range(parts):
            conns.append(connect())
    except StatevaultError as exc:
        # e.g. max_connections reached: verify with the one connection rather than fail a
        # restore whose data is already in
        log.warning("reading the table back over one connection: another one was refused (%s)", exc.message)
        for c in conns:
            c.close()
        return None
    try:
        for i, c in enumerate(conns):
            c.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            if i == 0:
                snapshot = c.execute("SELECT pg_catalog.pg_export_snapshot()").fetchone()[0]
            else:
                c.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot)))
    except BaseException:
        for c in conns:
            c.close()
        raise
    # every transaction has its snapshot now: the exporting one may end whenever its stream does
    return [_stream(c, read, range_filter(lo, hi)) for c, (lo, hi) in zip(conns, page_ranges(size // block, parts))]


def _stream(conn, read, cond) -> Iterator[bytes]:
    try:
        yield from read(conn, cond)
    finally:
        conn.close()
