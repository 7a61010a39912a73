"""`data.decode_device: cuda`: workers ship JPEG bytes; the main process decodes whole batches with nvjpeg
(`torchvision.io.decode_jpeg(..., device="cuda")`) and crops, flips, resizes, normalizes and erases there.

CPU decode tops out at a few hundred images/s per core, well under what one GPU trains poolformer_s12
at; batched nvjpeg decode is thousands. The same code runs with device="cpu" (torchvision decodes on the
CPU then), which is how the unit tests check it without a GPU; tests/gpu runs it on CUDA.

Randomness is per sample, as in the CPU path: the crop box and the flip of a sample are drawn from its own
augmentation seed (shipped by the loader with the batch), with timm's `get_params`, so the boxes follow
timm's RandomResizedCrop and a resumed job crops exactly what the uninterrupted one did. RandAugment
(PIL operations) has no GPU form here: this path refuses `auto_augment`.

Bad images: the workers read each JPEG's header (garbage is a bad sample there, replaced and counted by the
loader), but a body that is cut short only fails in nvjpeg, which then refuses the whole batch. The batch is
then decoded image by image, and an image that fails takes the pixels of the nearest good image of the same
batch (with its own crop and flip): the same bytes fail the same way, so a resumed job still sees the same
batch. Each is logged and counted in `bad_images`.
"""

from __future__ import annotations

import io
import logging
import math
import random
from collections.abc import Sequence

import torch
from PIL import Image

from metaformer_platform.data.batch import BatchTransform

__all__ = ["DeviceDecodeTransform", "EncodedJpeg"]

_log = logging.getLogger(__name__)


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
        self.bad_images = 0  # images nvjpeg could not decode, replaced by a good one of their batch

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

    def _decode(self, encoded: list[torch.Tensor]) -> list[torch.Tensor]:
        """The batch decoded in one nvjpeg call; if that fails, image by image with stand-ins (see above)."""
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError as batch_error:
            images: list[torch.Tensor | None] = []
            for k, data in enumerate(encoded):
                try:
                    images.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device))
                except RuntimeError as err:
                    _log.warning("image %d of a batch of %d does not decode (%s); the nearest good image of the "
                                 "batch stands in", k, len(encoded), str(err).splitlines()[-1][:200])
                    images.append(None)
            good = [k for k, img in enumerate(images) if img is not None]
            if not good:
                raise RuntimeError(f"no image of a batch of {len(encoded)} decodes: {batch_error}") from batch_error
            self.bad_images += len(encoded) - len(good)
            # nearest good index, the earlier one on a tie: depends only on the batch's bytes
            return [img if img is not None else images[min(good, key=lambda g: (abs(g - k), g))]  # type: ignore[misc]
                    for k, img in enumerate(images)]

    def __call__(self, encoded: Sequence[torch.Tensor], seeds: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as F

        images = self._decode(list(encoded))
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
