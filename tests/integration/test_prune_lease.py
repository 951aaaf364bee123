"""Prune whose exclusive lease lapses mid-run (a suspended VM, a GC pause, SIGSTOP) must never
delete a chunk that a snapshot committed after it started may need.

QA's repro: backup S1, forget S1, a prune stalls past its lease's ttl just before deleting,
a backup meanwhile reuses S1's (now unreferenced) chunk, stat found, 0 bytes uploaded; the
prune resumes. The stall is simulated in-process, deterministically: the prune's store is
wrapped so that at a chosen point its lease's refresh thread stops (the whole process stalls),
the ttl passes, another repository object (the other process) backs up, and then the stalled
process resumes: its refresh lands first (as after SIGCONT), then the prune goes on.
"""
from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
import redis

from backup.job import run_backup
from snapshots.check import check_repository
from snapshots.errors import VerificationError
from snapshots.leases import LeaseLapsedError, acquire_lease
from snapshots.manifest import RepoConfig, utcnow
from snapshots.prune import prune_repository
from snapshots.repository import open_repository
from snapshots.settings import Settings
from tests.integration.test_repository import SMALL_CHUNKS, memory_rows

# long enough that a lease is refreshed in time on a loaded 2-CPU CI host (0.6 s lapsed there
# once, between two steps of a test); the stalls must outlast it
TTL = 2.5
STALL = 3.0  # > TTL


class HookedStore:
    """The prune's store, calling `hook(event, key)` at the points a test stalls the process."""

    def __init__(self, inner, hook):
        self._inner, self._hook = inner, hook

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def list(self, prefix: str = ""):
        yield from self._inner.list(prefix)
        self._hook("listed", prefix)  # (prune lists data/ once, then plans)

    def delete(self, key: str) -> None:
        self._hook("delete", key)  # the call has begun: every check before it has passed
        self._inner.delete(key)


def stall(lease, during=None) -> None:
    """The holder's process stops for longer than the ttl (no refresh), `during` runs meanwhile
    in another "process", then it resumes: its refresh lands first, then the caller goes on."""
    lease._stop.set()
    lease._thread.join()
    time.sleep(STALL)
    if during is not None:
        during()
    lease._write(lease.store.put)  # SIGCONT: the refresh thread's write lands
    lease._stop = threading.Event()
    lease._thread = threading.Thread(target=lease._refresh_loop, daemon=True)
    lease._thread.start()


def once(event: str, prefix: str, action):
    done = []

    def hook(ev, key):
        if ev == event and key.startswith(prefix) and not done:
            done.append(key)
            action()
    return hook, done


def open_repo(url, **kw):
    repo = open_repository(url, config=RepoConfig(id="t", created_at=utcnow(), **SMALL_CHUNKS), **kw)
    repo.lease_ttl = TTL
    return repo


def data_keys(repo) -> set[str]:
    return {o.key for o in repo.store.list("data")}


def prune_lease(repo):
    (lease,) = [held for held in repo.held_leases() if held.exclusive]
    return lease


def test_qa_repro_prune_stalled_past_its_ttl_spares_the_chunk_a_new_backup_reused(file_repo_url, redis_url):
    """The exact QA scenario with a real Redis source of 3 keys and `prune_grace = 0h`."""
    with redis.Redis.from_url(redis_url) as r:
        for i in range(3):
            r.set(f"history:u{i}", f"message {i} " + "x" * 40)
    settings = Settings(repository={"url": file_repo_url, "lease_ttl_seconds": 5, "prune_grace": "0h"},
                        sources={"hist": {"kind": "redis", "url": redis_url}})
    repo = open_repo(file_repo_url, create=True)
    first = run_backup(repo, settings, ["hist"])
    assert first.ok
    with repo.lease("forget", exclusive=True):
        repo.delete_snapshot(first.results[0].snapshot_id)
    chunks = data_keys(repo)
    assert chunks

    second = []

    def backup_meanwhile():
        other = open_repo(file_repo_url)  # another process on the same repository
        result = run_backup(other, settings, ["hist"], retry_attempts=1)
        assert result.ok, result.results[0].error
        assert result.results[0].bytes_uploaded == 0  # it reused the unreferenced chunk(s)
        second.append(result.results[0].snapshot_id)

    # stalls after planning (S1's chunks unreferenced), before its first deletion
    hook, fired = once("listed", "data", lambda: stall(prune_lease(repo), backup_meanwhile))
    repo.store = HookedStore(repo.store, hook)
    with pytest.raises(LeaseLapsedError) as caught:
        prune_repository(repo, grace=timedelta(0))
    assert fired and second
    assert caught.value.exit_code == 4
    assert "prune" in caught.value.message and "lapsed" in caught.value.message
    assert data_keys(repo) == chunks  # nothing deleted
    report = check_repository(repo, read_data=True)
    assert report.ok, report.to_dict()
    # the prune run again, under a lease that stands, finds the chunks referenced again
    repo.store = repo.store._inner
    assert prune_repository(repo, grace=timedelta(0)).chunks_deleted == 0
    assert repo.list_snapshots()[-1].id == second[0]
    assert check_repository(repo, read_data=True).ok


def test_a_deletion_that_lands_after_the_lease_lapsed_stops_prune_naming_the_snapshot_it_broke(repo_url):
    """The stall falls between the last check and the deletion landing (inside the delete call):
    the chunk is deleted after a backup found it. Prune stops at once, naming that snapshot
    (exit 3), and deletes nothing more; a new backup uploads the chunk again."""
    repo = open_repo(repo_url, create=True)
    rows = memory_rows(2000)
    writer = repo.begin_snapshot("memory", "postgres")
    with writer.item("t", "table", "jsonl") as w:
        w.add_many(rows)
    old = writer.commit(utcnow())
    with repo.lease("forget", exclusive=True):
        repo.delete_snapshot(old.id)
    chunks = data_keys(repo)
    assert len(chunks) > 3

    new = []

    def backup_meanwhile():
        other = open_repo(repo_url)
        with other.lease("backup memory"):
            w2 = other.begin_snapshot("memory", "postgres")
            with w2.item("t", "table", "jsonl") as w:
                w.add_many(rows)  # the same records: every chunk found by stat, none uploaded
            new.append(w2.commit(utcnow()))
        assert w2.stats.chunks_new == 0

    hook, fired = once("delete", "data/", lambda: stall(prune_lease(repo), backup_meanwhile))
    repo.store = HookedStore(repo.store, hook)
    with pytest.raises(VerificationError, match="name chunk.s. this prune deleted") as caught:
        prune_repository(repo, grace=timedelta(0))
    assert caught.value.exit_code == 3 and fired and new
    assert new[0].id in caught.value.message
    assert len(chunks - data_keys(repo)) == 1  # the one deletion that landed late, and no other
    report = check_repository(repo, read_data=True)
    assert report.broken_snapshots == [new[0].id]
    # the runbook's repair: forget it, back up again (the chunk is uploaded again)
    repo.store = repo.store._inner
    with repo.lease("forget", exclusive=True):
        repo.delete_snapshot(new[0].id)
    writer = repo.begin_snapshot("memory", "postgres")
    with writer.item("t", "table", "jsonl") as w:
        w.add_many(rows)
    again = writer.commit(utcnow())
    assert check_repository(repo, read_data=True).ok
    assert list(repo.iter_records(repo.load_manifest(again.id).item("t"))) == rows


def test_a_lapse_is_not_hidden_by_the_refresh_that_lands_after_it(file_repo_url):
    """No one else got in, but the prune's lease lapsed while it was stopped; the refresh after
    SIGCONT re-validates the lease object. The prune must still stop before deleting."""
    repo = open_repo(file_repo_url, create=True)
    writer = repo.begin_snapshot("memory", "postgres")
    with writer.item("t", "table", "jsonl") as w:
        w.add_many(memory_rows(500))
    with repo.lease("forget", exclusive=True):
        repo.delete_snapshot(writer.commit(utcnow()).id)
    chunks = data_keys(repo)

    def stalled():
        lease = prune_lease(repo)
        stall(lease)
        assert lease.lapsed and lease.standing_for() == 0.0

    hook, _ = once("listed", "data", stalled)
    repo.store = HookedStore(repo.store, hook)
    with pytest.raises(LeaseLapsedError, match="lapsed"):
        prune_repository(repo, grace=timedelta(0))
    assert data_keys(repo) == chunks
    repo.store = repo.store._inner
    assert prune_repository(repo, grace=timedelta(0)).chunks_deleted == len(chunks)  # a fresh prune does


def test_a_snapshot_that_appears_during_prune_stops_it_whatever_the_clock_says(file_repo_url, monkeypatch):
    """Checked in the store, without clocks: a manifest written while prune holds its lease means
    someone got in (here a backup that stalled in its commit, after its lease check). Before any
    chunk it needs is deleted prune just stops; after, it names the snapshot as broken (exit 3)."""
    import snapshots.prune as prune_module

    repo = open_repo(file_repo_url, create=True)
    rows = memory_rows(2000)

    def snapshot(on):
        w = on.begin_snapshot("memory", "postgres")
        with w.item("t", "table", "jsonl") as item:
            item.add_many(rows)
        return w

    with repo.lease("forget", exclusive=True):
        repo.delete_snapshot(snapshot(repo).commit(utcnow()).id)
    chunks = data_keys(repo)

    # the zombie backup found every chunk before the prune began; it commits during the prune
    zombie = snapshot(open_repo(file_repo_url))
    hook, _ = once("listed", "data", lambda: zombie.commit(utcnow()))
    repo.store = HookedStore(repo.store, hook)
    with pytest.raises(LeaseLapsedError, match=f"snapshot.*{zombie.id}.*appeared"):
        prune_repository(repo, grace=timedelta(0))
    assert data_keys(repo) == chunks
    assert check_repository(repo, read_data=True).ok

    # the same, landing after the first deletion: detected at the next check of the store
    repo.store = repo.store._inner
    repo.delete_snapshot(zombie.id)
    monkeypatch.setattr(prune_module, "FENCE_EVERY", 1)
    zombie = snapshot(open_repo(file_repo_url))
    deleted = []

    def commit_after_first(ev, key):
        if ev == "delete" and key.startswith("data/"):
            deleted.append(key)
            if len(deleted) == 2:  # the first deletion has landed (this one is about to)
                zombie.commit(utcnow())

    repo.store = HookedStore(repo.store, commit_after_first)
    with pytest.raises(VerificationError, match=f"{zombie.id}.*name chunk") as caught:
        prune_repository(repo, grace=timedelta(0))
    assert caught.value.exit_code == 3
    assert list(caught.value.report["broken_snapshots"]) == [zombie.id]
    assert chunks - data_keys(repo) == set(deleted)  # nothing deleted after the check that saw it


def test_confirm_counts_a_stall_on_the_boot_clock_when_the_wall_clock_lags(file_repo_url, monkeypatch):
    """A VM resumed with a wall clock that has not caught up yet: the boot-time clock shows the lapse."""
    import snapshots.leases as leases_module

    store = open_repo(file_repo_url, create=True).store
    lease = acquire_lease(store, "repository", exclusive=True, purpose="prune", ttl=TTL)
    try:
        frozen = leases_module._now()
        lease._stop.set()
        lease._thread.join()
        monkeypatch.setattr(leases_module, "_now", lambda: frozen)
        assert lease.stands()
        time.sleep(STALL)
        assert not lease.stands()
        lease._write(store.put)
        assert lease.lapsed and not lease.stands()
        with pytest.raises(LeaseLapsedError, match="lapsed") as caught:
            lease.confirm(TTL / 3)
        assert caught.value.exit_code == 4
    finally:
        monkeypatch.undo()
        lease.release()
