"""Thread pools that live inside generators."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def read_ahead_pool(workers: int, name: str) -> Iterator[ThreadPoolExecutor]:
    """A pool for a generator's read-ahead: waited for when the generator runs to its end;
    when it is left unfinished (its consumer failed or stopped), the queued work is cancelled
    and the work in progress is not waited for. An unfinished generator is closed by the
    garbage collector, in whatever thread it runs in, even one holding threading's own locks:
    joining a thread from there deadlocks (seen: a restore's failed load, then a new thread's
    start() waiting forever)."""
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
    finished = False
    try:
        yield pool
        finished = True
    finally:
        pool.shutdown(wait=finished, cancel_futures=not finished)
