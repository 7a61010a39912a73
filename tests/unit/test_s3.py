"""The S3 store against a scripted client: resumed streams, refusals translated, per-process clients.

The real server (SeaweedFS with SigV4) is exercised in tests/integration/test_s3_data.py.
"""

from __future__ import annotations

import datetime
import io
import json
import pickle

import pytest
from botocore.exceptions import ClientError, NoCredentialsError
from urllib3.exceptions import ProtocolError

from metaformer_platform.data import load_manifest
from metaformer_platform.storage import Location, S3AccessError, open_store
from metaformer_platform.storage.s3 import S3Store

DATA = bytes(range(256)) * 4096  # 1 MiB
_MTIME = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)


class _Body:
    """A response body that breaks (as a dropped connection does) after `fail_after` bytes."""

    def __init__(self, data: bytes, fail_after: int | None):
        self.stream = io.BytesIO(data)
        self.fail_after = fail_after
        self.sent = 0

    def read(self, n: int = -1) -> bytes:
        if self.fail_after is not None and self.sent >= self.fail_after:
            raise ProtocolError("Connection broken: IncompleteRead")
        if self.fail_after is not None:
            n = min(n, self.fail_after - self.sent)
        chunk = self.stream.read(n)
        self.sent += len(chunk)
        return chunk

    def close(self) -> None:
        pass


def _error(code: str, status: int, op: str) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": "scripted"}, "ResponseMetadata": {"HTTPStatusCode": status}}, op
    )


class _Client:
    def __init__(self, breaks: list[int] | None = None, head_bucket_error: Exception | None = None):
        self.breaks = list(breaks or [])
        self.head_bucket_error = head_bucket_error
        self.gets: list[dict] = []

    def head_bucket(self, Bucket):
        if self.head_bucket_error:
            raise self.head_bucket_error

    def head_object(self, Bucket, Key):
        if Key != "pre/shard.tar":
            raise _error("404", 404, "HeadObject")
        return {"ContentLength": len(DATA), "Metadata": {}}

    def get_object(self, Bucket, Key, Range=None, IfMatch=None):
        self.gets.append({"Key": Key, "Range": Range, "IfMatch": IfMatch})
        start = int(Range.removeprefix("bytes=").rstrip("-")) if Range else 0
        fail = self.breaks.pop(0) if self.breaks else None
        return {"ContentLength": len(DATA) - start, "ETag": '"v1"', "Body": _Body(DATA[start:], fail)}


def test_url_parsing_and_registration():
    assert (Location.parse("s3://bucket/a/b/").bucket, Location.parse("s3://bucket/a/b/").key) == ("bucket", "a/b")
    assert (Location.parse("s3://bucket").bucket, Location.parse("s3://bucket").key) == ("bucket", "")
    storage = open_store("s3://bucket/imagenet/")
    assert isinstance(storage, S3Store) and storage.describe("x.tar") == "s3://bucket/imagenet/x.tar"
    with pytest.raises(ValueError, match="names no bucket"):
        Location.parse("s3:///prefix")


def test_a_stream_that_breaks_mid_object_resumes_at_the_byte_it_reached():
    client = _Client(breaks=[300_000, 100_000])  # the first two connections drop
    storage = S3Store("s3://bkt/pre", client_factory=lambda: client, backoff=0.001)
    assert storage.read_bytes("shard.tar") == DATA
    assert [g["Range"] for g in client.gets] == [None, "bytes=300000-", "bytes=400000-"]
    assert [g["IfMatch"] for g in client.gets] == [
        None,
        '"v1"',
        '"v1"',
    ]  # a replaced object fails, never splices


def test_a_stream_that_keeps_breaking_gives_up_with_the_object_name():
    client = _Client(breaks=[1000] * 10)
    storage = S3Store("s3://bkt/pre", client_factory=lambda: client, max_resumes=2, backoff=0.001)
    with pytest.raises(OSError, match=r"s3://bkt/pre/shard.tar: the read broke 3 times"):
        storage.read_bytes("shard.tar")


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (
            _error("403", 403, "HeadBucket"),
            r"refused the credentials .*AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY",
        ),
        (_error("404", 404, "HeadBucket"), r"bucket 'bkt' does not exist .*create it"),
        (NoCredentialsError(), r"no usable S3 credentials .*AWS_ACCESS_KEY_ID"),
    ],
)
def test_refusals_say_what_to_fix(error, expected):
    storage = S3Store("s3://bkt/pre", client_factory=lambda: _Client(head_bucket_error=error))
    with pytest.raises(S3AccessError, match=expected):
        storage.exists("_info.json")


_MADE: list[_Client] = []


def _factory() -> _Client:
    _MADE.append(_Client())
    return _MADE[-1]


def test_missing_objects_and_client_per_process():
    _MADE.clear()
    storage = S3Store("s3://bkt/pre", client_factory=_factory)
    assert storage.exists("shard.tar") and not storage.exists("_info.json")
    assert storage.size("shard.tar") == len(DATA)
    assert len(_MADE) == 1  # one client, reused
    clone = pickle.loads(pickle.dumps(storage))  # what a Ray task or spawned worker receives
    assert clone._conn is None and clone.exists("shard.tar") and len(_MADE) == 2
    storage._conn.pid = -1  # as seen from a forked child: the parent's client must not be reused
    storage.exists("shard.tar")
    assert len(_MADE) == 3


class _ListingClient(_Client):
    """Objects under pre/: a manifest and two shards, one of them shorter than the manifest says."""

    OBJECTS = {"pre/_info.json": None, "pre/train-000000.tar": 100, "pre/train-000001.tar": 90}

    def __init__(self):
        super().__init__()
        self.lists = 0

    def get_paginator(self, op):
        assert op == "list_objects_v2"
        client = self

        class _Pages:
            def paginate(self, Bucket, Prefix):
                client.lists += 1
                items = [
                    {"Key": k, "Size": n or 0, "LastModified": _MTIME} for k, n in client.OBJECTS.items() if k.startswith(Prefix)
                ]
                yield {"Contents": items[:2]}  # two pages, as S3 pages at 1000
                yield {"Contents": items[2:]}

        return _Pages()

    def head_object(self, Bucket, Key):
        raise AssertionError("the manifest check lists sizes instead of one HEAD per shard")

    def get_object(self, Bucket, Key, Range=None, IfMatch=None):
        if Key == "pre/_info.json":
            body = {
                "splits": {
                    "train": {
                        "num_samples": 4,
                        "filenames": ["train-000000.tar", "train-000001.tar"],
                        "shard_lengths": [2, 2],
                        "shard_bytes": [100, 100],
                    }
                }
            }
            data = json.dumps(body).encode()
            return {"ContentLength": len(data), "ETag": '"m"', "Body": _Body(data, None)}
        raise _error("NoSuchKey", 404, "GetObject")


def test_s3_sizes_come_from_a_listing_and_a_gone_object_is_file_not_found(monkeypatch):
    client = _ListingClient()
    storage = S3Store("s3://bkt/pre", client_factory=lambda: client)
    monkeypatch.setattr(storage, "exists", lambda name: name == "_info.json")
    listed = storage.listing()
    assert listed is not None
    assert {name: stat.size for name, stat in listed.items()} == {"_info.json": 0, "train-000000.tar": 100, "train-000001.tar": 90}
    with pytest.raises(
        ValueError,
        match=r"shard size differs from the manifest: s3://bkt/pre/train-000001.tar \(90 bytes, manifest says 100\)",
    ):
        load_manifest(storage)
    assert client.lists == 2
    # a shard deleted after the check: FileNotFoundError (a fault the loader skips), not a ClientError
    with pytest.raises(FileNotFoundError, match="s3://bkt/pre/train-000000.tar does not exist"):
        storage.read_bytes("train-000000.tar")


def test_directory_markers_are_not_files_of_the_folder():
    """pyarrow's S3 filesystem (Ray Train's checkpoint writer) leaves zero-byte "folder/" objects: a listing that
    took them for files handed the downloader a member named '' (refused as outside its folder)."""
    client = _ListingClient()
    client.OBJECTS = {**_ListingClient.OBJECTS, "pre/": 0, "pre/sub/": 0, "pre/sub/x.json": 3}
    listed = S3Store("s3://bkt/pre", client_factory=lambda: client).listing()
    assert listed is not None
    assert sorted(listed) == ["_info.json", "sub/x.json", "train-000000.tar", "train-000001.tar"]


def test_without_list_permission_the_sizes_come_from_heads(monkeypatch):
    client = _ListingClient()
    sizes = {"pre/train-000000.tar": 100, "pre/train-000001.tar": 90}

    def refuse(op):
        raise _error("AccessDenied", 403, "ListObjectsV2")

    monkeypatch.setattr(client, "get_paginator", refuse)

    def head(Bucket, Key):
        if Key not in sizes:
            raise _error("404", 404, "HeadObject")
        return {"ContentLength": sizes[Key], "Metadata": {}}

    monkeypatch.setattr(client, "head_object", head)
    storage = S3Store("s3://bkt/pre", client_factory=lambda: client)
    assert storage.listing() is None
    monkeypatch.setattr(storage, "exists", lambda name: name == "_info.json" or f"pre/{name}" in sizes)
    with pytest.raises(ValueError, match=r"s3://bkt/pre/train-000001.tar \(90 bytes, manifest says 100\)"):
        load_manifest(storage)
