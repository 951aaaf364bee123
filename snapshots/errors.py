"""Every error statevault raises, modelled once.

Each class carries a message, the process exit code the CLI turns it into (DESIGN.md),
a hint telling the operator what to do, and whether retrying can help (the daemon's
backoff reads `retryable`). Library code raises these; only `cli` exits.

    StatevaultError                     exit 1  the operation failed
    ├── UsageError                      exit 2  bad usage, config or input; nothing was changed
    │   ├── ConfigError                         the config file or an env override is invalid
    │   ├── NotFoundError                       unknown snapshot id, source, item or repository
    │   ├── TargetNotEmptyError                 restore onto live data without an explicit mode
    │   └── IncompatibleTargetError             the target cannot hold the snapshot (version gate)
    ├── VerificationError               exit 3  counts or digests differ, corruption found
    │   ├── CorruptChunkError                   a chunk's content does not match its name
    │   └── ManifestError                       a manifest is unreadable, tampered or too new
    ├── LockedError                     exit 4  blocked by a lease held by someone else
    ├── StoreError                      exit 1  the object store failed (transient ones retry)
    ├── SourceError                     exit 1  a source or target server failed (idem)
    └── Aborted                         exit 1  interrupted (SIGTERM, Ctrl-C) before committing

Foreign exceptions (botocore, psycopg, redis, qdrant-client, OSError) are translated at the
boundary where we call those libraries; `translate_store_error` does it for object stores.
"""
from __future__ import annotations

import threading


class StatevaultError(Exception):
    exit_code = 1
    default_hint = ""

    def __init__(self, message: str, *, hint: str | None = None, retryable: bool = False):
        super().__init__(message)
        self.message = message
        self.hint = hint if hint is not None else self.default_hint
        self.retryable = retryable

    def to_dict(self) -> dict:
        return {
            "error": type(self).__name__,
            "message": self.message,
            "hint": self.hint,
            "exit_code": self.exit_code,
            "retryable": self.retryable,
        }


class UsageError(StatevaultError):
    exit_code = 2


class ConfigError(UsageError):
    default_hint = "Fix the config file (see README, 'Configuration'); nothing was changed."


class NotFoundError(UsageError):
    default_hint = "Run `statevault snapshots list` to see what exists."


class TargetNotEmptyError(UsageError):
    default_hint = (
        "The target holds live data. Choose --mode replace (takes a pre-restore snapshot first), "
        "--mode swap (restore beside it and switch atomically; PostgreSQL and Qdrant), or restore --into a new name."
    )


class IncompatibleTargetError(UsageError):
    default_hint = "Restore into a new name with --into, or onto a compatible server with --to."


class VerificationError(StatevaultError):
    exit_code = 3

    def __init__(self, message: str, *, report: dict | None = None, **kw):
        super().__init__(message, **kw)
        self.report = report or {}

    def to_dict(self) -> dict:
        return {**super().to_dict(), "report": self.report}


class CorruptChunkError(VerificationError):
    default_hint = "Run `statevault snapshots check --read-data` to list every damaged snapshot."

    def __init__(self, message: str, *, chunk_id: str, **kw):
        super().__init__(message, **kw)
        self.chunk_id = chunk_id


class ManifestError(VerificationError):
    default_hint = "The manifest is damaged or from a newer statevault; do not restore from it."


class LockedError(StatevaultError):
    exit_code = 4
    default_hint = (
        "Another statevault holds the lease. Wait for it to finish; an abandoned lease "
        "expires by itself and is then taken over (see `statevault locks list`)."
    )


class StoreError(StatevaultError):
    default_hint = "Check the repository URL, credentials and network; transient errors are retried."


class SourceError(StatevaultError):
    default_hint = "Check that the server is up and the URL and credentials in the config are right."


class Aborted(StatevaultError):
    default_hint = "Nothing was committed; run the command again."


def raise_if_aborted(event: threading.Event | None, message: str, *, hint: str | None = None) -> None:
    """Raise Aborted(message) once `event` (a daemon's shutdown, an operator's interrupt) is set;
    long jobs call it between steps that are safe to stop after."""
    if event is not None and event.is_set():
        raise Aborted(message, hint=hint)


def translate_store_error(exc: BaseException, what: str) -> StatevaultError:
    """Map an exception from boto3/botocore or the OS to ours.

    Unknown exceptions are not swallowed: they become a non-retryable StoreError that names
    the original type, so a missing mapping shows up in tests rather than as a silent retry.
    """
    if isinstance(exc, StatevaultError):
        return exc
    name = type(exc).__name__
    code = ""
    status = 0
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = str(response.get("Error", {}).get("Code", ""))
        status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    if code in {"NoSuchBucket"}:
        return NotFoundError(f"{what}: bucket does not exist", hint="Create the bucket or fix repository.url.")
    if code in {"NoSuchKey", "404", "NotFound"} or isinstance(exc, FileNotFoundError):
        return NotFoundError(f"{what}: object not found")
    if code in {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"} or isinstance(exc, PermissionError):
        return StoreError(f"{what}: access denied ({code or name})",
                          hint="Check the credentials (AWS_* env or the AWS config chain) and bucket policy.")
    if code in {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError",
                "ServiceUnavailable", "RequestTimeTooSkewed"} or status >= 500:
        return StoreError(f"{what}: transient store error ({code or status})", retryable=True)
    if name in {"EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError",
                "ConnectTimeoutError", "ConnectionError", "ProxyConnectionError"} or isinstance(exc, ConnectionError):
        return StoreError(f"{what}: cannot reach the store ({name})", retryable=True)
    if isinstance(exc, OSError):
        return StoreError(f"{what}: {exc.strerror or exc}", retryable=False)
    return StoreError(f"{what}: unexpected {name}: {exc}", retryable=False)
