"""Verification: counts and digests, and a diff report when they differ.

Digests are order-independent, so equal (count, digest) means equal multisets of records.
When they differ, `diff_sorted` merges the snapshot's records with the live ones (both
streams come in the same deterministic order: primary key, key name, point id) and reports
missing, extra and changed records by key, with a bounded number of samples: memory stays
constant whatever the item size.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from snapshots.codec import RecordDigest

SAMPLES = 10


@dataclass
class ItemCheck:
    item: str
    target: str
    expected_records: int
    expected_digest: str
    actual_records: int
    actual_digest: str
    diff: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # checks beyond the digest (e.g. Redis TTLs)

    @property
    def ok(self) -> bool:
        return (self.expected_records == self.actual_records and self.expected_digest == self.actual_digest
                and not self.problems)

    def to_dict(self) -> dict[str, Any]:
        d = {"item": self.item, "target": self.target, "ok": self.ok,
             "expected": {"records": self.expected_records, "digest": self.expected_digest},
             "actual": {"records": self.actual_records, "digest": self.actual_digest}}
        if self.diff:
            d["diff"] = self.diff
        if self.problems:
            d["problems"] = self.problems
        return d


def digest_of(records: Iterable[bytes], canonical: Callable[[bytes], bytes] | None = None, *,
              algo: str | None = None) -> tuple[int, str]:
    """Count and digest of records (their canonical form), with the item's digest algorithm."""
    d = RecordDigest(algo) if algo else RecordDigest()
    d.update(records if canonical is None else map(canonical, records))
    return d.count, d.hexdigest


def digest_concurrently(streams: list[Iterable[bytes]], canonical: Callable[[bytes], bytes] | None = None, *,
                        algo: str | None = None) -> tuple[int, str]:
    """`digest_of` the records of several streams together, each read in its own thread (a
    table read back in page ranges by several server processes). The digest is a sum, so the
    parts' digests add up to the whole's. The first error of any stream is raised, after
    every thread has stopped."""
    from concurrent.futures import ThreadPoolExecutor

    def one(records: Iterable[bytes]) -> RecordDigest:
        d = RecordDigest(algo) if algo else RecordDigest()
        return d.update(records if canonical is None else map(canonical, records))

    with ThreadPoolExecutor(max_workers=len(streams), thread_name_prefix="verify") as pool:
        futures = [pool.submit(one, s) for s in streams]
    total = RecordDigest(algo) if algo else RecordDigest()
    for f in futures:
        total.merge(f.result())
    return total.count, total.hexdigest


def _sorted_pairs(records: Iterable[bytes], key: Callable[[bytes], Any]) -> Iterator[tuple[Any, bytes]]:
    for r in records:
        yield key(r), r


def diff_sorted(expected: Iterable[bytes], actual: Iterable[bytes], *, key: Callable[[bytes], Any],
                canonical: Callable[[bytes], bytes] | None = None, classify: Callable[[bytes, bytes], str] | None = None
                ) -> dict[str, Any]:
    """Merge two key-ordered record streams; count and sample what differs.

    `classify(expected, actual)` names the kind of change (e.g. 'type', 'value', 'ttl' for Redis);
    default 'changed'. Keys must come in ascending order on both sides.
    """
    canon = canonical or (lambda r: r)
    counts: dict[str, int] = {"missing": 0, "extra": 0}
    samples: dict[str, list] = {"missing": [], "extra": []}

    def note(kind: str, k: Any) -> None:
        counts[kind] = counts.get(kind, 0) + 1
        bucket = samples.setdefault(kind, [])
        if len(bucket) < SAMPLES:
            bucket.append(k if isinstance(k, (str, int, float)) else repr(k))

    exp, act = _sorted_pairs(expected, key), _sorted_pairs(actual, key)
    e, a = next(exp, None), next(act, None)
    while e is not None or a is not None:
        if a is None or (e is not None and e[0] < a[0]):
            note("missing", e[0])
            e = next(exp, None)
        elif e is None or a[0] < e[0]:
            note("extra", a[0])
            a = next(act, None)
        else:
            if canon(e[1]) != canon(a[1]):
                note(classify(e[1], a[1]) if classify else "changed", e[0])
            e, a = next(exp, None), next(act, None)
    return {"counts": {k: v for k, v in counts.items() if v}, "samples": {k: v for k, v in samples.items() if v}}
