"""The main process's half of the paper's transform: a uint8 batch -> normalized float on the training device,
with random erasing seeded per sample (see ``augment`` for the worker half and why the transform is split)."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch

from metaformer_platform.data.transforms import IMAGENET_MEAN, IMAGENET_STD


class BatchTransform:
    """The main process's half: uint8 NHWC batch -> normalized float NCHW on `device`, random erasing
    (timm's RandomErasing parameters, seeded per sample), in `memory_format`."""

    def __init__(
        self,
        *,
        device: torch.device | str = "cpu",
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        re_prob: float = 0.0,
        re_mode: str = "pixel",
        re_count: int = 1,
        memory_format: torch.memory_format = torch.contiguous_format,
    ):
        if re_mode not in ("const", "rand", "pixel"):
            raise ValueError(f"re_mode must be 'const', 'rand' or 'pixel', got {re_mode!r}")
        if not 0 <= re_prob <= 1:
            raise ValueError(f"re_prob must be a probability in [0, 1], got {re_prob}")
        self.device = torch.device(device)
        # (x - 255 mean) / (255 std) as one multiply-add: x * scale + shift
        self.scale = torch.tensor([1 / (255 * s) for s in std], device=self.device).view(1, 3, 1, 1)
        self.shift = torch.tensor([-m / s for m, s in zip(mean, std, strict=True)], device=self.device).view(1, 3, 1, 1)
        self.re_prob, self.re_mode, self.re_count = re_prob, re_mode, re_count
        self.memory_format = memory_format

    def __call__(self, images: torch.Tensor, seeds: torch.Tensor | None = None) -> torch.Tensor:
        """`images`: uint8, NHWC (from WorkerTransform) or NCHW; `seeds`: the per-sample augmentation seeds
        (int64, one per image), needed when random erasing is on."""
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise TypeError(f"BatchTransform takes a uint8 batch of 4 dims, got {images.dtype} {tuple(images.shape)}")
        x = images.to(self.device, non_blocking=True)
        if x.shape[-1] == 3 and x.shape[1] != 3:
            x = x.permute(0, 3, 1, 2)  # NHWC storage viewed as NCHW: channels_last, no copy
        x = x.to(dtype=torch.float32, memory_format=self.memory_format)
        torch.addcmul(self.shift, x, self.scale, out=x)
        if self.re_prob > 0:
            if seeds is None or len(seeds) != len(x):
                raise ValueError("random erasing needs one augmentation seed per image (the loader ships them)")
            for img, seed in zip(x, seeds.tolist(), strict=True):
                self._erase(img, int(seed))
        return x

    def _erase(self, img: torch.Tensor, seed: int) -> None:
        """timm's RandomErasing._erase for one image, drawing from RNGs of this sample's own seed.

        Written out (not timm's class) because timm draws from the process-global `random` and torch
        generators, which would make the erasing depend on batch order and break exact resume."""
        rng = random.Random(f"erase:{seed}")
        if rng.random() > self.re_prob:
            return
        chan, img_h, img_w = img.shape
        area = img_h * img_w
        count = 1 if self.re_count == 1 else rng.randint(1, self.re_count)
        log_aspect = (math.log(0.3), math.log(1 / 0.3))
        gen: torch.Generator | None = None
        for _ in range(count):
            for _attempt in range(10):
                target_area = rng.uniform(0.02, 1 / 3) * area / count
                aspect = math.exp(rng.uniform(*log_aspect))
                h = int(round(math.sqrt(target_area * aspect)))
                w = int(round(math.sqrt(target_area / aspect)))
                if w < img_w and h < img_h:
                    top = rng.randint(0, img_h - h)
                    left = rng.randint(0, img_w - w)
                    if self.re_mode == "const":
                        img[:, top : top + h, left : left + w] = 0
                    else:
                        if gen is None:
                            gen = torch.Generator(self.device).manual_seed(rng.getrandbits(63))
                        shape = (chan, h, w) if self.re_mode == "pixel" else (chan, 1, 1)
                        noise = torch.randn(shape, generator=gen, device=self.device, dtype=img.dtype)
                        img[:, top : top + h, left : left + w] = noise
                    break
