"""Which keys an item covers on a Redis/Valkey server (its *scope*), listed in sorted order
with bounded memory.

An item's scope: keys matching its pattern, not matching any earlier item's pattern (a key
matching several configured patterns belongs to the first), and, when `only` selectors are
given, matching at least one of them. Patterns use Redis glob syntax as SCAN MATCH does
(`*`, `?`, `[abc]`, `[^a]`, `[a-z]`, backslash escapes); a selector without any of `*?[\\`
means exactly that key.

Key names are collected with SCAN (COUNT 5000, names only), de-duplicated (SCAN may return a
key twice) and sorted. Up to RUN_LIMIT names are sorted in memory (~100 bytes each for
typical keys, so ~2 MB); past that, sorted runs spill to temp files and are merged a block of
each run at a time, and every MAX_RUNS runs are merged into one as they accumulate, so memory
and open files stay bounded whatever the keyspace size.
"""
from __future__ import annotations

import bisect
import re
import struct
import tempfile
from typing import Iterable, Iterator

import numpy as np

from backup.sources.redis_client import ReplyPipe, _pack, execute_many, raise_first_error
from snapshots.codec import batched

RUN_LIMIT = 20_000  # names sorted in memory before a run spills: ~2 MB, so RSS does not grow with the keyspace
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
    scan_iter needs callbacks).

    The next SCAN goes out before a page is handed over, so the server walks the next slice
    of its keyspace while the caller sorts and spills this one: the listing phase costs the
    larger of the two, not their sum (~0.1 s less per 200k keys)."""
    def request(cursor: bytes) -> bytes:
        return _pack([("SCAN", cursor, "MATCH", match, "COUNT", SCAN_COUNT)])

    with ReplyPipe(client) as pipe:
        ticket = pipe.send(request(b"0"), 1)
        while True:
            cursor, keys = raise_first_error(pipe.recv(ticket))[0]
            if cursor != b"0":
                ticket = pipe.send(request(cursor), 1)
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

_RUN_BLOCK = 1024  # names per stored block of a spilled run: what a merge buffers of each run
MAX_RUNS = 32      # spilled runs of one level merged into one run of the next (open files, buffers)
_BLOCK_HEAD = struct.Struct("<IQ")  # names in the block, bytes of their data


class _Run:
    """A sorted run of names spilled to a temp file, as blocks of at most _RUN_BLOCK names
    (count and data size, the names' lengths as uint32, then their bytes): written and read
    back a block at a time, with no Python call per name."""

    def __init__(self, names: Iterable[list[bytes]] = ()):
        self._f = tempfile.TemporaryFile(prefix="statevault-keys-")
        for part in names:
            self.write(part)

    def write(self, names: list[bytes]) -> None:
        """Append sorted names (after every name written so far)."""
        for i in range(0, len(names), _RUN_BLOCK):
            part = names[i:i + _RUN_BLOCK]
            data = b"".join(part)
            lens = np.fromiter(map(len, part), dtype=np.uint32, count=len(part))
            self._f.write(_BLOCK_HEAD.pack(len(part), len(data)) + lens.tobytes() + data)

    def rewind(self) -> None:
        self._f.seek(0)

    def next_block(self) -> list[bytes]:
        head = self._f.read(_BLOCK_HEAD.size)
        if not head:
            return []
        count, size = _BLOCK_HEAD.unpack(head)
        lens = np.frombuffer(self._f.read(4 * count), dtype=np.uint32)
        data = self._f.read(size)
        ends = np.cumsum(lens, dtype=np.int64)
        return [data[a:b] for a, b in zip((ends - lens).tolist(), ends.tolist())]

    def close(self) -> None:
        self._f.close()


def _merge_runs(runs: list[_Run]) -> Iterator[list[bytes]]:
    """The names of sorted runs, merged and de-duplicated, a sorted list at a time: each round
    emits every buffered name up to the smallest of the blocks' last names (the other names
    are not known to be next yet) with one C-level sort of already sorted pieces. One block of
    each run is buffered: at most MAX_RUNS x _RUN_BLOCK names."""
    for run in runs:
        run.rewind()
    blocks = [(r, b) for r in runs if (b := r.next_block())]
    last: bytes | None = None
    while blocks:
        bound = min(b[-1] for _, b in blocks)
        pieces: list[bytes] = []
        rest = []
        for run, block in blocks:
            cut = bisect.bisect_right(block, bound)
            pieces += block[:cut]
            block = block[cut:] or run.next_block()
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
    holding at most `run_limit` names in memory: full runs are sorted and spilled to temp files,
    and MAX_RUNS runs of one level are merged into one run of the next (each name is rewritten
    once per level: log32 of the number of runs), so the open files and the final merge's
    buffers grow only with that logarithm."""

    def __init__(self, run_limit: int = RUN_LIMIT):
        self.run_limit = run_limit
        self._buf: set[bytes] = set()
        self._runs: list[tuple[int, _Run]] = []  # (level, run)

    def add(self, name: bytes) -> None:
        self.add_many((name,))

    def add_many(self, names: Iterable[bytes]) -> None:
        self._buf.update(names)
        if len(self._buf) >= self.run_limit:
            self._spill()

    def _spill(self) -> None:
        self._runs.append((0, _Run([sorted(self._buf)])))
        self._buf = set()
        level = 0
        while len(same := [r for lv, r in self._runs if lv == level]) >= MAX_RUNS:
            self._runs = [(lv, r) for lv, r in self._runs if lv != level]
            try:
                self._runs.append((level + 1, _Run(_merge_runs(same))))
            finally:
                for run in same:
                    run.close()
            level += 1

    def __iter__(self) -> Iterator[bytes]:
        try:
            if not self._runs:
                yield from sorted(self._buf)
                return
            if self._buf:
                self._spill()
            for names in _merge_runs([run for _, run in self._runs]):
                yield from names
        finally:
            self.close()

    def close(self) -> None:
        for _, run in self._runs:
            run.close()
        self._runs = []
        self._buf = set()


def sorted_unique(names: Iterable[bytes], run_limit: int = RUN_LIMIT) -> Iterator[bytes]:
    """`names` sorted and de-duplicated with bounded memory (reads all of `names` first)."""
    return sorted_unique_pages(batched(names, 5000), run_limit)


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
