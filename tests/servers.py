"""Servers for tests: the launchers of `backup.local_servers`, plus stand-ins for servers the
operator points us at and the policy for sharing one server between many tests.

Overrides (for a machine without the server binaries, or a CI with service containers):

    STATEVAULT_TEST_PG_URL      an existing PostgreSQL the tests may create and drop databases on.
                                Tests only ever work inside databases they create themselves
                                (named svtest_*), dropped again after each test.
    STATEVAULT_TEST_REDIS_URL   a Redis DEDICATED to tests: the DBs handed out are FLUSHDB'd.
    STATEVAULT_TEST_REDIS_DBS   which DB indexes of that server are ours, e.g. "8-15" or "3,5";
                                default: only the index in STATEVAULT_TEST_REDIS_URL's path.
"""
from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from urllib.parse import urlsplit, urlunsplit

from backup.local_servers import (  # noqa: F401 - re-exported for tests and bench scripts
    REDIS_FLAVOURS,
    S3_DUMMY_CREDENTIALS,
    S3_REGION,
    PostgresDatabases,
    PostgresServer,
    RedisServer,
    S3Server,
    ServerUnavailable,
    find_pg_bin_dir,
    find_redis_binary,
    free_port,
)


def unique_name(prefix: str, hint: str = "", max_len: int = 63) -> str:
    """A lowercase identifier safe for databases and buckets: prefix, a slug of `hint`, random tail."""
    slug = re.sub(r"[^a-z0-9]+", "_", hint.lower()).strip("_")
    tail = secrets.token_hex(4)
    head = f"{prefix}_{slug}" if slug else prefix
    return f"{head[: max_len - len(tail) - 1]}_{tail}"


class ExistingPostgres(PostgresDatabases):
    """A PostgreSQL we did not start (STATEVAULT_TEST_PG_URL): same interface, never stopped."""

    external = True

    def __init__(self, url: str):
        self.url = url
        parts = urlsplit(url)
        self.host, self.port = parts.hostname, parts.port or 5432

    def stop(self) -> None:
        """Not ours to stop."""


class ExistingRedis:
    """A Redis we did not start (STATEVAULT_TEST_REDIS_URL), restricted to the DBs we were given."""

    external = True
    flavour = "external"

    def __init__(self, url: str, db_indexes: Sequence[int] | None = None):
        parts = urlsplit(url)
        self._parts = parts
        self.host, self.port = parts.hostname, parts.port or 6379
        own = int(parts.path.strip("/") or 0)
        self.db_indexes = list(db_indexes) if db_indexes else [own]
        self.url = self.db_url(self.db_indexes[0])

    def db_url(self, index: int) -> str:
        return urlunsplit(self._parts._replace(path=f"/{index}"))

    @property
    def version(self) -> str:
        import redis

        with redis.Redis.from_url(self.url) as client:
            info = client.info("server")
        return str(info.get("valkey_version") or info.get("redis_version"))

    def stop(self) -> None:
        """Not ours to stop."""


def parse_db_indexes(spec: str | None) -> list[int] | None:
    """"8-15" -> [8..15]; "3,5" -> [3, 5]; empty -> None."""
    if not spec or not spec.strip():
        return None
    indexes: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.strip().partition("-")
        indexes.extend(range(int(lo), int(hi or lo) + 1))
    return indexes


class RedisDbAllocator:
    """Hands out one server's DB indexes round-robin, each FLUSHDB'd (that DB only) first.

    A test may hold several at once (source and restore target); asking for more than the
    server has is an error rather than a silent reuse of a DB the test already holds.
    """

    def __init__(self, server):
        self.server = server
        self._indexes = list(server.db_indexes)
        self._next = 0

    def take(self, held: int) -> str:
        if held >= len(self._indexes):
            raise RuntimeError(f"a test asked for more than the {len(self._indexes)} Redis DBs of "
                               f"{self.server.host}:{self.server.port} that the tests may use")
        import redis

        index = self._indexes[self._next % len(self._indexes)]
        self._next += 1
        url = self.server.db_url(index)
        with redis.Redis.from_url(url) as client:
            client.flushdb()
        return url
