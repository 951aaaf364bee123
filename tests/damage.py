"""Damaging a repository's chunks behind statevault's back (file:// with the filesystem,
s3:// with boto3), for the tests of what a damaged snapshot does."""
from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from snapshots import codec


class Damage:
    """Corrupts one chunk object without going through statevault."""

    def __init__(self, url: str, s3_server=None):
        self.url, self.s3 = url, s3_server
        parts = urlsplit(url)
        if parts.scheme == "file":
            self.root = Path(parts.path)
        else:
            self.client, self.bucket, self.prefix = s3_server.client(), parts.netloc, parts.path.strip("/")

    def _read(self, key: str) -> bytes:
        if self.s3 is None:
            return (self.root / key).read_bytes()
        return self.client.get_object(Bucket=self.bucket, Key=f"{self.prefix}/{key}")["Body"].read()

    def _write(self, key: str, data: bytes) -> None:
        if self.s3 is None:
            (self.root / key).write_bytes(data)
        else:
            self.client.put_object(Bucket=self.bucket, Key=f"{self.prefix}/{key}", Body=data)

    def __call__(self, how: str, cid: str) -> None:
        key = codec.chunk_key(cid)
        if how == "delete":
            if self.s3 is None:
                (self.root / key).unlink()
            else:
                self.client.delete_object(Bucket=self.bucket, Key=f"{self.prefix}/{key}")
            return
        data = bytearray(self._read(key))
        if how == "flip":
            data[len(data) // 2] ^= 0x01
        elif how == "truncate":
            del data[len(data) // 2:]
        self._write(key, bytes(data))


def damage_late_chunk(repo_url: str, item, how: str = "flip", s3_server=None, last: bool = False) -> str:
    """Damage a chunk three quarters into `item` (a manifest Item of at least 4 chunks), or its
    last one, so a restore of it fails after it has written the records before that chunk;
    returns its id."""
    assert len(item.chunks) >= 4, len(item.chunks)
    cid = item.chunks[-1 if last else len(item.chunks) * 3 // 4].id
    Damage(repo_url, s3_server)(how, cid)
    return cid
