"""Drift detection: compare a live store with a snapshot without restoring anything."""
from __future__ import annotations

import dataclasses

from backup.sources import open_source
from backup.sources.base import ItemSpec
from backup.sources.redis import recorded_scope
from restore.targets import open_target
from restore.verify import ItemCheck, digest_of
from snapshots.errors import NotFoundError
from snapshots.repository import Repository
from snapshots.settings import Settings


def verify_live(repo: Repository, settings: Settings, source: str, ref: str = "latest", *,
                only: list[str] | None = None) -> tuple[str, list[ItemCheck]]:
    """Count and digest each of the snapshot's items on the live store; returns (snapshot id, checks).

    A live item that is gone shows as 0 records. Read-only: the source is opened as for a backup.
    Each item is read with the snapshot's own scope, not the config's: a partial snapshot
    (a pre-restore snapshot of `--only ...`) is compared with the live records it could hold.
    PostgreSQL and Qdrant items are whole tables and collections, named exactly; a Redis item
    is its pattern minus earlier items' patterns, restricted to the `only` selectors it was
    taken with (see _snapshot_scope).
    """
    cfg = settings.source(source)
    manifest = repo.resolve(ref, source=source)
    items = [i for i in manifest.items if not only or i.name in only]
    # the target knows each format's canonical form (e.g. Redis records without their TTL)
    target = open_target(cfg)
    canon = {i.name: (lambda r, _i=i: target.canonical(_i, r)) for i in items}
    target.close()
    try:
        return manifest.id, _measure(cfg, items, canon, [i.name for i in items], manifest.items)
    except NotFoundError:
        pass
    # some item is gone from the live store: measure one at a time so the missing ones show as 0
    checks = []
    for item in items:
        try:
            checks += _measure(cfg, [item], canon, [item.name], manifest.items)
        except NotFoundError:
            checks.append(ItemCheck(item.name, item.name, item.records, item.digest, 0, "",
                                    problems=["missing from the live store"]))
    return manifest.id, checks


def _snapshot_scope(item, all_items) -> dict | None:
    """For a Redis item (kind "keys"): the scope it was taken with (recorded_scope, as a restore
    reads it); None for other kinds."""
    if item.kind != "keys":
        return None
    pattern, earlier, only = recorded_scope(all_items, [i.name for i in all_items].index(item.name))
    return {"pattern": pattern, "earlier_patterns": earlier, "only": only}


def _measure(cfg, items, canon, only: list[str], all_items) -> list[ItemCheck]:
    checks = []
    with open_source(cfg).open(only=only) as cut:
        live = {spec.name: spec for spec in cut.items()}
        for item in items:
            spec = live.get(item.name)
            scope = _snapshot_scope(item, all_items)
            if scope is not None:
                # read the snapshot's scope, whatever the config (or the selectors verify opened
                # the cut with) says now: a partial snapshot holds only its `only` keys
                spec = ItemSpec(item.name, item.kind, item.format, {**(spec.schema if spec else {}), **scope})
            if spec is not None:  # the live records in the snapshot's record format (Qdrant has two)
                spec = dataclasses.replace(spec, format=item.format)
            count, digest = (digest_of(cut.records(spec), canon[item.name], algo=item.digest_algo)
                             if spec else (0, ""))
            checks.append(ItemCheck(item.name, item.name, item.records, item.digest, count, digest))
    return checks
