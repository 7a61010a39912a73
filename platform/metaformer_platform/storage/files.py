"""One interface for listing, reading, writing, deleting and fetching files, local and on S3 alike.

Everything goes through the pyarrow filesystem of a ``Location`` (``pyarrow.fs.LocalFileSystem`` or an
``S3FileSystem`` built from ``S3Settings``). ``download`` is the one function that turns object keys into local
paths: every name is checked to stay inside the destination first (object keys come from whoever wrote the
bucket). S3 errors a user can fix (missing bucket, refused key, endpoint down) become ``S3AccessError``
(a ValueError) naming the location and the fix.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import IO, Any

from metaformer_platform.storage.location import Location, LocationLike
from metaformer_platform.storage.settings import CREDENTIAL_VARS, S3Settings

__all__ = [
    "S3AccessError",
    "atomic_write",
    "check_access",
    "check_writable",
    "delete",
    "download",
    "exists",
    "list_files",
    "no_bucket",
    "read_bytes",
    "s3_refusal",
    "safe_member",
    "write_bytes",
]

_CREDENTIAL_CODES = {
    "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken", "TokenRefreshRequired",
    "AccessDenied", "AuthorizationHeaderMalformed", "403", "Forbidden",
}


class S3AccessError(ValueError):
    """An S3 request was refused for a reason the user has to fix (bucket, credentials, endpoint)."""


def is_temporary(name: str) -> bool:
    """A file still being written under a hidden temporary name, renamed when done: ours (``.NAME.tmp-PID``),
    DCP's (``.metadata.tmp``) and ``tempfile``-style ones (``.tmpXXXX``) another rank's library may write into
    a shared checkpoint folder. Never part of a listing (DCP's finished ``.metadata`` is)."""
    return name.startswith(".") and ".tmp" in name


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
        code = str(err.response.get("Error", {}).get("Code", ""))
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


def check_access(location: LocationLike, *, what: str | None = None) -> Location:
    """Refuse, before anything is written, an S3 location whose bucket is missing, whose credentials are refused
    or whose endpoint does not answer (one HEAD of the bucket, retried at most twice). Local: nothing to check."""
    loc = Location.parse(location)
    if loc.remote:
        from botocore.exceptions import BotoCoreError, ClientError

        settings = S3Settings.from_env()
        client = settings.boto3_client(max_attempts=2, connect_timeout=5, read_timeout=10)
        try:
            client.head_bucket(Bucket=loc.bucket)
        except (ClientError, BotoCoreError) as err:
            if isinstance(err, ClientError) and str(err.response.get("Error", {}).get("Code")) in ("404", "NotFound"):
                raise no_bucket(str(loc.bucket), what or loc.uri) from None
            mapped = s3_refusal(err, what or loc.uri, loc.bucket)
            if mapped is err:
                raise ValueError(f"{what or loc.uri}: S3 refused the bucket check ({err})") from None
            raise mapped from None
    return loc


def check_writable(location: LocationLike, what: str = "run.storage_path") -> Location:
    """Refuse, with the reason and the fix, a location that cannot be written (a probe file, removed again)."""
    loc = Location.parse(location)
    # unique per call: two pipeline members in one process probe the same storage at once
    probe = loc.join(f".write-probe-{os.getpid()}-{uuid.uuid4().hex[:12]}")
    try:
        check_access(loc)
        if not loc.remote:
            loc.path.mkdir(parents=True, exist_ok=True)
        write_bytes(probe, b"")
        delete(probe)
    except S3AccessError as err:  # names the bucket, endpoint or credentials, and the fix
        raise ValueError(f"{what}={str(location)!r} cannot be written: {err}") from None
    except (OSError, ValueError) as err:
        raise ValueError(
            f"{what}={str(location)!r} cannot be written ({err}); choose a folder you can write, or an s3:// URI "
            "whose bucket exists and whose key may write"
        ) from None
    return loc


def _wrap(location: Location, action: str) -> contextlib.AbstractContextManager[None]:
    @contextlib.contextmanager
    def wrapped() -> Iterator[None]:
        try:
            yield
        except FileNotFoundError:
            raise
        except OSError as err:  # pyarrow maps S3 errors to OSError with the server's message
            if not location.remote:
                raise
            raise S3AccessError(
                f"cannot {action} {location.uri}: {err}; check the URI, AWS_ENDPOINT_URL and the credentials"
            ) from None

    return wrapped()


def _finished_files(loc: Location) -> list[Any]:
    """pyarrow ``FileInfo`` of every finished file under a folder (files still being written excepted; none for
    a folder that does not exist), with ``path`` made relative (POSIX) to the folder."""
    from pyarrow import fs as pafs

    prefix = loc.fs_path.rstrip("/") + "/"
    with _wrap(loc, "list"):
        infos = loc.filesystem().get_file_info(pafs.FileSelector(loc.fs_path, recursive=True, allow_not_found=True))
    return [pafs.FileInfo(info.path.removeprefix(prefix), info.type, mtime_ns=info.mtime_ns, size=info.size)
            for info in infos if info.type == pafs.FileType.File and not is_temporary(info.base_name)]


def list_files(location: LocationLike) -> dict[str, int]:
    """Every finished file under a folder: relative POSIX name -> size (files still being written excepted;
    ``{}`` for a folder that does not exist)."""
    return {info.path: int(info.size) for info in _finished_files(Location.parse(location))}


def fingerprint(location: LocationLike) -> str:
    """A digest of what is under a folder now: every finished file's name, size and modification time. Any
    rewrite changes it (an object store sets a new modification time on every PUT), even one of the same size."""
    rows = sorted((info.path, int(info.size), int(info.mtime_ns or 0)) for info in _finished_files(Location.parse(location)))
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def exists(location: LocationLike) -> bool:
    """Whether a file or folder is there."""
    from pyarrow import fs as pafs

    loc = Location.parse(location)
    with _wrap(loc, "look up"):
        return loc.filesystem().get_file_info(loc.fs_path).type != pafs.FileType.NotFound


def read_bytes(location: LocationLike) -> bytes:
    """The whole file (FileNotFoundError when absent)."""
    loc = Location.parse(location)
    with _wrap(loc, "read"), loc.filesystem().open_input_stream(loc.fs_path) as stream:
        return stream.read()


def write_bytes(location: LocationLike, data: bytes) -> None:
    """Write a whole file: locally through ``atomic_write``; on S3 an object appears only once complete."""
    loc = Location.parse(location)
    if not loc.remote:
        with atomic_write(loc.path) as out:
            out.write(data)
        return
    with _wrap(loc, "write"), loc.filesystem().open_output_stream(loc.fs_path) as out:
        out.write(data)


def delete(location: LocationLike, *, folder: bool = False) -> None:
    """Remove a file (or, with ``folder=True``, a folder and everything in it); absent is fine."""
    from pyarrow import fs as pafs

    loc = Location.parse(location)
    fs = loc.filesystem()
    with _wrap(loc, "delete"):
        kind = fs.get_file_info(loc.fs_path).type
        if kind == pafs.FileType.Directory and folder:
            fs.delete_dir(loc.fs_path)
        elif kind == pafs.FileType.File:
            fs.delete_file(loc.fs_path)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path`` and rename it over ``path`` once the block ends without error:
    a reader (or a re-run) never sees half a file. The temporary name is one ``list_files`` leaves out."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, mode) as out:
            yield out
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def safe_member(dest: Path, name: str, *, source: str = "") -> Path:
    """``dest / name`` when ``name`` (an object key or archive member, from someone else) stays inside ``dest``;
    a ValueError for absolute names, ``..`` components, or anything that resolves outside."""
    pure = PurePosixPath(name)
    if not name or pure.is_absolute() or ".." in pure.parts or "\\" in name or "\x00" in name:
        raise ValueError(
            f"{source or 'a source'}: member {name!r} would be written outside {str(dest)!r} (absolute name or "
            "'..'); nothing was fetched: remove or rename that object"
        )
    root = dest.resolve()
    target = (root / pure).resolve()
    if not target.is_relative_to(root):
        raise ValueError(
            f"{source or 'a source'}: member {name!r} resolves outside {str(dest)!r} (through a link); nothing "
            "was fetched"
        )
    return root / pure


def download(
    location: LocationLike,
    dest: str | os.PathLike[str],
    names: Iterable[str] | None = None,
    *,
    listing: dict[str, int] | None = None,
    progress: Callable[[str, int], None] | None = None,
) -> dict[str, int]:
    """Copy the folder at ``location`` (every file, or only ``names`` where they exist) into local ``dest``;
    returns what was copied (name -> size). The one place where object keys become local paths: every name is
    checked (``safe_member``) before the first byte is written, and each file is checked against its listed size.
    """
    loc = Location.parse(location)
    target = Path(dest)
    files = listing if listing is not None else list_files(loc)
    if names is not None:
        wanted = set(names)
        files = {n: s for n, s in files.items() if n in wanted}
    paths = {name: safe_member(target, name, source=loc.uri) for name in files}  # all refused before any write
    fs = loc.filesystem()
    for name, size in files.items():
        out_path = paths[name]
        out_path.parent.mkdir(parents=True, exist_ok=True)
        with _wrap(loc, "read"), fs.open_input_stream(loc.join(name).fs_path) as src, open(out_path, "wb") as out:
            shutil.copyfileobj(src, out, 8 << 20)
        got = out_path.stat().st_size
        if got != size:
            raise ValueError(f"{loc.join(name).uri}: read {got} bytes, listed {size}: the object changed while it was read")
        if progress is not None:
            progress(name, size)
    return files


@contextlib.contextmanager
def local_folder(location: LocationLike, names: Iterable[str] | None = None) -> Iterator[Path]:
    """A local folder with the files at ``location``: the folder itself when local, else a temporary download
    (everything, or only ``names``), removed afterwards. For reading a few small files; weights go through
    ``storage.weights.resolve`` (cached)."""
    loc = Location.parse(location)
    if not loc.remote:
        yield loc.path
        return
    with tempfile.TemporaryDirectory(prefix="metaformer-fetch-") as tmp:
        download(loc, tmp, names)
        yield Path(tmp)
