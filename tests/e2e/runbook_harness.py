"""Running docs/runbook.md's commands exactly as written, and remembering which ones ran.

The runbook puts every runnable command on its own line starting with `statevault ` inside
```sh blocks, with placeholders for what differs between installations. `Runbook.run(template,
**values)` refuses a template that is not (verbatim) in the runbook, substitutes the
placeholders (PLACEHOLDERS is the runbook's substitution table: placeholder -> keyword), runs
the real CLI (`python -m cli.app`) with STATEVAULT_CONFIG set, checks the exit code and records
the template in EXECUTED. `test_runbook.py` fails listing every runbook command no scenario ran.

Also here: the agent state the scenarios break and restore (PostgreSQL memories, Redis
histories with TTLs, two Qdrant local-mode collections) and small readers to compare it.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parents[2]
RUNBOOK = ROOT / "docs" / "runbook.md"

# the runbook's "Placeholders" table; keyword arguments of Runbook.run / Runbook.start
PLACEHOLDERS = {
    "<snapshot-id>": "snapshot_id",
    "<pre-restore-id>": "pre_restore_id",
    "<broken-snapshot-id>": "broken_snapshot_id",
    "<time>": "time",
    "<new-postgres-url>": "new_postgres_url",
    "<new-redis-url>": "new_redis_url",
    "<new-qdrant-path>": "new_qdrant_path",
    "<query-file>": "query_file",
    "<times-file>": "times_file",
    "$DIR": "dir",
    "$HOST": "host",
    "$PORT": "port",
}
_LEFTOVER = re.compile(r"<[a-z][a-z-]*>|\$[A-Z]+")

EXECUTED: set[str] = set()     # runbook command templates some scenario ran
SELECTED: set[str] = set()     # node ids of the scenario tests selected in this session (conftest)
SCENARIO_MODULES = ("test_runbook_vector.py", "test_runbook_stores.py", "test_runbook_ops.py")


def runbook_commands(text: str | None = None) -> list[str]:
    """Every `statevault ...` line of the runbook's ```sh blocks, in order, without duplicates."""
    text = RUNBOOK.read_text(encoding="utf-8") if text is None else text
    out: list[str] = []
    in_sh = False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("```"):
            in_sh = not in_sh and stripped == "```sh"
            continue
        if in_sh and stripped.startswith("statevault ") and stripped not in out:
            out.append(stripped)
    return out


def substitute(template: str, values: dict[str, Any]) -> list[str]:
    """The template's argv with placeholders replaced; every placeholder must be given and used."""
    used = {p for p in PLACEHOLDERS if p in template}
    given = {p for p, k in PLACEHOLDERS.items() if k in values}
    unknown = set(values) - set(PLACEHOLDERS.values())
    assert not unknown, f"unknown placeholder values {unknown}"
    assert used == given, f"{template!r} needs {sorted(used)}, got {sorted(given)}"
    argv = []
    for token in shlex.split(template):
        for placeholder, key in PLACEHOLDERS.items():
            if key in values:
                token = token.replace(placeholder, str(values[key]))
        assert not _LEFTOVER.search(token), f"unsubstituted placeholder in {token!r} ({template!r})"
        argv.append(token)
    assert argv[0] == "statevault"
    return argv[1:]


@dataclass
class Result:
    command: str
    rc: int
    stdout: str
    stderr: str

    @property
    def json(self) -> Any:
        return json.loads(self.stdout)

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def _log(res: Result, seconds: float) -> None:
    """With STATEVAULT_RUNBOOK_LOG=FILE, append each command's output (for the runbook's examples)."""
    path = os.environ.get("STATEVAULT_RUNBOOK_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"$ statevault {res.command}   # exit {res.rc}, {seconds:.1f}s\n{res.stdout}{res.stderr}\n")


class Runbook:
    """The CLI with one config, run as an operator would from `cwd`."""

    def __init__(self, config: Path, cwd: Path):
        self.config, self.cwd = config, cwd
        self._commands = set(runbook_commands())

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("STATEVAULT_", "AWS_"))}
        env.update(STATEVAULT_CONFIG=str(self.config), PYTHONPATH=str(ROOT), COLUMNS="200")
        return env

    def _argv(self, template: str, values: dict[str, Any]) -> list[str]:
        assert template in self._commands, f"not a command of docs/runbook.md: {template!r}"
        return [sys.executable, "-m", "cli.app", *substitute(template, values)]

    def run(self, template: str, *, rc: int | None = 0, timeout: float = 120, **values: Any) -> Result:
        """Run a runbook command; assert its exit code (None: any)."""
        argv = self._argv(template, values)
        started = time.monotonic()
        proc = subprocess.run(argv, cwd=self.cwd, env=self.env(), capture_output=True, text=True, timeout=timeout)
        EXECUTED.add(template)
        res = Result(shlex.join(argv[3:]), proc.returncode, proc.stdout, proc.stderr)
        _log(res, time.monotonic() - started)
        if rc is not None:
            assert res.rc == rc, f"`statevault {res.command}` exited {res.rc}, expected {rc}\n{res.output}"
        return res

    def start(self, template: str, **values: Any) -> subprocess.Popen:
        """Start a long-running runbook command (offline serve); the caller stops it."""
        proc = subprocess.Popen(self._argv(template, values), cwd=self.cwd, env=self.env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        EXECUTED.add(template)
        return proc

    def setup(self, *args: str, rc: int = 0) -> Result:
        """A command the scenario needs but does not exercise (e.g. the backups before an incident)."""
        proc = subprocess.run([sys.executable, "-m", "cli.app", *args], cwd=self.cwd, env=self.env(),
                              capture_output=True, text=True, timeout=120)
        res = Result(" ".join(args), proc.returncode, proc.stdout, proc.stderr)
        assert res.rc == rc, f"setup `statevault {res.command}` exited {res.rc}\n{res.output}"
        return res


# --------------------------------------------------------------------------- agent state

DIM = 8
CATEGORIES = ("billing", "shipping", "returns")


def write_config(path: Path, repo: Path, pg_url: str, redis_url: str, qdrant_path: Path, extra: str = "") -> Path:
    path.write_text(f'''[repository]
url = "{repo.as_uri()}"
lease_ttl_seconds = 30

[sources.memory]
kind = "postgres"
url = "{pg_url}"
retention = {{ keep_last = 1 }}

[sources.history]
kind = "redis"
url = "{redis_url}"
patterns = ["history:*"]

[sources.knowledge]
kind = "qdrant"
path = "{qdrant_path}"
{extra}''', encoding="utf-8")
    return path


def vector(i: int, salt: int = 0) -> list[float]:
    import numpy as np

    return np.random.default_rng(i * 7919 + salt).standard_normal(DIM).astype("float32").tolist()


def seed_postgres(url: str, rows: int = 300) -> None:
    import psycopg

    with psycopg.connect(url) as conn:
        conn.execute("CREATE TABLE memories (id bigserial PRIMARY KEY, user_id text NOT NULL, kind text NOT NULL, "
                     "content text NOT NULL, meta jsonb NOT NULL DEFAULT '{}', "
                     "created_at timestamptz NOT NULL DEFAULT '2026-11-01T00:00:00Z')")
        conn.execute("INSERT INTO memories (user_id, kind, content, meta) SELECT 'u' || (g %% 40), "
                     "(ARRAY['fact','preference','summary'])[1 + g %% 3], 'memory number ' || g, "
                     "jsonb_build_object('n', g) FROM generate_series(1, %s) g", (rows,))


def seed_redis(url: str, users: int = 60) -> None:
    import redis

    with redis.Redis.from_url(url) as r:
        pipe = r.pipeline(transaction=False)
        for u in range(users):
            turns = [{"role": "user" if t % 2 == 0 else "assistant", "content": f"turn {t} of u{u}"} for t in range(4)]
            pipe.set(f"history:u{u}", json.dumps(turns), ex=86400 + u)
        pipe.rpush("history:u42:events", "opened", "asked", "answered")
        pipe.set("session:u42", "not part of the history source")
        pipe.execute()


@contextmanager
def qdrant(path: Path) -> Iterator[Any]:
    """A local-mode client; closed before the CLI runs (local mode holds an exclusive lock)."""
    from qdrant_client import QdrantClient

    client = QdrantClient(path=str(path))
    try:
        yield client
    finally:
        client.close()


def seed_qdrant(path: Path) -> None:
    from qdrant_client import models

    with qdrant(path) as client:
        for name, n in (("customer_service_kb", 150), ("product_kb", 60)):
            client.create_collection(name, vectors_config=models.VectorParams(size=DIM, distance=models.Distance.COSINE))
            client.upsert(name, [models.PointStruct(id=i, vector=vector(i, len(name)),
                                                    payload={"title": f"{name} article {i}",
                                                             "category": CATEGORIES[i % 3]})
                                 for i in range(n)])


def pg_rows(url: str, table: str = "memories") -> list[tuple]:
    import psycopg

    with psycopg.connect(url) as conn:
        return conn.execute(f"SELECT id, user_id, kind, content, meta::text, created_at FROM {table} ORDER BY id").fetchall()


def redis_state(url: str, pattern: str = "history:*") -> dict[bytes, tuple[str, Any]]:
    """key -> (type, value) for every key matching pattern."""
    import redis

    with redis.Redis.from_url(url) as r:
        out = {}
        for k in sorted(r.scan_iter(pattern)):
            t = r.type(k).decode()
            out[k] = (t, r.get(k) if t == "string" else r.lrange(k, 0, -1))
        return out


def redis_pttls(url: str, pattern: str = "history:*") -> dict[bytes, int]:
    import redis

    with redis.Redis.from_url(url) as r:
        return {k: r.pttl(k) for k in sorted(r.scan_iter(pattern))}


def redis_expiry_times(url: str, pattern: str = "history:*") -> dict[bytes, int]:
    """Each key's absolute expiry (PEXPIRETIME, Redis 7+: ms since the epoch; -1 none): unlike a
    PTTL it does not change while the test runs, so `--ttl keep` can be checked exactly."""
    import redis

    with redis.Redis.from_url(url) as r:
        return {k: r.pexpiretime(k) for k in sorted(r.scan_iter(pattern))}


def qdrant_points(path: Path, collection: str) -> dict[Any, tuple]:
    """id -> (rounded unit vector, payload) of every point.

    Normalised here because local mode returns a Cosine vector normalised in the client that
    wrote it but as written after a reopen; Qdrant compares them normalised either way.
    """
    import numpy as np

    with qdrant(path) as client:
        points, offset = [], None
        while True:
            batch, offset = client.scroll(collection, limit=256, offset=offset, with_vectors=True, with_payload=True)
            points += batch
            if offset is None:
                break
    def unit(v) -> tuple:
        a = np.asarray(v, dtype=np.float64)
        return tuple((a / (np.linalg.norm(a) or 1.0)).tolist())

    return {p.id: (unit(p.vector), json.dumps(p.payload, sort_keys=True)) for p in points}


def same_points(a: dict, b: dict) -> bool:
    """Equal ids and payloads, vectors equal up to float32 rounding."""
    import numpy as np

    return a.keys() == b.keys() and all(
        a[k][1] == b[k][1] and np.allclose(a[k][0], b[k][0], atol=1e-5) for k in a)


def corrupt_chunk(repo: Path, chunk_id: str) -> Path:
    """Overwrite bytes in the middle of a stored chunk (it stays present: only a re-read finds it)."""
    path = repo / "data" / chunk_id[:2] / chunk_id
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 8] = b"garbage!"
    path.write_bytes(bytes(data))
    return path


def wait_for_port(host: str, port: int, proc: subprocess.Popen, timeout: float = 20) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"nothing listening on {host}:{port} after {timeout}s")
