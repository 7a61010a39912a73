"""Reading samples out of webdataset tar shards, and decoding them.

Shards are read front to back as a stream, which is what an object-store body gives too. Members are
grouped into samples webdataset's way: consecutive members whose names agree up to the first dot of the
base name form one sample, keyed by that prefix.

The tar headers are parsed here (ustar/GNU headers by hand, plus GNU long names and PAX paths; anything
else through `tarfile.TarInfo.frombuf`) rather than by `tarfile`'s stream mode, which reads a member's data
in 10 KiB pieces: parsing in place in large windows and copying each member out once is what lets the tar
path keep up with the network (see tests/benchmarks/bench_s3_reader.py).

A header's size is never trusted for an allocation: a member that declares more bytes than are left in the
shard (its size is known for local files, S3 objects and prefetched shards) refuses the shard as
truncated, a GNU long name or PAX header over 1 MiB refuses it too (`OversizedMemberError`), and one larger than `max_member_bytes` is read past and its sample refused
(`RawSample.refused`), so a 1 KiB shard cannot make a worker allocate gigabytes. Every refusal is a
`BadShardError` or a `ShortShardError` (data/faults.py): the loader counts it, nothing else escapes.
"""

from __future__ import annotations

import io
import os
import tarfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from PIL import Image

from metaformer_platform.data.faults import (
    DEFAULT_MAX_MEMBER_BYTES,
    BadShardError,
    OversizedMemberError,
    ShortShardError,
)

__all__ = ["IMAGE_EXTS", "RawSample", "ShardSource", "count_samples", "decode_image", "decode_label", "iter_shard", "open_image", "read_shard"]

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


class ShardSource(Protocol):
    """Where shards are read from (``open``: a stream read front to back; ``describe``: the full location, for
    messages): a ``storage.Store``, or the loader's prefetching view of one."""

    def open(self, name: str) -> BinaryIO: ...

    def describe(self, name: str) -> str: ...


@dataclass
class RawSample:
    """A sample's undecoded members ({"jpg": b"...", "cls": b"3", ...}) and where it came from; `refused` says
    why a member was left out (larger than `max_member_bytes`): such a sample is a bad one."""

    key: str
    files: dict[str, bytes]
    shard: str
    refused: str = ""


def _split_member(name: str) -> tuple[str, str]:
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{folder}/{stem}" if folder else stem
    return key, (ext.lower() if dot else "")


_BLOCK = 512
_FILE_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)
# Bytes read from a stream at a time (local files, S3 bodies); an in-memory shard is parsed in place.
_WINDOW = 16 << 20
_POSIX_MAGIC = b"ustar\x0000"
_GNU_MAGIC = b"ustar  \x00"
# A GNU long name or a PAX header is a few hundred bytes; past this the header is not one a writer made.
_MAX_HEADER_RECORD = 1 << 20


def _stream_size(stream: BinaryIO) -> int | None:
    """The byte length of a shard's stream when it is known: a local file's size, an S3 body's Content-Length
    (``storage.s3._ResumableBody.length``, under its BufferedReader), a prefetched shard's length."""
    if isinstance(stream, io.BytesIO):
        return len(stream.getbuffer())
    raw = getattr(stream, "raw", stream)
    length = getattr(raw, "length", None)
    if isinstance(length, int):
        return length
    try:
        return os.fstat(raw.fileno()).st_size
    except (AttributeError, OSError, ValueError):  # no file descriptor (io.UnsupportedOperation is an OSError)
        return None


class _TarMembers:
    """The regular-file members of a tar, in order; `data()` copies the current member's bytes out.

    The tar is parsed in place in a memoryview window: the whole shard when it is already in memory (the
    loader's prefetched shards), else 16 MiB read at a time with `readinto`. Each member's bytes are
    copied once, out of the window (only a member that straddles two windows is copied twice), and the
    headers are parsed by hand: `tarfile.TarInfo.frombuf` costs about 100 us a header here, as much as
    reading a 100 KB JPEG from the object store (bench_s3_reader.py). Headers without the ustar magic
    (old V7 tars, garbage) still go through `frombuf`, which verifies their checksum.
    """

    def __init__(self, stream: BinaryIO, where: str, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES):
        self.where = where
        self.max_member_bytes = max_member_bytes
        self.total = _stream_size(stream)  # None: not known, only max_member_bytes bounds a member
        self.consumed = 0  # bytes of the tar before `pos`
        self.too_large = ""  # why the current member's data is not copied out (see `data`)
        # an in-memory stream (io.BytesIO of the prefetched bytes): getvalue() returns that object, no copy
        self.stream: BinaryIO | None = None if isinstance(stream, io.BytesIO) else stream
        self.buf = memoryview(stream.getvalue()) if isinstance(stream, io.BytesIO) else memoryview(b"")
        self.pos = 0
        self._remaining = 0  # bytes (data + padding) of the current member not yet consumed
        self._size = 0

    def _fill(self, n: int) -> int:
        """Make `n` bytes available at `pos` if the tar holds them; returns how many are available."""
        have = len(self.buf) - self.pos
        if have >= n or self.stream is None:
            return min(have, n)
        self.consumed += self.pos
        window = bytearray(max(n, _WINDOW))  # n is bounded: by the bytes left in the shard, or max_member_bytes
        window[:have] = self.buf[self.pos :]
        view, got = memoryview(window), have
        while got < len(window):
            read = self.stream.readinto(view[got:])  # type: ignore[attr-defined]
            if not read:
                break
            got += read
        self.buf, self.pos = view[:got], 0
        return min(got, n)

    def _take(self, n: int) -> memoryview:
        if self._fill(n) != n:
            raise BadShardError(
                f"{self.where}: unexpected end of data (the tar is truncated after "
                f"{len(self.buf) - self.pos} of {n} bytes)"
            )
        view = self.buf[self.pos : self.pos + n]
        self.pos += n
        return view

    def _skip(self, n: int) -> None:
        while n > 0:
            if not self._fill(min(n, _WINDOW)):
                raise BadShardError(f"{self.where}: unexpected end of data (the tar is truncated)")
            step = min(n, len(self.buf) - self.pos)
            self.pos += step
            n -= step

    def data(self) -> bytes:
        """The current member's bytes (not for one that is `too_large`: its sample is refused instead)."""
        assert not self.too_large, "the member is larger than max_member_bytes: refuse its sample"
        padded, self._remaining = self._remaining, 0
        return bytes(self._take(padded)[: self._size])

    def _left(self) -> int | None:
        """Bytes of the shard after `pos`, when its size is known."""
        return None if self.total is None else self.total - self.consumed - self.pos

    def _check_size(self, name: str, size: int, what: str, limit: int | None = None) -> None:
        """Refuse the shard when a header declares a size that cannot be right (negative, past the shard's
        end) or, for a header record, one over `limit`."""
        if size < 0:
            raise BadShardError(f"{self.where}: not a valid tar header ({name!r} declares {size} bytes)")
        left = self._left()
        if left is not None and size > left:
            raise BadShardError(  # refused from the header: nothing is allocated for the declared size
                f"{self.where}: unexpected end of data ({what} {name!r} declares {size} bytes but only {left} are "
                "left in the shard: it is truncated or forged); rebuild or re-copy the shard"
            )
        if limit is not None and size > limit:
            raise OversizedMemberError(
                f"{self.where}: {what} {name!r} declares {size} bytes, more than a tar header record holds "
                f"({limit}); the shard is not one a tar writer made: rebuild it"
            )

    def _record(self, name: str, size: int, padded: int) -> bytes:
        """The data of a GNU long name or PAX header (bounded, like every size a header declares)."""
        self._check_size(name, size, "the header record of", _MAX_HEADER_RECORD)
        return bytes(self._take(padded)[:size])

    def _header(self, block: memoryview) -> tuple[str, int, bytes]:
        """(name, size, type) of one header block."""
        magic = bytes(block[257:265])
        size_field = bytes(block[124:136])
        if magic in (_POSIX_MAGIC, _GNU_MAGIC) and not size_field[0] & 0x80:  # not a base-256 size
            try:
                size = int(size_field.split(b"\0", 1)[0].strip() or b"0", 8)
            except ValueError:
                raise BadShardError(f"{self.where}: not a valid tar header (bad size field)") from None
            name = bytes(block[:100]).split(b"\0", 1)[0]
            kind = bytes(block[156:157])
            if magic == _POSIX_MAGIC and kind not in (tarfile.GNUTYPE_LONGNAME, tarfile.XHDTYPE):
                prefix = bytes(block[345:500]).split(b"\0", 1)[0]
                if prefix:
                    name = prefix + b"/" + name
            return name.decode("utf-8", "surrogateescape"), size, kind
        try:
            info = tarfile.TarInfo.frombuf(bytes(block), "utf-8", "surrogateescape")
        except tarfile.HeaderError as err:
            raise BadShardError(f"{self.where}: not a valid tar header ({err})") from None
        return info.name, info.size, info.type

    def __iter__(self) -> Iterator[str]:
        """The names of the regular-file members; `too_large` is set while the current one is over
        `max_member_bytes` (its data is read past, never held)."""
        long_name: str | None = None
        while True:
            got = self._fill(_BLOCK)
            if got == 0:
                return
            if got != _BLOCK:
                raise BadShardError(f"{self.where}: unexpected end of data inside a tar header")
            block = self._take(_BLOCK)
            if block == _ZERO_BLOCK:  # end of archive (some writers omit the end blocks)
                return
            name, size, kind = self._header(block)
            del block  # a view of the window: holding it would keep a third 16 MiB window alive across a refill
            padded = -(-size // _BLOCK) * _BLOCK
            if kind == tarfile.GNUTYPE_LONGNAME:
                record = self._record(name, size, padded)
                long_name = record.rstrip(b"\0").decode("utf-8", "surrogateescape")
                continue
            if kind == tarfile.XHDTYPE:
                long_name = _pax_path(self._record(name, size, padded), self.where) or long_name
                continue
            self._check_size(long_name or name, size, "member")
            if kind not in _FILE_TYPES:  # directories, links, global PAX headers...
                self._skip(padded)
                continue
            name, long_name = long_name or name, None
            self._remaining, self._size = padded, size
            self.too_large = "" if size <= self.max_member_bytes else (
                f"member {name!r} declares {size} bytes, more than data.max_member_bytes={self.max_member_bytes}"
            )
            yield name
            self.too_large = ""
            if self._remaining:
                self._skip(self._remaining)
                self._remaining = 0


_ZERO_BLOCK = bytes(_BLOCK)


def _pax_path(records: bytes, where: str = "") -> str | None:
    """The `path` of a PAX extended header (records of "<len> <key>=<value>" and a newline), if it sets one."""
    pos = 0
    while pos < len(records):
        if not records[pos:].strip(b"\0"):  # the padding after the last record
            return None
        length_text, _, rest = records[pos:].partition(b" ")
        length = int(length_text) if length_text.isdigit() else 0
        if length <= len(length_text) + 1 or pos + length > len(records):  # 0 would loop for ever
            raise BadShardError(f"{where}: not a valid tar header (a PAX record of length {length_text[:20]!r})")
        key, _, value = rest[: length - len(length_text) - 2].partition(b"=")
        if key == b"path":
            return value.decode("utf-8", "surrogateescape")
        pos += length
    return None


def read_shard(storage: ShardSource, filename: str) -> bytes:
    """A whole shard's bytes (for the loader's shard prefetcher), read through `storage.open` so a broken S3
    connection resumes: one request for the rest of the object (`_ResumableBody.readall`), or one read of a
    local file's size."""
    with storage.open(filename) as stream:
        return stream.read()


def iter_shard(
    storage: ShardSource, filename: str, start: int = 0, stop: int | None = None, *,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
) -> Iterator[RawSample]:
    """Yield samples [start, stop) of one shard; the data of members before `start` is read past, not kept.

    A member over `max_member_bytes` is read past too: its sample comes with `refused` set (a bad sample).
    Raises ShortShardError (a RuntimeError) when the shard ends before `stop` (it disagrees with the
    manifest), and BadShardError (a tarfile.ReadError naming the shard) when it is not a complete tar or a
    header declares more than the shard holds.
    """
    count = 0  # samples whose first member has been seen
    sample: RawSample | None = None  # the sample being collected (None: before `start`)
    key: str | None = None
    with storage.open(filename) as stream:
        members = _TarMembers(stream, storage.describe(filename), max_member_bytes)
        for name in members:
            member_key, ext = _split_member(name)
            if member_key != key:
                if sample is not None:
                    yield sample
                    sample = None
                if stop is not None and count >= stop:
                    return
                key = member_key
                count += 1
                sample = RawSample(key, {}, filename) if count > start else None
            if sample is not None and members.too_large:
                sample.refused = sample.refused or members.too_large
            elif sample is not None:
                sample.files[ext] = members.data()
    if sample is not None:
        yield sample
    if stop is not None and count < stop:
        raise ShortShardError(
            f"{storage.describe(filename)} holds {count} samples but the manifest needs at least {stop}: "
            "the shard was truncated or replaced; rebuild it (or its manifest)"
        )


def count_samples(storage: ShardSource, filename: str, *, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES) -> int:
    """How many samples one shard holds, by walking its tar headers (member data is read past, not kept).

    For shards that no manifest lists (a brace pattern over bare tars): it reads the whole shard.
    """
    count, key = 0, None
    with storage.open(filename) as stream:
        for name in _TarMembers(stream, storage.describe(filename), max_member_bytes):
            member_key, _ = _split_member(name)
            if member_key != key:
                key, count = member_key, count + 1
    return count


def _check_whole(sample: RawSample) -> None:
    if sample.refused:
        raise ValueError(f"{sample.shard}: sample {sample.key!r} is refused: {sample.refused}")


def decode_label(sample: RawSample) -> int:
    _check_whole(sample)
    if "cls" not in sample.files:
        raise RuntimeError(f"{sample.shard}: sample {sample.key!r} has no .cls member")
    return int(sample.files["cls"])


def open_image(sample: RawSample) -> Image.Image:
    """The sample's image, opened but not decoded (PIL reads the header only: format, mode, size)."""
    _check_whole(sample)
    data = next((sample.files[ext] for ext in IMAGE_EXTS if ext in sample.files), None)
    if data is None:
        raise RuntimeError(
            f"{sample.shard}: sample {sample.key!r} has no image member ({'/'.join(IMAGE_EXTS)}); "
            f"it has {sorted(sample.files)}"
        )
    with warnings.catch_warnings():  # a bomb below PIL's hard limit only warns: refuse it before decoding
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(data))


def decode_image(sample: RawSample, draft_size: int | None = None) -> Image.Image:
    """The sample's image as RGB. With `draft_size`, JPEGs at least twice that size on the short side
    decode at a reduced scale (PIL's draft: libjpeg DCT scaling) that keeps both sides >= draft_size,
    which is several times faster than a full decode followed by a downscale."""
    img = open_image(sample)
    if draft_size and img.format == "JPEG" and min(img.size) >= 2 * draft_size:
        img.draft("RGB", (draft_size, draft_size))
    return img.convert("RGB")
