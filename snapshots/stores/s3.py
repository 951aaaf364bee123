"""A repository in an S3 bucket (or any S3 API: MinIO, moto, R2 via endpoint_url): s3://bucket/prefix.

S3 PUTs are atomic per object; conditional create uses `IfNoneMatch="*"` (a 412 means the
key existed). Credentials come from the standard AWS chain (env, profile, instance role);
they are never logged. botocore's exceptions are translated here and nowhere else.
"""
from __future__ import annotations

import threading
from typing import Iterator
from urllib.parse import urlsplit

from snapshots.errors import NotFoundError, translate_store_error
from snapshots.stores.base import ObjectInfo, check_key


class S3Store:
    def __init__(self, bucket: str, prefix: str, *, endpoint_url: str | None = None, region: str | None = None):
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self._endpoint_url = endpoint_url
        self._region = region
        # One client shared by every thread: botocore clients are thread-safe (sessions are not,
        # so it is built once under a lock). A client per thread cost ~0.2-2 s per new thread
        # pool (list_snapshots, read-ahead, check each start one), on every call.
        self._client = None
        self._client_lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str, *, endpoint_url: str | None = None, region: str | None = None) -> "S3Store":
        parts = urlsplit(url)
        return cls(parts.netloc, parts.path, endpoint_url=endpoint_url, region=region)

    @property
    def client(self):
        client = self._client
        if client is None:
            with self._client_lock:
                if self._client is None:
                    import boto3
                    from botocore.config import Config

                    session = boto3.session.Session()
                    self._client = session.client(
                        "s3", endpoint_url=self._endpoint_url, region_name=self._region,
                        config=Config(retries={"max_attempts": 5, "mode": "adaptive"},
                                      max_pool_connections=32, connect_timeout=10, read_timeout=120),
                    )
                client = self._client
        return client

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _rel(self, full: str) -> str:
        return full[len(self.prefix) + 1:] if self.prefix else full

    def put(self, key: str, data: bytes) -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        except Exception as exc:
            raise translate_store_error(exc, f"write {key}") from exc

    def create(self, key: str, data: bytes) -> bool:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, IfNoneMatch="*")
            return True
        except Exception as exc:
            code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                return False
            raise translate_store_error(exc, f"create {key}") from exc

    def get(self, key: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except Exception as exc:
            err = translate_store_error(exc, f"read {key}")
            if isinstance(err, NotFoundError) and "bucket" not in err.message:
                err = NotFoundError(f"{key}: not in repository {self.url}")
            raise err from exc

    def exists(self, key: str) -> bool:
        try:
            self.stat(key)
            return True
        except NotFoundError as exc:
            if "bucket" in exc.message:
                raise
            return False

    def stat(self, key: str) -> ObjectInfo:
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as exc:
            raise translate_store_error(exc, f"stat {key}") from exc
        return ObjectInfo(key, int(head["ContentLength"]), head["LastModified"])

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        full = self._key(prefix.rstrip("/")) + "/" if prefix else (self.prefix + "/" if self.prefix else "")
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full)
            for page in pages:
                for obj in page.get("Contents", ()):
                    yield ObjectInfo(self._rel(obj["Key"]), int(obj["Size"]), obj["LastModified"])
        except Exception as exc:
            raise translate_store_error(exc, f"list {prefix or '/'}") from exc

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as exc:
            raise translate_store_error(exc, f"delete {key}") from exc

    def check_bucket(self) -> None:
        """Fail early with a clear message when the bucket is missing or unreachable."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as exc:
            err = translate_store_error(exc, f"bucket {self.bucket}")
            if isinstance(err, NotFoundError):
                err = NotFoundError(f"bucket {self.bucket!r} does not exist",
                                    hint="Create the bucket or fix repository.url / endpoint_url.")
            raise err from exc
