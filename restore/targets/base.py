"""The target protocol: how a snapshot's records are written back into a live store.

The orchestrator (restore/run.py) resolves the snapshot, asks the target for a plan, takes
the pre-restore snapshot when the plan replaces live data, streams records into the target
and verifies by reading the target back. A target never decides policy on its own: it
refuses (TargetNotEmptyError, IncompatibleTargetError) during `plan`, before any write.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal, Protocol

from snapshots.manifest import Item, Manifest

Mode = Literal["new", "replace", "swap"]
TtlMode = Literal["keep", "reset", "none"]


@dataclass(frozen=True)
class RestoreOptions:
    mode: Mode = "new"
    ttl: TtlMode = "keep"
    batch_size: int = 1000
    # PostgreSQL: connections that load one big table at once, and read it back for verification
    # (postgres_load, postgres_parallel); 1 loads it in place in one transaction, as a small one
    jobs: int = 2


@dataclass
class ItemPlan:
    item: Item                      # the snapshot item
    target: str                     # the table / collection / key pattern written to
    action: Literal["create", "replace", "swap"]
    live_records: int | None = None  # what the target holds now (None: does not exist)
    # restrict the item's records (partial restore, e.g. one user's keys); None = all
    record_filter: Callable[[bytes], bool] | None = None
    # what a pre-restore snapshot must cover on the target (source `only` selectors)
    backup_selector: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def partial(self) -> bool:
        return self.record_filter is not None

    def to_dict(self) -> dict[str, Any]:
        return {"item": self.item.name, "target": self.target, "action": self.action,
                "records": self.item.records, "bytes": self.item.bytes, "stored_bytes": self.item.stored_bytes,
                "live_records": self.live_records, "partial": self.partial, "notes": self.notes}


class Target(Protocol):
    """Optional methods, called through getattr by the orchestrator when a target has them:

        written_records(plan, options)   a transform (records -> records) of what `restore`
                                         is given and the digest covers, or None (Redis:
                                         hash fields expired under --ttl keep)
        finish(plans, options) -> None   after every plan's restore, before verification:
                                         cross-item work (PostgreSQL adds foreign keys here)
        switch(plans) -> None            mode swap, after the staged items verified: the
                                         atomic switch; without it, close() discards the staging
    """

    kind: str
    supports_swap: bool

    def plan(self, manifest: Manifest, *, only: list[str], into: str | None, mode: Mode,
             ttl: TtlMode = "keep") -> list[ItemPlan]:
        """Decide what goes where. Raises before writing anything when the target holds live
        data and mode is `new`, when it cannot hold the snapshot (with expiries kept as `ttl`
        says), or when `swap` is unsupported."""

    def restore(self, plan: ItemPlan, records: Iterator[bytes], options: RestoreOptions) -> None:
        """Write the (already filtered) records. `swap` must leave live data untouched until an
        atomic switch at the end; an interrupted restore must never leave a half-replaced item
        where the live one was."""

    canonical_is_identity: bool = False  # True: `canonical` returns the record unchanged

    def read_back(self, plan: ItemPlan, ordered: bool = True) -> Iterator[bytes]:
        """The restored item's canonical records (same format and order as the snapshot's),
        restricted like the plan, for verification. `ordered=False` lets a target skip work
        spent only on ordering when just the (order-independent) digest is wanted."""

    def canonical(self, item: Item, record: bytes) -> bytes:
        """The part of a record the digest covers (identity for most formats)."""

    def record_key(self, item: Item, record: bytes) -> Any:
        """A sortable identity of a record (primary key, key name, point id), for diff reports."""

    def close(self) -> None: ...
