"""COPY FROM STDIN into one table, over one connection or over several at once.

The load of a restore is bound by the server: one backend parses the COPY text (jsonb,
timestamptz, ... from text), forms the tuples and writes them and their WAL, on one CPU,
while the client only decompresses and joins records. Several COPYs into the same table, one
per connection, let as many backends do that at once. Each COPY is its own transaction, so
they can only write to a table that is already committed: the PostgreSQL target builds a big
table in a staging schema and moves it into place when it is whole (restore.targets.postgres,
`_build_staged`).

How many connections: RestoreOptions.jobs (`restore --jobs`, default 2). Measured on 2 CPUs
with the bench's 1M-row memory table (250 MB of COPY text), the COPY alone: one connection
1.94-2.61 s, two 1.56-1.59 s, three 1.56-1.90 s. More connections than the server has CPUs
buy nothing.
"""
from __future__ import annotations

import queue
import threading
from typing import Iterable, Iterator

MIN_BYTES = 64 << 20      # smaller tables load in one transaction, in place (no staging)
BATCH_BYTES = 1 << 20     # a write to COPY: at most this much, or `rows` records
_QUEUE = 8                # batches waiting for a loader: bounds the memory to ~8 MiB


def batches(records: Iterable[bytes], rows: int) -> Iterator[bytes]:
    """`records` joined into writes of at most `rows` records or ~BATCH_BYTES."""
    rows = max(1, rows)
    batch: list[bytes] = []
    size = 0
    for record in records:
        batch.append(record)
        size += len(record)
        if len(batch) >= rows or size >= BATCH_BYTES:
            yield b"".join(batch)
            batch, size = [], 0
    if batch:
        yield b"".join(batch)


def copy_in(conn, statement, records: Iterable[bytes], rows: int) -> None:
    """One COPY FROM STDIN on `conn` (in the caller's transaction)."""
    with conn.cursor() as cur, cur.copy(statement) as copy:
        for batch in batches(records, rows):
            copy.write(batch)


class _Stop(Exception):
    """Makes a loader's COPY fail, so the server rolls that part back."""


_END, _ABORT = object(), object()


def parallel_copy_in(conns: list, statement, records: Iterable[bytes], rows: int) -> None:
    """`records` into one table by a COPY on each of `conns` (autocommit: each commits its own
    part when it ends), fed from this thread through one bounded queue: a loader takes the
    next batch when its server process is ready for it.

    All or nothing only together with its caller: if anything fails (a loader's COPY, reading
    the records, an interrupt), the other loaders' COPYs are made to fail too, but a part that
    had already committed stays, so the caller drops the table. The first error is raised."""
    work: queue.Queue = queue.Queue(_QUEUE)
    errors: list[BaseException] = []

    def load(conn) -> None:
        ended = False  # this loader took its end mark: the feeder puts one per loader
        try:
            with conn.cursor() as cur, cur.copy(statement) as copy:
                while not ended:
                    batch = work.get()
                    ended = batch is _END or batch is _ABORT
                    if batch is _ABORT:
                        raise _Stop
                    if not ended:
                        copy.write(batch)
        except _Stop:
            return
        except BaseException as exc:  # noqa: BLE001 - handed to the feeding thread
            errors.append(exc)
            while not ended:  # keep the feeder from blocking on a full queue
                batch = work.get()
                ended = batch is _END or batch is _ABORT

    loaders = [threading.Thread(target=load, args=(c,), name=f"statevault-copy-{i}", daemon=True)
               for i, c in enumerate(conns)]
    for t in loaders:
        t.start()
    end = _END
    try:
        for batch in batches(records, rows):
            if errors:
                break
            work.put(batch)
    except BaseException:
        end = _ABORT
        raise
    finally:
        if errors:
            end = _ABORT
        for _ in loaders:
            work.put(end)
        for t in loaders:
            t.join()
    if errors:
        raise errors[0]
