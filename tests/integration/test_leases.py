"""Leases between real processes, on both stores: one exclusive winner, takeover after expiry, refresh.

The racers are separate Python processes released together by a file barrier; a holder that
dies is SIGKILLed, one that stalls is SIGSTOPped. Nothing here patches the lease code.
"""
from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from snapshots.errors import LockedError
from snapshots.leases import acquire_lease, list_leases
from snapshots.repository import open_repository
from snapshots.stores.base import open_store

ROOT = Path(__file__).resolve().parents[2]

RACER = textwrap.dedent('''
    import sys, time
    from pathlib import Path
    from snapshots.errors import LockedError
    from snapshots.leases import acquire_lease
    from snapshots.stores.base import open_store

    url, sync, me, other, rounds = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
    store = open_store(url)

    def barrier(tag):
        (sync / f"{tag}-{me}").touch()
        deadline = time.monotonic() + 60
        while not (sync / f"{tag}-{other}").exists():
            if time.monotonic() > deadline:
                sys.exit(f"{me}: barrier {tag} timed out")
            time.sleep(0.0002)

    store.list("locks")  # warm up the client before the first race
    for r in range(rounds):
        barrier(f"start{r}")
        try:
            lease = acquire_lease(store, "repository", exclusive=True, purpose=f"round {r}", ttl=60, owner=me)
        except LockedError:
            lease = None
        (sync / f"result{r}-{me}").write_text("won" if lease else "lost")
        barrier(f"tried{r}")  # the winner holds until the loser has tried
        if lease:
            lease.release()
        barrier(f"released{r}")
    print("DONE", flush=True)
''')

HOLDER = textwrap.dedent('''
    import sys, time
    from snapshots.leases import acquire_lease
    from snapshots.stores.base import open_store

    exclusive = len(sys.argv) < 4 or sys.argv[3] != "shared"
    lease = acquire_lease(open_store(sys.argv[1]), "repository", exclusive=exclusive,
                          purpose="nightly prune" if exclusive else "backup memory",
                          ttl=float(sys.argv[2]), owner="holder-host:4242")
    print("HELD", lease.key, flush=True)
    while True:
        time.sleep(0.05)
        if lease.lost:
            print("LOST", flush=True)
            break
    time.sleep(600)
''')


def spawn(tmp_path: Path, name: str, code: str, *args: str) -> subprocess.Popen:
    script = tmp_path / f"{name}.py"
    script.write_text(code)
    return subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


def read_line(proc: subprocess.Popen, timeout: float) -> str:
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    if not sel.select(timeout):
        return ""
    return proc.stdout.readline().decode().strip()


def kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)


@pytest.fixture
def store(repo_url):
    return open_store(repo_url)


def test_two_processes_racing_for_an_exclusive_lease_one_wins_each_round(store, repo_url, tmp_path):
    rounds = 12
    sync = tmp_path / "sync"
    sync.mkdir()
    racers = [spawn(tmp_path, f"racer_{me}", RACER, repo_url, str(sync), me, other, str(rounds))
              for me, other in (("p1", "p2"), ("p2", "p1"))]
    try:
        for proc in racers:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0 and b"DONE" in out, err.decode()[-2000:]
    finally:
        for proc in racers:
            kill(proc)
    for r in range(rounds):
        results = {me: (sync / f"result{r}-{me}").read_text() for me in ("p1", "p2")}
        assert sorted(results.values()) == ["lost", "won"], f"round {r}: {results}"
    assert [lease for lease in list_leases(store) if not lease.expired] == []  # every winner released


def test_expired_lease_of_a_killed_holder_is_taken_over(store, repo_url, tmp_path):
    holder = spawn(tmp_path, "holder", HOLDER, repo_url, "1.0")
    try:
        line = read_line(holder, 30)
        assert line.startswith("HELD"), holder.stderr.read().decode() if holder.poll() is not None else line
        held_key = line.split()[1]
        with pytest.raises(LockedError) as exc:
            acquire_lease(store, "repository", exclusive=True, purpose="prune", ttl=30)
        assert "holder-host:4242" in exc.value.message and "nightly prune" in exc.value.message
        assert exc.value.exit_code == 4
        kill(holder)
        killed_at = time.monotonic()
        with pytest.raises(LockedError):  # not expired yet: a dead holder is only detected by expiry
            acquire_lease(store, "repository", exclusive=True, purpose="prune", ttl=30)
        lease = None
        while lease is None and time.monotonic() - killed_at < 10:
            try:
                lease = acquire_lease(store, "repository", exclusive=True, purpose="prune", ttl=30)
            except LockedError:
                time.sleep(0.1)
        assert lease is not None, "the expired lease was never taken over"
        with lease:
            assert lease.key > held_key  # a newer generation
            live = [i for i in list_leases(store) if not i.expired]
            assert [(i.owner, i.purpose) for i in live] == [(lease.owner, "prune")]
    finally:
        kill(holder)


def test_expired_shared_lease_of_a_killed_backup_blocks_nothing_and_is_tidied(file_repo_url, tmp_path):
    store = open_store(file_repo_url)
    holder = spawn(tmp_path, "holder", HOLDER, file_repo_url, "0.6", "shared")
    try:
        assert read_line(holder, 30).startswith("HELD")
        with pytest.raises(LockedError, match="backup memory"):
            acquire_lease(store, "repository", exclusive=True, purpose="prune", ttl=30)
        kill(holder)
        time.sleep(0.8)
        (dead,) = list_leases(store)
        assert dead.expired and not dead.exclusive
        with acquire_lease(store, "repository", exclusive=True, purpose="prune", ttl=30) as lease:
            assert [i.key for i in list_leases(store)] == [lease.key]  # the dead holder's object is gone
    finally:
        kill(holder)


def test_a_stalled_holder_learns_it_lost_the_lease(file_repo_url, tmp_path):
    """SIGSTOP past the ttl, takeover, SIGCONT: the old holder must see `lost`, not refresh on as a zombie."""
    store = open_store(file_repo_url)
    holder = spawn(tmp_path, "holder", HOLDER, file_repo_url, "1.0")
    try:
        assert read_line(holder, 30).startswith("HELD")
        holder.send_signal(signal.SIGSTOP)
        time.sleep(1.3)
        taker = acquire_lease(store, "repository", exclusive=True, purpose="takeover", ttl=30)
        with taker:
            holder.send_signal(signal.SIGCONT)
            assert read_line(holder, 5) == "LOST"
            live = [i for i in list_leases(store) if i.exclusive and not i.expired]
            assert [i.purpose for i in live] == ["takeover"]
    finally:
        holder.send_signal(signal.SIGCONT)
        kill(holder)


def test_shared_and_exclusive_exclude_each_other(store):
    backup = acquire_lease(store, "repository", exclusive=False, purpose="backup memory", ttl=30, owner="a:1")
    restore = acquire_lease(store, "repository", exclusive=False, purpose="restore memory", ttl=30, owner="b:2")
    with pytest.raises(LockedError, match="in use") as exc:
        acquire_lease(store, "repository", exclusive=True, purpose="prune", ttl=30)
    assert "a:1" in exc.value.message or "b:2" in exc.value.message
    backup.release()
    with pytest.raises(LockedError):
        acquire_lease(store, "repository", exclusive=True, purpose="prune", ttl=30)
    restore.release()
    restore.release()  # idempotent

    prune = acquire_lease(store, "repository", exclusive=True, purpose="prune", ttl=30, owner="c:3")
    with pytest.raises(LockedError, match="c:3"):
        acquire_lease(store, "repository", exclusive=False, purpose="backup", ttl=30)
    with pytest.raises(LockedError, match="prune"):
        acquire_lease(store, "repository", exclusive=True, purpose="prune again", ttl=30)
    # a lease of another name is independent
    with acquire_lease(store, "job-backup-memory", exclusive=True, purpose="daemon", ttl=30):
        pass
    prune.release()
    with acquire_lease(store, "repository", exclusive=False, purpose="backup", ttl=30):
        pass
    assert [i for i in list_leases(store) if not i.expired] == []  # a refused shared lease left nothing behind


def test_refresh_keeps_a_lease_alive_past_its_ttl(store):
    lease = acquire_lease(store, "repository", exclusive=True, purpose="long prune", ttl=0.4)
    try:
        time.sleep(1.0)  # 2.5 ttls
        with pytest.raises(LockedError, match="long prune"):
            acquire_lease(store, "repository", exclusive=True, purpose="other", ttl=30)
        (info,) = list_leases(store)
        assert not info.expired and not lease.lost
    finally:
        lease.release()
    assert list_leases(store) == []


def test_prune_is_blocked_by_a_live_exclusive_lease_and_locks_list_shows_it(file_repo_url, tmp_path):
    # the real command as a subprocess; the lease logic itself runs on both stores above
    open_repository(file_repo_url, create=True)
    store = open_store(file_repo_url)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "STATEVAULT_REPOSITORY__URL": file_repo_url}
    statevault = [str(Path(sys.executable).parent / "statevault")]
    with acquire_lease(store, "repository", exclusive=True, purpose="forget", ttl=60, owner="ops-host:777"):
        with acquire_lease(store, "job-backup-memory", exclusive=False, purpose="backup memory", ttl=60,
                           owner="daemon-host:9"):
            pruned = subprocess.run([*statevault, "snapshots", "prune"], capture_output=True, text=True, env=env,
                                    cwd=tmp_path, timeout=60)
            listed = subprocess.run([*statevault, "locks", "list", "--json"], capture_output=True, text=True, env=env,
                                    cwd=tmp_path, timeout=60)
    assert pruned.returncode == 4, pruned.stderr
    assert "ops-host:777" in pruned.stderr and "forget" in pruned.stderr
    assert listed.returncode == 0, listed.stderr
    leases = sorted(json.loads(listed.stdout), key=lambda i: i["owner"])
    assert [(i["name"], i["exclusive"], i["owner"], i["purpose"], i["expired"]) for i in leases] == [
        ("job-backup-memory", False, "daemon-host:9", "backup memory", False),
        ("repository", True, "ops-host:777", "forget", False)]
