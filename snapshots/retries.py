"""Retrying transient errors: one place for the backoff policy and its one trap.

Every retry in statevault (a store call, a source's whole backup, a Qdrant upsert) goes through
`retry_call`: exponential backoff with full jitter (tenacity), for errors marked retryable, and
the last error raised as it is.

The trap: tenacity keeps each attempt's outcome, the exception, in its call state, which is a
local of a frame on that exception's own traceback. That reference cycle holds every frame of
the traceback, with all their locals, until Python's cyclic GC happens to run. In a backup,
each new chunk's `stat` ends in NotFoundError, so every upload left its chunk buffers (up to
4 MiB) behind for a while: the peak RSS of a backup rose with its size (bench/bench_rss.py:
1.23-1.26x at 10x the data, 1.09-1.15x once the frames are cleared).
"""
from __future__ import annotations

import traceback
from typing import Callable, TypeVar

from snapshots.errors import StatevaultError

T = TypeVar("T")


def is_retryable(exc: BaseException) -> bool:
    return isinstance(exc, StatevaultError) and exc.retryable


def retry_call(fn: Callable[[], T], *, attempts: int, multiplier: float, max_wait: float) -> T:
    """`fn()`, called again after a retryable StatevaultError, at most `attempts` times in all,
    waiting a random time up to multiplier x 2^n seconds (at most `max_wait`) between calls."""
    from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_random_exponential

    retry = Retrying(stop=stop_after_attempt(attempts), wait=wait_random_exponential(multiplier=multiplier,
                                                                                      max=max_wait),
                     retry=retry_if_exception(is_retryable), reraise=True)
    try:
        return retry(fn)
    except BaseException as exc:
        traceback.clear_frames(exc.__traceback__)  # break the cycle (module docstring)
        raise
