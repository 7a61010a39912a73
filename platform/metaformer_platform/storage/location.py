"""One parsed location: a local folder (plain path or ``file:///abs/path``) or ``s3://bucket/key``.

Every "is this local or remote?" question in the platform is answered here (``Location.parse(...).remote``),
not by string tests spread through the code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias
from urllib.parse import unquote, urlparse

if TYPE_CHECKING:
    import pyarrow.fs

__all__ = ["Location", "LocationLike"]


@dataclass(frozen=True)
class Location:
    """Where a file or folder lives. ``bucket`` is None for local paths; ``key`` is the object key (S3) or the
    absolute path (local), without a trailing slash."""

    bucket: str | None
    key: str

    @classmethod
    def parse(cls, value: str | os.PathLike[str] | Location) -> Location:
        """Parse a plain path, ``file://`` URL or ``s3://bucket/key``; anything else is a ValueError saying what is."""
        if isinstance(value, Location):
            return value
        text = os.fspath(value)
        if not text:
            raise ValueError("a location must be a non-empty path or URL (a folder, file:///abs/path or s3://bucket/key)")
        if "://" not in text:
            return cls(None, str(Path(text).expanduser().resolve()))
        scheme, _, rest = text.partition("://")
        scheme = scheme.lower()
        if scheme == "file":
            parsed = urlparse(text)
            if parsed.netloc not in ("", "localhost"):
                raise ValueError(
                    f"file URL {text!r} names host {parsed.netloc!r}: only local files are supported; write "
                    "file:///absolute/path (three slashes) or a plain path"
                )
            return cls(None, str(Path(unquote(parsed.path)).expanduser().resolve()))
        if scheme == "s3":
            bucket, _, key = rest.partition("/")
            if not bucket:
                raise ValueError(f"S3 URL {text!r} names no bucket; write s3://bucket/prefix")
            return cls(bucket, key.strip("/"))
        raise ValueError(f"{text!r}: unsupported URL scheme {scheme!r}; use a local path, file:///abs/path or s3://bucket/key")

    @property
    def remote(self) -> bool:
        """True on object storage (s3://), False for a local path."""
        return self.bucket is not None

    @property
    def uri(self) -> str:
        """The location as users write it: ``s3://bucket/key`` or an absolute local path."""
        if self.bucket is None:
            return self.key
        return f"s3://{self.bucket}/{self.key}" if self.key else f"s3://{self.bucket}"

    @property
    def fs_path(self) -> str:
        """The path on this location's pyarrow filesystem (``bucket/key`` on S3, the absolute path locally)."""
        if self.bucket is None:
            return self.key
        return f"{self.bucket}/{self.key}" if self.key else self.bucket

    @property
    def name(self) -> str:
        """The last path component (``checkpoint-00000010`` of ``s3://b/runs/x/checkpoint-00000010``)."""
        return self.key.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> Location:
        """The folder this file or folder is in (a bucket's root is its own parent)."""
        if self.bucket is None:
            return Location(None, str(Path(self.key).parent))
        return Location(self.bucket, self.key.rpartition("/")[0])

    @property
    def path(self) -> Path:
        """The local path; a ValueError for an S3 location (callers that need local files use ``download``)."""
        if self.bucket is not None:
            raise ValueError(f"{self.uri} is on object storage, not a local path: fetch it first")
        return Path(self.key)

    def join(self, *names: str) -> Location:
        """The location of ``names`` under this folder."""
        if self.bucket is None:
            return Location(None, str(Path(self.key, *names)))
        parts = [self.key, *(n.strip("/") for n in names)]
        return Location(self.bucket, "/".join(p for p in parts if p))

    def filesystem(self) -> pyarrow.fs.FileSystem:
        """The pyarrow filesystem this location is on (S3 from ``S3Settings``, else the local one)."""
        from pyarrow import fs as pafs

        if self.bucket is None:
            return pafs.LocalFileSystem()
        from metaformer_platform.storage.settings import S3Settings

        return S3Settings.from_env().pyarrow_filesystem()

    def __str__(self) -> str:
        return self.uri


# What every storage function takes: a plain path (str or Path), a file:// URL, an s3:// URI or a parsed Location.
LocationLike: TypeAlias = "str | os.PathLike[str] | Location"
