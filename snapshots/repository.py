"""The repository: open it, write and list snapshots, read items back verified.

    repo = open_repository("s3://bucket/agents", endpoint_url=..., create=True)
    manifest = repo.resolve("latest", source="memory")
    for record in repo.iter_records(manifest.item("public.memories")):
        ...

Layout (DESIGN.md): config.json, snapshots/<id>.json, data/<ab>/<hash>, locks/, drills/.
"""
from __future__ import annotations

import logging
import secrets
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from typing import Callable, Iterable, Iterator, TypeVar

from snapshots import codec
from snapshots.errors import CorruptChunkError, ManifestError, NotFoundError, UsageError
from snapshots.leases import Lease, acquire_lease
from snapshots.manifest import FORMAT_VERSION, Item, Manifest, RepoConfig, is_snapshot_id, snapshot_id_time, utcnow
from snapshots.retries import retry_call
from snapshots.settings import RepositorySettings, redact_url
from snapshots.stores.base import ObjectStore, open_store
from snapshots.threads import read_ahead_pool
from snapshots.writer import SnapshotWriter

T = TypeVar("T")
PRE_RESTORE_TAG = "pre-restore"
READ_AHEAD = 4
# An id's time is its writer's start on the backup host's clock, taken just after the source's
# cut opened (backup/job.py); cut_time may come from the server's clock (PostgreSQL now(),
# Redis TIME). An unreadable manifest is placed in time by its id give or take this much.
ID_TIME_SLACK = timedelta(minutes=1)
log = logging.getLogger("statevault.repository")


class Repository:
    def __init__(self, store: ObjectStore, config: RepoConfig, *, compression_level: int | None = None,
                 upload_concurrency: int = 4, lease_ttl: float = 300, upload_nice: int = 0):
        self.store = store
        self.config = config
        self.compression_level = compression_level
        self.upload_concurrency = upload_concurrency
        self.upload_nice = upload_nice
        self.lease_ttl = lease_ttl
        self.url = redact_url(store.url)
        self.manifest_errors: list[ManifestError] = []
        self.unreadable: dict[str, ManifestError] = {}  # snapshot id -> why its manifest is unreadable
        self._leases: list[Lease] = []  # taken through `lease()`; released ones are dropped lazily

    # ---- retries -------------------------------------------------------------------------
    def retrying(self, fn: Callable[[], T], what: str, attempts: int = 5) -> T:
        """Run a store call, retrying errors marked retryable with exponential backoff and jitter."""
        return retry_call(fn, attempts=attempts, multiplier=0.2, max_wait=10)

    # ---- writing -------------------------------------------------------------------------
    def begin_snapshot(self, source: str, kind: str, *, tags: Iterable[str] = (), backup_set: str | None = None,
                       source_info: dict | None = None, compression_level: int | None = None) -> SnapshotWriter:
        """Start a snapshot; chunks of the source's latest snapshot count as already stored.
        zstd level: `compression_level`, else the repository's, else the kind's default."""
        known: dict[str, int] = {}
        previous = self.list_snapshots(source=source)
        if previous:
            known = {c.id: c.stored for it in previous[-1].items + previous[-1].offline_index for c in it.chunks}
        return SnapshotWriter(self, source, kind, tags=tags, backup_set=backup_set,
                              source_info=source_info, known_chunks=known,
                              compression_level=compression_level)

    # ---- snapshots -----------------------------------------------------------------------
    def load_manifest(self, snapshot_id: str) -> Manifest:
        if not is_snapshot_id(snapshot_id):
            raise UsageError(f"{snapshot_id!r} is not a snapshot id (like 20261126T030000Z-1a2b3c4d)",
                             hint="Use `latest`, a full id, or a unique prefix from `statevault snapshots list`.")
        key = f"snapshots/{snapshot_id}.json"
        try:
            data = self.store.get(key)
        except NotFoundError:
            raise NotFoundError(f"no snapshot {snapshot_id} in {self.url}") from None
        manifest = Manifest.from_json(data, key)
        if manifest.id != snapshot_id:
            raise ManifestError(f"{key}: manifest claims id {manifest.id}; it was renamed or tampered with")
        return manifest

    def snapshot_ids(self) -> list[str]:
        ids = []
        for obj in self.store.list("snapshots"):
            name = obj.key.rsplit("/", 1)[-1]
            if name.endswith(".json") and is_snapshot_id(name[:-5]):
                ids.append(name[:-5])
        return sorted(ids)

    def list_snapshots(self, source: str | None = None) -> list[Manifest]:
        """Valid manifests, oldest cut first; unreadable ones are collected in `manifest_errors`."""
        out, self.manifest_errors, self.unreadable = [], [], {}
        ids = self.snapshot_ids()
        with ThreadPoolExecutor(max_workers=8) as pool:
            for sid, result in zip(ids, pool.map(self._try_load, ids)):
                if isinstance(result, ManifestError):
                    self.manifest_errors.append(result)
                    self.unreadable[sid] = result
                elif result is not None and (source is None or result.source == source):
                    out.append(result)
        return sorted(out, key=lambda m: (m.cut_time, m.id))

    def _try_load(self, snapshot_id: str) -> Manifest | ManifestError | None:
        try:
            return self.load_manifest(snapshot_id)
        except ManifestError as exc:
            return exc
        except NotFoundError:
            return None  # forgotten while listing

    def resolve(self, ref: str = "latest", *, source: str | None = None, at: datetime | None = None) -> Manifest:
        """`latest`, a full id or a unique id prefix; with `at`, the newest cut at or before it.

        `latest` and `at` never pick a `pre-restore` snapshot (the state a restore replaced):
        after a restore, "latest" still means the newest backup. Name its id to restore one.

        `at` is converted to UTC (naive: taken as UTC). Given in whole seconds (as listings
        show cut times), it means the end of that second: 03:00:00Z includes a snapshot cut at
        03:00:00.4, so a time pasted from `snapshots list` finds the snapshot listed.

        `latest` and `at` warn (log, stderr in the CLI) about unreadable manifests that could
        be newer than the snapshot chosen: the choice itself ignores them.
        """
        if ref != "latest" and is_snapshot_id(ref):
            manifest = self.load_manifest(ref)
            if source is not None and manifest.source != source:
                raise UsageError(f"snapshot {ref} belongs to source {manifest.source!r}, not {source!r}")
            return manifest
        candidates = self.list_snapshots(source=source)
        if ref == "latest":
            candidates = [m for m in candidates if PRE_RESTORE_TAG not in m.tags]
        where = f" for source {source!r}" if source else ""
        limit = None
        if at is not None:
            at = at.astimezone(timezone.utc) if at.tzinfo else at.replace(tzinfo=timezone.utc)
            limit = at.replace(microsecond=999_999) if at.microsecond == 0 else at
            candidates = [m for m in candidates if m.cut_time <= limit]
            where += f" at or before {_iso_utc(at)}"
        if ref != "latest":
            candidates = [m for m in candidates if m.id.startswith(ref)]
            if len(candidates) > 1:
                raise UsageError(f"snapshot prefix {ref!r} is ambiguous{where}: "
                                 + ", ".join(m.id for m in candidates[:5]))
        suspects = self._unreadable_after(candidates[-1] if candidates else None, limit) if ref == "latest" else []
        if not candidates:
            what = "no snapshot" if ref == "latest" else f"no snapshot {ref!r}"
            hint = None
            if suspects:
                hint = (f"{len(suspects)} unreadable manifest(s) could hold it: " + ", ".join(suspects[:5])
                        + ". Run `statevault snapshots check`.")
            raise NotFoundError(f"{what}{where} in {self.url}", hint=hint)
        chosen = candidates[-1]
        for sid in suspects:
            log.warning("unreadable manifest: %s; it could be a newer snapshot%s than %s, which was chosen. "
                        "Run `statevault snapshots check`.", self.unreadable[sid].message, where, chosen.id)
        return chosen

    def _unreadable_after(self, chosen: Manifest | None, limit: datetime | None) -> list[str]:
        """Unreadable manifests (of any source: theirs is unknown) whose id time says they could
        be cut after `chosen` and, with `limit`, at or before it."""
        out = []
        floor = snapshot_id_time(chosen.id) - ID_TIME_SLACK if chosen is not None else None
        for sid in sorted(self.unreadable):
            t = snapshot_id_time(sid)
            if t is None or (floor is not None and t < floor) or (limit is not None and t > limit + ID_TIME_SLACK):
                continue
            out.append(sid)
        return out

    def delete_snapshot(self, snapshot_id: str) -> None:
        self.store.delete(f"snapshots/{snapshot_id}.json")

    # ---- reading -------------------------------------------------------------------------
    def read_chunk(self, cid: str) -> bytes:
        """A chunk's uncompressed bytes, checked against its name."""
        key = codec.chunk_key(cid)
        try:
            blob = self.retrying(lambda: self.store.get(key), f"read chunk {cid[:12]}")
        except NotFoundError:
            raise CorruptChunkError(f"chunk {cid} is missing from {self.url}", chunk_id=cid) from None
        try:
            data = codec.decompress(blob)
        except Exception:  # zstd raises its own ZstdError for damaged frames
            raise CorruptChunkError(f"chunk {cid} is damaged (not a valid zstd frame)", chunk_id=cid) from None
        if codec.chunk_id(data) != cid:
            raise CorruptChunkError(f"chunk {cid} is damaged (content does not match its hash)", chunk_id=cid)
        return data

    def iter_chunks(self, item: Item) -> Iterator[bytes]:
        """Each chunk of an item in order, read ahead by a few chunks in parallel."""
        ids = [c.id for c in item.chunks]
        with read_ahead_pool(READ_AHEAD, "read-chunk") as pool:
            pending = [pool.submit(self.read_chunk, cid) for cid in ids[:READ_AHEAD]]
            nxt = len(pending)
            while pending:
                data = pending.pop(0).result()
                if nxt < len(ids):
                    pending.append(pool.submit(self.read_chunk, ids[nxt]))
                    nxt += 1
                yield data

    def iter_records(self, item: Item) -> Iterator[bytes]:
        """The item's records, as the source wrote them."""
        for block in self.iter_record_blocks(item):
            yield from block

    def iter_record_blocks(self, item: Item) -> Iterator[list[bytes]]:
        """The item's records, one list per chunk (for callers that work a block at a time)."""
        width = record_width(item)
        for data in self.iter_chunks(item):
            yield split_records(data, width)

    # ---- leases and small objects --------------------------------------------------------
    def lease(self, purpose: str, *, exclusive: bool = False, name: str = "repository") -> Lease:
        lease = acquire_lease(self.store, name, exclusive=exclusive, purpose=purpose, ttl=self.lease_ttl)
        self._leases = [held for held in self._leases if held.key is not None] + [lease]
        return lease

    def held_leases(self, name: str = "repository") -> list[Lease]:
        """The leases on `name` this process holds now through this repository object."""
        return [held for held in self._leases if held.key is not None and held.name == name]

    def put_json(self, key: str, data: bytes) -> None:
        self.store.put(key, data)


def record_width(item: Item) -> int | None:
    """The fixed record size of an item's format (f32le rows), or None for line records."""
    return item.schema.get("row_bytes") if item.format.startswith("f32le") else None


def split_records(data: bytes, width: int | None) -> list[bytes]:
    """The records of a chunk: rows of `width` bytes (record_width), else lines."""
    return codec.split_fixed(data, width) if width else codec.split_lines(data)


def _iso_utc(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ" if t.microsecond else "%Y-%m-%dT%H:%M:%SZ")


def _new_config() -> RepoConfig:
    return RepoConfig(id=secrets.token_hex(16), created_at=utcnow())


def open_repository(url: str | RepositorySettings, *, endpoint_url: str | None = None, create: bool = False,
                    config: RepoConfig | None = None) -> Repository:
    """Open the repository at `url`; with create=True initialise it if absent (conditional create)."""
    settings = url if isinstance(url, RepositorySettings) else RepositorySettings(url=url, endpoint_url=endpoint_url)
    store = open_store(settings.url, endpoint_url=settings.endpoint_url, region=settings.region)
    check_bucket = getattr(store, "check_bucket", None)
    if check_bucket is not None:
        check_bucket()
    try:
        raw = store.get("config.json")
    except NotFoundError:
        if not create:
            raise NotFoundError(f"no statevault repository at {redact_url(settings.url)}",
                                hint="Run `statevault init` or a first `statevault backup` to create it.") from None
        store.create("config.json", (config or _new_config()).model_dump_json(indent=1).encode())
        raw = store.get("config.json")
    try:
        repo_config = RepoConfig.model_validate_json(raw)
    except Exception:
        raise ManifestError(f"{redact_url(settings.url)}/config.json is not a statevault repository config") from None
    if repo_config.format_version > FORMAT_VERSION:
        raise ManifestError(f"repository format {repo_config.format_version} is newer than this statevault "
                            f"reads ({FORMAT_VERSION}); upgrade statevault")
    return Repository(store, repo_config, compression_level=settings.compression_level,
                      upload_concurrency=settings.upload_concurrency, lease_ttl=settings.lease_ttl_seconds,
                      upload_nice=settings.upload_nice)
