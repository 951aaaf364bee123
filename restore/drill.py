"""DR drills: prove that the latest snapshots restore, on a schedule, with measured RTO and RPO.

For each source the drill restores the snapshot into a *scratch target* that can never be
the live data, verifies counts and digests (the restore does), for Qdrant also checks that
the offline index answers sampled queries like the restored collection, measures RTO
(restore + verify seconds) and RPO (age of the snapshot's cut), and removes the scratch
target, also when the drill fails. Scratch targets:

    postgres  a scratch database `statevault_drill_<id>` on the source server (or drill.url)
    redis     drill.url / drill.redis_db, else an EMPTY database index on the source server,
              chosen from 15 downwards (refused if none is empty)
    qdrant    collections `statevault_drill_<id>_<name>` on the source (or drill.url / drill.path)
"""
from __future__ import annotations

import secrets
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from restore.run import restore_snapshot
from snapshots.drill_reports import save_drill_report
from snapshots.errors import (Aborted, SourceError, StatevaultError, UsageError, VerificationError,
                             raise_if_aborted)
from snapshots.manifest import utcnow
from snapshots.repository import Repository
from snapshots.settings import Settings, redact_url

SCRATCH_PREFIX = "statevault_drill_"
SAMPLED_QUERIES = 5
SAMPLED_TOP_K = 10
# offline scores are float64 over the float32 rows, Qdrant's float32: equal within this, relative
# to max(1, |score|) (Qdrant's own rounding is ~1e-6 of that for a thousand dimensions)
SCORE_TOLERANCE = 1e-4


@dataclass
class SourceDrill:
    source: str
    kind: str
    snapshot_id: str | None = None
    cut_time: str | None = None
    ok: bool = False
    status: str = "error"              # pass | verification_failed | error
    scratch: str | None = None
    rto_seconds: float | None = None
    rpo_seconds: float | None = None
    records: int = 0
    bytes: int = 0
    checks: list[dict] = field(default_factory=list)
    offline_check: dict | None = None
    error: str | None = None
    cleaned_up: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class DrillResult:
    id: str
    started_at: str
    finished_at: str | None = None
    sources: list[SourceDrill] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.sources) and all(s.ok for s in self.sources)

    @property
    def status(self) -> str:
        if self.ok:
            return "pass"
        return "verification_failed" if any(s.status == "verification_failed" for s in self.sources) else "error"

    @property
    def rto_seconds(self) -> float:
        return sum(s.rto_seconds or 0 for s in self.sources)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "started_at": self.started_at, "finished_at": self.finished_at, "ok": self.ok,
                "status": self.status, "rto_seconds": round(self.rto_seconds, 3),
                "rpo_seconds": max((s.rpo_seconds or 0 for s in self.sources), default=0),
                "sources": [s.to_dict() for s in self.sources]}


def run_drill(repo: Repository, settings: Settings, sources: list[str] | None = None, *, snapshot: str = "latest",
              keep_scratch: bool = False, save: bool = True, abort: threading.Event | None = None) -> DrillResult:
    """Drill every named source (default: every configured source). Never raises for a source's
    failure: it is recorded in that source's entry. The report is saved in the repository.

    With an `abort` event (the daemon's shutdown), the drill stops before its next restore step
    and raises Aborted, after the scratch target of the source in progress is cleaned up; an
    interrupted drill proves nothing, so no report is saved."""
    names = list(sources) if sources else sorted(settings.sources)
    for n in names:
        settings.source(n)
    started = utcnow()
    result = DrillResult(id=started.strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3),
                         started_at=started.isoformat())
    for name in names:
        result.sources.append(_drill_source(repo, settings, name, snapshot, result.id, keep_scratch, abort))
    result.finished_at = utcnow().isoformat()
    if save:
        save_drill_report(repo, result.to_dict())
    return result


def _check_abort(abort: threading.Event | None, name: str) -> None:
    raise_if_aborted(abort, f"drill interrupted at source {name}; its scratch target is removed",
                     hint="No drill report was saved; run the drill again.")


def _drill_source(repo, settings, name, ref, drill_id, keep_scratch, abort=None) -> SourceDrill:
    cfg = settings.source(name)
    entry = SourceDrill(source=name, kind=cfg.kind)
    scratch = None
    try:
        _check_abort(abort, name)
        manifest = repo.resolve(ref, source=name)
        entry.snapshot_id, entry.cut_time = manifest.id, manifest.cut_time.isoformat()
        scratch = _open_scratch(cfg, drill_id)
        entry.scratch = scratch.describe()
        started = time.monotonic()
        for only, into in scratch.restores(manifest):
            _check_abort(abort, name)
            res = restore_snapshot(repo, settings, name, manifest.id, only=only, into=into, mode="new",
                                   to_url=scratch.url, to_path=scratch.path)
            entry.records += res.records_restored
            entry.bytes += res.bytes_restored
            entry.checks += [c.to_dict() for c in res.checks]
        entry.rto_seconds = round(time.monotonic() - started, 3)
        entry.rpo_seconds = round((utcnow() - manifest.cut_time).total_seconds(), 3)
        if cfg.kind == "qdrant" and manifest.offline_index:
            entry.offline_check = _check_offline(repo, manifest, scratch)
            if not entry.offline_check["ok"]:
                raise VerificationError("offline index answers differ from the restored collection",
                                        report=entry.offline_check)
        entry.ok, entry.status = True, "pass"
    except Aborted:
        raise  # after the cleanup below
    except VerificationError as exc:
        entry.status, entry.error = "verification_failed", exc.message
        report = getattr(exc, "report", None) or {}
        entry.checks = entry.checks or report.get("checks", [])
    except StatevaultError as exc:
        entry.status, entry.error = "error", exc.message
    except Exception as exc:  # noqa: BLE001 - one source's surprise must not end the drill
        entry.status, entry.error = "error", f"unexpected {type(exc).__name__}: {exc}"
    finally:
        if scratch is not None and not keep_scratch:
            try:
                scratch.cleanup()
                entry.cleaned_up = True
            except Exception as exc:  # noqa: BLE001 - report, do not mask the drill's own outcome
                entry.error = (entry.error + "; " if entry.error else "") + f"cleanup failed: {exc}"
    return entry


class _Scratch:
    url: str | None = None
    path: str | None = None

    def restores(self, manifest) -> list[tuple[list[str], str | None]]:
        return [([], None)]

    def describe(self) -> str:
        return redact_url(self.url) or self.path or "?"

    def cleanup(self) -> None: ...


class _PostgresScratch(_Scratch):
    def __init__(self, cfg, drill_id: str):
        import psycopg

        base = cfg.drill.url or cfg.url
        self.db = SCRATCH_PREFIX + drill_id.replace("-", "_").lower()
        parts = urlsplit(base)
        self._admin = base
        self.url = urlunsplit((parts.scheme, parts.netloc, "/" + self.db, parts.query, parts.fragment))
        try:
            with psycopg.connect(self._admin, autocommit=True, connect_timeout=10) as conn:
                conn.execute(f'CREATE DATABASE "{self.db}"')
        except psycopg.Error as exc:
            raise SourceError(f"cannot create scratch database {self.db} on {redact_url(base)}: {exc}") from None

    def cleanup(self) -> None:
        import psycopg

        with psycopg.connect(self._admin, autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.db}" WITH (FORCE)')


class _RedisScratch(_Scratch):
    def __init__(self, cfg):
        import redis

        base = cfg.drill.url or cfg.url
        parts = urlsplit(base)
        live_db = int((parts.path or "/0").strip("/") or 0)
        candidates = [cfg.drill.redis_db] if cfg.drill.redis_db is not None else list(range(15, -1, -1))
        for db in candidates:
            if db == live_db and not cfg.drill.url:
                continue  # never the live database
            url = urlunsplit((parts.scheme, parts.netloc, f"/{db}", parts.query, parts.fragment))
            client = redis.Redis.from_url(url)
            try:
                if client.dbsize() == 0:
                    self.url, self._client = url, client
                    return
            except redis.RedisError as exc:
                raise SourceError(f"drill: cannot reach {redact_url(url)}: {exc}", retryable=True) from None
            client.close()
        raise UsageError("drill: no empty Redis database index for a scratch restore",
                         hint="Set [sources.NAME.drill] url = a drill server, or redis_db = an unused index.")

    def cleanup(self) -> None:
        self._client.flushdb()
        self._client.close()


class _QdrantScratch(_Scratch):
    def __init__(self, cfg, drill_id: str):
        self.url = cfg.drill.url or (None if cfg.drill.path else cfg.url)
        self.path = cfg.drill.path or (None if cfg.drill.url else cfg.path)
        self.api_key = cfg.api_key
        self.prefix = f"{SCRATCH_PREFIX}{drill_id.replace('-', '_').lower()}_"
        self.collections: list[str] = []

    def describe(self) -> str:
        # the prefix is what an operator needs to find (or delete) scratch kept with --keep-scratch
        return f"{super().describe()} collections {self.prefix}*"

    def restores(self, manifest):
        self.collections = [self.prefix + item.name for item in manifest.items]
        return [([item.name], self.prefix + item.name) for item in manifest.items]

    def client(self):
        from qdrant_client import QdrantClient

        return QdrantClient(url=self.url, api_key=self.api_key) if self.url else QdrantClient(path=self.path)

    def cleanup(self) -> None:
        client = self.client()
        try:
            for name in client.get_collections().collections:
                if name.name.startswith(self.prefix):
                    client.delete_collection(name.name)
        finally:
            client.close()


def _open_scratch(cfg, drill_id: str) -> _Scratch:
    if cfg.kind == "postgres":
        return _PostgresScratch(cfg, drill_id)
    if cfg.kind == "redis":
        return _RedisScratch(cfg)
    return _QdrantScratch(cfg, drill_id)


def _check_offline(repo: Repository, manifest, scratch: _QdrantScratch) -> dict[str, Any]:
    """Sampled queries: the offline index's top-10 must agree with Qdrant's exact search on the
    restored copy, up to ties (`agree_up_to_ties`)."""
    import numpy as np
    from qdrant_client import models

    from snapshots.offline.pull import pull_offline_index
    from snapshots.offline.search import OfflineIndex

    tmp = tempfile.mkdtemp(prefix="statevault-drill-offline-")
    checked, mismatches = 0, []
    client = scratch.client()
    try:
        pull_offline_index(repo, manifest, tmp)
        index = OfflineIndex.open(tmp)
        rng = np.random.default_rng(0)
        for item in manifest.items:
            col = index.collection(item.name)
            for name, spec in col.meta["vectors"].items():
                matrix = col.matrix(name)
                rows = [i for i in rng.choice(len(matrix), size=min(SAMPLED_QUERIES, len(matrix)), replace=False)
                        if not np.isnan(matrix[i]).any()]
                for i in rows:
                    q = np.asarray(matrix[i], dtype=np.float32)
                    ours = [(p["id"], p["score"])
                            for p in col.search(q, using=name or None, top_k=SAMPLED_TOP_K, with_payload=False)]
                    theirs = client.query_points(scratch.prefix + item.name, query=q.tolist(), using=name or None,
                                                 limit=SAMPLED_TOP_K,
                                                 # local mode is always exact and warns about search_params
                                                 search_params=models.SearchParams(exact=True) if scratch.url
                                                 else None).points
                    theirs = [(p.id, p.score) for p in theirs]
                    checked += 1
                    if not agree_up_to_ties(ours, theirs, SAMPLED_TOP_K):
                        mismatches.append({"collection": item.name, "vector": name, "row": int(i),
                                           "offline": _hits(ours), "qdrant": _hits(theirs)})
    finally:
        client.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return {"ok": not mismatches, "queries": checked, "mismatches": mismatches[:10]}


def _hits(hits: list[tuple[Any, float]]) -> list[list]:
    return [[pid, round(float(score), 6)] for pid, score in hits]


def scores_equal(a: float, b: float) -> bool:
    return abs(a - b) <= SCORE_TOLERANCE * max(1.0, abs(a), abs(b))


def agree_up_to_ties(ours: list[tuple[Any, float]], theirs: list[tuple[Any, float]], limit: int) -> bool:
    """Whether two top-`limit` answers, (id, score) best first, are the same up to ties.

    Equal scores come back in any order (Qdrant's order among ties is not statevault's lower row
    first), so: the same number of hits, the same score at every rank (`scores_equal`), and the
    same ids once each group of equal scores is taken as a set. A group that reaches the limit
    may be cut by it: beyond the cut there may be more points with that score, and each side may
    keep different ones, so there any ids are accepted (their scores already equal the boundary
    score at every rank).
    """
    if len(ours) != len(theirs):
        return False
    if not all(scores_equal(a[1], b[1]) for a, b in zip(ours, theirs)):
        return False
    start = 0
    for end in range(1, len(ours) + 1):
        if (end < len(ours) and scores_equal(ours[end][1], ours[end - 1][1])
                and scores_equal(theirs[end][1], theirs[end - 1][1])):
            continue  # the group of equal scores goes on
        cut_by_limit = end == len(ours) == limit
        if not cut_by_limit and {p for p, _ in ours[start:end]} != {p for p, _ in theirs[start:end]}:
            return False
        start = end
    return True
