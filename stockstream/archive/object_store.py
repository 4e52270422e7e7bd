"""Where archive objects go: an S3/MinIO bucket, or a local directory with the same layout.

Both back-ends store whole objects under `/`-separated keys and guarantee what the archive
relies on:

- a `put` is atomic: a reader (or a restarted writer) sees the old object, the new one, or none,
  never a torn one. S3 gives that per PUT; the local store writes a hidden temp file in the
  target directory, fsyncs it, renames it over the key (`os.replace` is atomic within a file
  system) and fsyncs the directory, so a crash leaves at most a `.*.tmp` file behind, which
  `list` ignores and the next `put` of the same key does not care about;
- a `put` of an existing key replaces it (the archive re-writes identical objects after a
  crash; last writer wins, and both wrote the same bytes);
- `get` of a missing key returns None (not an error): a partition without a manifest yet.

The API is synchronous (minio is a blocking urllib3 client); the archive calls it through
`asyncio.to_thread` so the worker's event loop, and the aggregation on it, never waits on disk
or network. Errors are raised as they come; retries, back-off and the failure policy belong to
the caller (archive/writer.py), which knows what a failure means for its batch.

`from_settings`: S3_ENDPOINT empty -> `LocalDirectoryStore(ARCHIVE_LOCAL_DIR)`; otherwise
`S3Store`. S3_ENDPOINT is `host:port` (TLS from S3_SECURE) or a URL whose scheme decides TLS.
Credentials come from S3_ACCESS_KEY / S3_SECRET_KEY or their `_FILE` variants (docker secrets);
they stay `Secret`s until handed to the client. The bucket is created when missing.
"""

from __future__ import annotations

import contextlib
import io
import os
import uuid
from abc import ABC, abstractmethod
from pathlib import Path
from urllib.parse import urlsplit

from stockstream.errors import StockstreamError
from stockstream.settings import ArchiveSettings, Secret, SettingsError


class InvalidKey(StockstreamError, ValueError):
    """A key that could escape the store's root or is not a plain `/`-separated path."""


class ObjectStore(ABC):
    """Whole-object storage under `/`-separated keys."""

    @abstractmethod
    def ensure_ready(self) -> None:
        """Create the bucket / directory if missing (idempotent)."""

    @abstractmethod
    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        """Store `data` under `key` atomically, replacing any previous object."""

    @abstractmethod
    def get(self, key: str) -> bytes | None:
        """The object's bytes, or None when there is no such object."""

    @abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Keys starting with `prefix`, sorted."""

    @abstractmethod
    def describe(self) -> str:
        """Where the objects go, for logs (never a credential)."""


def check_key(key: str) -> str:
    parts = key.split("/")
    if (
        not key
        or key.startswith("/")
        or "\\" in key
        or "\x00" in key
        or any(part in ("", ".", "..") for part in parts)
    ):
        raise InvalidKey(f"invalid object key {key!r}")
    return key


class LocalDirectoryStore(ObjectStore):
    """Objects as files under `root` (the embedded default); same layout as the bucket."""

    def __init__(self, root: Path, fsync: bool = True) -> None:
        self.root = Path(root)
        self.fsync = fsync

    def describe(self) -> str:
        return f"file://{self.root.resolve()}"

    def ensure_ready(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key).split("/"))

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        # Hidden and not ending in the key's suffix: globs such as `**/*.parquet` skip it.
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                if self.fsync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        if self.fsync:
            self._fsync_dir(target.parent)

    @staticmethod
    def _fsync_dir(directory: Path) -> None:
        # Makes the rename itself durable (POSIX); not possible on every platform.
        try:
            fd = os.open(directory, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)

    def get(self, key: str) -> bytes | None:
        try:
            return self.path(key).read_bytes()
        except FileNotFoundError:
            return None

    def list(self, prefix: str) -> list[str]:
        # Walk only the deepest directory the prefix names completely.
        base = self.root
        head, _, _ = prefix.rpartition("/")
        if head:
            base = self.root.joinpath(*check_key(head).split("/"))
        if not base.is_dir():
            return []
        keys = []
        for path in base.rglob("*"):
            if not path.is_file() or path.name.startswith("."):
                continue
            key = path.relative_to(self.root).as_posix()
            if key.startswith(prefix):
                keys.append(key)
        return sorted(keys)


class S3Store(ObjectStore):
    """A bucket on S3 or any S3-compatible server (MinIO, SeaweedFS), through `minio`."""

    def __init__(
        self,
        endpoint: str,
        bucket: str,
        access_key: Secret,
        secret_key: Secret,
        *,
        secure: bool = True,
        region: str = "us-east-1",
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
    ) -> None:
        import urllib3
        from minio import Minio

        host, secure = split_endpoint(endpoint, secure)
        self.endpoint = host
        self.secure = secure
        self.bucket = bucket
        self.region = region
        # Short timeouts and no hidden urllib3 retries: a storage outage must surface quickly
        # as an error the archive counts, backs off from and applies its policy to (minio's
        # default client would wait up to 5 minutes per attempt and retry on its own).
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout),
            retries=urllib3.Retry(total=0, redirect=0),
            maxsize=8,
        )
        self.client = Minio(
            host,
            access_key=access_key.reveal() or None,
            secret_key=secret_key.reveal() or None,
            secure=secure,
            region=region,
            http_client=http,
        )

    def describe(self) -> str:
        return f"{'https' if self.secure else 'http'}://{self.endpoint}/{self.bucket}"

    def ensure_ready(self) -> None:
        from minio.error import S3Error

        if self.client.bucket_exists(self.bucket):
            return
        try:
            self.client.make_bucket(self.bucket, location=self.region)
        except S3Error as exc:
            # Another worker created it between the two calls.
            if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        self.client.put_object(
            self.bucket, check_key(key), io.BytesIO(data), len(data), content_type=content_type
        )

    def get(self, key: str) -> bytes | None:
        from minio.error import S3Error

        try:
            response = self.client.get_object(self.bucket, check_key(key))
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject"):
                return None
            raise
        try:
            return bytes(response.read())
        finally:
            response.close()
            response.release_conn()

    def list(self, prefix: str) -> list[str]:
        names = (
            o.object_name
            for o in self.client.list_objects(self.bucket, prefix=prefix, recursive=True)
        )
        return sorted(name for name in names if name is not None)


def split_endpoint(endpoint: str, secure: bool) -> tuple[str, bool]:
    """`host:port` and whether to use TLS; a `http://`/`https://` scheme overrides `secure`."""
    endpoint = endpoint.strip()
    if "://" in endpoint:
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise SettingsError(
                f"S3_ENDPOINT: expected host:port or http(s)://host:port, got {endpoint!r}"
            )
        if parts.path not in ("", "/"):
            raise SettingsError(f"S3_ENDPOINT: must not contain a path, got {endpoint!r}")
        return parts.netloc, parts.scheme == "https"
    return endpoint.rstrip("/"), secure


def from_settings(archive: ArchiveSettings) -> ObjectStore:
    """The configured store: S3/MinIO when S3_ENDPOINT is set, else the local directory."""
    if not archive.endpoint:
        return LocalDirectoryStore(archive.local_dir)
    return S3Store(
        archive.endpoint,
        archive.bucket,
        archive.access_key,
        archive.secret_key,
        secure=archive.secure,
        region=archive.region,
    )
