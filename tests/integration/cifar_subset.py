"""A small subset of CIFAR-10's real photos (``../shared/data/cifar10``, present on the project's machines and in
CI, absent in a user's clone): an ImageFolder copy for a bare timm loop, and the same JPEGs as webdataset shards
(built by the platform's own builder) for a job. Shared by the real-photos job test and bench_defaults."""

from __future__ import annotations

import os
import tarfile
from collections import Counter
from pathlib import Path

CIFAR10 = Path(os.environ.get("METAFORMER_CIFAR10", Path(__file__).resolve().parents[3] / "shared" / "data" / "cifar10"))
MISSING = f"CIFAR-10 photos not found at {CIFAR10} (../shared/data/cifar10; set METAFORMER_CIFAR10 to its folder)"


def available() -> bool:
    return (CIFAR10 / "train.tar").is_file() and (CIFAR10 / "test.tar").is_file()


def extract(dest: Path, split: str, per_class: int) -> Path:
    """The first ``per_class`` photos of every class of ``split`` ("train" or "test") as ``dest/split/<class>/``."""
    taken: Counter[str] = Counter()
    with tarfile.open(CIFAR10 / f"{split}.tar") as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) != 3 or taken[parts[1]] >= per_class:
                continue
            taken[parts[1]] += 1
            out = dest / split / parts[1] / f"{parts[1]}_{parts[2]}"  # the builder keys samples by file name
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(tar.extractfile(member).read())  # type: ignore[union-attr]
    return dest / split


def shards(dest: Path, train_dir: Path, val_dir: Path, samples_per_shard: int = 500) -> Path:
    """``train_dir`` and ``val_dir`` (ImageFolders of the same classes) as shards + _info.json in ``dest``."""
    from metaformer_platform.data.build.builder import (
        BuildOptions,
        build_dataset,
        load_classes,
        plan_shards,
        scan_image_folder,
    )

    classes = load_classes(train_dir, require_wnids=False)
    splits = {"train": scan_image_folder(train_dir, classes), "val": scan_image_folder(val_dir, classes)}
    tasks = plan_shards(splits, BuildOptions(samples_per_shard=samples_per_shard), classes)
    build_dataset(dest, tasks, classes=classes, name="cifar10-subset", log=lambda _: None)
    return dest


def prepare(dest: Path, *, train_per_class: int, test_per_class: int) -> tuple[Path, Path, Path]:
    """(train ImageFolder, test ImageFolder, shards folder) of the subset, under ``dest``."""
    train_dir = extract(dest / "photos", "train", train_per_class)
    test_dir = extract(dest / "photos", "test", test_per_class)
    return train_dir, test_dir, shards(dest / "shards", train_dir, test_dir)
