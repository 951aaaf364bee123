"""An operator's restore stopped by SIGTERM (systemd, Kubernetes, `timeout`) or Ctrl-C undoes
what it wrote before the process exits, and says so; the process exits 1."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import redis

ROOT = Path(__file__).resolve().parents[2]


def statevault(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "cli.app", "-c", str(config), *args]


def backed_up(tmp_path: Path, source: str, kind: str, url: str) -> tuple[Path, dict]:
    """A config with one source in a file:// repository, initialised and backed up through the
    CLI; (config path, environment for the CLI)."""
    config = tmp_path / "statevault.toml"
    config.write_text(f'[repository]\nurl = "{(tmp_path / "repo").as_uri()}"\n\n'
                      f'[sources.{source}]\nkind = "{kind}"\nurl = "{url}"\n', encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for args in (("init",), ("backup", source)):
        subprocess.run(statevault(config, *args), cwd=ROOT, env=env, check=True, capture_output=True)
    return config, env


def sigterm_once(command: list[str], env: dict, started: Callable[[], bool]) -> tuple[int, str, str]:
    """Run `command`, send it SIGTERM as soon as `started()` says its work has begun, and
    return its (exit code, stdout, stderr); it is killed if it outlives the test."""
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not started():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.005)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out, err


def test_sigterm_mid_restore_removes_the_keys_it_wrote(redis_url, fresh_redis_url, tmp_path):
    source = fresh_redis_url()
    pipe = redis.Redis.from_url(source).pipeline(transaction=False)
    for i in range(100_000):
        pipe.set(f"history:u{i}", f"turn {i} " * 30, px=3_600_000)
    pipe.execute()
    config, env = backed_up(tmp_path, "history", "redis", source)

    target = fresh_redis_url()
    t = redis.Redis.from_url(target)
    code, _, err = sigterm_once(statevault(config, "restore", "latest", "--source", "history", "--to", target), env,
                                lambda: t.dbsize() >= 1000)  # writing has begun
    assert code == 1, err
    assert "interrupted by SIGTERM" in err and "key(s) it had written were removed" in err, err
    assert t.dbsize() == 0


CLI_WITH_SMALL_PARALLEL_LOADS = ("import runpy, sys\n"
                                 "import restore.targets.postgres_load as load\n"
                                 "load.MIN_BYTES = 0  # this small table loads as a big one: staged, one COPY a job\n"
                                 "sys.argv[0] = 'statevault'\n"
                                 "runpy.run_module('cli.app', run_name='__main__')\n")


def test_sigterm_mid_parallel_load_leaves_no_table_and_no_staging_schema(pg_url, pg_database, tmp_path):
    import psycopg

    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE memories (id bigint PRIMARY KEY, body text NOT NULL);"
                     "INSERT INTO memories SELECT g, repeat(md5(g::text), 4) FROM generate_series(1, 300000) g")
    config, env = backed_up(tmp_path, "memory", "postgres", pg_url)

    target = pg_database("svsigterm")

    def scalar(query: str):
        with psycopg.connect(target, autocommit=True) as conn:
            return conn.execute(query).fetchone()[0]

    copying = ("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'statevault restore' "
               "AND datname = current_database() AND query LIKE 'COPY%FROM STDIN%' AND state = 'active'")
    command = [sys.executable, "-c", CLI_WITH_SMALL_PARALLEL_LOADS, "-c", str(config),
               "restore", "latest", "--source", "memory", "--to", target, "--jobs", "3"]
    code, _, err = sigterm_once(command, env, lambda: scalar(copying) == 3)  # every loader is in its COPY
    assert code == 1, err
    assert "interrupted by SIGTERM" in err, err
    assert scalar("SELECT to_regclass('public.memories') IS NULL")
    assert scalar("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'statevault%'") == 0
