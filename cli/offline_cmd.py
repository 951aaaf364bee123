"""`statevault offline pull | search | serve`: degraded mode while Qdrant is down."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import orjson
import typer
from rich.table import Table

from cli.context import console, emit_json, err_console, state, with_repository
from snapshots.errors import UsageError

app = typer.Typer(help="The offline vector index: exact search from the last snapshot while Qdrant is down.",
                  no_args_is_help=True)

DirOpt = Annotated[Path, typer.Option("--dir", help="Directory holding the pulled index.")]


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="offline")


def _qdrant_source(settings, name: str | None) -> str:
    kinds = [n for n, s in settings.sources.items() if s.kind == "qdrant"]
    if name:
        if settings.source(name).kind != "qdrant":
            raise UsageError(f"source {name!r} is not a qdrant source")
        return name
    if len(kinds) != 1:
        raise UsageError("name the qdrant source with --source (configured: " + (", ".join(kinds) or "none") + ")")
    return kinds[0]


@app.command()
def pull(ctx: typer.Context, dir: DirOpt,
         source: Annotated[Optional[str], typer.Option("--source", "-s")] = None,
         snapshot: Annotated[str, typer.Option("--snapshot", help="Snapshot id or `latest`.")] = "latest",
         collection: Annotated[Optional[list[str]], typer.Option("--collection", help="Only these collections.")] = None,
         json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Lay a snapshot's offline index out on DIR (verified; an unchanged snapshot is a no-op)."""
    from snapshots.offline.pull import pull_offline_index

    settings = state(ctx).settings
    name = _qdrant_source(settings, source)
    with with_repository(ctx) as repo:
        manifest = repo.resolve(snapshot, source=name)
        pulled = pull_offline_index(repo, manifest, dir, collections=collection or None)
    info = {"snapshot_id": manifest.id, "cut_time": manifest.cut_time.isoformat(), "dir": str(dir),
            "collections": [p if isinstance(p, (str, dict)) else str(p) for p in pulled]}
    if json:
        emit_json(info)
    else:
        console.print(f"offline index of snapshot {manifest.id} (cut {manifest.cut_time:%Y-%m-%d %H:%M:%SZ}) in {dir}")
        for p in info["collections"]:
            console.print(f"  {p}")


def _read_vector(vector: str | None, vector_file: Path | None):
    if (vector is None) == (vector_file is None):
        raise UsageError("give exactly one of --vector JSON or --vector-file FILE")
    text = vector if vector is not None else _read_file(vector_file)
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise UsageError(f"query vector is not JSON: {exc}") from None
    if not isinstance(value, list) or not all(isinstance(x, (int, float)) for x in value):
        raise UsageError("query vector must be a JSON array of numbers")
    return value


def _read_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None


@app.command()
def search(dir: DirOpt,
           collection: Annotated[str, typer.Option("--collection")],
           vector: Annotated[Optional[str], typer.Option("--vector", help="Query vector as a JSON array.")] = None,
           vector_file: Annotated[Optional[Path], typer.Option("--vector-file")] = None,
           using: Annotated[Optional[str], typer.Option("--using", help="Named vector.")] = None,
           filter: Annotated[Optional[str], typer.Option("--filter", help="Qdrant filter as JSON.")] = None,
           top_k: Annotated[int, typer.Option("--top-k")] = 10,
           json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Exact top-k over the offline index, with Qdrant's distances, scores and filters."""
    from snapshots.offline.search import OfflineIndex

    query = _read_vector(vector, vector_file)
    try:
        flt = orjson.loads(filter) if filter else None
    except orjson.JSONDecodeError as exc:
        raise UsageError(f"--filter is not JSON: {exc}") from None
    col = OfflineIndex.open(dir).collection(collection)
    hits = col.search(query, using=using, top_k=top_k, filter=flt)
    meta = col.meta
    if json:
        emit_json({"snapshot_id": meta.get("snapshot_id"), "snapshot_time": meta.get("snapshot_time"), "result": hits})
        return
    err_console.print(f"degraded search: snapshot {meta.get('snapshot_id')} taken at {meta.get('snapshot_time')}")
    table = Table("id", "score", "payload")
    for h in hits:
        table.add_row(str(h["id"]), f"{h['score']:.4f}", orjson.dumps(h.get("payload")).decode()[:100])
    console.print(table)


@app.command()
def serve(dir: DirOpt,
          host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
          port: Annotated[int, typer.Option("--port")] = 6333) -> None:
    """Answer Qdrant's read-only REST API from the offline index (point an agent's client here)."""
    from snapshots.offline.search import OfflineIndex
    from snapshots.offline.serve import run_server

    OfflineIndex.open(dir)  # fail early, exit 2, on a missing or damaged index
    err_console.print(f"serving the offline index in {dir} on http://{host}:{port} (read-only, degraded mode)")
    run_server(dir, host, port)
