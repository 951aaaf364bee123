"""The on-disk layout of the offline vector index: reading its metadata, writing it, checking it.

One directory per collection under the index root (DIR):

    DIR/<collection>/meta.json          {"format": 1, "collection", "snapshot_id", "snapshot_time",
                                         "source", "points_count", "vectors": {name: {"size",
                                         "distance", "file"}}, "sparse_vectors": [names],
                                         "config": {...}, "files": {file: {"sha256", "size"}}}
    DIR/<collection>/vectors[.<name>].npy   float32 (points_count, size); row i is point i; rows of
                                         a Cosine vector are L2-normalised; a point without that
                                         named vector has a row of NaN
    DIR/<collection>/points.jsonl       one {"id", "payload"} line per point, in row order

The vector name "" is the single unnamed vector. Ids are unsigned integers or UUIDs written in
their canonical lowercase hyphenated form. `meta["aliases"]` (optional, a list of names) lets the
server answer for a collection under its Qdrant aliases too.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from snapshots.durable import publish_dir
from snapshots.errors import CorruptChunkError, ManifestError, UsageError

FORMAT = 1
META_FILE = "meta.json"
POINTS_FILE = "points.jsonl"
DISTANCES = ("Cosine", "Dot", "Euclid", "Manhattan")
F32_EPSILON = np.float32(1.1920929e-7)  # Qdrant leaves a cosine vector shorter than this as is
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")

PointId = int | str


def normalize_point_id(value: Any) -> PointId:
    """Qdrant's canonical form of a point id: an unsigned int, or a UUID as lowercase hyphenated text."""
    if isinstance(value, bool):
        raise UsageError(f"Format error: point id must be an unsigned integer or a UUID, got {value!r}")
    if isinstance(value, int):
        if 0 <= value < 2**64:
            return value
        raise UsageError(f"Format error: point id must be an unsigned integer or a UUID, got {value!r}")
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, str):
        try:
            return str(uuid.UUID(value))
        except ValueError:
            pass
    raise UsageError(f"Format error: point id must be an unsigned integer or a UUID, got {value!r}")


def vector_file_name(name: str) -> str:
    if name == "":
        return "vectors.npy"
    if _SAFE_NAME.match(name):
        return f"vectors.{name}.npy"
    # a vector name that is no safe file name still gets a stable one; meta.json maps it
    return f"vectors.{hashlib.sha256(name.encode()).hexdigest()[:16]}.npy"


def file_digest(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def read_meta(coll_dir: Path) -> dict:
    """Load and check a collection's meta.json; a damaged or too new one is a ManifestError."""
    path = Path(coll_dir) / META_FILE
    try:
        meta = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        raise ManifestError(f"offline index: {path} is missing") from None
    except orjson.JSONDecodeError as exc:
        raise ManifestError(f"offline index: {path} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise ManifestError(f"offline index: {path} is not a JSON object")
    if meta.get("format") != FORMAT:
        raise ManifestError(f"offline index: {path} has format {meta.get('format')!r}; this statevault reads {FORMAT}")
    for key in ("collection", "points_count", "vectors", "files"):
        if key not in meta:
            raise ManifestError(f"offline index: {path} lacks {key!r}")
    if not isinstance(meta["points_count"], int) or meta["points_count"] < 0:
        raise ManifestError(f"offline index: {path}: bad points_count {meta['points_count']!r}")
    if not isinstance(meta["vectors"], dict) or not isinstance(meta["files"], dict):
        raise ManifestError(f"offline index: {path}: 'vectors' and 'files' must be objects")
    for name, spec in meta["vectors"].items():
        if not isinstance(spec, dict) or spec.get("distance") not in DISTANCES:
            raise ManifestError(f"offline index: {path}: vector {name!r} has no known distance")
        if not isinstance(spec.get("size"), int) or spec["size"] < 1:
            raise ManifestError(f"offline index: {path}: vector {name!r} has a bad size")
        _check_file_name(path, spec.get("file"))
    for name in meta["files"]:
        _check_file_name(path, name)
    return meta


def _check_file_name(meta_path: Path, name: Any) -> None:
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name.startswith("."):
        raise ManifestError(f"offline index: {meta_path}: bad file name {name!r}")


def verify_files(coll_dir: Path, meta: dict) -> None:
    """Re-hash every file meta.json lists; a missing, truncated or altered one raises CorruptChunkError."""
    coll_dir = Path(coll_dir)
    listed = set(meta["files"])
    needed = {spec["file"] for spec in meta["vectors"].values()} | {POINTS_FILE}
    if needed - listed:
        raise ManifestError(f"offline index {meta['collection']}: meta.json lists no digest for {sorted(needed - listed)}")
    for name, info in sorted(meta["files"].items()):
        chunk_id = f"{meta['collection']}/{name}"
        path = coll_dir / name
        if not path.is_file():
            raise CorruptChunkError(f"offline index file {chunk_id} is missing", chunk_id=chunk_id)
        digest, size = file_digest(path)
        if size != info.get("size"):
            raise CorruptChunkError(
                f"offline index file {chunk_id} is corrupt: size {size}, expected {info.get('size')}",
                chunk_id=chunk_id)
        if digest != info.get("sha256"):
            raise CorruptChunkError(
                f"offline index file {chunk_id} is corrupt: sha256 {digest}, expected {info.get('sha256')}",
                chunk_id=chunk_id)


def _point_fields(point: Any) -> tuple[Any, Any, Any]:
    if isinstance(point, Mapping):
        vector = point["vector"] if "vector" in point else point.get("vectors")
        return point["id"], vector, point.get("payload")
    return point.id, getattr(point, "vector", None), getattr(point, "payload", None)


def _vector_for(vector: Any, name: str, names: list[str]) -> Any:
    if vector is None or isinstance(vector, Mapping):
        return None if vector is None else vector.get(name)
    if names == [""]:
        return vector
    raise UsageError(f"offline index: a point has one unnamed vector, but the collection has named vectors {names}")


def write_offline_collection(dir: str | Path, meta: Mapping[str, Any], points_iter: Iterable[Any]) -> dict:
    """Write one collection of the offline index under the index root `dir`; return its full meta.

    `meta` needs "collection", "snapshot_id", "snapshot_time", and "vectors" as {name: {"size",
    "distance"}}; "source", "sparse_vectors", "config" and "aliases" are carried over. The writer
    fills in "format", "points_count", each vector's "file" and the "files" digests. Points are
    dicts (or objects) with "id", "vector" (a list for the unnamed vector, else {name: list};
    sparse vectors are skipped) and "payload", streamed to disk, never held in memory. Cosine rows
    are normalised as Qdrant does. The collection appears atomically: everything is written into a
    temporary directory, fsynced, and renamed over any previous copy.
    """
    root = Path(dir)
    name = meta.get("collection")
    if not isinstance(name, str) or not _SAFE_NAME.match(name):
        raise UsageError(f"offline index: collection name {name!r} cannot be a directory name")
    specs = dict(meta.get("vectors") or {})
    if not specs:
        raise UsageError(f"offline index {name}: meta has no dense vectors")
    vectors: dict[str, dict] = {}
    for vname, spec in specs.items():
        if spec.get("distance") not in DISTANCES or not isinstance(spec.get("size"), int) or spec["size"] < 1:
            raise UsageError(f"offline index {name}: vector {vname!r} needs a size and one of {DISTANCES}")
        vectors[vname] = {"size": spec["size"], "distance": spec["distance"], "file": vector_file_name(vname)}

    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        count = _write_rows(tmp, name, vectors, points_iter)
        files = {}
        for fname in [POINTS_FILE, *(spec["file"] for spec in vectors.values())]:
            digest, size = file_digest(tmp / fname)
            files[fname] = {"sha256": digest, "size": size}
        full = {
            **{k: v for k, v in meta.items() if k not in ("vectors", "files", "points_count", "format")},
            "format": FORMAT, "collection": name, "points_count": count, "vectors": vectors,
            "sparse_vectors": list(meta.get("sparse_vectors") or []), "files": files,
        }
        with open(tmp / META_FILE, "wb") as f:  # written last: a directory without it is no collection
            f.write(orjson.dumps(full, option=orjson.OPT_INDENT_2))
            f.flush()
            os.fsync(f.fileno())
        publish_dir(tmp, root / name)
        return full
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_rows(tmp: Path, name: str, vectors: dict[str, dict], points_iter: Iterable[Any]) -> int:
    names = list(vectors)
    outs = {}
    header_len = {}
    try:
        for vname, spec in vectors.items():
            f = open(tmp / spec["file"], "wb", buffering=1 << 20)
            outs[vname] = f
            # numpy leaves room in the header for the row count to grow, so it can be rewritten in place
            np.lib.format.write_array_header_1_0(f, _npy_header(0, spec["size"]))
            header_len[vname] = f.tell()
        seen: set[PointId] = set()
        count = 0
        with open(tmp / POINTS_FILE, "wb", buffering=1 << 20) as points_out:
            for point in points_iter:
                raw_id, vector, payload = _point_fields(point)
                pid = normalize_point_id(raw_id)
                if pid in seen:
                    raise UsageError(f"offline index {name}: duplicate point id {pid!r}")
                seen.add(pid)
                for vname, spec in vectors.items():
                    outs[vname].write(_row(name, pid, vname, spec, _vector_for(vector, vname, names)).tobytes())
                if payload is not None and not isinstance(payload, Mapping):
                    raise UsageError(f"offline index {name}: payload of point {pid!r} is not an object")
                points_out.write(orjson.dumps({"id": pid, "payload": dict(payload or {})}) + b"\n")
                count += 1
            points_out.flush()
            os.fsync(points_out.fileno())
        for vname, f in outs.items():
            f.flush()
            f.seek(0)
            np.lib.format.write_array_header_1_0(f, _npy_header(count, vectors[vname]["size"]))
            if f.tell() != header_len[vname]:
                raise ManifestError(f"offline index {name}: .npy header changed length")  # numpy changed its format
            f.flush()
            os.fsync(f.fileno())
        return count
    finally:
        for f in outs.values():
            f.close()


def _npy_header(rows: int, size: int) -> dict:
    return {"descr": np.lib.format.dtype_to_descr(np.dtype("<f4")), "fortran_order": False, "shape": (rows, size)}


def _row(name: str, pid: PointId, vname: str, spec: dict, vector: Any) -> np.ndarray:
    size = spec["size"]
    if vector is None or (isinstance(vector, Mapping) and "indices" in vector):
        return np.full(size, np.nan, dtype="<f4")
    arr = np.asarray(vector, dtype="<f4")
    if arr.shape != (size,):
        raise UsageError(f"offline index {name}: point {pid!r} vector {vname!r} has shape {arr.shape}, expected ({size},)")
    if not np.isfinite(arr).all():
        raise UsageError(f"offline index {name}: point {pid!r} vector {vname!r} has NaN or infinite values")
    if spec["distance"] == "Cosine":
        norm = np.sqrt(np.dot(arr.astype(np.float64), arr.astype(np.float64)))
        if norm >= F32_EPSILON:
            arr = (arr / norm).astype("<f4")
    return arr
