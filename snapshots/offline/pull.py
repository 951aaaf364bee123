"""`statevault offline pull`: lay a snapshot's offline vector index out on local disk.

    paths = pull_offline_index(repo, manifest, "/var/lib/statevault/offline")
    report = pull_offline_collections(repo, manifest, dir, ["kb"])   # with status per collection

Writes, per collection, the layout snapshots/offline/layout.py documents and search.py reads:
DIR/<collection>/meta.json, vectors[.<name>].npy (float32, one row per point), points.jsonl.
The manifest's `offline_index` items (written by backup/offline_build.py) are the source:
`<collection>#vectors:<name>` ("f32le-rows": one little-endian float32 row per record) and
`<collection>#points` ("jsonl": one {"id","payload"} line per point, same row order).

Guarantees:
- Streaming: each .npy is a numpy 1.0 header followed by the item's chunks as they are read;
  nothing holds a matrix in memory.
- Verified: every chunk is checked against its hash while reading (repo.read_chunk), so a
  damaged chunk raises CorruptChunkError; row and line counts must match the manifest
  (else ManifestError).
- Atomic per collection: everything is written into DIR/.<collection>.tmp-<random>, fsynced,
  then renamed into place (a previous copy is moved aside first and removed after). An
  interrupted or failed pull leaves the previous copy, or nothing, never a half index; its
  temp directory is removed (or, after a crash, by a later pull once an hour old).
- Idempotent: when DIR/<collection>/meta.json already has this snapshot id and every file
  still matches its sha256, nothing is written and the status is "unchanged".
- Safe names: a collection name with '/', '\\', NUL, '..' or a leading '.' (only a tampered
  manifest has one) is a ManifestError before anything is written.
"""
from __future__ import annotations

import hashlib
import io
import os
import secrets
import shutil
import time
from dataclasses import dataclass
from datetime import timezone
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from snapshots.durable import publish_dir
from snapshots.errors import CorruptChunkError, ManifestError, NotFoundError
from snapshots.manifest import Item, Manifest
from snapshots.offline.layout import (DISTANCES, FORMAT, META_FILE, POINTS_FILE, read_meta, vector_file_name,
                                      verify_files)
from snapshots.repository import Repository

VECTORS_KIND = "offline-vectors"
POINTS_KIND = "offline-points"
LEFTOVER_AGE = 3600  # seconds before another pull removes a crashed pull's temp directory


@dataclass
class PulledCollection:
    collection: str
    path: Path
    status: str          # "pulled" | "unchanged"
    points: int
    bytes: int           # bytes written (0 when unchanged)

    def to_dict(self) -> dict[str, Any]:
        return {"collection": self.collection, "path": str(self.path), "status": self.status,
                "points": self.points, "bytes": self.bytes}


def pull_offline_index(repo: Repository, manifest: Manifest, dest_dir: str | os.PathLike,
                       collections: list[str] | None = None) -> list[Path]:
    """Pull the offline index of `manifest` (all collections, or `collections`) under `dest_dir`;
    returns each collection's directory."""
    return [r.path for r in pull_offline_collections(repo, manifest, dest_dir, collections)]


def pull_offline_collections(repo: Repository, manifest: Manifest, dest_dir: str | os.PathLike,
                             collections: list[str] | None = None) -> list[PulledCollection]:
    """Like pull_offline_index, reporting per collection whether it was pulled or unchanged."""
    groups = offline_groups(manifest)
    if not groups:
        raise NotFoundError(f"snapshot {manifest.id} has no offline index",
                            hint="Set offline_index = true for the Qdrant source and take a new backup.")
    names = list(dict.fromkeys(collections)) if collections else sorted(groups)
    unknown = [n for n in names if n not in groups]
    if unknown:
        raise NotFoundError(f"snapshot {manifest.id} has no offline index for {', '.join(map(repr, unknown))} "
                            f"(it has: {', '.join(sorted(groups))})")
    root = Path(dest_dir)
    root.mkdir(parents=True, exist_ok=True)
    return [_pull_collection(repo, manifest, root, name, groups[name]) for name in names]


def check_collection_name(name: Any) -> str:
    if (not isinstance(name, str) or not name or name.startswith(".") or ".." in name
            or any(c in name for c in "/\\\0")):
        raise ManifestError(f"offline index: collection name {name!r} is not a safe directory name "
                            "(the manifest is damaged or tampered with)")
    return name


def offline_groups(manifest: Manifest) -> dict[str, dict[str, Any]]:
    """{collection: {"points": Item, "vectors": {vector name: Item}}}, checked for consistency."""
    groups: dict[str, dict[str, Any]] = {}
    for item in manifest.offline_index:
        name = check_collection_name(item.schema.get("collection"))
        group = groups.setdefault(name, {"points": None, "vectors": {}})
        if item.kind == POINTS_KIND:
            if item.name != f"{name}#points" or group["points"] is not None:
                raise ManifestError(f"offline index item {item.name!r} does not belong to collection {name!r}")
            group["points"] = item
        elif item.kind == VECTORS_KIND:
            vname = item.schema.get("vector")
            size, distance = item.schema.get("size"), item.schema.get("distance")
            if (not isinstance(vname, str) or item.name != f"{name}#vectors:{vname}" or vname in group["vectors"]
                    or not isinstance(size, int) or size < 1 or distance not in DISTANCES
                    or item.schema.get("row_bytes") != size * 4 or item.format != "f32le-rows"):
                raise ManifestError(f"offline index item {item.name!r} has an inconsistent schema")
            group["vectors"][vname] = item
        else:
            raise ManifestError(f"offline index item {item.name!r} has unknown kind {item.kind!r}")
    for name, group in groups.items():
        points = group["points"]
        if points is None or not group["vectors"]:
            raise ManifestError(f"offline index of {name!r} is incomplete (needs a points item and a vectors item)")
        for vname, item in group["vectors"].items():
            if item.records != points.records:
                raise ManifestError(f"offline index of {name!r}: vector {vname!r} has {item.records} rows "
                                    f"for {points.records} points")
    return groups


def _pull_collection(repo: Repository, manifest: Manifest, root: Path, name: str,
                     group: dict[str, Any]) -> PulledCollection:
    dest = root / name
    points: Item = group["points"]
    if _is_current(dest, manifest.id):
        return PulledCollection(name, dest, "unchanged", points.records, 0)
    _remove_leftovers(root, name)
    tmp = root / f".{name}.tmp-{secrets.token_hex(6)}"
    tmp.mkdir()
    try:
        files: dict[str, dict[str, Any]] = {}
        vectors: dict[str, dict[str, Any]] = {}
        for vname, item in sorted(group["vectors"].items()):
            fname = vector_file_name(vname)
            files[fname] = _write_npy(repo, item, tmp / fname)
            vectors[vname] = {"size": item.schema["size"], "distance": item.schema["distance"], "file": fname,
                              "normalized": bool(item.schema.get("normalized"))}
        files[POINTS_FILE] = _write_lines(repo, points, tmp / POINTS_FILE)
        config = points.schema.get("config") or {}
        meta = {
            "format": FORMAT, "collection": name, "snapshot_id": manifest.id,
            "snapshot_time": manifest.cut_time.astimezone(timezone.utc).isoformat().replace("+00:00", "Z"),
            "source": manifest.source, "points_count": points.records, "vectors": vectors,
            "sparse_vectors": list(points.schema.get("sparse_vectors") or sorted(config.get("sparse_vectors") or {})),
            "config": config, "files": files,
        }
        with open(tmp / META_FILE, "wb") as f:  # last: a directory without meta.json is no collection
            f.write(orjson.dumps(meta, option=orjson.OPT_INDENT_2))
            f.flush()
            os.fsync(f.fileno())
        publish_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return PulledCollection(name, dest, "pulled", points.records, sum(f["size"] for f in files.values()))


def _is_current(dest: Path, snapshot_id: str) -> bool:
    if not (dest / META_FILE).is_file():
        return False
    try:
        meta = read_meta(dest)
        if meta.get("snapshot_id") != snapshot_id:
            return False
        verify_files(dest, meta)
    except (ManifestError, CorruptChunkError):
        return False  # damaged local copy: pull it again
    return True


def _write_npy(repo: Repository, item: Item, path: Path) -> dict[str, Any]:
    size = item.schema["size"]
    row_bytes = size * 4
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype("<f4")), "fortran_order": False,
              "shape": (item.records, size)}
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    head = buf.getvalue()
    h = hashlib.sha256(head)
    written = 0
    with open(path, "wb") as f:
        f.write(head)
        for data in repo.iter_chunks(item):
            if len(data) % row_bytes:
                raise ManifestError(f"offline index item {item.name!r}: a chunk is not whole rows of {row_bytes} bytes")
            f.write(data)
            h.update(data)
            written += len(data)
        if written != item.records * row_bytes:
            raise ManifestError(f"offline index item {item.name!r}: {written // row_bytes} rows read, "
                                f"{item.records} recorded")
        f.flush()
        os.fsync(f.fileno())
    return {"sha256": h.hexdigest(), "size": len(head) + written}


def _write_lines(repo: Repository, item: Item, path: Path) -> dict[str, Any]:
    h = hashlib.sha256()
    written = lines = 0
    with open(path, "wb") as f:
        for data in repo.iter_chunks(item):
            f.write(data)
            h.update(data)
            written += len(data)
            lines += data.count(b"\n")
        if lines != item.records:
            raise ManifestError(f"offline index item {item.name!r}: {lines} lines read, {item.records} recorded")
        f.flush()
        os.fsync(f.fileno())
    return {"sha256": h.hexdigest(), "size": written}


def _remove_leftovers(root: Path, name: str) -> None:
    cutoff = time.time() - LEFTOVER_AGE
    prefixes = (f".{name}.tmp-", f".{name}.old-")
    for p in root.iterdir():
        try:
            if p.name.startswith(prefixes) and p.stat().st_mtime < cutoff:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


