"""Where shards live: one small interface over local folders and object storage.

Every byte the data path reads goes through a `Storage`; s3:// (`data/s3.py`) is one more scheme
registered with `register_scheme`, so the manifest, shard set and loader do not know where bytes live.
The shard builder also writes through a storage (`upload_file`, `write_bytes`, `delete`, `sha256`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, Protocol, runtime_checkable

from metaformer_platform.storage.location import Location

__all__ = [
    "ListingStorage", "LocalStorage", "Storage", "WritableStorage", "open_storage", "register_scheme", "split_url",
]


class Storage(Protocol):
    """Read access to the objects under one dataset root (a folder or a bucket prefix)."""

    url: str  # the root, as given by the user (for messages)

    def open(self, name: str) -> BinaryIO:
        """Open object `name` (relative to the root) as a binary stream, to be read front to back."""
        ...

    def read_bytes(self, name: str) -> bytes: ...

    def exists(self, name: str) -> bool: ...

    def size(self, name: str) -> int: ...

    def describe(self, name: str) -> str:
        """The full location of `name`, for error messages."""
        ...


@runtime_checkable
class ListingStorage(Storage, Protocol):
    """A storage that lists all its objects' sizes in one go (S3: one request per 1000 objects, where `size`
    costs a request each). Local folders are not: a stat per file is as cheap."""

    def list_sizes(self) -> dict[str, int] | None:
        """{name: bytes} of every object under the root; None when listing is not allowed."""
        ...


class WritableStorage(Storage, Protocol):
    """A storage the shard builder can write to: every write is all-or-nothing."""

    def upload_file(self, name: str, path: str | Path, *, sha256: str | None = None) -> None: ...

    def write_bytes(self, name: str, data: bytes) -> None: ...

    def delete(self, name: str) -> None: ...

    def sha256(self, name: str) -> str: ...


class LocalStorage:
    """A dataset root on a local (or mounted) file system: a plain path or a file:// URL."""

    def __init__(self, root: str | Path, url: str | None = None):
        self.root = Path(root)
        self.url = url if url is not None else str(root)

    def _path(self, name: str) -> Path:
        return self.root / name

    def open(self, name: str) -> BinaryIO:
        # Large buffer: shards are read sequentially, and small reads dominate tar parsing otherwise.
        return open(self._path(name), "rb", buffering=1 << 20)

    def read_bytes(self, name: str) -> bytes:
        return self._path(name).read_bytes()

    def exists(self, name: str) -> bool:
        return self._path(name).is_file()

    def size(self, name: str) -> int:
        return self._path(name).stat().st_size

    def describe(self, name: str) -> str:
        return str(self._path(name))

    def sha256(self, name: str) -> str:
        digest = hashlib.sha256()
        with open(self._path(name), "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        return digest.hexdigest()

    def _replace_atomically(self, name: str, fill) -> None:
        # temp name + rename: a reader (or a re-run) never sees half an object
        target = self._path(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        try:
            fill(tmp)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)

    def upload_file(self, name: str, path: str | Path, *, sha256: str | None = None) -> None:
        """Place a finished local file at `name`: renamed when on the same file system (the file is then
        gone from `path`), else copied; either way atomically."""
        target = self._path(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(path, target)
        except OSError:  # another file system (EXDEV)
            self._replace_atomically(name, lambda tmp: shutil.copyfile(path, tmp))

    def write_bytes(self, name: str, data: bytes) -> None:
        self._replace_atomically(name, lambda tmp: tmp.write_bytes(data))

    def delete(self, name: str) -> None:
        self._path(name).unlink(missing_ok=True)

    def __repr__(self) -> str:
        return f"LocalStorage({str(self.root)!r})"


def _local_from_url(url: str) -> LocalStorage:
    return LocalStorage(Location.parse(url).path, url=url)  # the storage core refuses file://HOST/...


_SCHEMES: dict[str, Callable[[str], Storage]] = {"file": _local_from_url}


def register_scheme(scheme: str, factory: Callable[[str], Storage]) -> None:
    """Make `open_storage` accept `scheme://...` URLs (the s3:// data plane registers itself here)."""
    _SCHEMES[scheme.lower()] = factory


def split_url(source: str | Path) -> tuple[str, str]:
    """(scheme, rest) of a source; plain paths have scheme "" ."""
    text = os.fspath(source)
    if "://" in text:
        scheme, _, rest = text.partition("://")
        return scheme.lower(), rest
    return "", text


def open_storage(source: str | Path) -> Storage:
    """The `Storage` for a dataset root: a folder path, a file:// URL, or a registered scheme."""
    if isinstance(source, Path):
        return LocalStorage(source)
    if not isinstance(source, str) or not source:
        raise ValueError(f"data source must be a non-empty path or URL, got {source!r}")
    scheme, _ = split_url(source)
    if not scheme:
        return LocalStorage(Path(source).expanduser(), url=source)
    factory = _SCHEMES.get(scheme)
    if factory is None:
        raise ValueError(
            f"data source {source!r}: unsupported URL scheme {scheme!r}; supported: "
            f"{sorted(_SCHEMES)} or a plain path"
        )
    return factory(source)
