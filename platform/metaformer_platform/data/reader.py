"""Reading samples out of webdataset tar shards, and decoding them.

Shards are read front to back as a stream (`tarfile` mode "r|"), which is what an object-store body
gives too. Members are grouped into samples webdataset's way: consecutive members whose names agree up
to the first dot of the base name form one sample, keyed by that prefix.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

from PIL import Image

from .storage import Storage

__all__ = ["IMAGE_EXTS", "RawSample", "decode_image", "decode_label", "iter_shard"]

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


def iter_shard(
    storage: Storage, filename: str, start: int = 0, stop: int | None = None
) -> Iterator[RawSample]:
    """Yield samples [start, stop) of one shard; members before `start` are skipped without reading data.

    Raises RuntimeError when the shard ends before `stop` (it disagrees with the manifest).
    """
    count = 0  # samples whose first member has been seen
    key: str | None = None
    files: dict[str, bytes] | None = None
    with storage.open(filename) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            member_key, ext = _split_member(member.name)
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
                extracted = tar.extractfile(member)
                assert extracted is not None
                files[ext] = extracted.read()
    if files is not None:
        yield RawSample(key, files, filename)  # type: ignore[arg-type]
    if stop is not None and count < stop:
        raise RuntimeError(
            f"{storage.describe(filename)} holds {count} samples but the manifest needs at least {stop}: "
            "the shard was truncated or replaced; rebuild it (or its manifest)"
        )


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
    img = Image.open(io.BytesIO(data))
    if draft_size and img.format == "JPEG" and min(img.size) >= 2 * draft_size:
        img.draft("RGB", (draft_size, draft_size))
    return img.convert("RGB")
