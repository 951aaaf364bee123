"""Which keys an item covers on a Redis/Valkey server (its *scope*), listed in sorted order
with bounded memory.

An item's scope: keys matching its pattern, not matching any earlier item's pattern (a key
matching several configured patterns belongs to the first), and, when `only` selectors are
given, matching at least one of them. Patterns use Redis glob syntax as SCAN MATCH does
(`*`, `?`, `[abc]`, `[^a]`, `[a-z]`, backslash escapes); a selector without any of `*?[\\`
means exactly that key.

Key names are collected with SCAN (COUNT 5000, names only), de-duplicated (SCAN may return a
key twice) and sorted. Up to RUN_LIMIT names are sorted in memory (~100 bytes each for
typical keys, so ~10 MB); past that, sorted runs spill to temp files and are merged a block
of each run at a time (about RUN_LIMIT names over all of them), so memory stays bounded
whatever the keyspace size.
"""
from __future__ import annotations

import bisect
import re
import tempfile
from itertools import islice
from typing import Iterable, Iterator

import numpy as np

from backup.sources.redis_client import execute_many, raise_first_error

RUN_LIMIT = 100_000  # names sorted in memory before a run spills: ~10 MB, so RSS does not grow with the keyspace
SCAN_COUNT = 5000  # names per SCAN call: fewer round trips, each still ~1 ms of server time
_GLOB_CHARS = frozenset(b"*?[\\")


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


def scan_pages(client, match: bytes) -> Iterator[list[bytes]]:
    """SCAN MATCH over the whole keyspace, a reply's names at a time (raw replies: redis-py's
    scan_iter needs callbacks)."""
    cursor = b"0"
    while True:
        cursor, keys = client.execute_command("SCAN", cursor, "MATCH", match, "COUNT", SCAN_COUNT)
        yield keys
        if cursor == b"0":
            return


def scan(client, match: bytes) -> Iterator[bytes]:
    for page in scan_pages(client, match):
        yield from page


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

    def _candidate_pages(self, client) -> Iterator[list[bytes]]:
        if not self._filters:
            yield from scan_pages(client, self.pattern.encode())
            return
        narrowest = self._filters[0]
        for glob in narrowest.globs:
            yield from scan_pages(client, glob)
        exact = sorted(k for k in narrowest.exact if self.contains(k))
        for start in range(0, len(exact), 1000):
            batch = exact[start:start + 1000]
            found = raise_first_error(execute_many(client, [("EXISTS", key) for key in batch]))
            yield [key for key, n in zip(batch, found) if n]

    def keys(self, client) -> Iterator[bytes]:
        """The scope's keys on the server now, sorted by raw bytes, each once."""
        if not self._filters and self._earlier is None:
            # SCAN MATCH of the pattern is the whole test: no per-name check in Python
            return sorted_unique_pages(scan_pages(client, self.pattern.encode()))
        contains = self.contains
        return sorted_unique_pages([k for k in page if contains(k)] for page in self._candidate_pages(client))


# ---- sorting key names with bounded memory -----------------------------------------------

_MERGE_BLOCK = 20_000  # names read from each spilled run at a time while merging, at most
_MIN_MERGE_BLOCK = 500  # ... and at least; in between, run_limit names over all the runs


class _Run:
    """A sorted run of names spilled to a temp file: the names' lengths (uint32) then their
    bytes, read back a block of names at a time (no Python call per name)."""

    def __init__(self, names: list[bytes]):
        self._f = tempfile.TemporaryFile(prefix="statevault-keys-")
        lens = np.fromiter(map(len, names), dtype=np.uint32, count=len(names))
        self._f.write(lens.tobytes())
        self._f.write(b"".join(names))
        self._count, self._done = len(names), 0
        self._lens_at, self._data_at = 0, lens.nbytes

    def next_block(self, size: int) -> list[bytes]:
        n = min(size, self._count - self._done)
        if n <= 0:
            return []
        self._f.seek(self._lens_at)
        lens = np.frombuffer(self._f.read(4 * n), dtype=np.uint32)
        ends = np.cumsum(lens, dtype=np.int64)
        self._f.seek(self._data_at)
        data = self._f.read(int(ends[-1]))
        self._done += n
        self._lens_at += 4 * n
        self._data_at += len(data)
        starts = (ends - lens).tolist()
        return [data[a:b] for a, b in zip(starts, ends.tolist())]

    def close(self) -> None:
        self._f.close()


def _merge_runs(runs: list[_Run], run_limit: int) -> Iterator[list[bytes]]:
    """The names of sorted runs, merged and de-duplicated, a sorted list at a time: each round
    emits every buffered name up to the smallest of the blocks' last names (the other names
    are not known to be next yet) with one C-level sort of already sorted pieces. Each run
    buffers a block of about run_limit / runs names, so memory stays about one run's worth
    however many runs there are."""
    size = max(_MIN_MERGE_BLOCK, min(_MERGE_BLOCK, run_limit // max(1, len(runs))))
    blocks = [(r, b) for r in runs if (b := r.next_block(size))]
    last: bytes | None = None
    while blocks:
        bound = min(b[-1] for _, b in blocks)
        pieces: list[bytes] = []
        rest = []
        for run, block in blocks:
            cut = bisect.bisect_right(block, bound)
            pieces += block[:cut]
            block = block[cut:] or run.next_block(size)
            if block:
                rest.append((run, block))
        blocks = rest
        pieces.sort()
        out = list(dict.fromkeys(pieces))  # drops repeats, keeps the order
        if out and out[0] == last:
            out = out[1:]
        if out:
            last = out[-1]
            yield out


class NameSorter:
    """Collects names (in any order, with repeats) and yields them sorted and de-duplicated,
    holding at most `run_limit` names in memory: full runs are sorted and spilled to temp files."""

    def __init__(self, run_limit: int = RUN_LIMIT):
        self.run_limit = run_limit
        self._buf: set[bytes] = set()
        self._runs: list[_Run] = []

    def add(self, name: bytes) -> None:
        self.add_many((name,))

    def add_many(self, names: Iterable[bytes]) -> None:
        self._buf.update(names)
        if len(self._buf) >= self.run_limit:
            self._runs.append(_Run(sorted(self._buf)))
            self._buf = set()

    def __iter__(self) -> Iterator[bytes]:
        try:
            if not self._runs:
                yield from sorted(self._buf)
                return
            if self._buf:
                self._runs.append(_Run(sorted(self._buf)))
            self._buf = set()
            for names in _merge_runs(self._runs, self.run_limit):
                yield from names
        finally:
            self.close()

    def close(self) -> None:
        for run in self._runs:
            run.close()
        self._runs = []
        self._buf = set()


def sorted_unique(names: Iterable[bytes], run_limit: int = RUN_LIMIT) -> Iterator[bytes]:
    """`names` sorted and de-duplicated with bounded memory (reads all of `names` first)."""
    it = iter(names)
    return sorted_unique_pages(iter(lambda: list(islice(it, 5000)), []), run_limit)


def sorted_unique_pages(pages: Iterable[list[bytes]], run_limit: int = RUN_LIMIT) -> Iterator[bytes]:
    """`sorted_unique` of names that come in lists (SCAN replies): no Python call per name."""
    sorter = NameSorter(run_limit)
    try:
        for page in pages:
            sorter.add_many(page)
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
