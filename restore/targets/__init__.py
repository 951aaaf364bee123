"""One module per target kind; `open_target` imports only the one in use."""
from __future__ import annotations

from snapshots.errors import ConfigError


def open_target(settings, *, url: str | None = None, path: str | None = None):
    """The Target for a [sources.NAME] config entry, or for another server (`--to`)."""
    if settings.kind == "postgres":
        from restore.targets.postgres import PostgresTarget

        return PostgresTarget(url or settings.url)
    if settings.kind == "redis":
        from restore.targets.redis import RedisTarget

        return RedisTarget(url or settings.url)
    if settings.kind == "qdrant":
        from restore.targets.qdrant import QdrantTarget

        if url is None and path is None:
            url, path = settings.url, settings.path
        return QdrantTarget(url=url, path=path, api_key=settings.api_key)
    raise ConfigError(f"unknown source kind {settings.kind!r}")
