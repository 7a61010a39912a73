"""The one storage API: list, read, write, delete and fetch files, local and on S3 alike.

A ``Store`` is a folder (a local path or ``s3://bucket/prefix``) with the same methods on both backends:
``LocalStore`` here, ``S3Store`` (boto3: the fast client for shards and every file the platform moves) in
``storage/s3.py``. The functions below take a ``Location`` (or anything ``Location.parse`` takes) and go
through the store of its folder. pyarrow appears only where Ray Train needs a filesystem
(``Location.filesystem()``, ``storage/upload.py``), built from the same ``S3Settings``.

``download`` is the one function that turns object keys into local paths: every name is checked to stay
inside the destination first (object keys come from whoever wrote the bucket). S3 errors a user can fix
(missing bucket, refused key, endpoint down) are ``S3AccessError`` (a ValueError) naming the location and
the fix; a missing file is a ``FileNotFoundError`` on both backends.
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
from typing import IO, Any, BinaryIO, Protocol

from metaformer_platform.storage.location import Location, LocationLike
from metaformer_platform.storage.s3 import S3AccessError, S3Store, check_bucket
from metaformer_platform.storage.settings import S3Settings
from metaformer_platform.storage.types import FileStat

__all__ = [
    "FileStat",
    "LocalStore",
    "Store",
    "atomic_write",
    "check_access",
    "check_writable",
    "delete",
    "download",
    "exists",
    "fingerprint",
    "is_temporary",
    "list_files",
    "local_folder",
    "open_store",
    "read_bytes",
    "safe_member",
    "write_bytes",
]


class Store(Protocol):
    """A folder of files, local or on S3; every name is relative to ``root`` (POSIX, ``/``-separated)."""

    root: Location
    url: str  # the root, for messages

    def describe(self, name: str) -> str:
        """The full location of ``name``, for messages."""
        ...

    def open(self, name: str) -> BinaryIO:
        """A binary stream of file ``name``, to be read front to back (FileNotFoundError when absent)."""
        ...

    def read_bytes(self, name: str) -> bytes: ...

    def exists(self, name: str) -> bool:
        """Whether the file ``name`` is there."""
        ...

    def size(self, name: str) -> int: ...

    def listing(self, name: str = "") -> dict[str, FileStat] | None:
        """Every file under the folder ``name``: relative name -> stat; ``{}`` for a folder that does not
        exist; None when the store refuses to list (an S3 key without s3:ListBucket)."""
        ...

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write a whole file, all-or-nothing."""
        ...

    def upload_file(self, name: str, path: str | Path, *, sha256: str | None = None) -> None:
        """Place a finished local file at ``name``, all-or-nothing (``sha256`` is recorded where it can be)."""
        ...

    def delete(self, name: str, *, folder: bool = False) -> None:
        """Remove a file (or, with ``folder=True``, everything under the folder); absent is fine."""
        ...

    def sha256(self, name: str) -> str: ...


class LocalStore:
    """A folder on a local (or mounted) file system."""

    def __init__(self, root: LocationLike):
        self.root = Location.parse(root)
        self.url = self.root.uri  # for messages
        self.path = self.root.path

    def describe(self, name: str) -> str:
        """The full path of ``name``."""
        return str(self.path / name)

    def open(self, name: str) -> BinaryIO:
        """The file, with a large buffer: shards are read sequentially, and small reads dominate tar parsing."""
        return open(self.path / name, "rb", buffering=1 << 20)

    def read_bytes(self, name: str) -> bytes:
        """The whole file."""
        return (self.path / name).read_bytes()

    def exists(self, name: str) -> bool:
        """Whether the file ``name`` is there."""
        return (self.path / name).is_file()

    def size(self, name: str) -> int:
        """The file's size in bytes."""
        return (self.path / name).stat().st_size

    def listing(self, name: str = "") -> dict[str, FileStat]:
        """Every file under the folder ``name`` (``{}`` when it does not exist)."""
        folder = self.path / name
        stats = {}
        for path in folder.rglob("*") if folder.is_dir() else ():
            if path.is_file():
                st = path.stat()
                stats[path.relative_to(folder).as_posix()] = FileStat(st.st_size, st.st_mtime_ns)
        return stats

    def sha256(self, name: str) -> str:
        """A hash of the file's bytes."""
        with open(self.path / name, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()

    def upload_file(self, name: str, path: str | Path, *, sha256: str | None = None) -> None:
        """Renamed into place when on the same file system (the file is then gone from ``path``), else copied;
        either way atomically."""
        target = self.path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(path, target)
        except OSError:  # another file system (EXDEV)
            with atomic_write(target) as out, open(path, "rb") as src:
                shutil.copyfileobj(src, out, 8 << 20)

    def write_bytes(self, name: str, data: bytes) -> None:
        """Written through ``atomic_write``: a reader (or a re-run) never sees half a file."""
        with atomic_write(self.path / name) as out:
            out.write(data)

    def delete(self, name: str, *, folder: bool = False) -> None:
        """Remove a file (or a whole folder with ``folder=True``); absent is fine."""
        target = self.path / name
        if target.is_dir() and not target.is_symlink():
            if folder:
                shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)

    def __repr__(self) -> str:
        return f"LocalStore({self.url!r})"


def open_store(location: LocationLike) -> Store:
    """The store of the folder at ``location``: a plain path, ``file://`` URL or ``s3://bucket/prefix``."""
    loc = Location.parse(location)
    return S3Store(loc) if loc.remote else LocalStore(loc)


def is_temporary(name: str) -> bool:
    """A file still being written under a hidden temporary name, renamed when done: ours (``.NAME.tmp-PID``),
    DCP's (``.metadata.tmp``) and ``tempfile``-style ones (``.tmpXXXX``) another rank's library may write into
    a shared checkpoint folder. Never part of a listing (DCP's finished ``.metadata`` is)."""
    return name.startswith(".") and ".tmp" in name


def check_access(location: LocationLike, *, what: str | None = None) -> Location:
    """Refuse, before anything is written, an S3 location whose bucket is missing, whose credentials are refused
    or whose endpoint does not answer (one HEAD of the bucket, retried at most twice). Local: nothing to check."""
    loc = Location.parse(location)
    if loc.bucket is not None:
        client = S3Settings.from_env().boto3_client(max_attempts=2, connect_timeout=5, read_timeout=10)
        check_bucket(client, loc.bucket, what or loc.uri)
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


def _finished_files(location: LocationLike) -> dict[str, FileStat]:
    """Every finished file under a folder (files still being written excepted; none for a folder that does not
    exist), by relative POSIX name."""
    loc = Location.parse(location)
    stats = open_store(loc).listing()
    if stats is None:
        raise S3AccessError(f"cannot list {loc.uri}: AccessDenied; this key needs s3:ListBucket on the bucket")
    return {name: stat for name, stat in stats.items() if not is_temporary(PurePosixPath(name).name)}


def list_files(location: LocationLike) -> dict[str, int]:
    """Every finished file under a folder: relative POSIX name -> size (files still being written excepted;
    ``{}`` for a folder that does not exist)."""
    return {name: stat.size for name, stat in _finished_files(location).items()}


def fingerprint(location: LocationLike) -> str:
    """A digest of what is under a folder now: every finished file's name, size and modification time. Any
    rewrite changes it (an object store sets a new modification time on every PUT), even one of the same size."""
    rows = sorted((name, stat.size, stat.mtime_ns) for name, stat in _finished_files(location).items())
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def exists(location: LocationLike) -> bool:
    """Whether a file or folder is there (on S3, a folder is a prefix with objects under it)."""
    loc = Location.parse(location)
    if not loc.remote:
        return loc.path.exists()
    return open_store(loc.parent).exists(loc.name) or bool(open_store(loc).listing())


def read_bytes(location: LocationLike) -> bytes:
    """The whole file (FileNotFoundError when absent)."""
    loc = Location.parse(location)
    return open_store(loc.parent).read_bytes(loc.name)


def write_bytes(location: LocationLike, data: bytes) -> None:
    """Write a whole file: a reader never sees half of it (locally a rename; on S3 an object appears only once
    complete)."""
    loc = Location.parse(location)
    open_store(loc.parent).write_bytes(loc.name, data)


def delete(location: LocationLike, *, folder: bool = False) -> None:
    """Remove a file (or, with ``folder=True``, a folder and everything in it); absent is fine."""
    loc = Location.parse(location)
    open_store(loc.parent).delete(loc.name, folder=folder)


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
    store = open_store(loc)
    for name, size in files.items():
        out_path = paths[name]
        out_path.parent.mkdir(parents=True, exist_ok=True)
        with store.open(name) as src, open(out_path, "wb") as out:
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

