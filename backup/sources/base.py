"""The source protocol: how a store's live state becomes record streams.

A source opens a *cut*: one consistent point in time (a REPEATABLE READ transaction, a
scan started at a time, a scroll). The cut names its items and streams each one's records
in a deterministic order (primary key, sorted key names, point id), as bytes in the item's
documented record format. Nothing is held in memory beyond a bounded batch.

The same source code reads a *restored* target back for verification: the records it
streams are canonical, so their count and digest equal the manifest's exactly when the
restored state equals the snapshot.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ContextManager, Iterator, Protocol

from snapshots.writer import SnapshotWriter


@dataclass(frozen=True)
class ItemSpec:
    name: str
    kind: str
    format: str
    schema: dict[str, Any] = field(default_factory=dict)


class SourceCut(Protocol):
    cut_time: datetime
    source_info: dict[str, Any]  # server version etc.; never secrets

    def items(self) -> list[ItemSpec]:
        """The items selected by the source's config (and `only`), in a stable order."""

    def records(self, item: ItemSpec) -> Iterator[bytes]:
        """The item's records in deterministic order."""

    def backup_item(self, item: ItemSpec, writer: SnapshotWriter) -> None:
        """Write the item (and anything derived from the same stream, e.g. the offline index)."""


class Source(Protocol):
    kind: str

    def open(self, only: list[str] | None = None) -> ContextManager[SourceCut]:
        """Open a consistent cut; `only` restricts items (table names, collections, key patterns).

        Raises SourceError (retryable when the failure is transient) if the server is unreachable.
        """


def write_item_records(cut: SourceCut, item: ItemSpec, writer: SnapshotWriter) -> None:
    """The usual `backup_item`: stream the records into one snapshot item."""
    with writer.item(item.name, item.kind, item.format, item.schema) as w:
        for record in cut.records(item):
            w.add(record)
