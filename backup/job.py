"""The backup job: one snapshot per source, every source attempted, a result object per run.

`run_backup` is what `statevault backup` and the daemon call. One source failing never stops
the others; transient failures (marked `retryable`) are retried with exponential backoff and
jitter; the run returns what happened to each source rather than raising.
"""
from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Callable, Iterable

from backup.sources import open_source
from snapshots.errors import StatevaultError
from snapshots.manifest import Manifest, utcnow
from snapshots.settings import redact_url
from snapshots.repository import Repository
from snapshots.retries import retry_call
from snapshots.settings import Settings

ProgressFn = Callable[[str, str, int], None]  # (source, item, records so far)


@dataclass
class SourceResult:
    source: str
    kind: str
    ok: bool = False
    snapshot_id: str | None = None
    cut_time: datetime | None = None
    items: int = 0
    records: int = 0
    bytes_read: int = 0
    bytes_uploaded: int = 0
    bytes_deduplicated: int = 0
    records_per_item: dict[str, int] = field(default_factory=dict)
    duration_seconds: float = 0.0
    attempts: int = 0
    error: StatevaultError | None = None

    def to_dict(self) -> dict:
        return {
            "source": self.source, "kind": self.kind, "ok": self.ok, "snapshot_id": self.snapshot_id,
            "cut_time": self.cut_time.isoformat() if self.cut_time else None, "items": self.items,
            "records": self.records, "bytes_read": self.bytes_read, "bytes_uploaded": self.bytes_uploaded,
            "bytes_deduplicated": self.bytes_deduplicated, "records_per_item": self.records_per_item,
            "duration_seconds": round(self.duration_seconds, 3), "attempts": self.attempts,
            "error": self.error.to_dict() if self.error else None,
        }


@dataclass
class BackupResult:
    backup_set: str
    started_at: datetime
    results: list[SourceResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    def to_dict(self) -> dict:
        return {"backup_set": self.backup_set, "started_at": self.started_at.isoformat(), "ok": self.ok,
                "sources": [r.to_dict() for r in self.results]}


class _AbortSignal(Exception):
    pass


def snapshot_source(repo: Repository, name: str, source_settings, *, tags: Iterable[str] = (),
                    backup_set: str | None = None, only: list[str] | None = None, url: str | None = None,
                    path: str | None = None, progress: ProgressFn | None = None,
                    abort: threading.Event | None = None) -> tuple[Manifest, dict]:
    """Take one snapshot of one source (or of another server holding that kind, via url/path).

    Returns the committed manifest and the writer's stats. Raises on failure; a failure before
    commit leaves no visible snapshot.
    """
    from snapshots.errors import Aborted, raise_if_aborted

    # checked first: a retry after a stop request must not start over
    raise_if_aborted(abort, f"backup of {name} stopped before it began; no snapshot was written")
    source = open_source(source_settings, url=url, path=path)
    all_tags = list(source_settings.tags) + list(tags)
    with source.open(only=only) as cut:
        if url or path:  # another server than the configured one (a pre-restore snapshot of a --to target)
            cut.source_info["location"] = redact_url(url) or path
        writer = repo.begin_snapshot(name, source_settings.kind, tags=all_tags, backup_set=backup_set,
                                     source_info=cut.source_info,
                                     compression_level=source_settings.compression_level)
        try:
            if progress is not None or abort is not None:
                original = writer.item

                def counted_item(*a, **kw):
                    # the writer reports once per block of records, not per record: no hot-path cost
                    w = original(*a, **kw)

                    def on_progress(records: int, _item=w.name) -> None:
                        if progress is not None:
                            progress(name, _item, records)
                        if abort is not None and abort.is_set():
                            raise _AbortSignal()

                    w.on_progress = on_progress
                    return w

                writer.item = counted_item  # type: ignore[method-assign]
            for item in cut.items():
                if abort is not None and abort.is_set():
                    raise _AbortSignal()
                cut.backup_item(item, writer)
            if abort is not None and abort.is_set():
                raise _AbortSignal()
            manifest = writer.commit(cut.cut_time, extra_info=cut.source_info)
        except _AbortSignal:
            writer.abort()
            raise Aborted(f"backup of {name} interrupted before commit; no snapshot was written") from None
        except BaseException:
            writer.abort()
            raise
    return manifest, writer.stats.as_dict()


def _attempt(fn, attempts: int, max_wait: float, result: SourceResult):
    def counted():
        result.attempts += 1
        return fn()

    return retry_call(counted, attempts=attempts, multiplier=0.5, max_wait=max_wait)


def run_backup(repo: Repository, settings: Settings, sources: list[str] | None = None, *,
               tags: Iterable[str] = (), retry_attempts: int = 3, retry_max_wait: float = 30.0,
               progress: ProgressFn | None = None, abort: threading.Event | None = None) -> BackupResult:
    """Back up the named sources (default: all), linked as one backup set.

    Never raises for a source's failure: each SourceResult carries its error. Unknown source
    names raise NotFoundError before anything runs.
    """
    names = list(sources) if sources else sorted(settings.sources)
    for n in names:
        settings.source(n)  # validate every name up front: nothing runs on a typo
    result = BackupResult(backup_set=secrets.token_hex(6), started_at=utcnow())
    with repo.lease(f"backup {','.join(names)}"):
        for name in names:
            cfg = settings.sources[name]
            sr = SourceResult(source=name, kind=cfg.kind)
            started = time.monotonic()
            try:
                manifest, stats = _attempt(
                    lambda: snapshot_source(repo, name, cfg, tags=tags, backup_set=result.backup_set,
                                            progress=progress, abort=abort),
                    retry_attempts, retry_max_wait, sr)
                sr.ok = True
                sr.snapshot_id, sr.cut_time = manifest.id, manifest.cut_time
                sr.items, sr.records = len(manifest.items), manifest.records
                sr.records_per_item = {i.name: i.records for i in manifest.items}
                sr.bytes_read, sr.bytes_uploaded = stats["bytes_read"], stats["bytes_uploaded"]
                sr.bytes_deduplicated = stats["bytes_deduplicated"]
            except StatevaultError as exc:
                sr.error = exc
            except Exception as exc:  # noqa: BLE001 - an unmapped library error must not stop other sources
                sr.error = StatevaultError(f"{name}: unexpected {type(exc).__name__}: {exc}")
            sr.duration_seconds = time.monotonic() - started
            result.results.append(sr)
            if abort is not None and abort.is_set():
                break
    return result
