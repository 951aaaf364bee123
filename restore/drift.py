"""Drift detection: compare a live store with a snapshot without restoring anything."""
from __future__ import annotations

import dataclasses

from backup.sources import open_source
from restore.targets import open_target
from restore.verify import ItemCheck, digest_of
from snapshots.errors import NotFoundError
from snapshots.repository import Repository
from snapshots.settings import Settings


def verify_live(repo: Repository, settings: Settings, source: str, ref: str = "latest", *,
                only: list[str] | None = None) -> tuple[str, list[ItemCheck]]:
    """Count and digest each of the snapshot's items on the live store; returns (snapshot id, checks).

    A live item that is gone shows as 0 records. Read-only: the source is opened as for a backup.
    """
    cfg = settings.source(source)
    manifest = repo.resolve(ref, source=source)
    items = [i for i in manifest.items if not only or i.name in only]
    # the target knows each format's canonical form (e.g. Redis records without their TTL)
    target = open_target(cfg)
    canon = {i.name: (lambda r, _i=i: target.canonical(_i, r)) for i in items}
    target.close()
    try:
        return manifest.id, _measure(cfg, items, canon, [i.name for i in items])
    except NotFoundError:
        pass
    # some item is gone from the live store: measure one at a time so the missing ones show as 0
    checks = []
    for item in items:
        try:
            checks += _measure(cfg, [item], canon, [item.name])
        except NotFoundError:
            checks.append(ItemCheck(item.name, item.name, item.records, item.digest, 0, "",
                                    problems=["missing from the live store"]))
    return manifest.id, checks


def _measure(cfg, items, canon, only: list[str]) -> list[ItemCheck]:
    checks = []
    with open_source(cfg).open(only=only) as cut:
        live = {spec.name: spec for spec in cut.items()}
        for item in items:
            spec = live.get(item.name)
            if spec is not None:  # the live records in the snapshot's record format (Qdrant has two)
                spec = dataclasses.replace(spec, format=item.format)
            count, digest = (digest_of(cut.records(spec), canon[item.name], algo=item.digest_algo)
                             if spec else (0, ""))
            checks.append(ItemCheck(item.name, item.name, item.records, item.digest, count, digest))
    return checks
