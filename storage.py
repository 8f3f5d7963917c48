"""File storage for uploads and task outputs: a local directory (the default) or an S3 bucket.

Keys are opaque relative paths chosen by the caller (`uploads/<user>/<id>`,
`outputs/<task>/<name>`); the API serves a file only after checking its owner in the DB.
`Storage` is the one interface the API and the workers use; `storage_from_settings` picks
the backend from STORAGE_URL, in one place for every process.

A saved file becomes visible whole or not at all, under either backend: a reader never
sees half a file, and a save that fails leaves the key as it was.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from settings import Settings


class Storage(Protocol):
    """save/save_file return the stored size; open/size/local_file raise FileNotFoundError
    for a key that holds nothing, and delete of such a key does nothing; a key that could
    leave the root is a ValueError everywhere. `local_file(key, dest)` is a local file with
    the key's bytes for a reader that needs a path (a processor's input): the directory's own
    file, or a download to `dest`, which the caller removes."""

    def save(self, key: str, data: bytes | BinaryIO) -> int: ...
    def save_file(self, key: str, path: Path) -> int: ...
    def open(self, key: str) -> BinaryIO: ...
    def local_file(self, key: str, dest: Path) -> Path: ...
    def size(self, key: str) -> int: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...


def check_key(key: str) -> str:
    """A key is a relative path of plain segments: nothing that could climb out of the
    root (`..`), start at another one (`/`), or mean two objects on S3 (`a//b`, `./a`)."""
    parts = key.split("/") if isinstance(key, str) else [""]
    if not key or "\\" in key or "\x00" in key or any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"storage key escapes the root: {key!r}")
    return key


class LocalStorage:
    """A directory that every process reading or writing files must share (one machine,
    or a shared volume)."""

    def __init__(self, root: Path | str):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        """Where the key's file lives. This backend's own; callers of `Storage` use local_file."""
        target = (self.root / check_key(key)).resolve()
        if self.root not in target.parents:
            raise ValueError(f"storage key escapes the root: {key!r}")
        return target

    def _write(self, key: str, write) -> int:
        # Write to a temporary file beside the target and rename it over the target: a
        # reader never sees half a file, and a failed write leaves nothing behind.
        target = self.path(key)
        for attempt in range(3):
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".part-")
                break
            except FileNotFoundError:  # a delete removed the directory, now empty, in between
                if attempt == 2:
                    raise
        try:
            with os.fdopen(fd, "wb") as out:
                write(out)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return target.stat().st_size

    def save(self, key: str, data: bytes | BinaryIO) -> int:
        if isinstance(data, (bytes, bytearray, memoryview)):
            return self._write(key, lambda out: out.write(data))
        return self._write(key, lambda out: shutil.copyfileobj(data, out, 1 << 20))

    def save_file(self, key: str, path: Path) -> int:
        def copy(out):
            with open(path, "rb") as source:
                shutil.copyfileobj(source, out, 1 << 20)

        return self._write(key, copy)

    def open(self, key: str) -> BinaryIO:
        return open(self.path(key), "rb")

    def local_file(self, key: str, dest: Path) -> Path:
        """The stored file itself (no copy; read it, never change it). `dest` is unused."""
        path = self.path(key)
        if not path.is_file():
            raise FileNotFoundError(key)
        return path

    def size(self, key: str) -> int:
        return self.path(key).stat().st_size

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def delete(self, key: str) -> None:
        path = self.path(key)
        path.unlink(missing_ok=True)
        # Directories left empty go too (one per task's outputs, one per user's uploads), up
        # to the root; a directory still holding anything stays.
        for parent in path.parents:
            if parent == self.root:
                break
            try:
                parent.rmdir()
            except OSError:
                break


class S3Storage:
    """An S3 bucket, or any S3-compatible store (MinIO, R2, ...) at `endpoint_url`, under an
    optional key prefix. Credentials and region come from boto3's usual sources
    (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_DEFAULT_REGION, a profile, an
    instance role).

    S3 makes an object visible only once its PUT (or its multipart upload) completes, so a
    reader sees the old object or the whole new one, as with the local directory's rename.
    """

    # Larger files go up (and down) in parts, several at once; smaller ones in one request.
    MULTIPART_THRESHOLD = 16 * 1024 * 1024

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None, client=None):
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        if client is None:
            config = Config(
                retries={"mode": "standard", "max_attempts": 5},
                connect_timeout=10, read_timeout=60,
                # Endpoints of S3-compatible stores (MinIO, R2, a test server) are addressed by
                # path; AWS's own picks virtual-host style itself.
                s3={"addressing_style": "path"} if endpoint_url else None,
            )
            client = boto3.session.Session().client("s3", endpoint_url=endpoint_url or None, config=config)
        self.client = client
        self.transfer = TransferConfig(multipart_threshold=self.MULTIPART_THRESHOLD,
                                       multipart_chunksize=self.MULTIPART_THRESHOLD, max_concurrency=4)

    def __repr__(self) -> str:
        return f"S3Storage(s3://{self.bucket}/{self.prefix})"

    def object_key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _missing(self, error) -> bool:
        from botocore.exceptions import ClientError

        if not isinstance(error, ClientError):
            return False
        code = str(error.response.get("Error", {}).get("Code", ""))
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return code in ("404", "NoSuchKey", "NotFound") or status == 404

    def _head(self, key: str) -> dict:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=self.object_key(key))
        except Exception as exc:
            if self._missing(exc):
                raise FileNotFoundError(key) from None
            raise

    def save(self, key: str, data: bytes | BinaryIO) -> int:
        name = self.object_key(key)
        if isinstance(data, (bytes, bytearray, memoryview)):
            self.client.put_object(Bucket=self.bucket, Key=name, Body=bytes(data))
            return len(data)
        # A multipart upload that fails is aborted by the transfer manager: nothing appears.
        self.client.upload_fileobj(data, self.bucket, name, Config=self.transfer)
        return self.size(key)

    def save_file(self, key: str, path: Path) -> int:
        self.client.upload_file(str(path), self.bucket, self.object_key(key), Config=self.transfer)
        return Path(path).stat().st_size

    def open(self, key: str) -> BinaryIO:
        """A stream of the object's bytes (not seekable); close it when done."""
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self.object_key(key))["Body"]
        except Exception as exc:
            if self._missing(exc):
                raise FileNotFoundError(key) from None
            raise

    def local_file(self, key: str, dest: Path) -> Path:
        """The object downloaded to `dest` (the caller's scratch directory, which it removes)."""
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            # The transfer manager writes to a temporary name and renames it when complete.
            self.client.download_file(self.bucket, self.object_key(key), str(dest), Config=self.transfer)
        except Exception as exc:
            if self._missing(exc):
                raise FileNotFoundError(key) from None
            raise
        return dest

    def size(self, key: str) -> int:
        return int(self._head(key)["ContentLength"])

    def exists(self, key: str) -> bool:
        try:
            self._head(key)
        except FileNotFoundError:
            return False
        return True

    def delete(self, key: str) -> None:
        # Deleting a missing object succeeds on S3: running a cleanup twice is harmless.
        self.client.delete_object(Bucket=self.bucket, Key=self.object_key(key))


def parse_storage_url(url: str) -> tuple[str, str, str]:
    """STORAGE_URL as (scheme, location, prefix): ("file", directory, "") for a `file://`
    URL or a plain path, ("s3", bucket, prefix) for `s3://bucket/prefix`, ("", "", "")
    when unset (the local directory MEDIA_ROOT). ValueError for anything else."""
    url = (url or "").strip()
    if not url:
        return "", "", ""
    if "://" not in url:
        return "file", url, ""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"a file:// storage URL names a local directory, not a host: {url!r}")
        if not parts.path:
            raise ValueError(f"the file:// storage URL names no directory: {url!r}")
        return "file", parts.path, ""
    if scheme == "s3":
        if not parts.netloc or parts.query or parts.fragment:
            raise ValueError(f"an S3 storage URL is s3://bucket or s3://bucket/prefix, got {url!r}")
        prefix = parts.path.strip("/")
        if prefix:
            check_key(prefix)
        return "s3", parts.netloc, prefix
    raise ValueError(f"storage URLs are s3://bucket[/prefix], file:///directory or a path, got {url!r}")


def storage_from_settings(settings: Settings) -> Storage:
    """The storage every process of a deployment shares: STORAGE_URL's, else the local
    directory MEDIA_ROOT (`make run`'s default)."""
    scheme, location, prefix = parse_storage_url(settings.storage_url)
    if scheme == "s3":
        return S3Storage(location, prefix, endpoint_url=settings.s3_endpoint_url or None)
    return LocalStorage(location if scheme == "file" else settings.media_root)
