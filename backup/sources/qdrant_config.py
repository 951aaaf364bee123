"""A Qdrant collection's config as a plain JSON dict (the item schema), and back.

The dict is what a `collection` item carries in the manifest as its `schema`; it holds
everything needed to recreate the collection without the live server:

    {"format": 1,
     "vectors": {"<name>": {"size", "distance", "on_disk"?, "hnsw_config"?, "quantization_config"?,
                            "datatype"?, "multivector_config"?, ...}},   # "" = the single unnamed vector
     "sparse_vectors": {"<name>": {"modifier"?, "index"?}},
     "payload_indexes": {"<field>": {"type": "keyword" | "integer" | ..., "params"?: {...}}},
     "hnsw_config", "optimizers_config", "wal_config", "quantization_config",
     "shard_number", "sharding_method", "replication_factor", "write_consistency_factor",
     "on_disk_payload", "strict_mode_config", "metadata"       (each only when the server reports it),
     "points_count": n,                                        (informational, at backup time)
     "source_mode": "server" | "local"}

Values are qdrant-client models dumped with `model_dump(mode="json", exclude_none=True)`, so
enums are their JSON strings ("Cosine", "keyword") and unset options are absent. Rebuilding
(`create_collection_kwargs`) validates each part against the installed client's models and
keeps only fields that model knows, so a snapshot from a newer Qdrant restores onto an older
one with the options the older one has (the vector layout itself is checked by `signature`).

qdrant-client's local mode reports fixed hnsw/optimizer/wal defaults and no payload indexes
(`payload_schema` is always empty there; indexes have no effect in local mode).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SCHEMA_FORMAT = 1
DISTANCES = ("Cosine", "Dot", "Euclid", "Manhattan")


def _dump(model: Any) -> Any:
    if model is None:
        return None
    if hasattr(model, "model_dump"):
        return model.model_dump(mode="json", exclude_none=True)
    return model


def collection_schema(info: Any, *, local: bool) -> dict[str, Any]:
    """The schema dict of a `CollectionInfo` (from `client.get_collection(name)`)."""
    config = info.config
    params = config.params
    vectors = params.vectors
    if vectors is None:
        dense: dict[str, Any] = {}
    elif isinstance(vectors, dict):
        dense = {name: _dump(v) for name, v in sorted(vectors.items())}
    else:
        dense = {"": _dump(vectors)}
    schema: dict[str, Any] = {
        "format": SCHEMA_FORMAT,
        "vectors": dense,
        "sparse_vectors": {name: _dump(v) or {} for name, v in sorted((params.sparse_vectors or {}).items())},
        "payload_indexes": {
            field: _payload_index(index) for field, index in sorted((info.payload_schema or {}).items())
        },
    }
    for key, value in (
        ("hnsw_config", config.hnsw_config),
        ("optimizers_config", getattr(config, "optimizer_config", None)),
        ("wal_config", config.wal_config),
        ("quantization_config", config.quantization_config),
        ("strict_mode_config", getattr(config, "strict_mode_config", None)),
        ("metadata", getattr(config, "metadata", None)),
        ("shard_number", params.shard_number),
        ("sharding_method", params.sharding_method),
        ("replication_factor", params.replication_factor),
        ("write_consistency_factor", params.write_consistency_factor),
        ("on_disk_payload", params.on_disk_payload),
    ):
        dumped = _dump(value)
        if dumped is not None:
            schema[key] = dumped
    schema["points_count"] = info.points_count
    schema["source_mode"] = "local" if local else "server"
    return schema


def _payload_index(index: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"type": _dump(index.data_type)}
    params = _dump(getattr(index, "params", None))
    if params:
        out["params"] = params
    return out


# ---- the vector layout -------------------------------------------------------------------

@dataclass(frozen=True)
class VectorLayout:
    """Which vector names a point can carry, and how each is encoded in a record."""

    unnamed: bool                               # the collection has one unnamed dense vector ("")
    dense: dict[str, tuple[int, str]]           # name -> (size, distance); plain dense vectors
    multi: dict[str, tuple[int, str]]           # multivectors (lists of dense vectors)
    sparse: tuple[str, ...]

    @property
    def cosine_dense(self) -> list[str]:
        return [n for n, (_, d) in self.dense.items() if d == "Cosine"]


def vector_layout(schema: dict[str, Any]) -> VectorLayout:
    dense, multi = {}, {}
    for name, params in (schema.get("vectors") or {}).items():
        entry = (int(params["size"]), str(params["distance"]))
        (multi if params.get("multivector_config") else dense)[name] = entry
    return VectorLayout(unnamed="" in dense, dense=dense, multi=multi,
                        sparse=tuple(sorted(schema.get("sparse_vectors") or {})))


def signature(schema: dict[str, Any]) -> dict[str, Any]:
    """What must match for points of one collection to fit another: names, sizes, distances,
    datatypes, multivector comparators and sparse vector names."""
    dense = {}
    for name, p in sorted((schema.get("vectors") or {}).items()):
        mv = p.get("multivector_config") or {}
        dense[name] = (p.get("size"), p.get("distance"), p.get("datatype") or "float32", mv.get("comparator"))
    return {"vectors": dense, "sparse_vectors": sorted(schema.get("sparse_vectors") or {})}


def describe_difference(want: dict[str, Any], have: dict[str, Any]) -> str:
    """A short human description of how two signatures differ."""
    parts = []
    wv, hv = want["vectors"], have["vectors"]
    for name in sorted(set(wv) | set(hv)):
        label = repr(name) if name else "the unnamed vector"
        if name not in hv:
            parts.append(f"{label} is missing")
        elif name not in wv:
            parts.append(f"{label} is not in the snapshot")
        elif wv[name] != hv[name]:
            w, h = wv[name], hv[name]
            parts.append(f"{label}: snapshot size {w[0]} {w[1]} {w[2]}, target size {h[0]} {h[1]} {h[2]}")
    if want["sparse_vectors"] != have["sparse_vectors"]:
        parts.append(f"sparse vectors: snapshot {want['sparse_vectors']}, target {have['sparse_vectors']}")
    return "; ".join(parts)


# ---- back to create_collection -----------------------------------------------------------

def _model(cls: Any, data: dict[str, Any] | None) -> Any:
    """Validate `data` with a client model, dropping fields this client version does not know."""
    if data is None:
        return None
    known = getattr(cls, "model_fields", None)
    if known is not None:
        data = {k: v for k, v in data.items() if k in known}
    return cls.model_validate(data)


def create_collection_kwargs(schema: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments for `client.create_collection(name, **kwargs)` from a schema dict."""
    from pydantic import TypeAdapter
    from qdrant_client import models

    vectors = schema.get("vectors") or {}
    if "" in vectors:
        vectors_config: Any = _model(models.VectorParams, vectors[""])
    else:
        vectors_config = {name: _model(models.VectorParams, p) for name, p in vectors.items()}
    kwargs: dict[str, Any] = {"vectors_config": vectors_config}
    sparse = schema.get("sparse_vectors") or {}
    if sparse:
        kwargs["sparse_vectors_config"] = {n: _model(models.SparseVectorParams, p) for n, p in sparse.items()}
    for key, cls in (("hnsw_config", models.HnswConfigDiff), ("optimizers_config", models.OptimizersConfigDiff),
                     ("wal_config", models.WalConfigDiff), ("strict_mode_config", models.StrictModeConfig)):
        if schema.get(key):
            kwargs[key] = _model(cls, schema[key])
    if schema.get("quantization_config"):
        kwargs["quantization_config"] = TypeAdapter(models.QuantizationConfig).validate_python(
            schema["quantization_config"])
    for key in ("shard_number", "replication_factor", "write_consistency_factor", "on_disk_payload", "metadata"):
        if schema.get(key) is not None:
            kwargs[key] = schema[key]
    if schema.get("sharding_method"):
        kwargs["sharding_method"] = models.ShardingMethod(schema["sharding_method"])
    return kwargs


def payload_index_ops(schema: dict[str, Any]) -> list[tuple[str, Any]]:
    """(field name, field_schema) pairs for `client.create_payload_index`, in field order."""
    from pydantic import TypeAdapter
    from qdrant_client import models

    ops = []
    for field, spec in sorted((schema.get("payload_indexes") or {}).items()):
        params = spec.get("params")
        if params:
            field_schema = TypeAdapter(models.PayloadSchemaParams).validate_python(params)
        else:
            field_schema = models.PayloadSchemaType(spec["type"])
        ops.append((field, field_schema))
    return ops


def local_mode_config(schema: dict[str, Any]) -> dict[str, Any]:
    """The parts of a schema qdrant-client's local mode keeps (for comparing round trips there)."""
    return {"vectors": schema.get("vectors"), "sparse_vectors": schema.get("sparse_vectors")}
