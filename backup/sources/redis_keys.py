"""Talking to Redis/Valkey for backup and restore: connecting, errors, server facts, and
which keys an item covers (its *scope*), listed in sorted order with bounded memory.

An item's scope: keys matching its pattern, not matching any earlier item's pattern (a key
matching several configured patterns belongs to the first), and, when `only` selectors are
given, matching at least one of them. Patterns use Redis glob syntax as SCAN MATCH does
(`*`, `?`, `[abc]`, `[^a]`, `[a-z]`, backslash escapes); a selector without any of `*?[\\`
means exactly that key.

Key names are collected with SCAN (COUNT 1000, names only), de-duplicated (SCAN may return a
key twice) and sorted. Up to RUN_LIMIT names are sorted in memory (~100 bytes each for
typical keys, so ~100 MB); past that, sorted runs spill to temp files and are merged, so
memory stays bounded whatever the keyspace size.
"""
from __future__ import annotations

import contextlib
import heapq
import re
import struct
import tempfile
from dataclasses import dataclass
from typing import IO, Iterable, Iterator
from urllib.parse import urlsplit

from snapshots.errors import ConfigError, SourceError, StatevaultError
from snapshots.settings import redact_url

RUN_LIMIT = 1_000_000
SCAN_COUNT = 1000
_GLOB_CHARS = frozenset(b"*?[\\")


# ---- connecting and errors ---------------------------------------------------------------

def connect(url: str):
    """A redis-py client speaking RESP2 with *raw* replies (no response callbacks): stream
    entries with repeated field names must not be folded into dicts, and INFO/XINFO are parsed
    here the same way on every server version."""
    import redis

    try:
        client = redis.Redis.from_url(url, protocol=2, decode_responses=False,
                                      socket_connect_timeout=10, socket_timeout=120)
    except ValueError as exc:
        raise ConfigError(f"invalid Redis URL {redact_url(url)}: {exc}") from None
    client.response_callbacks.clear()
    return client


def translate_redis_error(exc: BaseException, what: str) -> StatevaultError:
    """Map a redis-py (or socket) exception to ours; unknown ones are not retried."""
    from redis import exceptions as redis

    if isinstance(exc, StatevaultError):
        return exc
    name = type(exc).__name__
    if isinstance(exc, (redis.AuthenticationError, redis.AuthenticationWrongNumberOfArgsError)):
        return SourceError(f"{what}: authentication failed",
                           hint="Check the user and password in the Redis URL.")
    if isinstance(exc, redis.NoPermissionError):
        return SourceError(f"{what}: the Redis user lacks a permission: {exc}",
                           hint="Grant the user the commands statevault needs (see README, 'Redis').")
    if isinstance(exc, (redis.ConnectionError, redis.TimeoutError, OSError)):
        return SourceError(f"{what}: cannot reach the server ({name}: {exc})", retryable=True)
    if isinstance(exc, redis.ReadOnlyError):
        return SourceError(f"{what}: the server is a read-only replica",
                           hint="Restore into the primary, not a replica.")
    if isinstance(exc, redis.ResponseError) and str(exc).startswith(("LOADING", "BUSY", "TRYAGAIN", "MASTERDOWN")):
        return SourceError(f"{what}: the server is busy ({exc})", retryable=True)
    if isinstance(exc, redis.RedisError):
        return SourceError(f"{what}: {name}: {exc}")
    return SourceError(f"{what}: unexpected {name}: {exc}")


@contextlib.contextmanager
def redis_errors(what: str):
    """Translate redis-py exceptions raised in the block (also inside generators)."""
    from redis.exceptions import RedisError

    try:
        yield
    except (RedisError, OSError) as exc:
        raise translate_redis_error(exc, what) from exc


@dataclass(frozen=True)
class ServerInfo:
    flavour: str            # "redis" | "valkey"
    version: str            # valkey_version for Valkey, else redis_version
    redis_version: str
    db: int
    has_pexpiretime: bool   # Redis >= 7.0 and every Valkey

    def to_dict(self) -> dict:
        return {"server": self.flavour, "version": self.version, "redis_version": self.redis_version, "db": self.db}


def server_info(client, url: str) -> ServerInfo:
    raw = client.execute_command("INFO", "server")
    fields = {}
    for line in raw.decode(errors="replace").splitlines():
        name, sep, value = line.partition(":")
        if sep:
            fields[name.strip()] = value.strip()
    redis_version = fields.get("redis_version", "0")
    valkey = fields.get("valkey_version")
    major = int(re.match(r"\d*", redis_version).group() or 0)
    path = urlsplit(url).path.strip("/")
    db = int(path) if path.isdigit() else int(client.connection_pool.connection_kwargs.get("db", 0) or 0)
    return ServerInfo(flavour="valkey" if valkey else "redis", version=valkey or redis_version,
                      redis_version=redis_version, db=db, has_pexpiretime=bool(valkey) or major >= 7)


def server_time_ms(client) -> int:
    sec, usec = client.execute_command("TIME")
    return int(sec) * 1000 + int(usec) // 1000


# ---- patterns ----------------------------------------------------------------------------

def is_glob(selector: str | bytes) -> bool:
    data = selector.encode() if isinstance(selector, str) else selector
    return any(c in _GLOB_CHARS for c in data)


def glob_regex(pattern: bytes) -> re.Pattern[bytes]:
    """Redis `stringmatchlen` semantics as a bytes regex (use fullmatch)."""
    out: list[bytes] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == 0x2A:  # *
            if not out or out[-1] != b".*":
                out.append(b".*")
        elif c == 0x3F:  # ?
            out.append(b".")
        elif c == 0x5C and i + 1 < n:  # backslash: next byte literally
            i += 1
            out.append(b"\\x%02x" % pattern[i])
        elif c == 0x5B:  # [ ... ]
            i += 1
            negate = i < n and pattern[i] == 0x5E
            if negate:
                i += 1
            parts: list[bytes] = []
            while i < n and pattern[i] != 0x5D:
                if pattern[i] == 0x5C and i + 1 < n:
                    i += 1
                    parts.append(b"\\x%02x" % pattern[i])
                elif i + 2 < n and pattern[i + 1] == 0x2D:  # a-z (Redis swaps a reversed range)
                    lo, hi = sorted((pattern[i], pattern[i + 2]))
                    parts.append(b"\\x%02x-\\x%02x" % (lo, hi))
                    i += 2
                else:
                    parts.append(b"\\x%02x" % pattern[i])
                i += 1
            if parts:
                out.append(b"[" + (b"^" if negate else b"") + b"".join(parts) + b"]")
            else:
                out.append(b"(?s:.)" if negate else b"(?!)")
        else:
            out.append(b"\\x%02x" % c)
        i += 1
    return re.compile(b"".join(out), re.DOTALL)


class KeyMatcher:
    """Matches raw key bytes against selectors: exact keys by set lookup, globs by regex."""

    def __init__(self, selectors: Iterable[str]):
        self.exact: set[bytes] = set()
        self.globs: list[bytes] = []
        self._regexes: list[re.Pattern[bytes]] = []
        for s in selectors:
            b = s.encode()
            if is_glob(b):
                self.globs.append(b)
                self._regexes.append(glob_regex(b))
            else:
                self.exact.add(b)

    def __call__(self, key: bytes) -> bool:
        if key in self.exact:
            return True
        for rx in self._regexes:
            if rx.fullmatch(key):
                return True
        return False


def scan(client, match: bytes) -> Iterator[bytes]:
    """SCAN MATCH over the whole keyspace (raw replies: redis-py's scan_iter needs callbacks)."""
    cursor = b"0"
    while True:
        cursor, keys = client.execute_command("SCAN", cursor, "MATCH", match, "COUNT", SCAN_COUNT)
        yield from keys
        if cursor == b"0":
            return


def _prefix_pattern(pattern: str) -> str | None:
    """"abc*" -> "abc" (a literal prefix and one trailing star), else None."""
    if pattern.endswith("*") and not is_glob(pattern[:-1]):
        return pattern[:-1]
    return None


def selector_may_match(selector: str, pattern: str, earlier: Iterable[str] = ()) -> bool:
    """False when no key matching `selector` can belong to the item `pattern` (after
    `earlier`); True when it may (exact for keys, conservative for globs)."""
    if not is_glob(selector):
        key = selector.encode()
        return KeyMatcher([pattern])(key) and not KeyMatcher(list(earlier))(key)
    literal = re.split(r"[*?\[\\]", selector, maxsplit=1)[0]
    for e in earlier:
        prefix = _prefix_pattern(e)
        if prefix is not None and literal.startswith(prefix):
            return False  # every key the selector matches starts with an earlier prefix
    own = _prefix_pattern(pattern)
    return own is None or literal.startswith(own) or own.startswith(literal)


class Scope:
    """The keys one item covers on a server (see the module docstring).

    `within` is a second selector list every key must also match (a restore of a snapshot
    that was itself taken with `only` covers only what that snapshot could hold)."""

    def __init__(self, pattern: str, earlier: Iterable[str] = (), only: Iterable[str] | None = None,
                 *, within: Iterable[str] | None = None):
        self.pattern = pattern
        self.earlier = list(earlier)
        self.only = list(only) if only else None
        self.within = list(within) if within else None
        self._own = KeyMatcher([pattern])
        self._earlier = KeyMatcher(self.earlier) if self.earlier else None
        self._filters = [KeyMatcher(s) for s in (self.only, self.within) if s]

    def contains(self, key: bytes) -> bool:
        if not self._own(key):
            return False
        if self._earlier is not None and self._earlier(key):
            return False
        for match in self._filters:
            if not match(key):
                return False
        return True

    def _candidates(self, client) -> Iterator[bytes]:
        if not self._filters:
            yield from scan(client, self.pattern.encode())
            return
        narrowest = self._filters[0]
        for glob in narrowest.globs:
            yield from scan(client, glob)
        exact = sorted(k for k in narrowest.exact if self.contains(k))
        for start in range(0, len(exact), 1000):
            batch = exact[start:start + 1000]
            pipe = client.pipeline(transaction=False)
            for key in batch:
                pipe.execute_command("EXISTS", key)
            for key, found in zip(batch, pipe.execute()):
                if found:
                    yield key

    def keys(self, client) -> Iterator[bytes]:
        """The scope's keys on the server now, sorted by raw bytes, each once."""
        return sorted_unique(k for k in self._candidates(client) if self.contains(k))


# ---- sorting key names with bounded memory -----------------------------------------------

def _spill(names: list[bytes]) -> IO[bytes]:
    f = tempfile.TemporaryFile(prefix="statevault-keys-")
    pack = struct.Struct("<I").pack
    f.write(b"".join(pack(len(n)) + n for n in names))
    f.seek(0)
    return f


def _read_run(f: IO[bytes]) -> Iterator[bytes]:
    unpack = struct.Struct("<I").unpack
    while True:
        head = f.read(4)
        if not head:
            return
        yield f.read(unpack(head)[0])


class NameSorter:
    """Collects names (in any order, with repeats) and yields them sorted and de-duplicated,
    holding at most `run_limit` names in memory: full runs are sorted and spilled to temp files."""

    def __init__(self, run_limit: int = RUN_LIMIT):
        self.run_limit = run_limit
        self._buf: set[bytes] = set()
        self._runs: list[IO[bytes]] = []

    def add(self, name: bytes) -> None:
        self._buf.add(name)
        if len(self._buf) >= self.run_limit:
            self._runs.append(_spill(sorted(self._buf)))
            self._buf = set()

    def __iter__(self) -> Iterator[bytes]:
        try:
            if not self._runs:
                yield from sorted(self._buf)
                return
            if self._buf:
                self._runs.append(_spill(sorted(self._buf)))
            self._buf = set()
            previous = None
            for name in heapq.merge(*(_read_run(f) for f in self._runs)):
                if name != previous:
                    yield name
                    previous = name
        finally:
            self.close()

    def close(self) -> None:
        for f in self._runs:
            f.close()
        self._runs = []
        self._buf = set()


def sorted_unique(names: Iterable[bytes], run_limit: int = RUN_LIMIT) -> Iterator[bytes]:
    """`names` sorted and de-duplicated with bounded memory (reads all of `names` first)."""
    sorter = NameSorter(run_limit)
    try:
        for name in names:
            sorter.add(name)
    except BaseException:
        sorter.close()
        raise
    yield from sorter


def sorted_minus(left: Iterable[bytes], right: Iterable[bytes]) -> Iterator[bytes]:
    """Names of sorted `left` that are not in sorted `right`."""
    it = iter(right)
    r = next(it, None)
    for name in left:
        while r is not None and r < name:
            r = next(it, None)
        if r != name:
            yield name
