"""Building ImageNet-style webdataset shards: scan, plan, build each shard (in parallel), manifest last.

    classes = load_classes(root / "train", classes_file="classes.tsv")
    splits = {"train": scan_image_folder(root / "train", classes),
              "val": scan_val_folder(root / "val", "LOC_val_solution.csv", classes)}
    tasks = plan_shards(splits, BuildOptions(samples_per_shard=1000, seed=0, max_side=512))
    build_dataset("s3://bucket/imagenet", tasks, classes=classes, name="imagenet-1k")

The unit of work is `build_shard(task, dest)`: it reads the task's source images, optionally re-encodes
them, writes one deterministic tar and uploads it; a thin job runs it as one Ray task per shard by passing
`run` to `build_dataset` (this package never imports Ray).

* Deterministic: samples are listed in sorted order, shuffled into shards by `seed`, and tars carry fixed
  headers, so the same input and options give byte-identical shards.
* Idempotent: after each shard, a receipt `_build/{shard}.json` records the task's fingerprint (its
  sources, their sizes and mtimes, and the encode options) and the shard's sha256. A re-run skips a shard
  whose receipt matches the task and whose stored object has that sha256, and rebuilds the rest.
* Safe to interrupt: the old `_info.json` is removed before any shard is (re)written and the new one is
  written only after every shard is complete.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import random
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from metaformer_platform.data.build.writer import Sample, shard_name, write_shard
from metaformer_platform.data.manifest import INFO_NAME, ShardInfo, manifest_dict
from metaformer_platform.storage.files import Store, open_store

__all__ = [
    "BuildOptions",
    "ClassList",
    "ShardTask",
    "SourceImage",
    "build_dataset",
    "build_shard",
    "is_image_folder_tree",
    "load_classes",
    "prepare_build",
    "plan_shards",
    "scan_image_folder",
    "scan_val_folder",
]

_log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
WNID = re.compile(r"^n\d{8}$")
RECEIPTS = "_build"
OWNER = f"{RECEIPTS}/owner.json"  # which build a destination holds: written before its first shard
BUILDER_VERSION = 1  # part of every fingerprint: bump when the bytes a task produces change


@dataclass(frozen=True)
class ClassList:
    """Label i is `wnids[i]` (named `names[i]`, when names are known)."""

    wnids: tuple[str, ...]
    names: tuple[str, ...] = ()
    source: str = ""

    def __post_init__(self) -> None:
        if self.names and len(self.names) != len(self.wnids):
            raise ValueError(f"{self.source}: {len(self.wnids)} wnids but {len(self.names)} names")

    def label(self, wnid: str, where: str) -> int:
        try:
            return self._index[wnid]
        except KeyError:
            raise ValueError(
                f"{where}: class {wnid!r} is not one of the {len(self.wnids)} classes"
                + (f" in {self.source}" if self.source else "")
                + "; remove it or use a classes file that lists it"
            ) from None

    @property
    def _index(self) -> dict[str, int]:
        cached = self.__dict__.get("_index_cache")
        if cached is None:
            cached = {w: i for i, w in enumerate(self.wnids)}
            object.__setattr__(self, "_index_cache", cached)
        return cached


@dataclass(frozen=True)
class SourceImage:
    """One input image and where it goes: its sample key and label."""

    path: str  # absolute
    rel: str  # relative to the split's input folder (recorded in the sample's .json)
    key: str
    label: int
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class BuildOptions:
    """How samples are cut into shards and (optionally) re-encoded."""

    samples_per_shard: int | None = 1000
    shard_bytes: int | None = None  # a budget on the source bytes per shard
    seed: int = 0
    shuffle: bool = True
    max_side: int | None = None  # re-encode so that the longer side is at most this (None: keep bytes)
    quality: int = 90
    with_json: bool = True  # a {key}.json with the source path and wnid

    def __post_init__(self) -> None:
        if self.samples_per_shard is None and self.shard_bytes is None:
            raise ValueError("set samples_per_shard, shard_bytes, or both")
        for name in ("samples_per_shard", "shard_bytes", "max_side"):
            value = getattr(self, name)
            if value is not None and (type(value) is not int or value <= 0):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"quality must be in 1..100, got {self.quality}")


@dataclass(frozen=True)
class ShardTask:
    """Everything needed to build one shard, and a fingerprint of it."""

    split: str
    index: int
    images: tuple[SourceImage, ...]
    max_side: int | None
    quality: int
    with_json: bool
    wnids: Mapping[int, str] = field(default_factory=dict)

    @property
    def filename(self) -> str:
        return shard_name(self.split, self.index)

    @property
    def fingerprint(self) -> str:
        body = {
            "version": BUILDER_VERSION,
            "filename": self.filename,
            "max_side": self.max_side,
            "quality": self.quality,
            "with_json": self.with_json,
            "wnids": sorted(self.wnids.items()),
            "images": [[i.rel, i.key, i.label, i.size, i.mtime_ns] for i in self.images],
        }
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class ShardResult:
    """A built (or skipped) shard and how long it took."""

    info: ShardInfo
    skipped: bool
    seconds: float


# -- inputs ---------------------------------------------------------------------------------------


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def load_classes(
    folder: str | Path | None = None, *, classes_file: str | Path | None = None, require_wnids: bool = True
) -> ClassList:
    """The class list: from `classes_file` (TSV `index<TAB>wnid[<TAB>name]`, with or without a header; or
    one wnid per line), else the sorted class folders of `folder`. Labels are the sorted-wnid indices."""
    if classes_file is not None:
        path = Path(classes_file)
        if not path.is_file():
            raise ValueError(f"classes file {path} does not exist")
        rows = [line.rstrip("\n").split("\t") for line in path.read_text().splitlines() if line.strip()]
        if rows and rows[0][0].strip().lower() == "index":
            rows = rows[1:]
        if not rows:
            raise ValueError(f"classes file {path} lists no classes")
        if len(rows[0]) == 1:
            wnids, names = [r[0].strip() for r in rows], []
        else:
            try:
                indices = [int(r[0]) for r in rows]
            except ValueError:
                raise ValueError(
                    f"{path}: the first column must be the class index (index<TAB>wnid<TAB>name)"
                ) from None
            if indices != list(range(len(rows))):
                raise ValueError(f"{path}: class indices must be 0..{len(rows) - 1} in order")
            wnids = [r[1].strip() for r in rows]
            names = [r[2].strip() if len(r) > 2 else r[1].strip() for r in rows]
        if wnids != sorted(wnids) or len(set(wnids)) != len(wnids):
            raise ValueError(
                f"{path}: wnids must be unique and sorted (ImageNet-1k labels are sorted-wnid indices)"
            )
        classes = ClassList(tuple(wnids), tuple(names), source=str(path))
    else:
        if folder is None:
            raise ValueError("give a classes file or an ImageFolder to take the classes from")
        root = Path(folder)
        if not root.is_dir():
            raise ValueError(f"ImageFolder {root} does not exist or is not a folder")
        wnids = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not wnids:
            raise ValueError(f"ImageFolder {root} has no class folders (expected {root}/<wnid>/*.JPEG)")
        classes = ClassList(tuple(wnids), source=str(root))
    if require_wnids:
        bad = [w for w in classes.wnids if not WNID.match(w)]
        if bad:
            raise ValueError(
                f"{classes.source}: {bad[0]!r} is not a WordNet id (n + 8 digits, e.g. n01440764)"
                + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")
                + "; rename the class folders, or for a non-ImageNet set pass --any-class-names to "
                "jobs/build_shards.py (require_wnids=False in Python)"
            )
    return classes


def _key_of(path: Path) -> str:
    # webdataset splits a member name at the first dot: keep the key free of dots
    return path.stem.replace(".", "_")


def _source(path: Path, root: Path, label: int) -> SourceImage:
    st = path.stat()
    return SourceImage(
        str(path.resolve()),
        path.relative_to(root).as_posix(),
        _key_of(path),
        label,
        st.st_size,
        st.st_mtime_ns,
    )


def _unique_keys(images: Sequence[SourceImage], where: Path) -> None:
    seen: dict[str, str] = {}
    for image in images:
        if image.key in seen:
            raise ValueError(
                f"{where}: {seen[image.key]} and {image.rel} give the same sample key {image.key!r}; "
                "rename one of them (keys are file names without extension)"
            )
        seen[image.key] = image.rel


def scan_image_folder(folder: str | Path, classes: ClassList) -> list[SourceImage]:
    """Every image of an ImageFolder tree (`folder/<wnid>/*.JPEG`), labelled by `classes`, sorted."""
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"ImageFolder {root} does not exist or is not a folder")
    images = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        label = classes.label(class_dir.name, str(class_dir))
        images += [_source(p, root, label) for p in sorted(class_dir.iterdir()) if _is_image(p)]
    if not images:
        raise ValueError(
            f"ImageFolder {root} has no images ({'/'.join(IMAGE_SUFFIXES)}) in its class folders; "
            f"expected {root}/<wnid>/<name>.JPEG"
        )
    _unique_keys(images, root)
    return images


def _read_val_labels(labels_file: Path) -> dict[str, str]:
    """{file stem: wnid} from LOC_val_solution.csv (`ImageId,PredictionString`) or `<file> <wnid>` lines."""
    if not labels_file.is_file():
        raise ValueError(f"validation labels file {labels_file} does not exist")
    text = labels_file.read_text()
    labels: dict[str, str] = {}
    if text.startswith("ImageId,"):
        for row in csv.DictReader(io.StringIO(text)):
            tokens = (row.get("PredictionString") or "").split()
            if not tokens:
                raise ValueError(f"{labels_file}: image {row.get('ImageId')!r} has an empty PredictionString")
            labels[Path(row["ImageId"]).stem] = tokens[0]
    else:
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"{labels_file}:{number}: expected '<file> <wnid>', got {line!r}")
            labels[Path(parts[0]).stem] = parts[1]
    if not labels:
        raise ValueError(f"validation labels file {labels_file} lists no images")
    return labels


def is_image_folder_tree(folder: str | Path) -> bool:
    """Whether ``folder`` is laid out as an ImageFolder tree (``<wnid>/*.JPEG``, as most ImageNet preparations
    leave ``val/``) rather than ImageNet's flat validation folder: it has class folders and no images of its own."""
    root = Path(folder)
    if not root.is_dir():
        return False
    entries = list(root.iterdir())
    has_classes = any(p.is_dir() and not p.name.startswith(".") for p in entries)
    return has_classes and not any(_is_image(p) for p in entries)


def scan_val_folder(folder: str | Path, labels_file: str | Path, classes: ClassList) -> list[SourceImage]:
    """ImageNet's validation layout: a flat folder of images and a labels file naming each one's wnid."""
    root, labels_path = Path(folder), Path(labels_file)
    if not root.is_dir():
        raise ValueError(f"validation folder {root} does not exist or is not a folder")
    labels = _read_val_labels(labels_path)
    files = {p.stem: p for p in sorted(root.iterdir()) if _is_image(p)}
    if not files:
        raise ValueError(f"validation folder {root} has no images ({'/'.join(IMAGE_SUFFIXES)})")
    unknown = sorted(set(labels) - set(files))
    if unknown:
        raise ValueError(
            f"{labels_path} names {len(unknown)} file(s) that are not in {root}: "
            + ", ".join(unknown[:5])
            + (" ..." if len(unknown) > 5 else "")
            + "; use the labels file that belongs to this folder"
        )
    unlabelled = sorted(set(files) - set(labels))
    if unlabelled:
        raise ValueError(
            f"{root}: {len(unlabelled)} image(s) have no label in {labels_path}: "
            + ", ".join(unlabelled[:5])
            + "; remove them or complete the labels file"
        )
    images = [
        _source(files[stem], root, classes.label(labels[stem], f"{labels_path} ({stem})"))
        for stem in sorted(files)
    ]
    _unique_keys(images, root)
    return images


# -- plan -----------------------------------------------------------------------------------------


def _cut(images: Sequence[SourceImage], options: BuildOptions) -> list[list[SourceImage]]:
    shards: list[list[SourceImage]] = []
    current: list[SourceImage] = []
    nbytes = 0
    for image in images:
        full = options.samples_per_shard is not None and len(current) >= options.samples_per_shard
        over = options.shard_bytes is not None and current and nbytes + image.size > options.shard_bytes
        if full or over:
            shards.append(current)
            current, nbytes = [], 0
        current.append(image)
        nbytes += image.size
    if current:
        shards.append(current)
    return shards


def plan_shards(
    splits: Mapping[str, Sequence[SourceImage]], options: BuildOptions, classes: ClassList | None = None
) -> dict[str, list[ShardTask]]:
    """Cut each split into shard tasks: sorted, then shuffled by (seed, split) when `options.shuffle`."""
    plan = {}
    for split, images in splits.items():
        if not split or "/" in split or "-" in split:
            raise ValueError(f"split name {split!r} must be non-empty with no '/' or '-'")
        if not images:
            raise ValueError(f"split {split!r} has no images")
        ordered = sorted(images, key=lambda i: i.rel)
        if options.shuffle:
            random.Random(f"build:{options.seed}:{split}").shuffle(ordered)
        wnids = dict(enumerate(classes.wnids)) if classes is not None and options.with_json else {}
        plan[split] = [
            ShardTask(
                split,
                index,
                tuple(chunk),
                options.max_side,
                options.quality,
                options.with_json,
                {i.label: wnids[i.label] for i in chunk if i.label in wnids},
            )
            for index, chunk in enumerate(_cut(ordered, options))
        ]
    return plan


# -- one shard ------------------------------------------------------------------------------------


def _encode(path: str, max_side: int | None, quality: int) -> bytes:
    data = Path(path).read_bytes()
    if max_side is None:
        return data
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.draft(
                "RGB", (max_side, max_side)
            )  # DCT-domain downscale first: much faster, still >= max_side
            rgb = img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(
            f"{path}: cannot decode this image to re-encode it ({err}); replace or remove it"
        ) from None
    scale = max_side / max(rgb.size)
    if scale < 1:
        size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
        rgb = rgb.resize(size, Image.Resampling.BICUBIC)
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def _samples(task: ShardTask) -> Iterator[Sample]:
    for image in task.images:
        meta = {"path": image.rel, "wnid": task.wnids.get(image.label)} if task.with_json else None
        yield Sample(image.key, _encode(image.path, task.max_side, task.quality), image.label, meta)


def _receipt_name(filename: str) -> str:
    return f"{RECEIPTS}/{Path(filename).stem}.json"


def _existing(task: ShardTask, storage: Store) -> ShardInfo | None:
    """The shard as a previous run left it, when it is complete and was built from this same task."""
    name = _receipt_name(task.filename)
    if not storage.exists(name) or not storage.exists(task.filename):
        return None
    try:
        receipt = json.loads(storage.read_bytes(name))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if receipt.get("fingerprint") != task.fingerprint:
        return None
    if storage.size(task.filename) != receipt.get("num_bytes") or storage.sha256(
        task.filename
    ) != receipt.get("sha256"):
        return None
    return ShardInfo(task.filename, receipt["num_samples"], receipt["sha256"], receipt["num_bytes"])


def build_shard(task: ShardTask, dest: str | Path | Store) -> ShardResult:
    """Build one shard into `dest` (a folder, file:// or s3:// URL), unless it is already there intact."""
    start = time.perf_counter()
    storage = open_store(dest) if isinstance(dest, (str, Path)) else dest
    done = _existing(task, storage)
    if done is not None:
        return ShardResult(done, True, time.perf_counter() - start)
    # A local destination gets the tar written next to it (then renamed); others via a temp folder + upload.
    scratch = (
        tempfile.TemporaryDirectory(dir=storage.root.path, prefix=".build-")
        if not storage.root.remote
        else tempfile.TemporaryDirectory(prefix="shard-build-")
    )
    with scratch as tmp:
        local = Path(tmp) / task.filename
        info = write_shard(local, _samples(task))
        storage.upload_file(task.filename, local, sha256=info.sha256)
    receipt = {"fingerprint": task.fingerprint, **asdict(info)}
    storage.write_bytes(_receipt_name(task.filename), json.dumps(receipt, sort_keys=True).encode())
    return ShardResult(info, False, time.perf_counter() - start)


# -- the whole build ------------------------------------------------------------------------------


def run_serially(tasks: Sequence[ShardTask], dest: str | Path) -> Iterator[ShardResult]:
    """The default executor: one shard after another in this process."""
    for task in tasks:
        yield build_shard(task, dest)


def build_id(name: str, tasks: Sequence[ShardTask]) -> str:
    """What a build is: its data set name and every shard's fingerprint (sources, options, builder version)."""
    return hashlib.sha256(json.dumps([name, sorted(t.fingerprint for t in tasks)]).encode()).hexdigest()


def _contents(storage: Store) -> list[str] | None:
    """The names under a destination (None: the key may not list it)."""
    if not storage.root.remote:
        folder = storage.root.path
        return [p.name for p in folder.iterdir()] if folder.is_dir() else []
    stats = storage.listing()
    return None if stats is None else list(stats)


def claim_destination(storage: Store, build: str, *, overwrite: bool = False) -> None:
    """Make `storage` this build's destination: fine when it is empty or holds this same build (a re-run
    resumes); a folder of other files, or another build's shards, is refused unless `overwrite`, since
    the build replaces `_info.json` and same-named shards."""
    names = _contents(storage)
    owner = json.loads(storage.read_bytes(OWNER)) if storage.exists(OWNER) else None
    occupied = bool(names) if names is not None else storage.exists(INFO_NAME) or owner is not None
    if occupied and not overwrite and (owner or {}).get("build") != build:
        what = "another build (other sources, options or --name)" if owner else (
            f"files this builder did not write ({', '.join(sorted(names)[:3]) if names else INFO_NAME}...)"
        )
        raise ValueError(
            f"the destination {storage.url} is not empty: it holds {what}; building there would replace its "
            "_info.json and same-named shards. Choose an empty destination, or pass --overwrite to replace it"
        )
    if not storage.root.remote:
        storage.root.path.mkdir(parents=True, exist_ok=True)
    storage.write_bytes(OWNER, json.dumps({"build": build}).encode())


def build_dataset(
    dest: str | Path,
    tasks: Mapping[str, Sequence[ShardTask]],
    *,
    classes: ClassList,
    name: str = "imagenet",
    extra: Mapping[str, Any] | None = None,
    run: Callable[[Sequence[ShardTask], str | Path], Iterable[ShardResult]] = run_serially,
    log: Callable[[str], None] = _log.info,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Build every shard (`run` may execute them in parallel and yield results in any order), then write
    `_info.json`; returns the manifest. Logs one line per shard with samples/s and the ETA.

    `dest` must be empty, or hold this same build (then intact shards are kept): anything else is refused
    with a ValueError before a byte is written, unless `overwrite`."""
    storage = open_store(dest)
    everything = [t for split in tasks.values() for t in split]
    claim_destination(storage, build_id(name, everything), overwrite=overwrite)
    storage.delete(INFO_NAME)  # until the new build is complete
    total = sum(len(t.images) for t in everything)
    results: dict[str, ShardInfo] = {}
    done_samples = built_samples = skipped = 0
    start = time.perf_counter()
    for result in run(everything, dest):
        info = result.info
        results[info.filename] = info
        done_samples += info.num_samples
        skipped += result.skipped
        if not result.skipped:
            built_samples += info.num_samples
        elapsed = time.perf_counter() - start
        rate = built_samples / elapsed if elapsed > 0 else 0.0
        eta = (total - done_samples) / rate if rate > 0 else 0.0
        log(
            f"{info.filename}: {'present, checksum ok, skipped' if result.skipped else f'{info.num_samples} samples in {result.seconds:.1f} s ({info.num_samples / max(result.seconds, 1e-9):.0f}/s)'}; "
            f"{len(results)}/{len(everything)} shards, {done_samples}/{total} samples, {rate:.0f} samples/s, ETA {eta:.0f} s"
        )
    missing = [t.filename for t in everything if t.filename not in results]
    if missing:
        raise RuntimeError(f"the build returned no result for {missing[:5]}; no manifest was written")
    for task in everything:
        if results[task.filename].num_samples != len(task.images):
            raise RuntimeError(
                f"{task.filename}: built {results[task.filename].num_samples} samples, planned {len(task.images)}"
            )
    body = manifest_dict(
        name,
        {split: [results[t.filename] for t in split_tasks] for split, split_tasks in tasks.items()},
        class_names=classes.names or classes.wnids,
        extra={"wnids": list(classes.wnids), **(extra or {})},
    )
    storage.write_bytes(INFO_NAME, (json.dumps(body, indent=1) + "\n").encode())
    log(
        f"wrote {storage.describe(INFO_NAME)}: {len(everything)} shards ({skipped} already present), {total} samples "
        f"in {time.perf_counter() - start:.1f} s"
    )
    return body


def prepare_build(
    *,
    train: str | Path | None = None,
    val: str | Path | None = None,
    val_labels: str | Path | None = None,
    classes_file: str | Path | None = None,
    require_wnids: bool = True,
    options: BuildOptions,
) -> tuple[ClassList, dict[str, list[ShardTask]]]:
    """Scan the inputs (an ImageFolder `train`; `val` either as an ImageFolder tree, detected by its layout,
    or as ImageNet's flat folder + `val_labels`) and plan the shards.

    Every input error is raised here, as a ValueError naming the file, before any work starts."""
    if train is None and val is None:
        raise ValueError(
            "nothing to build: give a train ImageFolder and/or a val folder (an ImageFolder tree, or a flat "
            "folder with its labels file)"
        )
    val_tree = val is not None and is_image_folder_tree(val)
    if val is None and val_labels is not None:
        raise ValueError(f"a labels file ({val_labels}) was given without the val folder it labels")
    if val_tree and val_labels is not None:
        raise ValueError(
            f"{val} is an ImageFolder tree (<wnid>/*.JPEG): its folders are its labels; drop the labels file "
            f"{val_labels}, which only a flat val folder needs"
        )
    if val is not None and not val_tree and val_labels is None:
        raise ValueError(
            f"{val} is a flat folder of images: give its labels file (LOC_val_solution.csv or '<file> <wnid>' "
            "lines), or lay it out as an ImageFolder tree (<wnid>/*.JPEG)"
        )
    if classes_file is None and train is None:
        raise ValueError(
            "a val-only build needs a classes file (index<TAB>wnid<TAB>name) to number the classes"
        )
    classes = load_classes(train, classes_file=classes_file, require_wnids=require_wnids)
    splits: dict[str, list[SourceImage]] = {}
    if train is not None:
        splits["train"] = scan_image_folder(train, classes)
    if val_tree:
        splits["val"] = scan_image_folder(val, classes)  # type: ignore[arg-type]  # val_tree implies val
    elif val is not None and val_labels is not None:
        splits["val"] = scan_val_folder(val, val_labels, classes)
    return classes, plan_shards(splits, options, classes)
