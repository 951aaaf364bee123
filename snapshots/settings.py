"""Settings: one TOML file plus STATEVAULT_* env overrides, validated once and frozen.

Where the file is: `--config`, else $STATEVAULT_CONFIG, else ./statevault.toml. Env overrides use
`__` between levels: STATEVAULT_REPOSITORY__URL, STATEVAULT_SOURCES__MEMORY__URL. A bad value is
a ConfigError (exit 2), never a warning. CLI flags are applied with `model_copy(update=...)`.
"""
from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, Union
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from snapshots.errors import ConfigError, UsageError

DEFAULT_CONFIG = "statevault.toml"
_DURATION = re.compile(r"^(?:(\d+)y)?(?:(\d+)m)?(?:(\d+)d)?(?:(\d+)h)?$")


def _check_cron(expr: str) -> str:
    from croniter import croniter

    # croniter also takes a seventh field (years); the schedules here are five fields, or six
    # with croniter's seconds last (backup/schedule.py)
    if len(expr.split()) not in (5, 6) or not croniter.is_valid(expr):
        raise ValueError(f"not a valid cron expression: {expr!r} (five fields, e.g. '0 * * * *')")
    return expr


_SCHEMES = {"postgres": ("postgresql", "postgres"), "redis": ("redis", "rediss", "unix"),
            "qdrant": ("http", "https")}


def check_server_url(kind: str, url: str) -> str:
    """`url` if it can name a server of `kind`, else ValueError saying why: a URL of another
    kind (a redis:// URL for a PostgreSQL source) or a Redis DB index that is not a number
    (redis-py would quietly use DB 0, which may be the live keyspace). A PostgreSQL key=value
    connection string (no "://") is left to libpq."""
    if kind == "postgres" and "://" not in url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise ValueError(f"{redact_url(url)} is not a URL ({exc})") from None
    schemes = _SCHEMES[kind]
    if parts.scheme not in schemes:
        raise ValueError(f"{redact_url(url)} is not a {kind} URL: use {' or '.join(s + '://' for s in schemes)}")
    if kind == "redis" and parts.scheme != "unix":
        db = parts.path.strip("/")
        if db and not db.isdigit():
            raise ValueError(f"{redact_url(url)}: the Redis DB index {db!r} is not a number (redis://host:port/1)")
    return url


_TAG = re.compile(r"[A-Za-z0-9_.:@/+=-]+")
RESERVED_TAGS = ("pre-restore", "restore-of-")  # set by restores; `latest` skips pre-restore snapshots


def check_tags(tags: list[str]) -> list[str]:
    """`tags` if each is a tag a user may set, else ValueError: no spaces or commas (a retention
    rule's keep_tags entry is a comma-separated list), and not one that restores set."""
    for tag in tags:
        if not _TAG.fullmatch(tag):
            raise ValueError(f"tag {tag!r}: use letters, digits and _ . : @ / + = - (no spaces or commas)")
        if tag == RESERVED_TAGS[0] or tag.startswith(RESERVED_TAGS[1]):
            raise ValueError(f"tag {tag!r} is set by restores (their pre-restore snapshots): choose another")
    return tags


def _check_duration(value: str | None) -> str | None:
    if value is None:
        return None
    if not value or not _DURATION.match(value):
        raise ValueError(f"not a duration: {value!r} (use y/m/d/h like 1y2m3d4h)")
    return value


class Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RetentionPolicy(Frozen):
    """restic `forget` rules. Counts: None = rule unused, -1 = unlimited."""

    keep_last: int | None = None
    keep_hourly: int | None = None
    keep_daily: int | None = None
    keep_weekly: int | None = None
    keep_monthly: int | None = None
    keep_yearly: int | None = None
    keep_within: str | None = None
    keep_within_hourly: str | None = None
    keep_within_daily: str | None = None
    keep_within_weekly: str | None = None
    keep_within_monthly: str | None = None
    keep_within_yearly: str | None = None
    # each entry is a comma-separated tag list; a snapshot carrying all tags of any entry is kept
    keep_tag: list[str] = Field(default_factory=list)

    @field_validator("keep_last", "keep_hourly", "keep_daily", "keep_weekly", "keep_monthly", "keep_yearly")
    @classmethod
    def _count(cls, v: int | None) -> int | None:
        if v is not None and v < -1:
            raise ValueError("must be -1 (unlimited), 0 or a positive count")
        return v

    @field_validator("keep_within", "keep_within_hourly", "keep_within_daily", "keep_within_weekly",
                     "keep_within_monthly", "keep_within_yearly")
    @classmethod
    def _duration(cls, v: str | None) -> str | None:
        return _check_duration(v)

    def is_empty(self) -> bool:
        return all(v in (None, []) for v in self.model_dump().values())


class RepositorySettings(Frozen):
    url: str = "file://./statevault-repo"
    endpoint_url: str | None = None
    region: str | None = None
    # zstd level 1-22 for every source; unset: the source's own, else its kind's default
    # (snapshots/codec.py DEFAULT_LEVELS: postgres 3, redis 2, qdrant 1)
    compression_level: int | None = Field(None, ge=1, le=22)
    upload_concurrency: int = Field(4, ge=1, le=64)
    # added to the nice value of the threads that hash, compress and upload chunks (Linux), so
    # the source reader, which holds the store's cut open, and a database server on the same
    # host win the CPU; the uploads catch up in the reader's waits. 0: same priority.
    upload_nice: int = Field(10, ge=0, le=19)
    # chunks no manifest references are deleted by prune only when older than this
    prune_grace: str = "24h"
    lease_ttl_seconds: int = Field(300, ge=5)

    @field_validator("url")
    @classmethod
    def _scheme(cls, v: str) -> str:
        scheme = urlsplit(v).scheme
        if scheme not in ("file", "s3"):
            raise ValueError(f"repository url must start with file:// or s3://, got {redact_url(v)!r}")
        if scheme == "s3" and not urlsplit(v).netloc:
            raise ValueError("s3 repository url needs a bucket: s3://bucket/prefix")
        return v

    @field_validator("prune_grace")
    @classmethod
    def _grace(cls, v: str) -> str:
        return _check_duration(v) or v


class DrillTarget(Frozen):
    """Where a drill restores a source. Default: a scratch database/db index/collection on the source server."""

    url: str | None = None
    path: str | None = None
    redis_db: int | None = None


class SourceBase(Frozen):
    schedule: str = "0 * * * *"
    retention: RetentionPolicy = Field(default_factory=RetentionPolicy)
    tags: list[str] = Field(default_factory=list)
    drill: DrillTarget = Field(default_factory=DrillTarget)
    compression_level: int | None = Field(None, ge=1, le=22)  # wins over the repository's

    @field_validator("schedule")
    @classmethod
    def _cron(cls, v: str) -> str:
        return _check_cron(v)

    @field_validator("tags")
    @classmethod
    def _tags(cls, v: list[str]) -> list[str]:
        return check_tags(v)


class PostgresSource(SourceBase):
    kind: Literal["postgres"]
    url: str
    # schema.table glob patterns; default every user table
    tables: list[str] = Field(default_factory=lambda: ["*"])
    exclude: list[str] = Field(default_factory=list)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        return check_server_url("postgres", v)


class RedisSource(SourceBase):
    kind: Literal["redis"]
    url: str = "redis://localhost:6379/0"
    patterns: list[str] = Field(default_factory=lambda: ["*"])
    schedule: str = "*/15 * * * *"

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        return check_server_url("redis", v)


class QdrantSource(SourceBase):
    kind: Literal["qdrant"]
    url: str | None = None
    path: str | None = None
    api_key: str | None = Field(None, repr=False)
    collections: list[str] = Field(default_factory=list)  # empty: all
    offline_index: bool = True
    schedule: str = "0 2 * * *"

    @model_validator(mode="after")
    def _where(self) -> "QdrantSource":
        if bool(self.url) == bool(self.path):
            raise ValueError("a qdrant source needs exactly one of url or path")
        if self.url:
            check_server_url("qdrant", self.url)
        return self


SourceSettings = Annotated[Union[PostgresSource, RedisSource, QdrantSource], Field(discriminator="kind")]


class DaemonSettings(Frozen):
    timezone: str = "UTC"
    prune_schedule: str = "30 3 * * *"
    check_schedule: str = "0 5 * * 0"
    check_subset: str = "5%"
    drill_schedule: str | None = "0 6 * * 0"
    misfire_grace_seconds: int = Field(3600, ge=1)
    shutdown_timeout_seconds: int = Field(300, ge=0)
    metrics_port: int = Field(9108, ge=0, le=65535)  # 0: any free port
    metrics_host: str = "127.0.0.1"
    retry_attempts: int = Field(5, ge=1)
    retry_max_wait_seconds: float = Field(60.0, gt=0)
    # how often a daemon re-reads the repository (snapshots, other daemons' last runs) for metrics
    metrics_refresh_seconds: int = Field(300, ge=1)

    @field_validator("prune_schedule", "check_schedule", "drill_schedule")
    @classmethod
    def _cron(cls, v: str | None) -> str | None:
        return None if v is None else _check_cron(v)

    @field_validator("check_subset")
    @classmethod
    def _subset(cls, v: str) -> str:
        if not re.fullmatch(r"\d+(\.\d+)?%", v) or not 0 < float(v[:-1]) <= 100:
            raise ValueError("check_subset is a percentage like '5%'")
        return v

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        from zoneinfo import ZoneInfo

        try:
            ZoneInfo(v)
        except Exception:
            raise ValueError(f"unknown timezone {v!r}") from None
        return v


class _TomlFile(PydanticBaseSettingsSource):
    def __init__(self, settings_cls: type[BaseSettings], data: dict[str, Any]):
        super().__init__(settings_cls)
        self._data = data

    def get_field_value(self, field, field_name):  # pragma: no cover - __call__ is used
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return self._data


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="STATEVAULT_", env_nested_delimiter="__", extra="forbid", frozen=True,
    )

    repository: RepositorySettings = Field(default_factory=RepositorySettings)
    sources: dict[str, SourceSettings] = Field(default_factory=dict)
    daemon: DaemonSettings = Field(default_factory=DaemonSettings)

    @field_validator("sources")
    @classmethod
    def _names(cls, v: dict) -> dict:
        for name in v:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", name):
                raise ValueError(f"source name {name!r}: use letters, digits, '_', '-', '.'")
        return v

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):
        # env overrides the file; the file arrives through init kwargs (see load_settings)
        return (env_settings, init_settings)

    def source(self, name: str):
        from snapshots.errors import NotFoundError

        try:
            return self.sources[name]
        except KeyError:
            known = ", ".join(sorted(self.sources)) or "none configured"
            raise NotFoundError(f"unknown source {name!r} (configured: {known})",
                                hint="Sources are the [sources.NAME] tables of the config file.") from None


def config_path(explicit: str | os.PathLike | None) -> Path:
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("STATEVAULT_CONFIG") or DEFAULT_CONFIG)


def load_settings(path: str | os.PathLike | None = None, *, required: bool = False) -> Settings:
    """Read and validate the config once. Raises ConfigError naming the file and the bad key."""
    p = config_path(path)
    data: dict[str, Any] = {}
    if p.exists():
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{p}: not valid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"{p}: cannot read: {exc.strerror}") from None
    elif required or path is not None:
        raise ConfigError(f"config file {p} does not exist",
                          hint="Pass --config FILE, set STATEVAULT_CONFIG, or create ./statevault.toml.")
    _check_env_names()
    try:
        return Settings(**data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(x) for x in err["loc"])
            lines.append(f"  {loc}: {err['msg']}")
        raise ConfigError(f"{p}: invalid configuration:\n" + "\n".join(lines)) from None


def _check_env_names() -> None:
    """A STATEVAULT_X__Y variable names a setting: one whose first part is no setting is a typo
    that would be ignored (pydantic-settings reads only known names; a typo deeper down is
    already refused as an unknown key)."""
    known = {name.upper() for name in Settings.model_fields}
    for var in sorted(os.environ):
        if var.startswith("STATEVAULT_") and "__" in var:
            head = var[len("STATEVAULT_"):].split("__", 1)[0]
            if head not in known:
                raise ConfigError(f"environment variable {var}: {head} is no setting (settings: "
                                  + ", ".join(f"STATEVAULT_{k}__..." for k in sorted(known)) + ")",
                                  hint="Fix or unset the variable; nothing was changed.")


_SECRET_QUERY = re.compile(r"((?:password|passwd|api_key|apikey|token|secret)=)[^&]*", re.I)


def redact_url(url: str | None) -> str | None:
    """Hide the password of a URL (and secret-looking query values) for logs, errors and output."""
    if not url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        if ":" in userinfo:
            userinfo = userinfo.split(":", 1)[0] + ":***"
        netloc = f"{userinfo}@{host}"
    query = _SECRET_QUERY.sub(r"\1***", parts.query)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def approx_timedelta(duration: str):
    """A y/m/d/h duration as a timedelta (y = 365 d, m = 30 d): for grace periods, not retention."""
    from datetime import timedelta

    m = _DURATION.match(duration)
    if not m or not duration:  # from the config (validated there already) or an option like --grace
        raise UsageError(f"not a duration: {duration!r} (use y/m/d/h like 2d12h)")
    y, mo, d, h = (int(x or 0) for x in m.groups())
    return timedelta(days=365 * y + 30 * mo + d, hours=h)
