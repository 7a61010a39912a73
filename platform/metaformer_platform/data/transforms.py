"""The paper's augmentation recipe (DeiT-style, as PoolFormer trained it), built by timm.

Defaults follow the PoolFormer paper (Appendix A): RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25,
Mixup 0.8, CutMix 1.0, label smoothing 0.1, bicubic interpolation, crop_pct 0.9 (0.95 for the M sizes).
timm is imported inside the functions, so importing the data package stays cheap.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from PIL import Image

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "build_mixup", "build_transforms", "patch_timm_posterize"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _posterize(img: Image.Image, bits_to_keep: int, **_: object) -> Image.Image:
    """timm's posterize, with 0 bits meaning what it meant before Pillow 13: every channel 0 (black)."""
    from PIL import ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point([0] * 256 * len(img.getbands()))
    return ImageOps.posterize(img, bits_to_keep)


def patch_timm_posterize() -> bool:
    """Make timm's RandAugment survive Pillow >= 13; returns True when a patch was needed.

    With "inc1", RandAugment's PosterizeIncreasing keeps 4 - int(magnitude / 10 * 4) bits, so 0 bits
    whenever the (mstd-noised) magnitude reaches 10: about 2% of m9-mstd0.5 draws. Pillow 13's
    ImageOps.posterize raises ValueError for 0 bits (older Pillow returned a black image), which kills
    a DataLoader worker mid-epoch. timm 1.0.31 picks the op from NAME_TO_OP when the transform is built,
    so replacing those entries before `create_transform` is enough.
    """
    from PIL import Image, ImageOps
    from timm.data import auto_augment

    try:
        ImageOps.posterize(Image.new("RGB", (1, 1)), 0)
        return False
    except ValueError:
        pass
    for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
        if name in auto_augment.NAME_TO_OP:
            auto_augment.NAME_TO_OP[name] = _posterize
    return True


def check_transform_args(
    img_size: int, *, crop_pct: float, re_prob: float, hflip: float, mean: Sequence[float], std: Sequence[float]
) -> None:
    """ValueError naming the bad transform setting (shared by build_transforms and build_split_transforms)."""
    if type(img_size) is not int or img_size <= 0:
        raise ValueError(f"img_size must be a positive integer, got {img_size!r}")
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    for name, p in (("re_prob", re_prob), ("hflip", hflip)):
        if not 0 <= p <= 1:
            raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"mean and std need 3 values each (std > 0), got mean={mean}, std={std}")


def build_transforms(
    img_size: int,
    *,
    is_training: bool,
    crop_pct: float = 0.9,
    auto_augment: str | None = "rand-m9-mstd0.5-inc1",
    re_prob: float = 0.25,
    re_mode: str = "pixel",
    re_count: int = 1,
    interpolation: str = "bicubic",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    hflip: float = 0.5,
    color_jitter: float = 0.4,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> normalized float CHW tensor of `img_size` px, via `timm.data.create_transform`.

    Training: random-resized crop, flip, RandAugment (`auto_augment`; timm ignores `color_jitter` when it
    is set), normalize, random erasing. Evaluation: resize the short side to img_size / crop_pct, center
    crop, normalize. For the loader's `decode_size`, evaluation needs ceil(img_size / crop_pct).
    """
    from timm.data import create_transform

    check_transform_args(img_size, crop_pct=crop_pct, re_prob=re_prob, hflip=hflip, mean=mean, std=std)
    if is_training:
        if auto_augment:
            patch_timm_posterize()
        return create_transform(
            img_size,
            is_training=True,
            scale=scale,
            ratio=ratio,
            hflip=hflip,
            color_jitter=color_jitter,
            auto_augment=auto_augment or None,
            interpolation=interpolation,
            mean=tuple(mean),
            std=tuple(std),
            re_prob=re_prob,
            re_mode=re_mode,
            re_count=re_count,
        )
    return create_transform(
        img_size,
        is_training=False,
        interpolation=interpolation,
        mean=tuple(mean),
        std=tuple(std),
        crop_pct=crop_pct,
    )


def build_mixup(
    *,
    num_classes: int,
    mixup_alpha: float = 0.8,
    cutmix_alpha: float = 1.0,
    switch_prob: float = 0.5,
    label_smoothing: float = 0.1,
    prob: float = 1.0,
    mode: str = "batch",
    cutmix_minmax: tuple[float, float] | None = None,
) -> Any:
    """`timm.data.Mixup` with the paper's values, or None when both alphas are 0 (and no cutmix_minmax).

    Mixup turns labels into soft targets (label smoothing included): the Trainer pairs it with
    SoftTargetCrossEntropy, and needs even batch sizes (drop_last=True).
    """
    if type(num_classes) is not int or num_classes <= 1:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if mixup_alpha < 0 or cutmix_alpha < 0:
        raise ValueError(f"mixup_alpha and cutmix_alpha must be >= 0, got {mixup_alpha}, {cutmix_alpha}")
    for name, p in (("switch_prob", switch_prob), ("prob", prob)):
        if not 0 <= p <= 1:
            raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
    if not 0 <= label_smoothing < 1:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if mode not in ("batch", "pair", "elem"):
        raise ValueError(f"mode must be 'batch', 'pair' or 'elem', got {mode!r}")
    if mixup_alpha == 0 and cutmix_alpha == 0 and cutmix_minmax is None:
        return None
    from timm.data import Mixup

    return Mixup(
        mixup_alpha=mixup_alpha,
        cutmix_alpha=cutmix_alpha,
        cutmix_minmax=cutmix_minmax,
        prob=prob,
        switch_prob=switch_prob,
        mode=mode,
        label_smoothing=label_smoothing,
        num_classes=num_classes,
    )
