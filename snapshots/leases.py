"""Leases in the repository: shared (backup, restore) and exclusive (prune, daemon jobs).

Layout under `locks/<name>/`:
    shared-<uuid>.json      one per shared holder
    x-<generation>.json     exclusive holders, generation 1, 2, ...; the highest one counts

An exclusive lease is taken by *conditionally creating* the next generation after the
highest one, which must be expired or absent: of two racers exactly one create succeeds,
on S3 (`IfNoneMatch`) as on a local directory (link(2)). A shared holder writes its object
first and then looks for a live exclusive one; an exclusive holder takes its generation
first and then looks for live shared ones. Whoever sees the other backs off, so a
shared/exclusive race can make both back off but never lets both proceed.

Holders refresh their object every ttl/3 from a background thread; a holder that died
stops refreshing and its lease expires after `ttl` seconds, after which it is taken over
without any manual unlock. Clocks of hosts sharing a repository must be roughly in sync (NTP).

A holder that only stalled (a partition, a suspended VM) comes back to a lease that may have
been taken over meanwhile; refreshing it would not undo that. Each lease therefore knows
whether it *lapsed*: a refresh that landed after the previous one's expiry, or no valid one
now. `stands()` is False from then on, and whoever relies on the lease re-checks what it
assumed (a backup re-verifies its chunks before writing its manifest: snapshots/writer.py;
prune re-checks before and after every deletion: snapshots/prune.py).

A refresh that lands after a stall must not hide it: the lapse is recorded under the same lock
`stands()` reads under, so a check racing with that refresh sees either the old expiry (passed)
or the lapse, never the new expiry alone. Expiry is measured on two clocks, the wall clock the
lease objects carry and the boot-time clock (which a wall clock that has not caught up yet
after a VM resumed cannot hide); the earlier one counts. `confirm(margin)` is the check for
holders that are about to act (prune before a deletion); `verify_in_store()` checks, without
clocks, that no newer exclusive generation took over.
"""
from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from snapshots.errors import LockedError, NotFoundError
from snapshots.stores.base import ObjectStore

_X = re.compile(r"^x-(\d{10})\.json$")


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _mono() -> float:
    """Seconds on a clock that never jumps and counts a suspended host (Linux); else monotonic."""
    return time.clock_gettime(time.CLOCK_BOOTTIME) if hasattr(time, "CLOCK_BOOTTIME") else time.monotonic()


class LeaseLapsedError(LockedError):
    """A holder found, before or after acting, that its lease had not stood throughout (exit 4)."""

    default_hint = ("Another statevault may have used the repository meanwhile, so nothing further was done. "
                    "Run the command again; see `statevault locks list`.")


def default_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class LeaseInfo:
    key: str
    name: str
    exclusive: bool
    owner: str
    purpose: str
    created: datetime
    expires: datetime

    @property
    def expired(self) -> bool:
        return self.expires <= _now()

    def describe(self) -> str:
        kind = "exclusive" if self.exclusive else "shared"
        return (f"{kind} lease {self.name!r} held by {self.owner} for {self.purpose!r} "
                f"since {self.created:%Y-%m-%d %H:%M:%SZ}, expires {self.expires:%H:%M:%SZ}")

    def to_dict(self) -> dict:
        return {"key": self.key, "name": self.name, "exclusive": self.exclusive, "owner": self.owner,
                "purpose": self.purpose, "created": self.created.isoformat(),
                "expires": self.expires.isoformat(), "expired": self.expired}


def _decode(store: ObjectStore, key: str) -> LeaseInfo | None:
    try:
        d = json.loads(store.get(key))
        return LeaseInfo(key, d["name"], d["exclusive"], d["owner"], d["purpose"],
                         datetime.fromisoformat(d["created"]), datetime.fromisoformat(d["expires"]))
    except NotFoundError:
        return None  # released while we looked
    except (ValueError, KeyError, TypeError):
        # unreadable lease object: treat as expired long ago so it never blocks forever
        epoch = datetime(1970, 1, 1, tzinfo=timezone.utc)
        return LeaseInfo(key, key.split("/")[1], key.rsplit("/", 1)[-1].startswith("x-"), "?", "?", epoch, epoch)


def list_leases(store: ObjectStore, name: str | None = None) -> list[LeaseInfo]:
    prefix = f"locks/{name}" if name else "locks"
    out = []
    for obj in store.list(prefix):
        if obj.key.startswith("locks/claims/"):
            continue
        info = _decode(store, obj.key)
        if info is not None:
            out.append(info)
    return sorted(out, key=lambda i: i.created)


class Lease:
    """A held lease. Use as a context manager; `release()` is idempotent."""

    def __init__(self, store: ObjectStore, name: str, exclusive: bool, purpose: str,
                 ttl: float, owner: str | None = None):
        self.store, self.name, self.exclusive, self.purpose = store, name, exclusive, purpose
        self.ttl = ttl
        self.owner = owner or default_owner()
        self.key: str | None = None
        self.created = _now()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False    # set when a refresh found our lease gone (taken over after expiry)
        self.lapsed = False  # set when a refresh landed after our lease had expired (see module docstring)
        self._valid_until: datetime | None = None  # on the wall clock, as the lease object says
        self._valid_mono = 0.0                     # the same instant on _mono()
        self._state = threading.Lock()             # lapsed and the two expiries change together

    def _body(self, at: datetime) -> bytes:
        return json.dumps({
            "name": self.name, "exclusive": self.exclusive, "owner": self.owner, "purpose": self.purpose,
            "created": self.created.isoformat(),
            "expires": (at + timedelta(seconds=self.ttl)).isoformat(),
        }).encode()

    def _write(self, write) -> bool:
        """Write our object with `write(key, body)`; track how long it keeps the lease valid."""
        at, at_mono = _now(), _mono()  # taken before the write: the object says at + ttl
        done = write(self.key, self._body(at))
        if done is False:
            return False
        with self._state:
            if self._valid_until is not None and self._left() <= 0:
                self.lapsed = True  # the previous write had expired before this one was known to land
            self._valid_until = at + timedelta(seconds=self.ttl)
            self._valid_mono = at_mono + self.ttl
        return True

    def _left(self) -> float:
        """Seconds until the last write expires, on the earlier of both clocks (under _state)."""
        return min((self._valid_until - _now()).total_seconds(), self._valid_mono - _mono())

    def standing_for(self) -> float:
        """Seconds the lease still stands for from now; 0.0 once it does not (see `stands`)."""
        with self._state:
            if self.key is None or self.lost or self.lapsed or self._valid_until is None:
                return 0.0
            return max(0.0, self._left())

    def stands(self) -> bool:
        """Held, never lapsed, not taken over, and not expired now."""
        return self.standing_for() > 0

    def state(self) -> str:
        """Why the lease does not stand (or that it does), for error messages."""
        if self.key is None:
            return "was released"
        if self.lost:
            return "was taken over by another holder after it expired"
        if self.lapsed:
            return (f"lapsed: it expired before a refresh landed (this process stalled, or could not reach the "
                    f"store, for longer than the lease's ttl of {self.ttl:g}s)")
        left = self.standing_for()
        if left <= 0:
            return f"expired without a refresh (ttl {self.ttl:g}s)"
        return f"stands for {left:.1f}s more"

    def confirm(self, margin: float = 0.0, *, doing: str = "") -> None:
        """Return once the lease stands for more than `margin` seconds from now; else raise LeaseLapsedError.

        For a holder about to act: `margin` covers the time the action may take to land. A lease
        that stands for less (a refresh is late: a slow store) is waited on while it stands.
        """
        while True:
            left = self.standing_for()
            if left > margin:
                return
            if left <= 0:
                what = "exclusive" if self.exclusive else "shared"
                raise LeaseLapsedError(f"{doing or self.purpose} stopped: its {what} lease {self.name!r} {self.state()}")
            time.sleep(min(0.05, left))

    def verify_in_store(self, *, doing: str = "") -> None:
        """Exclusive leases: raise LeaseLapsedError if the store shows another holder took over
        (a newer generation, or ours gone). Needs no clock."""
        if self.exclusive and self.key is not None and self._superseded():
            self.lost = True
            raise LeaseLapsedError(f"{doing or self.purpose} stopped: its exclusive lease {self.name!r} {self.state()}")

    def acquire(self) -> "Lease":
        if self.exclusive:
            self._acquire_exclusive()
        else:
            self._acquire_shared()
        self._thread = threading.Thread(target=self._refresh_loop, name=f"lease-{self.name}", daemon=True)
        self._thread.start()
        return self

    def _live_exclusive(self) -> tuple[int, LeaseInfo | None]:
        top, holder = 0, None
        for obj in self.store.list(f"locks/{self.name}"):
            m = _X.match(obj.key.rsplit("/", 1)[-1])
            if m and int(m.group(1)) > top:
                top = int(m.group(1))
                holder = obj.key
        info = _decode(self.store, holder) if holder else None
        return top, (info if info is not None and not info.expired and info.key != self.key else None)

    def _acquire_exclusive(self) -> None:
        top, holder = self._live_exclusive()
        if holder is not None:
            raise LockedError(f"repository is locked: {holder.describe()}")
        self.key = f"locks/{self.name}/x-{top + 1:010d}.json"
        try:
            created = self._write(self.store.create)
        except BaseException:
            self.key = None  # not ours: never delete it on release
            raise
        if not created:
            key, self.key = self.key, None
            winner = _decode(self.store, key)
            raise LockedError("repository is locked: " + (winner.describe() if winner else "another process won the lease"))
        leases = list_leases(self.store, self.name)
        shared = [i for i in leases if not i.exclusive and not i.expired]
        if shared:
            self.release()
            raise LockedError(f"repository is in use: {shared[0].describe()}"
                              + (f" (and {len(shared) - 1} more)" if len(shared) > 1 else ""))
        # tidy up: older generations are expired or released, and expired shared leases belong to
        # holders that died (a killed backup); neither blocks anyone, both would linger forever
        for info in leases:
            m = _X.match(info.key.rsplit("/", 1)[-1])
            if (m and int(m.group(1)) <= top) or (not info.exclusive and info.expired):
                self.store.delete(info.key)

    def _acquire_shared(self) -> None:
        self.key = f"locks/{self.name}/shared-{uuid.uuid4().hex}.json"
        self._write(self.store.put)
        _, holder = self._live_exclusive()
        if holder is not None:
            self.release()
            raise LockedError(f"repository is locked: {holder.describe()}")

    def _superseded(self) -> bool:
        """Our exclusive generation is gone, or a newer one exists: we expired and were taken over.

        Checking only that our own object exists is not enough: a holder that stalled past its
        ttl (GC pause, SIGSTOP, suspended VM) would find it still there and refresh on as a
        zombie beside the new holder.
        """
        mine, present = int(_X.match(self.key.rsplit("/", 1)[-1]).group(1)), False
        for obj in self.store.list(f"locks/{self.name}"):
            m = _X.match(obj.key.rsplit("/", 1)[-1])
            if m and int(m.group(1)) > mine:
                return True
            present = present or obj.key == self.key
        return not present

    def _refresh_loop(self) -> None:
        while not self._stop.wait(max(self.ttl / 3, 0.05)):
            try:
                if self.key is None:
                    return
                if self.exclusive and self._superseded():
                    self.lost = True
                    return
                self._write(self.store.put)
            except Exception:  # noqa: BLE001 - a failed refresh is retried next period; expiry is the backstop
                continue

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if self.key is not None:
            try:
                self.store.delete(self.key)
            finally:
                self.key = None

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def acquire_lease(store: ObjectStore, name: str, *, exclusive: bool, purpose: str, ttl: float = 300,
                  owner: str | None = None) -> Lease:
    """Take a lease or raise LockedError naming who holds it."""
    return Lease(store, name, exclusive, purpose, ttl, owner).acquire()


def claim_once(store: ObjectStore, job: str, tick: datetime, owner: str | None = None) -> bool:
    """True for exactly one caller per (job, tick) across all processes sharing the repository."""
    key = f"locks/claims/{job}/{tick.astimezone(timezone.utc):%Y%m%dT%H%M%SZ}.json"
    body = json.dumps({"owner": owner or default_owner(), "claimed": _now().isoformat()}).encode()
    return store.create(key, body)
