"""`data.decode_device: cuda`: workers ship JPEG bytes; the main process decodes whole batches with nvjpeg
(`torchvision.io.decode_jpeg(..., device="cuda")`) and crops, flips, resizes, normalizes and erases there.

CPU decode tops out at a few hundred images/s per core, well under what one GPU trains poolformer_s12
at; batched nvjpeg decode is thousands. The same code runs with device="cpu" (torchvision decodes on the
CPU then), which is how the unit tests check it without a GPU; tests/gpu runs it on CUDA.

Randomness is per sample, as in the CPU path: the crop box and the flip of a sample are drawn from its own
augmentation seed (shipped by the loader with the batch), with timm's `get_params`, so the boxes follow
timm's RandomResizedCrop and a resumed job crops exactly what the uninterrupted one did. RandAugment
(PIL operations) has no GPU form here: this path refuses `auto_augment`.
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Sequence

import torch
from PIL import Image

from .augment import BatchTransform

__all__ = ["DeviceDecodeTransform", "EncodedJpeg"]


class EncodedJpeg:
    """The worker half: the sample's JPEG bytes as a uint8 tensor (images that nvjpeg cannot take, such as
    PNG or CMYK JPEGs, are re-encoded as RGB JPEG here, which is rare in ImageNet)."""

    encoded = True  # the loader hands it the sample's image bytes and ships a list, not a stacked batch

    def __call__(self, data: bytes) -> torch.Tensor:
        img = Image.open(io.BytesIO(data))  # reads the header: garbage fails here, in the worker
        if img.format != "JPEG" or img.mode not in ("RGB", "L"):
            out = io.BytesIO()
            img.convert("RGB").save(out, format="JPEG", quality=95)
            data = out.getvalue()
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)


class DeviceDecodeTransform:
    """The main-process half: a list of JPEG byte tensors + per-sample seeds -> a normalized float batch
    on `device` (training: random-resized crop + flip; evaluation: resize + centre crop; then `batch`:
    normalize and random erasing)."""

    def __init__(
        self,
        img_size: int,
        *,
        is_training: bool,
        batch: BatchTransform,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        crop_pct: float = 0.9,
        interpolation: str = "bicubic",
    ):
        from torchvision.transforms.v2 import InterpolationMode

        self.size = img_size
        self.is_training = is_training
        self.batch = batch
        self.device = batch.device
        self.scale, self.ratio, self.hflip = scale, ratio, hflip
        self.resize_to = math.floor(img_size / crop_pct)  # timm's eval: short side to img_size / crop_pct
        self.interpolation = InterpolationMode(interpolation)

    def _box(self, height: int, width: int, seed: int) -> tuple[tuple[int, int, int, int], bool]:
        """timm's RandomResizedCrop box and the flip, drawn from the sample's seed (the caller's global RNG
        state is put back: timm's get_params draws from the `random` module)."""
        from timm.data.transforms import RandomResizedCropAndInterpolation

        state = random.getstate()
        try:
            random.seed(f"device-crop:{seed}")
            # a zero-stride tensor of the image's shape: what get_params reads is the size
            shape = torch.empty((1, 1, 1)).expand(1, height, width)
            box = RandomResizedCropAndInterpolation.get_params(shape, self.scale, self.ratio)
            flip = random.random() < self.hflip
        finally:
            random.setstate(state)
        return box, flip

    def __call__(self, encoded: Sequence[torch.Tensor], seeds: torch.Tensor) -> torch.Tensor:
        from torchvision.io import ImageReadMode, decode_jpeg
        from torchvision.transforms.v2 import functional as F

        images = decode_jpeg(list(encoded), mode=ImageReadMode.RGB, device=self.device)
        out = torch.empty((len(images), self.size, self.size, 3), dtype=torch.uint8, device=self.device)
        for k, (img, seed) in enumerate(zip(images, seeds.tolist(), strict=True)):
            if self.is_training:
                (i, j, h, w), flip = self._box(img.shape[1], img.shape[2], int(seed))
                img = F.resized_crop(img, i, j, h, w, [self.size, self.size], self.interpolation, antialias=True)
                if flip:
                    img = img.flip(-1)
            else:
                img = F.resize(img, self.resize_to, self.interpolation, antialias=True)
                img = F.center_crop(img, [self.size, self.size])
            out[k] = img.permute(1, 2, 0)
        return self.batch(out, seeds)
