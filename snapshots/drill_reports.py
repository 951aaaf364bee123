"""DR drill reports in the repository: `drills/<timestamp>.json`.

The drill writes them (restore/drill.py); retention reads them to learn which snapshots a
drill has proven restorable, and never removes the newest of those per source.
"""
from __future__ import annotations

import json
from typing import Any

from snapshots.repository import Repository


def save_drill_report(repo: Repository, report: dict[str, Any]) -> str:
    key = f"drills/{report['id']}.json"
    repo.store.put(key, json.dumps(report, indent=1, default=str).encode())
    return key


def list_drill_reports(repo: Repository) -> list[dict[str, Any]]:
    """Every readable report, oldest first (unreadable ones are skipped: they prove nothing)."""
    out = []
    for obj in repo.store.list("drills"):
        if not obj.key.endswith(".json"):
            continue
        try:
            out.append(json.loads(repo.store.get(obj.key)))
        except (ValueError, Exception):  # noqa: BLE001 - a damaged report proves nothing; skip it
            continue
    return sorted(out, key=lambda r: str(r.get("started_at", "")))


def verified_snapshot_ids(repo: Repository) -> set[str]:
    """Snapshots that a drill restored and verified."""
    ids = set()
    for report in list_drill_reports(repo):
        for s in report.get("sources", []):
            if s.get("ok") and s.get("snapshot_id"):
                ids.add(s["snapshot_id"])
    return ids
