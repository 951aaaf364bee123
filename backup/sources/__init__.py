"""One module per source kind; `open_source` imports only the one in use."""
from __future__ import annotations

from snapshots.errors import ConfigError


def open_source(settings, *, url: str | None = None, path: str | None = None):
    """The Source for a [sources.NAME] config entry; `url`/`path` point it at another server."""
    if settings.kind == "postgres":
        from backup.sources.postgres import PostgresSource

        return PostgresSource(settings if url is None else settings.model_copy(update={"url": url}))
    if settings.kind == "redis":
        from backup.sources.redis import RedisSource

        return RedisSource(settings if url is None else settings.model_copy(update={"url": url}))
    if settings.kind == "qdrant":
        from backup.sources.qdrant import QdrantSource

        update = {}
        if url is not None:
            update = {"url": url, "path": None}
        elif path is not None:
            update = {"path": path, "url": None}
        return QdrantSource(settings.model_copy(update=update) if update else settings)
    raise ConfigError(f"unknown source kind {settings.kind!r}")
