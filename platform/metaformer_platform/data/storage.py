"""Where shards live: one small interface over local folders now, object storage later.

Every byte the data path reads goes through a `Storage`, so adding s3:// (the streaming data plane) means
registering one more scheme with `register_scheme`, not touching the manifest, shard set or loader.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, Protocol
from urllib.parse import unquote, urlparse

__all__ = ["LocalStorage", "Storage", "open_storage", "register_scheme", "split_url"]


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

    def __repr__(self) -> str:
        return f"LocalStorage({str(self.root)!r})"


def _local_from_url(url: str) -> LocalStorage:
    parsed = urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise ValueError(
            f"file URL {url!r} names host {parsed.netloc!r}: only local files are supported; "
            "write file:///absolute/path (three slashes) or a plain path"
        )
    return LocalStorage(unquote(parsed.path), url=url)


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
        hint = (
            " (s3:// arrives with the streaming data plane; until then copy the shards to a local folder)"
            if scheme == "s3"
            else ""
        )
        raise ValueError(
            f"data source {source!r}: unsupported URL scheme {scheme!r}; supported: "
            f"{sorted(_SCHEMES)} or a plain path{hint}"
        )
    return factory(source)
