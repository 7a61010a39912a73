"""A small, learnable synthetic image classification set, written as real shards.

It stands in for ImageNet wherever there is none (the embedded default, tests, the local stack): the
same writer, manifest and loader run on it. Each class is one shape (circle, square, triangle, ring,
plus, stripes, diamond, checkers, X) drawn in its own hue, at a random place and scale, on a random
low-saturation background with pixel noise; hue is jittered and one image in five gets a random hue, so
a model has to use shape as well as colour. Images are JPEG; every image is a pure function of
(seed, split, index), so the set is identical wherever it is generated.
"""

from __future__ import annotations

import colorsys
import fcntl
import hashlib
import io
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from metaformer_platform.data.build.writer import Sample, write_dataset
from metaformer_platform.data.manifest import INFO_NAME, load_manifest

__all__ = ["SHAPES", "ensure_synthetic_shards", "synthetic_samples"]

GENERATOR = "shapes-v1"  # bump when the images change, so old caches are not reused
SHAPES = (
    "circle",
    "square",
    "triangle",
    "ring",
    "plus",
    "hstripes",
    "vstripes",
    "diamond",
    "checkers",
    "xcross",
)
_SPLIT_CODES = {"train": 0, "val": 1}


def _rgb(hue: float, sat: float, val: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(hue % 1.0, sat, val)
    return int(r * 255), int(g * 255), int(b * 255)


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float], color, width: int
):
    x0, y0, x1, y1 = box
    cx, cy, w = (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=color)
    elif shape == "ring":
        draw.ellipse(box, outline=color, width=width)
    elif shape == "plus":
        draw.rectangle((cx - width / 2, y0, cx + width / 2, y1), fill=color)
        draw.rectangle((x0, cy - width / 2, x1, cy + width / 2), fill=color)
    elif shape in ("hstripes", "vstripes"):
        step = max(2, int(w / 4))
        for k in range(4):
            off = k * step
            if shape == "hstripes":
                draw.rectangle((x0, y0 + off, x1, y0 + off + step / 2), fill=color)
            else:
                draw.rectangle((x0 + off, y0, x0 + off + step / 2, y1), fill=color)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=color)
    elif shape == "checkers":
        cell = w / 4
        for i in range(4):
            for j in range(4):
                if (i + j) % 2 == 0:
                    draw.rectangle(
                        (x0 + i * cell, y0 + j * cell, x0 + (i + 1) * cell, y0 + (j + 1) * cell), fill=color
                    )
    elif shape == "xcross":
        draw.line((x0, y0, x1, y1), fill=color, width=width)
        draw.line((x0, y1, x1, y0), fill=color, width=width)
    else:  # pragma: no cover - SHAPES lists every branch
        raise AssertionError(shape)


def _image(label: int, num_classes: int, size: int, rng: np.random.Generator, quality: int) -> bytes:
    bg = np.array(_rgb(rng.random(), rng.uniform(0, 0.35), rng.uniform(0.15, 0.85)), dtype=np.float32)
    pixels = bg + rng.normal(0, 18, size=(size, size, 3)).astype(np.float32)
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    hue = label / num_classes + rng.uniform(-0.3, 0.3) / num_classes
    if rng.random() < 0.2:
        hue = rng.random()
    color = _rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.65, 1.0))
    extent = rng.uniform(0.4, 0.8) * size
    x0 = rng.uniform(0, size - extent)
    y0 = rng.uniform(0, size - extent)
    width = max(2, int(round(extent / 5)))
    _draw_shape(ImageDraw.Draw(img), SHAPES[label], (x0, y0, x0 + extent, y0 + extent), color, width)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def synthetic_samples(
    split: str, count: int, *, num_classes: int, image_size: int, seed: int, quality: int = 90
) -> Iterator[Sample]:
    """The `count` samples of one split; labels cycle through the classes so every class is balanced."""
    code = _SPLIT_CODES.get(split, len(split) + 100)
    for index in range(count):
        label = index % num_classes
        rng = np.random.default_rng([seed, code, index])
        yield Sample(
            key=f"{split}_{index:07d}",
            image=_image(label, num_classes, image_size, rng, quality),
            label=label,
        )


def _is_complete(folder: Path, params: dict) -> bool:
    if not (folder / INFO_NAME).is_file():
        return False
    try:
        manifest = load_manifest(folder)
    except ValueError:
        return False
    return manifest.extra.get("params") == params


@dataclass(frozen=True)
class _SyntheticParams:
    """What a synthetic set is made from (checked on construction); its manifest records them."""

    num_classes: int
    train_samples: int
    val_samples: int
    image_size: int
    samples_per_shard: int
    seed: int

    def __post_init__(self) -> None:
        if type(self.num_classes) is not int or not 2 <= self.num_classes <= len(SHAPES):
            raise ValueError(
                f"num_classes must be an integer in [2, {len(SHAPES)}] (one shape each), got {self.num_classes!r}"
            )
        if type(self.image_size) is not int or not 16 <= self.image_size <= 256:
            raise ValueError(f"image_size must be an integer in [16, 256], got {self.image_size!r}")
        for name in ("train_samples", "val_samples", "samples_per_shard"):
            value = getattr(self, name)
            if type(value) is not int or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if type(self.seed) is not int or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")

    def recorded(self) -> dict[str, object]:
        """The parameters as the manifest records them (with the generator's version)."""
        return {"generator": GENERATOR, **asdict(self)}

    def folder_name(self) -> str:
        """A name derived from the parameters: changing one gives a new set."""
        digest = hashlib.sha256(json.dumps(self.recorded(), sort_keys=True).encode()).hexdigest()[:12]
        return f"synthetic-c{self.num_classes}-{self.image_size}px-{digest}"


def ensure_synthetic_shards(
    root: str | Path,
    *,
    num_classes: int = 10,
    train_samples: int = 2000,
    val_samples: int = 500,
    image_size: int = 32,
    samples_per_shard: int = 250,
    seed: int = 0,
) -> Path:
    """The folder (under `root`) holding the synthetic set for these parameters; generated on first use.

    The folder name is derived from the parameters, so changing one gives a new set and an existing one
    is reused as long as its manifest and shards check out. Concurrent callers (several ranks, several
    jobs) are serialised by a lock file, and the set is built in a temporary folder and renamed into
    place, so nobody ever sees half a set. Returns the folder that holds `_info.json`.
    """
    params = _SyntheticParams(num_classes, train_samples, val_samples, image_size, samples_per_shard, seed)
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    folder = root / params.folder_name()
    if _is_complete(folder, params.recorded()):  # the common case: no lock needed to read a finished set
        return folder
    with open(root / f".{folder.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _is_complete(folder, params.recorded()):  # else another process built it while we waited
            _build(folder, params)
    return folder


def _build(folder: Path, params: _SyntheticParams) -> None:
    """Write the set into a temporary folder beside ``folder``, then rename it into place."""
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        tmp.mkdir()
        common = {"num_classes": params.num_classes, "image_size": params.image_size, "seed": params.seed}
        write_dataset(
            tmp,
            {
                "train": synthetic_samples("train", params.train_samples, **common),
                "val": synthetic_samples("val", params.val_samples, **common),
            },
            name=f"synthetic-{GENERATOR}",
            samples_per_shard=params.samples_per_shard,
            class_names=SHAPES[: params.num_classes],
            extra={"params": params.recorded()},
        )
        if folder.exists():  # a broken leftover (crash, manual edit): replace it
            stale = folder.with_name(f".{folder.name}.stale-{uuid.uuid4().hex[:8]}")
            folder.rename(stale)
            shutil.rmtree(stale, ignore_errors=True)
        tmp.rename(folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
