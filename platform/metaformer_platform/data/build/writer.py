"""Writing webdataset shards: deterministic tars, atomic renames, the manifest last.

The same samples in the same order always give byte-identical tars (fixed mtime, owner and mode, no
PAX headers), so a rebuilt shard has the same sha256 and re-running a build is a no-op for readers.
Every shard is written under a temporary name and renamed into place, and `_info.json` is written after
all shards: a reader that sees a manifest sees complete shards.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metaformer_platform.data.manifest import ShardInfo, manifest_dict, write_manifest

__all__ = ["Sample", "ShardWriter", "shard_name", "write_dataset", "write_shard"]

# 2000-01-01T00:00:00Z: a fixed, plausible timestamp (some tools warn about 1970).
FIXED_MTIME = 946684800


@dataclass(frozen=True)
class Sample:
    """One image classification sample: encoded image bytes, an integer label, optional metadata."""

    key: str
    image: bytes
    label: int
    meta: Mapping[str, Any] | None = field(default=None)
    ext: str = "jpg"


def shard_name(split: str, index: int) -> str:
    """`{split}-{NNNNNN}.tar`, the name timm's and webdataset's brace patterns expect."""
    return f"{split}-{index:06d}.tar"


def _check_sample(sample: Sample) -> None:
    key = sample.key
    # webdataset splits a member name at the first dot of its base name: a dot in the key would split it.
    if not key or "." in key.rsplit("/", 1)[-1] or key.startswith("/") or ".." in key.split("/"):
        raise ValueError(f"sample key {key!r} must be non-empty, relative, and have no '.' in its last part")
    if type(sample.label) is not int or sample.label < 0:
        raise ValueError(f"sample {key!r}: label must be a non-negative int, got {sample.label!r}")
    if not isinstance(sample.image, (bytes, bytearray)) or not sample.image:
        raise ValueError(f"sample {key!r}: image must be non-empty encoded bytes")


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = FIXED_MTIME
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _sample_members(sample: Sample) -> list[tuple[str, bytes]]:
    members = [
        (f"{sample.key}.{sample.ext}", bytes(sample.image)),
        (f"{sample.key}.cls", str(sample.label).encode()),
    ]
    if sample.meta is not None:
        members.append((f"{sample.key}.json", json.dumps(dict(sample.meta), sort_keys=True).encode()))
    return members


def write_shard(path: str | Path, samples: Iterable[Sample]) -> ShardInfo:
    """Write one tar shard atomically and return its length, size and sha256.

    This is the unit of work a parallel build (one Ray task per shard) runs.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    count = 0
    seen: set[str] = set()
    try:
        with open(tmp, "wb") as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for sample in samples:
                _check_sample(sample)
                if sample.key in seen:
                    raise ValueError(f"{path}: sample key {sample.key!r} appears twice in one shard")
                seen.add(sample.key)
                for name, data in _sample_members(sample):
                    _add(tar, name, data)
                count += 1
        digest = hashlib.sha256()
        with open(tmp, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        size = tmp.stat().st_size
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return ShardInfo(filename=path.name, num_samples=count, sha256=digest.hexdigest(), num_bytes=size)


class ShardWriter:
    """Stream samples of one split into `{split}-NNNNNN.tar` shards of `samples_per_shard` each."""

    def __init__(self, root: str | Path, split: str, *, samples_per_shard: int, start_index: int = 0):
        if samples_per_shard <= 0:
            raise ValueError(f"samples_per_shard must be positive, got {samples_per_shard}")
        if not split or "/" in split or "-" in split:
            raise ValueError(f"split name {split!r} must be non-empty with no '/' or '-'")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.split = split
        self.samples_per_shard = samples_per_shard
        self.index = start_index
        self.shards: list[ShardInfo] = []
        self._pending: list[Sample] = []

    def write(self, sample: Sample) -> None:
        _check_sample(sample)
        self._pending.append(sample)
        if len(self._pending) >= self.samples_per_shard:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            self.shards.append(write_shard(self.root / shard_name(self.split, self.index), self._pending))
            self.index += 1
            self._pending = []

    def close(self) -> list[ShardInfo]:
        """Write the last (possibly short) shard; returns every shard written."""
        self._flush()
        return self.shards

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()


def write_dataset(
    root: str | Path,
    splits: Mapping[str, Iterable[Sample]],
    *,
    name: str,
    samples_per_shard: int,
    class_names: Sequence[str] = (),
    num_classes: int | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write every split's shards, then `_info.json`; returns the manifest's path."""
    written: dict[str, list[ShardInfo]] = {}
    label_limit = num_classes if num_classes is not None else (len(class_names) or None)
    for split, samples in splits.items():
        with ShardWriter(root, split, samples_per_shard=samples_per_shard) as writer:
            for sample in samples:
                if label_limit is not None and sample.label >= label_limit:
                    raise ValueError(
                        f"sample {sample.key!r}: label {sample.label} >= the {label_limit} classes"
                    )
                writer.write(sample)
        if not writer.shards:
            raise ValueError(f"split {split!r} has no samples; a manifest split needs at least one shard")
        written[split] = writer.shards
    body = manifest_dict(name, written, class_names=class_names, num_classes=num_classes, extra=extra)
    return write_manifest(root, body)
