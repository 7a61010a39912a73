"""The types at the storage API's seams: a listed file's stat, and the slice of boto3's S3 client the S3 backend
uses (boto3 ships no types)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import IO, Protocol, TypedDict

__all__ = ["Body", "FileStat", "GetObjectOutput", "HeadObjectOutput", "ListPage", "Listed", "S3Client"]


@dataclass(frozen=True)
class FileStat:
    """One listed file: its size and when it was last written."""

    size: int
    mtime_ns: int


class Body(Protocol):
    """A GET response's body."""

    def read(self, n: int = ...) -> bytes: ...

    def close(self) -> None: ...


class GetObjectOutput(TypedDict):
    Body: Body
    ContentLength: int
    ETag: str


class HeadObjectOutput(TypedDict, total=False):
    ContentLength: int
    Metadata: dict[str, str]


class Listed(TypedDict):
    Key: str
    Size: int
    LastModified: datetime


class ListPage(TypedDict, total=False):
    Contents: list[Listed]


class Paginator(Protocol):
    def paginate(self, *, Bucket: str, Prefix: str) -> Iterator[ListPage]: ...


class S3Client(Protocol):
    """The boto3 S3 client calls this backend makes."""

    def head_bucket(self, *, Bucket: str) -> object: ...

    def head_object(self, *, Bucket: str, Key: str) -> HeadObjectOutput: ...

    def get_object(self, *, Bucket: str, Key: str, Range: str = ..., IfMatch: str = ...) -> GetObjectOutput: ...

    def put_object(self, *, Bucket: str, Key: str, Body: bytes) -> object: ...

    def delete_object(self, *, Bucket: str, Key: str) -> object: ...

    def upload_fileobj(self, f: IO[bytes], bucket: str, key: str, *, ExtraArgs: object, Config: object) -> None: ...

    def get_paginator(self, op: str) -> Paginator: ...
