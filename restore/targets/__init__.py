"""One module per target kind; `open_target` imports only the one in use."""
from __future__ import annotations

from snapshots.errors import ConfigError, UsageError
from snapshots.settings import check_server_url


def check_target(kind: str, url: str | None, path: str | None) -> None:
    """Refuse (exit 2, before anything is opened) a --to URL of another kind or a --to-path
    for a store that has none: either would otherwise fall back to the configured, live server."""
    if path is not None and kind != "qdrant":
        raise UsageError(f"--to-path is for Qdrant local mode; a {kind} source is restored onto another "
                         f"server with --to URL")
    if url is not None and path is not None:
        raise UsageError("give --to (a server) or --to-path (a Qdrant local store), not both")
    if url is not None:
        try:
            check_server_url(kind, url)
        except ValueError as exc:
            raise UsageError(f"--to {exc}") from None


def open_target(settings, *, url: str | None = None, path: str | None = None):
    """The Target for a [sources.NAME] config entry, or for another server (`--to`)."""
    check_target(settings.kind, url, path)
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
