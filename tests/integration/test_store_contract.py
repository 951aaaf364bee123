"""One contract suite for every object store: the same tests on file:// and on s3:// (moto over HTTP).

The contract is the docstring of `snapshots.stores.base.ObjectStore`; a backend that passes
here can hold a repository.
"""
from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone

import pytest

from snapshots.errors import NotFoundError, StatevaultError, StoreError, UsageError, translate_store_error
from snapshots.repository import Repository, open_repository
from snapshots.stores.base import open_store


@pytest.fixture
def store(repo_url):
    return open_store(repo_url)


def _keys(infos) -> dict[str, int]:
    return {i.key: i.size for i in infos}


# --------------------------------------------------------------------------- put / get / overwrite

def test_put_then_get_returns_the_bytes_and_overwrite_replaces_them(store):
    store.put("small/a.bin", b"first version")
    assert store.get("small/a.bin") == b"first version"
    big = bytes(range(256)) * 4096  # 1 MiB, binary
    store.put("small/a.bin", big)
    assert store.get("small/a.bin") == big
    store.put("small/a.bin", b"")
    assert store.get("small/a.bin") == b""
    assert store.stat("small/a.bin").size == 0


def test_overwrite_is_atomic_for_concurrent_readers(store):
    """Readers see the old or the new bytes, never a mix or a truncated object."""
    a, b = b"A" * (192 << 10), b"B" * (160 << 10)
    store.put("hot/object", a)
    stop = threading.Event()
    seen: list[bytes] = []
    errors: list[BaseException] = []

    def read() -> None:
        while not stop.is_set():
            try:
                seen.append(store.get("hot/object"))
            except BaseException as exc:  # noqa: BLE001 - any failure is a contract breach
                errors.append(exc)
                return

    readers = [threading.Thread(target=read) for _ in range(2)]
    for t in readers:
        t.start()
    deadline = time.monotonic() + 0.8
    writes = 0
    while time.monotonic() < deadline:
        store.put("hot/object", b if writes % 2 == 0 else a)
        writes += 1
    stop.set()
    for t in readers:
        t.join()
    assert not errors, errors[0]
    assert writes > 5 and len(seen) > 5
    torn = [len(x) for x in seen if x not in (a, b)]
    assert not torn, f"{len(torn)} reads saw torn objects (sizes {torn[:5]})"


# --------------------------------------------------------------------------- conditional create

def test_create_succeeds_once_and_never_overwrites(store):
    assert store.create("locks/x/one.json", b"winner") is True
    assert store.create("locks/x/one.json", b"loser") is False
    assert store.get("locks/x/one.json") == b"winner"
    store.put("plain", b"put first")
    assert store.create("plain", b"create later") is False
    assert store.get("plain") == b"put first"


def test_concurrent_create_from_eight_threads_has_exactly_one_winner(store):
    rounds, threads = 6, 8
    for r in range(rounds):
        key = f"race/round-{r}.json"
        barrier = threading.Barrier(threads)
        results: list[tuple[int, bool]] = []
        errors: list[BaseException] = []

        def attempt(n: int) -> None:
            try:
                barrier.wait(timeout=10)
                results.append((n, store.create(key, f"holder {n}".encode())))
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        workers = [threading.Thread(target=attempt, args=(n,)) for n in range(threads)]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        assert not errors, errors[0]
        winners = [n for n, won in results if won]
        assert len(results) == threads
        assert len(winners) == 1, f"round {r}: {len(winners)} creates succeeded"
        assert store.get(key) == f"holder {winners[0]}".encode()


# --------------------------------------------------------------------------- list

def test_list_is_recursive_and_stays_inside_the_prefix(store):
    objects = {"a/x": b"1", "a/b/y": b"22", "a/b/c/z": b"333", "ab/outside": b"4444", "top": b"55555",
               "b/a/not-a": b"6"}
    for key, data in objects.items():
        store.put(key, data)
    assert _keys(store.list("a")) == {"a/x": 1, "a/b/y": 2, "a/b/c/z": 3}
    assert _keys(store.list("a/")) == {"a/x": 1, "a/b/y": 2, "a/b/c/z": 3}
    assert _keys(store.list("a/b")) == {"a/b/y": 2, "a/b/c/z": 3}
    assert _keys(store.list("")) == {k: len(v) for k, v in objects.items()}
    assert list(store.list("nothing-here")) == []
    # a prefix names a directory-like level, not a string prefix: "a" never lists "ab/..."
    assert "ab/outside" not in _keys(store.list("a"))


def test_list_reports_modification_times_in_utc(store):
    before = datetime.now(timezone.utc) - timedelta(seconds=5)
    store.put("t/one", b"x")
    (info,) = list(store.list("t"))
    assert info.modified.tzinfo is not None
    assert before <= info.modified <= datetime.now(timezone.utc) + timedelta(seconds=5)


def test_list_refuses_a_prefix_that_escapes_the_repository(store):
    for prefix in ("..", "../", "../outside", "a/../../b", "/etc"):
        with pytest.raises(UsageError):
            list(store.list(prefix))


# --------------------------------------------------------------------------- delete / exists / stat

def test_delete_removes_and_is_idempotent(store):
    store.put("d/k", b"data")
    store.put("d/keep", b"other")
    store.delete("d/k")
    assert not store.exists("d/k")
    store.delete("d/k")            # absent: not an error
    store.delete("d/never-was")
    assert _keys(store.list("d")) == {"d/keep": 5}


def test_exists_and_stat(store):
    assert store.exists("s/k") is False
    store.put("s/k", b"12345")
    assert store.exists("s/k") is True
    info = store.stat("s/k")
    assert (info.key, info.size) == ("s/k", 5)
    # a "directory" level is not an object
    assert store.exists("s") is False
    with pytest.raises(NotFoundError):
        store.stat("s")


def test_missing_key_is_not_found(store):
    with pytest.raises(NotFoundError) as exc:
        store.get("data/ab/missing")
    assert "data/ab/missing" in exc.value.message
    with pytest.raises(NotFoundError):
        store.stat("data/ab/missing")


UNSAFE_KEYS = ["../escape", "/etc/passwd", "a/../../b", "a//b", "./a", "a/./b", "", "a/",
               "data/../../../etc/passwd", "a\\..\\b", "a/b c"]


def test_unsafe_keys_are_refused_by_every_operation(store):
    for key in UNSAFE_KEYS:
        ops = {"put": lambda: store.put(key, b"x"), "create": lambda: store.create(key, b"x"),
               "get": lambda: store.get(key), "exists": lambda: store.exists(key),
               "stat": lambda: store.stat(key), "delete": lambda: store.delete(key)}
        for name, op in ops.items():
            with pytest.raises(UsageError, match="refusing object key"):
                op()
                pytest.fail(f"{name}({key!r}) was accepted")
    assert list(store.list("")) == []  # nothing was written anywhere


# --------------------------------------------------------------------------- missing repository / bucket

def test_missing_bucket_is_not_found_with_a_clear_message(s3_endpoint):
    with pytest.raises(NotFoundError) as exc:
        open_repository("s3://no-such-bucket-statevault/prefix")
    assert "no-such-bucket-statevault" in exc.value.message
    assert "does not exist" in exc.value.message
    assert exc.value.exit_code == 2
    store = open_store("s3://no-such-bucket-statevault/prefix")
    with pytest.raises(NotFoundError) as exc:
        store.get("config.json")
    assert "bucket" in exc.value.message
    with pytest.raises(NotFoundError) as exc:  # a missing bucket is not "no objects"
        list(store.list("snapshots"))
    assert "bucket" in exc.value.message


def test_missing_repository_is_not_found_until_created(repo_url):
    with pytest.raises(NotFoundError) as exc:
        open_repository(repo_url)
    assert "no statevault repository" in exc.value.message
    repo = open_repository(repo_url, create=True)
    again = open_repository(repo_url, create=True)  # a second init keeps the first config
    assert again.config.id == repo.config.id


def test_unreachable_s3_endpoint_is_a_retryable_store_error(s3_endpoint):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = open_store("s3://bucket/p", endpoint_url=f"http://127.0.0.1:{port}")
    started = time.monotonic()
    with pytest.raises(StoreError) as exc:
        store.get("config.json")
    assert exc.value.retryable is True
    assert "cannot reach" in exc.value.message
    assert time.monotonic() - started < 30


# --------------------------------------------------------------------------- error translation

def test_unmapped_botocore_exception_is_a_non_retryable_store_error_naming_its_type():
    from botocore.exceptions import ClientError, ParamValidationError

    err = translate_store_error(ParamValidationError(report="Invalid bucket name"), "write data/ab/cd")
    assert type(err) is StoreError
    assert err.retryable is False
    assert "ParamValidationError" in err.message and "write data/ab/cd" in err.message

    unknown_code = ClientError({"Error": {"Code": "InvalidStorageClass", "Message": "nope"},
                                "ResponseMetadata": {"HTTPStatusCode": 400}}, "PutObject")
    err = translate_store_error(unknown_code, "write x")
    assert type(err) is StoreError and err.retryable is False
    assert "ClientError" in err.message and "InvalidStorageClass" in err.message

    class SomethingNew(Exception):
        pass

    err = translate_store_error(SomethingNew("surprise"), "read y")
    assert type(err) is StoreError and err.retryable is False
    assert "SomethingNew" in err.message


def test_known_store_errors_are_mapped():
    from botocore.exceptions import ClientError, EndpointConnectionError

    def client_error(code: str, status: int) -> ClientError:
        return ClientError({"Error": {"Code": code, "Message": code},
                            "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")

    assert isinstance(translate_store_error(client_error("NoSuchKey", 404), "r"), NotFoundError)
    assert isinstance(translate_store_error(client_error("NoSuchBucket", 404), "r"), NotFoundError)
    denied = translate_store_error(client_error("AccessDenied", 403), "r")
    assert type(denied) is StoreError and not denied.retryable
    assert translate_store_error(client_error("SlowDown", 503), "r").retryable is True
    assert translate_store_error(EndpointConnectionError(endpoint_url="http://x"), "r").retryable is True
    assert isinstance(translate_store_error(FileNotFoundError(2, "gone"), "r"), NotFoundError)


def test_repository_retries_transient_errors_but_not_unmapped_ones(file_repo_url):
    repo: Repository = open_repository(file_repo_url, create=True)
    calls = {"unmapped": 0, "transient": 0}

    def unmapped():
        calls["unmapped"] += 1
        raise translate_store_error(RuntimeError("boom"), "write k")

    def transient_then_ok():
        calls["transient"] += 1
        if calls["transient"] < 3:
            raise StoreError("flaky", retryable=True)
        return "ok"

    with pytest.raises(StoreError) as exc:
        repo.retrying(unmapped, "write k")
    assert calls["unmapped"] == 1 and "RuntimeError" in exc.value.message
    assert repo.retrying(transient_then_ok, "write k") == "ok"
    assert calls["transient"] == 3
    assert isinstance(exc.value, StatevaultError)
