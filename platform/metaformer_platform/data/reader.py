"""Reading samples out of webdataset tar shards, and decoding them.

Shards are read front to back as a stream, which is what an object-store body gives too. Members are
grouped into samples webdataset's way: consecutive members whose names agree up to the first dot of the
base name form one sample, keyed by that prefix.

The tar headers are parsed here (`tarfile.TarInfo.frombuf`, plus GNU long names and PAX paths) rather than
by `tarfile`'s stream mode, which reads a member's data in 10 KiB pieces: reading each member in one
request is what lets the tar path keep up with the network (see tests/benchmarks/bench_s3_reader.py).
"""

from __future__ import annotations

import io
import tarfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from PIL import Image

from .faults import ShortShardError
from .storage import Storage

__all__ = ["IMAGE_EXTS", "RawSample", "count_samples", "decode_image", "decode_label", "iter_shard"]

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


@dataclass
class RawSample:
    """A sample's undecoded members ({"jpg": b"...", "cls": b"3", ...}) and where it came from."""

    key: str
    files: dict[str, bytes]
    shard: str


def _split_member(name: str) -> tuple[str, str]:
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{folder}/{stem}" if folder else stem
    return key, (ext.lower() if dot else "")


_BLOCK = 512
_FILE_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)


class _TarMembers:
    """The regular-file members of a tar stream, in order; `data()` reads the current one in one request,
    and a member whose data was not asked for is skipped (read past) when iteration moves on."""

    def __init__(self, stream: BinaryIO, where: str):
        self.stream = stream
        self.where = where
        self._remaining = 0  # bytes (data + padding) of the current member not yet consumed
        self._size = 0

    def _read(self, n: int) -> bytes:
        data = self.stream.read(n)
        if len(data) != n:
            raise tarfile.ReadError(
                f"{self.where}: unexpected end of data (the tar is truncated after {len(data)} of {n} bytes)"
            )
        return data

    def _skip(self, n: int) -> None:
        while n > 0:
            n -= len(self._read(min(n, 1 << 20)))

    def data(self) -> bytes:
        padded, self._remaining = self._remaining, 0
        return self._read(padded)[: self._size]

    def __iter__(self) -> Iterator[str]:
        long_name: str | None = None
        while True:
            header = self.stream.read(_BLOCK)
            if not header or header == b"\0" * _BLOCK:  # end of archive (some writers omit the end blocks)
                return
            if len(header) != _BLOCK:
                raise tarfile.ReadError(f"{self.where}: unexpected end of data inside a tar header")
            try:
                info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
            except tarfile.HeaderError as err:
                raise tarfile.ReadError(f"{self.where}: not a valid tar header ({err})") from None
            padded = -(-info.size // _BLOCK) * _BLOCK
            if info.type == tarfile.GNUTYPE_LONGNAME:
                long_name = self._read(padded)[: info.size].rstrip(b"\0").decode("utf-8", "surrogateescape")
                continue
            if info.type == tarfile.XHDTYPE:
                long_name = _pax_path(self._read(padded)[: info.size]) or long_name
                continue
            if info.type not in _FILE_TYPES:  # directories, links, global PAX headers...
                self._skip(padded)
                continue
            name, long_name = long_name or info.name, None
            self._remaining, self._size = padded, info.size
            yield name
            if self._remaining:
                self._skip(self._remaining)
                self._remaining = 0


def _pax_path(records: bytes) -> str | None:
    """The `path` of a PAX extended header (records of "<len> <key>=<value>" and a newline), if it sets one."""
    pos = 0
    while pos < len(records):
        length_text, _, rest = records[pos:].partition(b" ")
        length = int(length_text)
        key, _, value = rest[: length - len(length_text) - 2].partition(b"=")
        if key == b"path":
            return value.decode("utf-8", "surrogateescape")
        pos += length
    return None


def iter_shard(
    storage: Storage, filename: str, start: int = 0, stop: int | None = None
) -> Iterator[RawSample]:
    """Yield samples [start, stop) of one shard; the data of members before `start` is read past, not kept.

    Raises ShortShardError (a RuntimeError) when the shard ends before `stop` (it disagrees with the
    manifest), and
    tarfile.ReadError (naming the shard) when it is not a complete tar.
    """
    count = 0  # samples whose first member has been seen
    key: str | None = None
    files: dict[str, bytes] | None = None
    with storage.open(filename) as stream:
        members = _TarMembers(stream, storage.describe(filename))
        for name in members:
            member_key, ext = _split_member(name)
            if member_key != key:
                if files is not None:
                    yield RawSample(key, files, filename)  # type: ignore[arg-type]
                    files = None
                if stop is not None and count >= stop:
                    return
                key = member_key
                count += 1
                files = {} if count > start else None
            if files is not None:
                files[ext] = members.data()
    if files is not None:
        yield RawSample(key, files, filename)  # type: ignore[arg-type]
    if stop is not None and count < stop:
        raise ShortShardError(
            f"{storage.describe(filename)} holds {count} samples but the manifest needs at least {stop}: "
            "the shard was truncated or replaced; rebuild it (or its manifest)"
        )


def count_samples(storage: Storage, filename: str) -> int:
    """How many samples one shard holds, by walking its tar headers (member data is read past, not kept).

    For shards that no manifest lists (a brace pattern over bare tars): it reads the whole shard.
    """
    count, key = 0, None
    with storage.open(filename) as stream:
        for name in _TarMembers(stream, storage.describe(filename)):
            member_key, _ = _split_member(name)
            if member_key != key:
                key, count = member_key, count + 1
    return count


def decode_label(sample: RawSample) -> int:
    if "cls" not in sample.files:
        raise RuntimeError(f"{sample.shard}: sample {sample.key!r} has no .cls member")
    return int(sample.files["cls"])


def decode_image(sample: RawSample, draft_size: int | None = None) -> Image.Image:
    """The sample's image as RGB. With `draft_size`, JPEGs at least twice that size on the short side
    decode at a reduced scale (PIL's draft: libjpeg DCT scaling) that keeps both sides >= draft_size,
    which is several times faster than a full decode followed by a downscale."""
    data = next((sample.files[ext] for ext in IMAGE_EXTS if ext in sample.files), None)
    if data is None:
        raise RuntimeError(
            f"{sample.shard}: sample {sample.key!r} has no image member ({'/'.join(IMAGE_EXTS)}); "
            f"it has {sorted(sample.files)}"
        )
    with warnings.catch_warnings():  # a bomb below PIL's hard limit only warns: refuse it before decoding
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = Image.open(io.BytesIO(data))
    if draft_size and img.format == "JPEG" and min(img.size) >= 2 * draft_size:
        img.draft("RGB", (draft_size, draft_size))
    return img.convert("RGB")
