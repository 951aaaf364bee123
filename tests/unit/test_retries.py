"""snapshots/retries.py: retries, and no reference cycle left by an error that went through them."""
from __future__ import annotations

import gc
import weakref

import pytest

from snapshots.errors import NotFoundError, StoreError
from snapshots.retries import retry_call


class Buffer:
    """Stands for a caller's chunk buffer (bytes cannot be weakly referenced)."""


def _failing(errors: list[Exception]):
    calls = []

    def fn():
        calls.append(1)
        if errors:
            raise errors.pop(0)
        return "done"
    return fn, calls


def test_retryable_errors_are_retried_and_others_raised_at_once():
    fn, calls = _failing([StoreError("busy", retryable=True), StoreError("busy", retryable=True)])
    assert retry_call(fn, attempts=3, multiplier=0, max_wait=0) == "done" and len(calls) == 3
    fn, calls = _failing([StoreError("busy", retryable=True)] * 3)
    with pytest.raises(StoreError, match="busy"):
        retry_call(fn, attempts=3, multiplier=0, max_wait=0)
    assert len(calls) == 3
    fn, calls = _failing([NotFoundError("gone"), NotFoundError("gone")])
    with pytest.raises(NotFoundError):
        retry_call(fn, attempts=3, multiplier=0, max_wait=0)
    assert len(calls) == 1


def test_an_error_caught_after_retry_call_frees_the_callers_locals_without_the_cyclic_gc():
    """tenacity's call state holds the exception whose traceback holds that call state's frame:
    without clearing, the caller's frame (and its buffers) lived on until a GC run."""
    gc.collect()
    gc.disable()
    try:
        refs = []

        def store_chunk():
            buffer = Buffer()
            refs.append(weakref.ref(buffer))
            fn, _ = _failing([NotFoundError("no such chunk")])
            try:
                retry_call(fn, attempts=3, multiplier=0, max_wait=0)
            except NotFoundError:
                pass

        for _ in range(5):
            store_chunk()
        assert [r() for r in refs] == [None] * 5
    finally:
        gc.enable()
