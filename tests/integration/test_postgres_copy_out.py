"""The libpq-level COPY reader used on the backup and verification hot paths."""
from __future__ import annotations

import psycopg
import pytest

from backup.sources.postgres_schema import copy_out_rows


@pytest.fixture
def conn(pg_url):
    with psycopg.connect(pg_url, autocommit=True) as c:
        c.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        c.execute("INSERT INTO t SELECT g, 'row ' || g || E'\\ttab' FROM generate_series(1, 5000) g")
        yield c


def test_rows_equal_psycopg_copy(conn):
    ours = list(copy_out_rows(conn, "COPY (SELECT * FROM t ORDER BY id) TO STDOUT"))
    with conn.cursor() as cur, cur.copy("COPY (SELECT * FROM t ORDER BY id) TO STDOUT") as copy:
        theirs = [bytes(r) for r in copy]
    assert ours == theirs and len(ours) == 5000 and ours[0] == b"1\trow 1\\ttab\n"


def test_abandoned_iteration_leaves_the_connection_usable(conn):
    rows = copy_out_rows(conn, "COPY t TO STDOUT")
    assert next(rows).startswith(b"1\t")
    rows.close()
    assert conn.execute("SELECT count(*) FROM t").fetchone()[0] == 5000


def test_errors_are_raised_and_the_connection_survives(conn):
    with pytest.raises(psycopg.errors.UndefinedTable):
        list(copy_out_rows(conn, "COPY no_such_table TO STDOUT"))
    assert conn.execute("SELECT 1").fetchone()[0] == 1
