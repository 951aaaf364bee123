"""JSON logs for the daemon: one event per line, secrets redacted.

    {"ts": "2026-11-26T03:00:01.204Z", "level": "info", "event": "job_finished", "job": "backup-memory",
     "source": "memory", "run_id": "9f2c1a0b7e44", "tick": "2026-11-26T03:00:00+00:00",
     "result": "ok", "duration": 4.21, "snapshot_id": "20261126T030000Z-1a2b3c4d"}

Callers log an event name as the message and the fields as `extra`: `log.info("job_finished",
extra={"job": ..., "duration": ...})`. Every line passes through `redact_text` as a backstop:
passwords in URLs and secret-looking query values are masked whatever field they end up in.
Never log config objects: log the fields you need, URLs through `redact_url`.
"""
from __future__ import annotations

import logging
import re
import sys
from datetime import datetime, timezone
from typing import IO

import orjson

# attributes every LogRecord has; everything else was passed through `extra`
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}
_URL_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^\s/:@\"]*:)[^\s@\"]+@")
_SECRET_QUERY = re.compile(r"((?:password|passwd|api_key|apikey|token|secret)=)[^&\s\"]*", re.I)


def redact_text(text: str) -> str:
    """Mask `user:password@` in URLs and `password=...`-style values anywhere in `text`."""
    return _SECRET_QUERY.sub(r"\1***", _URL_PASSWORD.sub(r"\1***@", text))


class JsonFormatter(logging.Formatter):
    """ts, level, event, logger, then the record's extra fields; exceptions as `exception`."""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, timezone.utc)
        doc: dict = {"ts": ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z",
                     "level": record.levelname.lower(), "event": record.getMessage(), "logger": record.name}
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                doc[key] = round(value, 3) if isinstance(value, float) else value
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        line = orjson.dumps(doc, default=str, option=orjson.OPT_NON_STR_KEYS).decode()
        return redact_text(line)


def configure_json_logging(level: str | int = "INFO", stream: IO[str] | None = None) -> logging.Handler:
    """Send every log record of the process to `stream` (default stderr) as JSON lines."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # APScheduler logs submissions and max-instance skips; our job events say the same with run ids
    logging.getLogger("apscheduler").setLevel(logging.ERROR)
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return handler
