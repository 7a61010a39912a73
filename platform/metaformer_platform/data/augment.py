"""The paper's transform split where it is cheapest to run (timm's prefetcher split, on any device).

Loader workers run only what needs a PIL image: the random-resized crop, flip and RandAugment. They
ship uint8 HWC images (a quarter of float32's bytes through the worker queues, and no per-sample
float maths). The main process then converts a whole batch at once on the training device: uint8 ->
float, normalize, random erasing (`BatchTransform`); mixup/cutmix follow in the Trainer, as before.

Three more savings in the workers (`DraftRandomResizedCrop`):
* the crop box is drawn from the JPEG header's size before anything is decoded, and the JPEG is then
  decoded at the largest reduced DCT scale (1/2, 1/4, 1/8) whose crop still covers the output size; the
  box comes from timm's own `get_params`, so the crops are distributed exactly as timm's
  RandomResizedCrop (same draws, same boxes);
* the decode is simplejpeg's (libjpeg-turbo, accurate IDCT, no PIL plumbing), and the crop's bicubic or
  bilinear resize is torch's antialiased uint8 kernel (the same filter as PIL's to rounding, 2-4x
  faster); measured side by side in tests/benchmarks/bench_loader_decode.py;
* images are shipped HWC, so the batch is channels_last NCHW without a copy.

Random erasing is seeded per sample from the seed the worker used for that sample's augmentation
(`(seed, epoch, sample key)`, see loader._seed_sample), not from a global RNG, so a resumed job erases
exactly what the uninterrupted one did, whatever the batch order or the process it runs in.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import simplejpeg
import torch
import torch.nn.functional as F
from PIL import Image

from metaformer_platform.data.batch import BatchTransform
from metaformer_platform.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    check_transform_args,
    patch_timm_posterize,
)

__all__ = ["BatchTransform", "DraftRandomResizedCrop", "WorkerTransform", "build_split_transforms", "to_hwc_tensor"]

_DRAFT_SCALES = (8, 4, 2)
# Only the power-of-two DCT scales: libjpeg-turbo's other k/8 scales (3/8, 3/4, 7/8, ...) run a scalar
# IDCT that is slower than the full-size SIMD decode (measured in bench_loader_decode.py).
# Resize filters torch computes as PIL does (antialiased, PIL's kernels); others stay on PIL.
_TORCH_RESIZE = {"bilinear": "bilinear", "bicubic": "bicubic"}


def to_hwc_tensor(img: Image.Image) -> torch.Tensor:
    """A PIL RGB image as a uint8 HWC tensor (one copy, out of PIL's buffer)."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())


def _is_undecoded_jpeg(img: Image.Image) -> bool:
    return img.format == "JPEG" and bool(getattr(img, "tile", None))


class DraftRandomResizedCrop:
    """timm's RandomResizedCropAndInterpolation, decoding no more of a JPEG than the crop needs.

    Given a lazily opened image (`Image.open`, header read, pixels not yet decoded), the box is drawn
    by timm's `get_params` from the header's size, the JPEG is decoded at the largest DCT scale 1/s
    (s in 8, 4, 2) that still leaves the box at least the output size, and the scaled box is resized to
    the output (PIL resize with a fractional box). At s == 1 the box is cut out of the full decode and
    resized by torch's antialiased kernel (PIL's filter, to rounding).

    JPEGs in memory (the loader's) decode with simplejpeg; anything it refuses (CMYK, a corrupt or
    truncated stream, a warning in strict mode) and non-JPEG or already decoded images take the PIL
    path, which decodes what PIL can and raises for the rest as before (a bad sample to the loader).
    """

    def __init__(self, rrc: Any):
        self.rrc = rrc  # a timm RandomResizedCropAndInterpolation: size, scale, ratio, interpolation
        if isinstance(rrc.interpolation, (tuple, list)):
            raise ValueError("DraftRandomResizedCrop needs one interpolation, not timm's 'random'")
        from torchvision.transforms.functional import pil_modes_mapping

        self.resample = pil_modes_mapping[rrc.interpolation]
        self.torch_mode = _TORCH_RESIZE.get(rrc.interpolation.value)

    def box(self, img: Image.Image) -> tuple[int, int, int, int]:
        """(top, left, height, width): timm's draw for an image of `img.size` (the JPEG header's size)."""
        return self.rrc.get_params(img, self.rrc.scale, self.rrc.ratio)

    def __call__(self, img: Image.Image) -> Image.Image:
        i, j, h, w = self.box(img)
        out_w, out_h = self.rrc.size[1], self.rrc.size[0]
        scale = next((s for s in _DRAFT_SCALES if w >= s * out_w and h >= s * out_h), 1)
        data = _jpeg_in_memory(img)
        if data is not None:
            try:
                return self._turbo(data, img.size, (i, j, h, w), scale)
            except ValueError:
                pass  # libjpeg-turbo refused it: PIL decodes what it can below, and raises for the rest
        if scale > 1 and _is_undecoded_jpeg(img):
            # PIL picks the largest power of two <= min(W // req_w, H // req_h): this request gives `scale`
            full_w = img.size[0]
            drafted = img.draft("RGB", (img.size[0] // scale, img.size[1] // scale))
            scale = 1 if drafted is None else round(full_w / drafted[1][2])  # box: (0, 0, W/s, H/s)
        else:
            scale = 1
        if img.mode != "RGB":
            img = img.convert("RGB")
        if scale == 1:
            return img.crop((j, i, j + w, i + h)).resize((out_w, out_h), self.resample)
        return self._resize_scaled(img, (i, j, h, w), scale)

    def _turbo(self, data: bytes, size: tuple[int, int], box: tuple[int, int, int, int], scale: int) -> Image.Image:
        """Decode with simplejpeg at 1/scale, then crop and resize; ValueError when libjpeg-turbo refuses."""
        full_w, full_h = size
        # simplejpeg decodes at the smallest k/8 whose size reaches these: k = 8 / scale, a SIMD scale
        pixels = simplejpeg.decode_jpeg(
            data, "RGB", min_width=-(-full_w // scale), min_height=-(-full_h // scale)
        )
        scale = round(full_w / pixels.shape[1])
        i, j, h, w = box
        if scale > 1:
            return self._resize_scaled(Image.fromarray(pixels), box, scale)
        crop = pixels[i : i + h, j : j + w]
        out_h, out_w = self.rrc.size
        if self.torch_mode is None:
            return Image.fromarray(crop).resize((out_w, out_h), self.resample)
        nchw = torch.from_numpy(crop).permute(2, 0, 1)[None]
        resized = F.interpolate(nchw, size=(out_h, out_w), mode=self.torch_mode, antialias=True)
        return Image.fromarray(resized[0].permute(1, 2, 0).contiguous().numpy())

    def _resize_scaled(self, img: Image.Image, box: tuple[int, int, int, int], scale: int) -> Image.Image:
        """The box, in full-size pixels, out of an image decoded at 1/scale, resized to the output (PIL
        resize with a fractional box: the scaled box rarely falls on whole pixels)."""
        i, j, h, w = box
        scaled = (j / scale, i / scale, (j + w) / scale, (i + h) / scale)
        return img.resize((self.rrc.size[1], self.rrc.size[0]), self.resample, box=scaled)


def _jpeg_in_memory(img: Image.Image) -> bytes | None:
    """The bytes of an undecoded RGB or grayscale JPEG opened from memory (the loader's), else None."""
    fp = getattr(img, "fp", None)
    if _is_undecoded_jpeg(img) and img.mode in ("RGB", "L") and isinstance(fp, io.BytesIO):
        return fp.getvalue()
    return None


class WorkerTransform:
    """What a loader worker runs: a PIL image -> uint8 HWC tensor. With `lazy_decode`, the loader hands
    it the image undecoded (header read only) and the first step decodes it (DraftRandomResizedCrop)."""

    def __init__(self, steps: Sequence[Callable[[Any], Any]], *, lazy_decode: bool):
        self.steps = list(steps)
        self.lazy_decode = lazy_decode

    def __call__(self, img: Image.Image) -> torch.Tensor:
        if not self.lazy_decode and img.mode != "RGB":
            img = img.convert("RGB")
        for step in self.steps:
            img = step(img)
        return to_hwc_tensor(img)


def build_split_transforms(
    img_size: int,
    *,
    is_training: bool,
    device: torch.device | str = "cpu",
    memory_format: torch.memory_format = torch.contiguous_format,
    crop_pct: float = 0.9,
    auto_augment: str | None = "rand-m9-mstd0.5-inc1",
    re_prob: float = 0.25,
    re_mode: str = "pixel",
    re_count: int = 1,
    interpolation: str = "bicubic",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    hflip: float = 0.5,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    decode_device: str = "cpu",
) -> tuple[Any, Any]:
    """The paper's transform (the same as `build_transforms`) as (worker half, batch half).

    `build_transforms(...)(img)` and `batch(worker(img)[None], seed)` give the same tensor (to float
    tolerance) for the same RNG draws; random erasing differs in where its randomness comes from only.
    Training crops decode lazily (DraftRandomResizedCrop); evaluation resizes and centre-crops.
    `decode_device="cuda"`: the workers ship JPEG bytes and the batch half decodes, crops, flips, resizes,
    normalizes and erases on the (CUDA) training device (data/device_decode.py; no RandAugment there).
    """
    check_transform_args(img_size, crop_pct=crop_pct, re_prob=re_prob, hflip=hflip, mean=mean, std=std)
    if decode_device not in ("cpu", "cuda"):
        raise ValueError(f"decode_device must be 'cpu' or 'cuda', got {decode_device!r}")
    if decode_device == "cuda":
        return _device_decode_transforms(
            img_size, is_training=is_training, device=torch.device(device), memory_format=memory_format,
            crop_pct=crop_pct, auto_augment=auto_augment, re_prob=re_prob, re_mode=re_mode, re_count=re_count,
            interpolation=interpolation, mean=mean, std=std, hflip=hflip, scale=scale, ratio=ratio,
        )
    worker = _worker_transform(
        img_size, is_training=is_training, crop_pct=crop_pct, auto_augment=auto_augment,
        interpolation=interpolation, mean=mean, std=std, hflip=hflip, scale=scale, ratio=ratio,
    )
    batch = BatchTransform(
        device=device, mean=mean, std=std, re_prob=re_prob if is_training else 0.0, re_mode=re_mode,
        re_count=re_count, memory_format=memory_format,
    )
    return worker, batch


def _worker_transform(
    img_size: int, *, is_training: bool, crop_pct: float, auto_augment: str | None, interpolation: str,
    mean: Sequence[float], std: Sequence[float], hflip: float, scale: tuple[float, float],
    ratio: tuple[float, float],
) -> WorkerTransform:
    """The worker half of timm's transform: its PIL steps (the crop made lazy in training), no tensor step."""
    from timm.data import create_transform
    from timm.data.transforms import MaybePILToTensor, RandomResizedCropAndInterpolation

    # timm's create_transform arguments shared by both splits (each keyword type-checked where it is passed on)
    common: dict[str, Any] = dict(interpolation=interpolation, mean=tuple(mean), std=tuple(std), use_prefetcher=True)
    if not is_training:
        evaluation = create_transform(img_size, is_training=False, crop_pct=crop_pct, **common)
        return WorkerTransform([t for t in evaluation.transforms if not isinstance(t, MaybePILToTensor)],
                               lazy_decode=False)
    if auto_augment:
        patch_timm_posterize()
    primary, secondary, _final = create_transform(
        img_size, is_training=True, scale=scale, ratio=ratio, hflip=hflip,
        auto_augment=auto_augment or None, separate=True, **common,
    )
    first, *rest = primary.transforms
    assert isinstance(first, RandomResizedCropAndInterpolation), first
    return WorkerTransform([DraftRandomResizedCrop(first), *rest, *secondary.transforms], lazy_decode=True)


def _device_decode_transforms(
    img_size: int, *, is_training: bool, device: torch.device, auto_augment: str | None, re_prob: float,
    re_mode: str, re_count: int, mean: Sequence[float], std: Sequence[float], memory_format: torch.memory_format,
    **crop: Any,
) -> tuple[Any, Any]:
    from metaformer_platform.data.device_decode import DeviceDecodeTransform, EncodedJpeg

    if device.type != "cuda":
        raise ValueError(f"data.decode_device=cuda decodes on the training device, which is {device}; "
                         "use data.decode_device=cpu without a GPU")
    if is_training and auto_augment:
        raise ValueError(f"data.decode_device=cuda has no RandAugment ({auto_augment!r}): set "
                         "data.auto_augment=null, or decode on the CPU (data.decode_device=cpu)")
    batch = BatchTransform(device=device, mean=mean, std=std, re_prob=re_prob if is_training else 0.0,
                           re_mode=re_mode, re_count=re_count, memory_format=memory_format)
    return EncodedJpeg(), DeviceDecodeTransform(img_size, is_training=is_training, batch=batch, **crop)
