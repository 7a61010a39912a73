"""s3:// storage through boto3: lazy per-process clients, retries, resumable streams, clear refusals.

`S3Storage` implements the `Storage` protocol for `s3://bucket/prefix` (registered with `register_scheme`
when `metaformer_platform.data` is imported; boto3 itself is imported only when a client is first needed).

* Endpoint, region, credentials and retries come from the storage core's one resolver
  (`metaformer_platform.storage.S3Settings`: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID / ..., AWS_PROFILE, roles),
  the same settings Ray Train's checkpoint filesystem is built from.
* The client is created on first use in each process: DataLoader workers fork, and a boto3 client (its
  connection pool) must not be shared across a fork. Pickling drops it, so Ray tasks and spawned workers
  build their own.
* Requests are retried by botocore (standard mode, 8 attempts, or AWS_RETRY_MODE / AWS_MAX_ATTEMPTS). A stream that breaks mid-read is re-opened at the byte where it broke (a ranged GET
  pinned to the object's ETag, so a replaced object fails instead of splicing two versions), with backoff.
* Errors a user can fix (missing bucket, refused credentials, no credentials, unreachable endpoint) are
  raised as `S3AccessError` (a ValueError) that names the URL and the environment variables to check.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

from metaformer_platform.data.storage import register_scheme
from metaformer_platform.storage.files import S3AccessError, no_bucket, s3_refusal
from metaformer_platform.storage.location import Location
from metaformer_platform.storage.settings import AWS_ENV_VARS, S3Settings, aws_env

__all__ = [
    "AWS_ENV_VARS",
    "S3AccessError",
    "S3Storage",
    "aws_env",
    "parse_s3_url",
    "register_webdataset_s3",
]

_log = logging.getLogger(__name__)

_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}
READ_BUFFER = 8 << 20  # tar parsing reads 10 KiB at a time: read the socket in large requests instead
MULTIPART_CHUNK = 64 << 20
SHA256_METADATA = "sha256"  # x-amz-meta-sha256, set on every object the builder uploads


def _error_code(err: BaseException) -> str:
    response = getattr(err, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def parse_s3_url(url: str) -> tuple[str, str]:
    """(bucket, prefix) of `s3://bucket/prefix/`; the prefix has no leading or trailing slash."""
    if not url.lower().startswith("s3://"):
        raise ValueError(f"{url!r} is not an s3:// URL")
    loc = Location.parse(url)
    return str(loc.bucket), loc.key


def default_client() -> Any:
    """A boto3 S3 client from the one S3 settings resolver, with timeouts suited to streaming shards."""
    return S3Settings.from_env().boto3_client(connect_timeout=10, read_timeout=60, max_pool_connections=32)


def _transient_stream_errors() -> tuple[type[BaseException], ...]:
    from botocore import exceptions as be
    from urllib3 import exceptions as ue

    return (
        be.ReadTimeoutError,
        be.ResponseStreamingError,
        be.IncompleteReadError,
        be.ConnectionClosedError,
        be.EndpointConnectionError,
        ue.ProtocolError,
        ue.ReadTimeoutError,
        ConnectionError,
        TimeoutError,
    )


class _ResumableBody(io.RawIOBase):
    """A GET body that, when the connection breaks mid-object, re-opens at the current byte and goes on."""

    def __init__(self, storage: S3Storage, name: str, max_resumes: int, backoff: float):
        super().__init__()
        self.storage = storage
        self.name = name
        self.max_resumes = max_resumes
        self.backoff = backoff
        self.pos = 0
        self.resumes = 0
        response = storage._call(
            "get", name, lambda c: c.get_object(Bucket=storage.bucket, Key=storage.key(name))
        )
        self.length = int(response["ContentLength"])
        self.etag = response.get("ETag")
        self.body = response["Body"]

    def readable(self) -> bool:
        return True

    def _wait(self, err: BaseException) -> None:
        """Count one broken read (or failed re-open), give up past `max_resumes`, else back off."""
        self.resumes += 1
        if self.resumes > self.max_resumes:
            raise OSError(
                f"{self.storage.describe(self.name)}: the read broke {self.resumes} times (last: {err!r}); "
                "giving up; check the S3 server and the network"
            ) from err
        delay = min(self.backoff * 2 ** (self.resumes - 1), 10.0) * (0.5 + random.random() / 2)
        _log.warning(
            "%s: read broke at byte %d of %d (%r); resuming in %.1f s (%d/%d)",
            self.storage.describe(self.name),
            self.pos,
            self.length,
            err,
            delay,
            self.resumes,
            self.max_resumes,
        )
        time.sleep(delay)

    def _reopen(self) -> Any:
        from botocore.exceptions import ClientError

        with_etag = {"IfMatch": self.etag} if self.etag else {}
        try:
            response = self.storage.client.get_object(
                Bucket=self.storage.bucket,
                Key=self.storage.key(self.name),
                Range=f"bytes={self.pos}-",
                **with_etag,
            )
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") == "PreconditionFailed":
                raise OSError(
                    f"{self.storage.describe(self.name)} was replaced while it was being read (its ETag changed "
                    f"from {self.etag}); the shard and its manifest may disagree: re-read the manifest"
                ) from None
            mapped = self.storage._refusal(err, self.storage.describe(self.name))
            if mapped is err:
                if _error_code(err) in _MISSING_CODES:  # deleted while it was being read
                    raise FileNotFoundError(f"{self.storage.describe(self.name)} does not exist") from None
                raise
            raise mapped from None
        return response["Body"]

    def _read(self, n: int) -> bytes:
        """Up to `n` bytes (at least one) from the current byte; a broken connection is re-opened there."""
        while True:
            try:
                if self.body is None:  # the connection broke: ask again from the byte reached
                    self.body = self._reopen()
                data = self.body.read(n)
                if not data:
                    raise ConnectionError(f"stream ended at byte {self.pos} of {self.length}")
            except _transient_stream_errors() as err:
                self._close_body()
                self._wait(err)
                continue
            self.pos += len(data)
            return data

    def readinto(self, buffer: Any) -> int:
        if self.pos >= self.length:
            return 0
        view = memoryview(buffer).cast("B")
        data = self._read(len(view))
        view[: len(data)] = data
        return len(data)

    def readall(self) -> bytes:
        """The rest of the object in one request (more only after a broken connection).

        `BufferedReader.read()` (and so `S3Storage.read_bytes` and the prefetcher's `read_shard`) ends here;
        io's default `readall` loops over 8 KiB `readinto` calls, about half the speed of raw boto3
        (bench_s3_reader.py)."""
        chunks: list[bytes] = []
        while self.pos < self.length:
            chunks.append(self._read(self.length - self.pos))
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _close_body(self) -> None:
        if self.body is not None:
            try:
                self.body.close()
            except Exception as err:  # a broken connection may fail to close; it is dropped either way
                _log.debug("closing a broken S3 stream: %r", err)
            self.body = None

    def close(self) -> None:
        if not self.closed:
            self._close_body()
        super().close()


class S3Storage:
    """The objects under `s3://bucket/prefix`: streamed reads, whole-object reads, uploads for the builder."""

    def __init__(
        self,
        url: str,
        *,
        client_factory: Callable[[], Any] | None = None,
        max_resumes: int = 5,
        backoff: float = 0.5,
    ):
        self.url = url.rstrip("/")
        self.bucket, self.prefix = parse_s3_url(url)
        self.client_factory = client_factory or default_client
        self.max_resumes = max_resumes
        self.backoff = backoff
        self._client: Any = None
        self._pid: int | None = None
        self._bucket_checked = False
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_client=None, _pid=None, _lock=None, _bucket_checked=False)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def client(self) -> Any:
        """This process's client (a forked child builds its own)."""
        if self._client is None or self._pid != os.getpid():
            with self._lock:
                if self._client is None or self._pid != os.getpid():
                    self._client = self.client_factory()
                    self._pid = os.getpid()
        return self._client

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def describe(self, name: str) -> str:
        return f"s3://{self.bucket}/{self.key(name)}"

    def __repr__(self) -> str:
        return f"S3Storage({self.url!r})"

    # -- errors ------------------------------------------------------------------------------------

    def _refusal(self, err: BaseException, what: str) -> BaseException:
        """A user-facing error for `err`, or `err` itself when it is not one the user can fix."""
        return s3_refusal(err, what, self.bucket)

    def _no_bucket(self, what: str) -> S3AccessError:
        return no_bucket(self.bucket, what)

    def _check_bucket(self) -> None:
        """Once per process: the bucket exists and the credentials are accepted (HEAD has no error body)."""
        if self._bucket_checked and self._pid == os.getpid():
            return
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as err:
            if str(err.response.get("Error", {}).get("Code")) in ("404", "NoSuchBucket", "NotFound"):
                raise self._no_bucket(self.url) from None
            raise self._refusal(err, self.url) from None
        except BotoCoreError as err:
            raise self._refusal(err, self.url) from None
        self._bucket_checked = True

    def _call(self, op: str, name: str, fn: Callable[[Any], Any]) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        self._check_bucket()
        try:
            return fn(self.client)
        except (ClientError, BotoCoreError) as err:
            mapped = self._refusal(err, self.describe(name))
            if mapped is err:
                if op == "get" and _error_code(err) in _MISSING_CODES:
                    # a shard that is gone is a fault the loader skips and counts (see data/faults.py)
                    raise FileNotFoundError(f"{self.describe(name)} does not exist") from None
                raise
            raise mapped from None

    # -- Storage -----------------------------------------------------------------------------------

    def _head(self, name: str) -> Mapping[str, Any] | None:
        from botocore.exceptions import ClientError

        try:
            return self._call("head", name, lambda c: c.head_object(Bucket=self.bucket, Key=self.key(name)))
        except ClientError as err:
            if str(err.response.get("Error", {}).get("Code")) in _MISSING_CODES:
                return None
            raise

    def exists(self, name: str) -> bool:
        return self._head(name) is not None

    def size(self, name: str) -> int:
        head = self._head(name)
        if head is None:
            raise FileNotFoundError(f"{self.describe(name)} does not exist")
        return int(head["ContentLength"])

    def list_sizes(self) -> dict[str, int] | None:
        """{name: bytes} of every object under the prefix, from ListObjectsV2 (one request per 1000
        objects, where `size()` costs a HEAD per object): how the manifest check compares sizes.
        None when the key may read objects but not list them (the check then HEADs each shard)."""
        from botocore.exceptions import BotoCoreError, ClientError

        self._check_bucket()
        base = f"{self.prefix}/" if self.prefix else ""
        sizes: dict[str, int] = {}
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=base
            ):
                for obj in page.get("Contents", ()):
                    sizes[obj["Key"][len(base) :]] = int(obj["Size"])
        except (ClientError, BotoCoreError) as err:
            if _error_code(err) == "AccessDenied":  # s3:ListBucket not granted; reads may still be
                _log.info("%s: listing refused (AccessDenied); checking shard sizes one HEAD each", self.url)
                return None
            mapped = self._refusal(err, self.url)
            if mapped is err:
                raise
            raise mapped from None
        return sizes

    def open(self, name: str) -> BinaryIO:
        """A buffered stream of the whole object, read in large requests, resumed where a connection broke."""
        return io.BufferedReader(
            _ResumableBody(self, name, self.max_resumes, self.backoff), buffer_size=READ_BUFFER
        )

    def read_bytes(self, name: str) -> bytes:
        with self.open(name) as stream:
            return stream.read()

    def stored_sha256(self, name: str) -> str | None:
        """The sha256 recorded when this platform uploaded `name`, or None (absent object or metadata)."""
        head = self._head(name)
        return None if head is None else head.get("Metadata", {}).get(SHA256_METADATA)

    def sha256(self, name: str) -> str:
        """The recorded sha256 when there is one, else a hash of the streamed object."""
        recorded = self.stored_sha256(name)
        if recorded:
            return recorded
        digest = hashlib.sha256()
        with self.open(name) as stream:
            while chunk := stream.read(1 << 20):
                digest.update(chunk)
        return digest.hexdigest()

    # -- writing (the shard builder) ---------------------------------------------------------------

    def upload_file(self, name: str, path: str | Path, *, sha256: str | None = None) -> None:
        """Upload a local file (multipart above 64 MiB); S3 makes it visible only once complete."""
        from boto3.s3.transfer import TransferConfig

        extra = {"Metadata": {SHA256_METADATA: sha256}} if sha256 else None
        transfer = TransferConfig(multipart_threshold=MULTIPART_CHUNK, multipart_chunksize=MULTIPART_CHUNK)
        with open(path, "rb") as f:
            self._call(
                "put",
                name,
                lambda c: c.upload_fileobj(f, self.bucket, self.key(name), ExtraArgs=extra, Config=transfer),
            )

    def write_bytes(self, name: str, data: bytes) -> None:
        self._call("put", name, lambda c: c.put_object(Bucket=self.bucket, Key=self.key(name), Body=data))

    def delete(self, name: str) -> None:
        self._call("delete", name, lambda c: c.delete_object(Bucket=self.bucket, Key=self.key(name)))


register_scheme("s3", S3Storage)


# -- webdataset -----------------------------------------------------------------------------------

_WDS_STORAGES: dict[tuple[int, str], S3Storage] = {}


def _gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> BinaryIO:
    """webdataset's `gopen` handler for s3:// URLs: our resumable boto3 stream."""
    if mode not in ("rb", "r"):
        raise ValueError(f"{url}: the s3 handler only reads (mode 'rb'), got mode {mode!r}")
    bucket, key = parse_s3_url(url)
    cache_key = (os.getpid(), bucket)
    storage = _WDS_STORAGES.get(cache_key)
    if storage is None:
        storage = _WDS_STORAGES[cache_key] = S3Storage(f"s3://{bucket}")
    return storage.open(key)


def register_webdataset_s3() -> None:
    """Let webdataset (and timm's `wds/` reader, which opens shards and `_info.json` through it) read s3://.

    webdataset 1.0.2 has no s3 handler of its own; this registers one in `webdataset.gopen_schemes`.
    """
    import webdataset

    webdataset.gopen_schemes["s3"] = _gopen_s3
