"""The S3 backend of the one storage API: boto3 clients, resumable streams, and the one set of S3 errors.

boto3 is the fast path for everything the platform itself reads and writes on S3 (shards, manifests,
checkpoint files, exports); pyarrow is only built for Ray Train (``Location.filesystem()``), from the same
``S3Settings``.

* The client is created on first use in each process: DataLoader workers fork, and a boto3 client (its
  connection pool) must not be shared across a fork. Pickling a store drops it, so Ray tasks and spawned
  workers build their own.
* Requests are retried by botocore (``S3Settings``: standard mode, 8 attempts). A stream that breaks mid-read is
  re-opened at the byte where it broke (a ranged GET pinned to the object's ETag, so a replaced object fails
  instead of splicing two versions), with backoff.
* Errors a user can fix (missing bucket, refused or absent credentials, unreachable endpoint) are raised as
  ``S3AccessError`` (a ValueError) that names the location and what to check; a missing object is a
  ``FileNotFoundError``.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, TypeVar

from metaformer_platform.storage.location import Location, LocationLike
from metaformer_platform.storage.settings import CREDENTIAL_VARS, S3Settings
from metaformer_platform.storage.types import Body, FileStat, HeadObjectOutput, Listed, S3Client

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

__all__ = ["S3AccessError", "S3Store", "no_bucket", "register_webdataset_s3", "s3_refusal"]

_log = logging.getLogger(__name__)
_T = TypeVar("_T")

_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}
_CREDENTIAL_CODES = {
    "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken", "TokenRefreshRequired",
    "AccessDenied", "AuthorizationHeaderMalformed", "403", "Forbidden",
}
READ_BUFFER = 8 << 20  # tar parsing reads 10 KiB at a time: read the socket in large requests instead
MULTIPART_CHUNK = 64 << 20
SHA256_METADATA = "sha256"  # x-amz-meta-sha256, set on every object the builder uploads


# -- errors -------------------------------------------------------------------------------------------


class S3AccessError(ValueError):
    """An S3 request was refused for a reason the user has to fix (bucket, credentials, endpoint)."""


def _error_code(err: BaseException) -> str:
    response = getattr(err, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def s3_refusal(err: BaseException, what: str, bucket: str | None) -> BaseException:
    """A user-facing ``S3AccessError`` for a botocore error ``err``, or ``err`` itself when the user cannot fix it."""
    from botocore import exceptions as be

    endpoint = S3Settings.from_env().endpoint_label
    if isinstance(err, be.NoCredentialsError | be.PartialCredentialsError):
        return S3AccessError(
            f"{what}: no usable S3 credentials were found ({err}); set {CREDENTIAL_VARS} for the endpoint "
            f"{endpoint} (AWS_ENDPOINT_URL)"
        )
    if isinstance(err, be.EndpointConnectionError | be.ConnectTimeoutError):
        return S3AccessError(
            f"{what}: cannot reach the S3 endpoint {endpoint} ({err}); check AWS_ENDPOINT_URL and that the "
            "server is running"
        )
    if isinstance(err, be.ClientError):
        code = _error_code(err)
        if code in _CREDENTIAL_CODES:
            return S3AccessError(
                f"{what}: the S3 server at {endpoint} refused the credentials ({code}: "
                f"{err.response.get('Error', {}).get('Message', '')}); check {CREDENTIAL_VARS} and "
                "AWS_ENDPOINT_URL, and that this key may use the bucket"
            )
        if code == "NoSuchBucket" and bucket is not None:  # (a bare 404 is a missing object, except on HeadBucket)
            return no_bucket(bucket, what)
    return err


def no_bucket(bucket: str, what: str) -> S3AccessError:
    """The error for a bucket that does not exist, with the fix."""
    return S3AccessError(
        f"{what}: bucket {bucket!r} does not exist at {S3Settings.from_env().endpoint_label}; create it (e.g. "
        f"`aws s3 mb s3://{bucket}`) or fix the bucket in the URL / AWS_ENDPOINT_URL"
    )


def check_bucket(client: S3Client, bucket: str, what: str) -> None:
    """The bucket exists and the credentials are accepted (one HEAD, which has no error body), else the reason."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        client.head_bucket(Bucket=bucket)
    except (ClientError, BotoCoreError) as err:
        if _error_code(err) in ("404", "NoSuchBucket", "NotFound"):
            raise no_bucket(bucket, what) from None
        mapped = s3_refusal(err, what, bucket)
        if mapped is err:
            raise ValueError(f"{what}: S3 refused the bucket check ({err})") from None
        raise mapped from None


def _client_for(settings: S3Settings) -> S3Client:
    """A boto3 S3 client with these settings and timeouts suited to streaming shards."""
    return settings.boto3_client(connect_timeout=10, read_timeout=60, max_pool_connections=32)


def _transient_stream_errors() -> tuple[type[BaseException], ...]:
    from botocore import exceptions as be
    from urllib3 import exceptions as ue

    return (
        be.ReadTimeoutError, be.ResponseStreamingError, be.IncompleteReadError, be.ConnectionClosedError,
        be.EndpointConnectionError, ue.ProtocolError, ue.ReadTimeoutError, ConnectionError, TimeoutError,
    )


# -- the connection: one client per process, the bucket checked once --------------------------------------


@dataclass
class _Connection:
    client: S3Client
    pid: int
    bucket_checked: bool = False


# keyed by the settings too: a process whose environment changes (new keys, another endpoint) gets a new client
_SHARED: dict[tuple[int, str, S3Settings], _Connection] = {}
_SHARED_LOCK = threading.Lock()


class S3Store:
    """The objects under ``s3://bucket/prefix``: streamed reads, whole-object reads, listing, uploads, deletes.

    ``client_factory`` replaces the default boto3 client (tests script one); without it, every store of a
    bucket in a process shares one client and one bucket check."""

    def __init__(self, root: LocationLike, *, client_factory: Callable[[], S3Client] | None = None,
                 max_resumes: int = 5, backoff: float = 0.5):
        loc = Location.parse(root)
        if loc.bucket is None:
            raise ValueError(f"{loc.uri} is a local path, not an s3:// location")
        self.root = loc
        self.url = loc.uri  # for messages
        self.bucket: str = loc.bucket
        self.client_factory = client_factory
        self.max_resumes = max_resumes
        self.backoff = backoff
        self._conn: _Connection | None = None

    def __getstate__(self) -> dict[str, object]:
        return {**self.__dict__, "_conn": None}  # a client (its connection pool) must not cross processes

    def _connection(self) -> _Connection:
        """This process's connection (a forked child builds its own)."""
        pid = os.getpid()
        with _SHARED_LOCK:  # the loader's prefetch thread and its reader ask at once
            if self._conn is None or self._conn.pid != pid:
                self._conn = self._new_connection(pid)
            return self._conn

    def _new_connection(self, pid: int) -> _Connection:
        if self.client_factory is not None:
            return _Connection(self.client_factory(), pid)
        settings = S3Settings.from_env()
        conn = _SHARED.get((pid, self.bucket, settings))
        if conn is None:
            conn = _SHARED[(pid, self.bucket, settings)] = _Connection(_client_for(settings), pid)
        return conn

    @property
    def client(self) -> S3Client:
        """This process's client."""
        return self._connection().client

    def key(self, name: str) -> str:
        """The object key of ``name`` (relative to the root)."""
        return self.root.join(name).key if name else self.root.key

    def describe(self, name: str) -> str:
        """The full location of ``name``, for messages."""
        return self.root.join(name).uri if name else self.root.uri

    def __repr__(self) -> str:
        return f"S3Store({self.url!r})"

    def _checked_client(self) -> S3Client:
        """This process's client, once the bucket is known to exist and accept the credentials."""
        conn = self._connection()
        if not conn.bucket_checked:
            check_bucket(conn.client, self.bucket, self.url)
            conn.bucket_checked = True
        return conn.client

    def _call(self, op: str, name: str, fn: Callable[[S3Client], _T]) -> _T:
        """``fn(client)`` after the bucket check; a refusal becomes ``S3AccessError``, a missing GET
        ``FileNotFoundError`` (a shard that is gone is a fault the loader skips and counts)."""
        from botocore.exceptions import BotoCoreError, ClientError

        client = self._checked_client()
        try:
            return fn(client)
        except (ClientError, BotoCoreError) as err:
            mapped = s3_refusal(err, self.describe(name), self.bucket)
            if mapped is not err:
                raise mapped from None
            if op == "get" and _error_code(err) in _MISSING_CODES:
                raise FileNotFoundError(f"{self.describe(name)} does not exist") from None
            raise

    def _head(self, name: str) -> HeadObjectOutput | None:
        from botocore.exceptions import ClientError

        try:
            return self._call("head", name, lambda c: c.head_object(Bucket=self.bucket, Key=self.key(name)))
        except ClientError as err:
            if _error_code(err) in _MISSING_CODES:
                return None
            raise

    def _keys(self, name: str) -> Iterator[Listed]:
        """Every object under the folder ``name`` (ListObjectsV2: one request per 1000 objects)."""
        from botocore.exceptions import BotoCoreError, ClientError

        folder = self.key(name)
        base = f"{folder}/" if folder else ""
        client = self._checked_client()
        try:
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base):
                for obj in page.get("Contents", ()):
                    # "folder/" objects are directory markers (pyarrow's S3 filesystem, which Ray Train writes
                    # checkpoints through, creates them): not files of the folder
                    if not obj["Key"].endswith("/"):
                        yield {**obj, "Key": obj["Key"][len(base):]}
        except (ClientError, BotoCoreError) as err:
            if _error_code(err) == "AccessDenied":  # s3:ListBucket not granted; reads may still be
                raise PermissionError(f"{self.describe(name)}: listing refused (AccessDenied)") from None
            mapped = s3_refusal(err, self.describe(name), self.bucket)
            if mapped is err:
                raise
            raise mapped from None

    def exists(self, name: str) -> bool:
        """Whether the object ``name`` is there."""
        return self._head(name) is not None

    def size(self, name: str) -> int:
        """The object's size in bytes (FileNotFoundError when absent)."""
        head = self._head(name)
        if head is None:
            raise FileNotFoundError(f"{self.describe(name)} does not exist")
        return int(head["ContentLength"])

    def listing(self, name: str = "") -> dict[str, FileStat] | None:
        """{relative name: stat} of every object under the folder ``name`` (ListObjectsV2: one request per 1000
        objects, where ``size()`` costs a HEAD each); None when the key may read objects but not list them
        (callers then HEAD each file)."""
        try:
            return {
                obj["Key"]: FileStat(int(obj["Size"]), int(obj["LastModified"].timestamp() * 1e9))
                for obj in self._keys(name)
            }
        except PermissionError:
            _log.info("%s: listing refused (AccessDenied); checking sizes one HEAD each", self.describe(name))
            return None

    def open(self, name: str) -> BinaryIO:
        """A buffered stream of the whole object, read in large requests, resumed where a connection broke."""
        return io.BufferedReader(_ResumableBody(self, name), buffer_size=READ_BUFFER)

    def read_bytes(self, name: str) -> bytes:
        """The whole object (FileNotFoundError when absent)."""
        with self.open(name) as stream:
            return stream.read()

    def sha256(self, name: str) -> str:
        """The sha256 recorded when this platform uploaded ``name``, else a hash of the streamed object."""
        head = self._head(name)
        recorded = None if head is None else head.get("Metadata", {}).get(SHA256_METADATA)
        if recorded:
            return recorded
        digest = hashlib.sha256()
        with self.open(name) as stream:
            while chunk := stream.read(1 << 20):
                digest.update(chunk)
        return digest.hexdigest()

    def upload_file(self, name: str, path: str | Path, *, sha256: str | None = None) -> None:
        """Upload a local file (multipart above 64 MiB); S3 makes it visible only once complete."""
        from boto3.s3.transfer import TransferConfig

        extra = {"Metadata": {SHA256_METADATA: sha256}} if sha256 else None
        transfer = TransferConfig(multipart_threshold=MULTIPART_CHUNK, multipart_chunksize=MULTIPART_CHUNK)
        with open(path, "rb") as f:
            self._call("put", name, lambda c: c.upload_fileobj(f, self.bucket, self.key(name), ExtraArgs=extra,
                                                                Config=transfer))

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write a whole object; S3 makes it visible only once complete."""
        self._call("put", name, lambda c: c.put_object(Bucket=self.bucket, Key=self.key(name), Body=data))

    def delete(self, name: str, *, folder: bool = False) -> None:
        """Remove an object (or, with ``folder=True``, every object under the folder ``name``); absent is fine."""
        keys = [self.key(name)]
        if folder:
            keys += [self.root.join(name, obj["Key"]).key for obj in self._keys(name)]
        for key in keys:
            self._delete_key(name, key)

    def _delete_key(self, name: str, key: str) -> None:
        self._call("delete", name, lambda c: c.delete_object(Bucket=self.bucket, Key=key))


class _ResumableBody(io.RawIOBase):
    """A GET body that, when the connection breaks mid-object, re-opens at the current byte and goes on."""

    def __init__(self, store: S3Store, name: str):
        super().__init__()
        self.store = store
        self.name = name
        self.where = store.describe(name)
        self.pos = 0
        self.resumes = 0
        response = store._call("get", name, lambda c: c.get_object(Bucket=store.bucket, Key=store.key(name)))
        self.length = int(response["ContentLength"])
        self.etag: str | None = response.get("ETag")
        self.body: Body | None = response["Body"]

    def readable(self) -> bool:
        return True

    def _wait(self, err: BaseException) -> None:
        """Count one broken read (or failed re-open), give up past ``max_resumes``, else back off."""
        self.resumes += 1
        if self.resumes > self.store.max_resumes:
            raise OSError(
                f"{self.where}: the read broke {self.resumes} times (last: {err!r}); giving up; check the S3 "
                "server and the network"
            ) from err
        delay = min(self.store.backoff * 2 ** (self.resumes - 1), 10.0) * (0.5 + random.random() / 2)
        _log.warning("%s: read broke at byte %d of %d (%r); resuming in %.1f s (%d/%d)", self.where, self.pos,
                     self.length, err, delay, self.resumes, self.store.max_resumes)
        time.sleep(delay)

    def _reopen(self) -> Body:
        from botocore.exceptions import ClientError

        with_etag = {"IfMatch": self.etag} if self.etag else {}
        try:
            response = self.store.client.get_object(
                Bucket=self.store.bucket, Key=self.store.key(self.name), Range=f"bytes={self.pos}-", **with_etag
            )
        except ClientError as err:
            if _error_code(err) == "PreconditionFailed":
                raise OSError(
                    f"{self.where} was replaced while it was being read (its ETag changed from {self.etag}); the "
                    "shard and its manifest may disagree: re-read the manifest"
                ) from None
            mapped = s3_refusal(err, self.where, self.store.bucket)
            if mapped is not err:
                raise mapped from None
            if _error_code(err) in _MISSING_CODES:  # deleted while it was being read
                raise FileNotFoundError(f"{self.where} does not exist") from None
            raise
        return response["Body"]

    def _read(self, n: int) -> bytes:
        """Up to ``n`` bytes (at least one) from the current byte; a broken connection is re-opened there."""
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

    def readinto(self, buffer: WriteableBuffer) -> int:
        if self.pos >= self.length:
            return 0
        view = memoryview(buffer).cast("B")
        data = self._read(len(view))
        view[: len(data)] = data
        return len(data)

    def readall(self) -> bytes:
        """The rest of the object in one request (more only after a broken connection).

        ``BufferedReader.read()`` (and so ``read_bytes`` and the loader's shard prefetcher) ends here; io's
        default ``readall`` loops over 8 KiB ``readinto`` calls, about half the speed of raw boto3
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


# -- webdataset ---------------------------------------------------------------------------------------


def _gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw: object) -> BinaryIO:
    """webdataset's ``gopen`` handler for s3:// URLs: our resumable boto3 stream (the shared client)."""
    if mode not in ("rb", "r"):
        raise ValueError(f"{url}: the s3 handler only reads (mode 'rb'), got mode {mode!r}")
    loc = Location.parse(url)
    return S3Store(Location(loc.bucket, "")).open(loc.key)


def register_webdataset_s3() -> None:
    """Let webdataset (and timm's ``wds/`` reader, which opens shards and ``_info.json`` through it) read s3://.

    webdataset 1.0.2 has no s3 handler of its own; this registers one in ``webdataset.gopen_schemes``.
    """
    import webdataset

    webdataset.gopen_schemes["s3"] = _gopen_s3
