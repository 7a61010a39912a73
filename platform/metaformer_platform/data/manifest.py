"""The `_info.json` shard manifest: the timm `wds/` schema plus checksums and class names.

Schema (keys timm's `ReaderWds` reads are marked *)::

    {
      "name": "imagenet-1k",                      *  dataset name
      "format": "metaformer-wds", "version": 1,      what wrote it
      "num_classes": 1000, "class_names": [...],     label i is class_names[i]
      "splits": {                                 *
        "train": {
          "name": "train",                        *  timm requires it (== the key)
          "num_samples": 1281167,                 *  == sum(shard_lengths)
          "filenames": ["train-000000.tar", ...], *  relative to the folder holding _info.json
          "shard_lengths": [1252, ...],           *  samples per shard, same order
          "shard_sha256": ["9f2c...", ...],          hex digest of each whole tar
          "shard_bytes": [131072000, ...]            size of each tar
        },
        "val": {...}
      },
      "extra": {...}                                 free-form provenance (generator parameters, source)
    }

Each sample in a shard is `{key}.jpg` + `{key}.cls` (the label as ASCII digits) + an optional `{key}.json`.

A data source names a folder (or URL prefix) holding `_info.json`, the manifest file itself
(`.../_info.json` or another `*.json` name), or a brace pattern of shards
(`s3://bucket/imagenet/{train-{000000..000099},val-{000000..000009}}.tar`, webdataset's syntax). A pattern
selects shards: with a manifest beside them their splits and lengths come from it; without one, each shard's
split is its name's `{split}-NNNNNN.tar` prefix and its length is counted by reading it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metaformer_platform.storage.files import Store, open_store

log = logging.getLogger(__name__)

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "INFO_NAME",
    "MAX_MANIFEST_BYTES",
    "Manifest",
    "ManifestError",
    "ShardInfo",
    "SplitInfo",
    "load_manifest",
    "manifest_dict",
    "verify_checksums",
    "write_manifest",
]

INFO_NAME = "_info.json"
FORMAT = "metaformer-wds"
FORMAT_VERSION = 1
BUILD_HINT = (
    "build shards with `python jobs/build_shards.py` (or `ensure_synthetic_shards()` for the built-in "
    "synthetic set), or point the data source at a folder that has one"
)
# An ImageNet manifest is about 200 KB (1,152 shards, 1,000 class names); a manifest is read whole and parsed
# in memory, so one from storage is refused past this size before a byte of it is parsed.
MAX_MANIFEST_BYTES = 64 << 20


class ManifestError(ValueError):
    """A manifest that cannot be used: unreadable, too large, not JSON, or not the schema; the message names the
    file, the problem and the fix."""


@dataclass(frozen=True)
class ShardInfo:
    """One written shard: what the writer reports and the manifest lists."""

    filename: str
    num_samples: int
    sha256: str
    num_bytes: int


@dataclass(frozen=True)
class SplitInfo:
    """One split of a manifest; the lists are parallel, one entry per shard."""

    name: str
    filenames: tuple[str, ...]
    shard_lengths: tuple[int, ...]
    shard_sha256: tuple[str, ...] = ()
    shard_bytes: tuple[int, ...] = ()

    @property
    def num_samples(self) -> int:
        return sum(self.shard_lengths)

    @property
    def num_shards(self) -> int:
        return len(self.filenames)


@dataclass(frozen=True)
class Manifest:
    """A validated `_info.json` together with the storage it was read from."""

    name: str
    splits: Mapping[str, SplitInfo]
    storage: Store
    class_names: tuple[str, ...] = ()
    num_classes: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    info_name: str = INFO_NAME  # the manifest's file name in `storage` (another name when given as a file)

    @property
    def url(self) -> str:
        return self.storage.url

    def split(self, name: str) -> SplitInfo:
        """The named split, or a ValueError that lists the ones there are."""
        if name not in self.splits:
            raise ValueError(
                f"{self.storage.describe(self.info_name)}: unknown split {name!r}; this manifest has "
                f"{sorted(self.splits)}; pass one of those as the split"
            )
        return self.splits[name]


def _listing(names: Sequence[str], shown: int = 5) -> str:
    """The first few names, and how many more there are."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _fail(where: str, problem: str, fix: str) -> ManifestError:
    return ManifestError(f"{where}: {problem}; {fix}")


def _parse_split(where: str, key: str, raw: object) -> SplitInfo:
    fix = "rebuild the shards (the manifest is written by the shard writer, not by hand)"
    if not isinstance(raw, Mapping):
        raise _fail(where, f"split {key!r} must be an object, got {type(raw).__name__}", fix)
    for required in ("filenames", "shard_lengths", "num_samples"):
        if required not in raw:
            raise _fail(where, f"split {key!r} has no {required!r}", fix)
    filenames, lengths = raw["filenames"], raw["shard_lengths"]
    if not isinstance(filenames, list) or not all(isinstance(f, str) and f for f in filenames):
        raise _fail(where, f"split {key!r}: 'filenames' must be a list of shard file names", fix)
    if not filenames:
        raise _fail(where, f"split {key!r} lists no shards", fix)
    if len(set(filenames)) != len(filenames):
        raise _fail(where, f"split {key!r} lists a shard more than once", fix)
    for name in filenames:  # split, not Path(name).parts: the same answer, 10x cheaper on 14,000 names
        if name.startswith("/") or "://" in name or ".." in name.split("/"):
            raise _fail(where, f"split {key!r}: shard name {name!r} must be relative to the manifest", fix)
    if not isinstance(lengths, list) or not all(type(n) is int and n >= 0 for n in lengths):
        raise _fail(where, f"split {key!r}: 'shard_lengths' must be a list of non-negative integers", fix)
    if len(lengths) != len(filenames):
        raise _fail(
            where, f"split {key!r} lists {len(filenames)} filenames but {len(lengths)} shard_lengths", fix
        )
    num_samples = raw["num_samples"]
    if type(num_samples) is not int or num_samples != sum(lengths):
        raise _fail(
            where,
            f"split {key!r}: num_samples is {num_samples!r} but its shard_lengths sum to {sum(lengths)}",
            fix,
        )
    if raw.get("name", key) != key:
        raise _fail(where, f"split {key!r} has name {raw.get('name')!r} (must equal its key)", fix)
    sha = raw.get("shard_sha256", [])
    sizes = raw.get("shard_bytes", [])
    for label, values, kind in (("shard_sha256", sha, str), ("shard_bytes", sizes, int)):
        if values and (
            not isinstance(values, list)
            or len(values) != len(filenames)
            or not all(type(v) is kind for v in values)
        ):
            raise _fail(where, f"split {key!r}: {label!r} must list one {kind.__name__} per shard", fix)
    return SplitInfo(
        name=key,
        filenames=tuple(filenames),
        shard_lengths=tuple(lengths),
        shard_sha256=tuple(sha),
        shard_bytes=tuple(sizes),
    )


def load_manifest(source: str | Path | Store, *, check_files: bool = True) -> Manifest:
    """Read and validate the manifest of `source`: a folder, URL or `Store` holding `_info.json`, the
    manifest file itself (`*.json`), or a brace pattern of shards (see the module docstring).

    With `check_files` (the default) every listed shard must exist (and have the listed size, when the
    manifest records sizes); checksums are only compared by `verify_checksums`, which reads every byte.
    """
    info_name = INFO_NAME
    if isinstance(source, (str, Path)):
        text = os.fspath(source)
        if "{" in text:
            return _manifest_of_pattern(text, check_files=check_files)
        if text.endswith(".json"):
            parent, _, info_name = text.rstrip("/").rpartition("/")
            source = parent if isinstance(source, str) else Path(parent or ".")
            if isinstance(source, str) and not _has_path(source):
                raise ValueError(f"data source {text!r}: a manifest URL needs a bucket or folder before the file name")
        storage = open_store(source or ".")
    else:
        storage = source
    where = storage.describe(info_name)
    if not storage.exists(info_name):
        raise ManifestError(f"no shards found in {storage.url}: expected {where}; {BUILD_HINT}")
    manifest = parse_manifest(_read_capped(storage, info_name), storage, info_name)
    if check_files:
        _check_files(manifest)
    return manifest


def _read_capped(storage: Store, name: str) -> bytes:
    """The file's bytes, refused past MAX_MANIFEST_BYTES from a bounded read (a size another writer reports is
    not trusted)."""
    with storage.open(name) as stream:
        data = stream.read(MAX_MANIFEST_BYTES + 1)
    if len(data) > MAX_MANIFEST_BYTES:
        raise _fail(
            storage.describe(name), f"the manifest is larger than {MAX_MANIFEST_BYTES} bytes (MAX_MANIFEST_BYTES)",
            "it is not one the shard writer made: rebuild the shards",
        )
    return data


def parse_manifest(data: bytes, storage: Store, info_name: str = INFO_NAME) -> Manifest:
    """A manifest from the bytes of `_info.json` (as `load_manifest` read them from `storage`), validated:
    anything else is a ManifestError naming the file."""
    where = storage.describe(info_name)
    try:
        raw = json.loads(data)
    except RecursionError:  # nesting deeper than the interpreter's stack: json raises this, not a ValueError
        raise _fail(where, "not valid JSON (nested too deeply)", "rebuild the shards or fix the file") from None
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, an integer past int_max_str_digits
        raise _fail(where, f"not valid JSON ({str(err)[:200]})", "rebuild the shards or fix the file") from None
    if not isinstance(raw, Mapping):
        raise _fail(where, "the manifest must be a JSON object", "rebuild the shards")
    splits_raw = raw.get("splits")
    if not isinstance(splits_raw, Mapping) or not splits_raw:
        raise _fail(where, "has no 'splits' object (timm's wds schema needs one)", "rebuild the shards")
    splits = {key: _parse_split(where, key, value) for key, value in splits_raw.items()}

    class_names = raw.get("class_names", [])
    if not isinstance(class_names, list) or not all(isinstance(c, str) for c in class_names):
        raise _fail(where, "'class_names' must be a list of strings", "rebuild the shards")
    num_classes = raw.get("num_classes", len(class_names) or None)
    if num_classes is not None and (type(num_classes) is not int or num_classes <= 0):
        raise _fail(
            where, f"'num_classes' must be a positive integer, got {num_classes!r}", "rebuild the shards"
        )
    if class_names and num_classes != len(class_names):
        raise _fail(
            where,
            f"num_classes is {num_classes} but {len(class_names)} class_names are listed",
            "rebuild the shards",
        )
    name, extra = raw.get("name", ""), raw.get("extra", {})
    if not isinstance(name, str) or not isinstance(extra, Mapping):
        raise _fail(where, "'name' must be a string and 'extra' an object", "rebuild the shards")
    return Manifest(
        name=name,
        splits=splits,
        storage=storage,
        class_names=tuple(class_names),
        num_classes=num_classes,
        extra=dict(extra),
        info_name=info_name,
    )


_SHARD_NAME = re.compile(r"^(?P<split>.+)-\d+\.tar$")


def _has_path(source: str) -> bool:
    """Whether a source names a folder or bucket (``s3://`` alone does not)."""
    return bool(source.partition("://")[2] if "://" in source else source)


def _manifest_of_pattern(pattern: str, *, check_files: bool) -> Manifest:
    """The shards a brace pattern names, as a manifest: a subset of the manifest beside them when there is
    one, else one split per `{split}-NNNNNN.tar` prefix with lengths counted by reading each shard."""
    from braceexpand import braceexpand

    root, _, _ = pattern[: pattern.index("{")].rpartition("/")
    if not root or not _has_path(root):
        raise ValueError(
            f"data source {pattern!r}: put the brace pattern after a folder or bucket prefix, e.g. "
            "s3://bucket/imagenet/train-{000000..000099}.tar"
        )
    names = [url[len(root) + 1 :] for url in braceexpand(pattern)]
    if len(set(names)) != len(names):
        raise ValueError(f"data source {pattern!r} names a shard more than once; fix the pattern")
    storage = open_store(root)
    if not storage.exists(INFO_NAME):
        return _counted_manifest(pattern, root.rpartition("/")[2], names, storage)
    manifest = _subset_manifest(pattern, names, load_manifest(storage, check_files=False))
    if check_files:
        _check_files(manifest)
    return manifest


def _subset_manifest(pattern: str, names: Sequence[str], full: Manifest) -> Manifest:
    """The part of ``full`` (the manifest beside the shards) that the pattern's shard ``names`` cover."""
    listed = {name for split in full.splits.values() for name in split.filenames}
    unknown = [name for name in names if name not in listed]
    if unknown:
        raise ValueError(
            f"data source {pattern!r}: {len(unknown)} shard(s) are not listed in "
            f"{full.storage.describe(INFO_NAME)}: {_listing(unknown)}; fix the pattern or rebuild the manifest"
        )
    wanted = set(names)
    splits: dict[str, SplitInfo] = {}
    for split in full.splits.values():
        picked = [i for i, name in enumerate(split.filenames) if name in wanted]
        if picked:
            splits[split.name] = SplitInfo(
                name=split.name,
                filenames=tuple(split.filenames[i] for i in picked),
                shard_lengths=tuple(split.shard_lengths[i] for i in picked),
                shard_sha256=tuple(split.shard_sha256[i] for i in picked) if split.shard_sha256 else (),
                shard_bytes=tuple(split.shard_bytes[i] for i in picked) if split.shard_bytes else (),
            )
    return Manifest(
        name=full.name, splits=splits, storage=full.storage, class_names=full.class_names,
        num_classes=full.num_classes, extra={**full.extra, "pattern": pattern},
    )


def _counted_manifest(pattern: str, name: str, names: Sequence[str], storage: Store) -> Manifest:
    """A manifest for shards with none beside them: split from each shard's name, lengths counted by reading."""
    from metaformer_platform.data.reader import count_samples

    grouped: dict[str, list[str]] = {}
    for shard in names:
        match = _SHARD_NAME.match(shard.rpartition("/")[2])
        if match is None:
            raise ValueError(
                f"data source {pattern!r}: shard {shard!r} is not named {{split}}-NNNNNN.tar and there is no "
                f"{storage.describe(INFO_NAME)} to say its split; rename the shards or build a manifest"
            )
        grouped.setdefault(match["split"], []).append(shard)
    missing = [shard for shard in names if not storage.exists(shard)]
    if missing:
        raise ValueError(
            f"data source {pattern!r}: {len(missing)} shard(s) do not exist in {storage.url}: "
            f"{_listing(missing)}; fix the pattern or copy the shards there"
        )
    log.warning(
        "%s has no %s: counting the samples of %d shards by reading them (build a manifest with "
        "jobs/build_shards.py to skip this)", storage.url, INFO_NAME, len(names),
    )
    splits = {
        split: SplitInfo(
            name=split,
            filenames=tuple(files),
            shard_lengths=tuple(count_samples(storage, shard) for shard in files),
            shard_bytes=tuple(storage.size(shard) for shard in files),
        )
        for split, files in grouped.items()
    }
    return Manifest(name=name, splits=splits, storage=storage, extra={"pattern": pattern})


def _check_files(manifest: Manifest) -> None:
    """Every listed shard exists with its listed size: a cheap check (a stat per file, or one S3 list
    request per 1000 objects), so a manifest that disagrees with its shards is refused before training."""
    storage = manifest.storage
    # one listing on S3 (where a HEAD per shard costs a request each; locally a stat per file is as cheap);
    # None also when listing is not allowed
    stats = storage.listing() if storage.root.remote else None
    listed = None if stats is None else {name: stat.size for name, stat in stats.items()}

    def size_of(name: str) -> int | None:
        if listed is not None:
            return listed.get(name)
        return storage.size(name) if storage.exists(name) else None

    missing, wrong_size = [], []
    for split in manifest.splits.values():
        for i, name in enumerate(split.filenames):
            size = size_of(name)
            if size is None:
                missing.append(name)
            elif split.shard_bytes and size != split.shard_bytes[i]:
                wrong_size.append(
                    f"{storage.describe(name)} ({size} bytes, manifest says {split.shard_bytes[i]})"
                )
    where = storage.describe(manifest.info_name)
    if missing:
        raise _fail(
            where,
            f"{len(missing)} listed shard file(s) are missing from {storage.url}: {_listing(missing)}",
            "copy the missing shards there or rebuild the shards",
        )
    if wrong_size:
        raise _fail(
            where, f"shard size differs from the manifest: {', '.join(wrong_size[:5])}", "rebuild the shards"
        )


def sha256_of(storage: Store, name: str) -> str:
    """A hash of the file's bytes as they are now (never a recorded digest)."""
    digest = hashlib.sha256()
    with storage.open(name) as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def verify_checksums(manifest: Manifest, split: str | None = None) -> int:
    """Re-hash every shard (of one split, or all) against the manifest; returns the number checked."""
    splits = [manifest.split(split)] if split is not None else list(manifest.splits.values())
    checked = 0
    for info in splits:
        if not info.shard_sha256:
            raise _fail(
                manifest.storage.describe(manifest.info_name),
                f"split {info.name!r} records no shard_sha256",
                "rebuild the shards with this platform's writer to get checksums",
            )
        for name, expected in zip(info.filenames, info.shard_sha256, strict=True):
            actual = sha256_of(manifest.storage, name)
            if actual != expected:
                raise ValueError(
                    f"{manifest.storage.describe(name)}: sha256 {actual} does not match the manifest's "
                    f"{expected}; the shard is corrupt or was replaced: rebuild or re-copy it"
                )
            checked += 1
    return checked


def manifest_dict(
    name: str,
    splits: Mapping[str, Sequence[ShardInfo]],
    *,
    class_names: Sequence[str] = (),
    num_classes: int | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON-ready manifest for written shards (see the module docstring for the schema)."""
    if class_names and num_classes is not None and num_classes != len(class_names):
        raise ValueError(f"num_classes={num_classes} but {len(class_names)} class_names were given")
    body: dict[str, Any] = {
        "name": name,
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "num_classes": num_classes if num_classes is not None else (len(class_names) or None),
        "class_names": list(class_names),
        "splits": {},
    }
    for split, shards in splits.items():
        body["splits"][split] = {
            "name": split,
            "num_samples": sum(s.num_samples for s in shards),
            "filenames": [s.filename for s in shards],
            "shard_lengths": [s.num_samples for s in shards],
            "shard_sha256": [s.sha256 for s in shards],
            "shard_bytes": [s.num_bytes for s in shards],
        }
    if body["num_classes"] is None:
        del body["num_classes"]
    if extra:
        body["extra"] = dict(extra)
    return body


def write_manifest(root: str | Path, body: Mapping[str, Any]) -> Path:
    """Write `_info.json` atomically (temp name + rename), so readers never see half a manifest."""
    root = Path(root)
    target = root / INFO_NAME
    tmp = root / f".{INFO_NAME}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(body, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, target)
    return target
