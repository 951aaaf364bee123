"""The repository: open it, write and list snapshots, read items back verified.

    repo = open_repository("s3://bucket/agents", endpoint_url=..., create=True)
    manifest = repo.resolve("latest", source="memory")
    for record in repo.iter_records(manifest.item("public.memories")):
        ...

Layout (DESIGN.md): config.json, snapshots/<id>.json, data/<ab>/<hash>, locks/, drills/.
"""
from __future__ import annotations

import secrets
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Callable, Iterable, Iterator, TypeVar

from snapshots import codec
from snapshots.errors import CorruptChunkError, ManifestError, NotFoundError, UsageError
from snapshots.leases import Lease, acquire_lease
from snapshots.manifest import FORMAT_VERSION, Item, Manifest, RepoConfig, is_snapshot_id, utcnow
from snapshots.retries import retry_call
from snapshots.settings import RepositorySettings, redact_url
from snapshots.stores.base import ObjectStore, open_store
from snapshots.threads import read_ahead_pool
from snapshots.writer import SnapshotWriter

T = TypeVar("T")
PRE_RESTORE_TAG = "pre-restore"
READ_AHEAD = 4


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
        out, self.manifest_errors = [], []
        ids = self.snapshot_ids()
        with ThreadPoolExecutor(max_workers=8) as pool:
            for result in pool.map(self._try_load, ids):
                if isinstance(result, ManifestError):
                    self.manifest_errors.append(result)
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
        if at is not None:
            at = at if at.tzinfo else at.replace(tzinfo=timezone.utc)
            candidates = [m for m in candidates if m.cut_time <= at]
            where += f" at or before {at:%Y-%m-%dT%H:%M:%SZ}"
        if ref != "latest":
            candidates = [m for m in candidates if m.id.startswith(ref)]
            if len(candidates) > 1:
                raise UsageError(f"snapshot prefix {ref!r} is ambiguous{where}: "
                                 + ", ".join(m.id for m in candidates[:5]))
        if not candidates:
            what = "no snapshot" if ref == "latest" else f"no snapshot {ref!r}"
            raise NotFoundError(f"{what}{where} in {self.url}")
        return candidates[-1]

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
        width = item.schema.get("row_bytes") if item.format.startswith("f32le") else None
        for data in self.iter_chunks(item):
            yield codec.split_fixed(data, width) if width else codec.split_lines(data)

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
