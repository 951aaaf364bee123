"""`statevault backup` stopped by SIGTERM (a Kubernetes Job's deadline, systemd, `timeout`): the
running source stops before its manifest, the others do not start, nothing half-made is
visible, and the repository's lease is released at once (killed by the signal, it would have
blocked prune until it expired)."""
from __future__ import annotations

import json
import os
import subprocess

import redis

from tests.e2e.test_interrupted_restore import ROOT, sigterm_once, statevault


def test_sigterm_mid_backup_commits_nothing_half_made_and_releases_the_lease(fresh_redis_url, tmp_path):
    urls = {}
    for name in ("alpha", "beta"):
        urls[name] = fresh_redis_url()
        pipe = redis.Redis.from_url(urls[name]).pipeline(transaction=False)
        for i in range(150_000):
            pipe.set(f"history:u{i}", f"{name} turn {i} " * 20)
        pipe.execute()
    repo = tmp_path / "repo"
    config = tmp_path / "statevault.toml"
    config.write_text(f'[repository]\nurl = "{repo.as_uri()}"\n\n' + "".join(
        f'[sources.{name}]\nkind = "redis"\nurl = "{url}"\n\n' for name, url in urls.items()), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(statevault(config, *args), cwd=ROOT, env=env, capture_output=True, text=True)

    assert run("init").returncode == 0
    code, out, err = sigterm_once(statevault(config, "backup", "--json"), env,
                                  lambda: any((repo / "data").glob("*/*")))  # the first chunks are being stored
    assert code == 1, err
    report = json.loads(out)
    assert report["stopped_by_signal"] is True
    assert [r["source"] for r in report["sources"]] + report["not_started"] == ["alpha", "beta"]
    stopped = [r for r in report["sources"] if not r["ok"]]  # the one running when the signal came, if any
    assert stopped or report["not_started"]
    assert all("interrupted before commit" in r["error"]["message"] for r in stopped)

    snapshots = json.loads(run("snapshots", "list", "--json").stdout)
    assert {s["source"] for s in snapshots["snapshots"]} == {r["source"] for r in report["sources"] if r["ok"]}
    assert json.loads(run("locks", "list", "--json").stdout) == []
    assert not [p for p in repo.rglob("*") if p.name.startswith(".")]  # no temp file left behind
    again = run("backup", "--json")
    assert again.returncode == 0, again.stderr
    assert {s["source"] for s in json.loads(run("snapshots", "list", "--json").stdout)["snapshots"]} == {"alpha", "beta"}
