"""Creating models by name, with early name checks, and measuring their size (params, MACs)."""

from __future__ import annotations

import difflib
from typing import Any

import timm
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from .mixers import RandomMixing
from .zoo import MODEL_SPECS

_LIST_HINT = (
    'List every name with `python -c "import metaformer_platform.models, timm; '
    "print(timm.list_models('*former*'))\"`, or see metaformer_platform.models.FAMILIES."
)


def check_model_name(name: str) -> None:
    """Raise ValueError, with the closest registered names, if `name` is not a timm model (a tag is allowed)."""
    if not isinstance(name, str):
        raise TypeError(f"model name must be a string, got {type(name).__name__} {name!r}")
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name.split(".", 1)[0], timm.list_models(), n=5, cutoff=0.6)
    suggestion = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown model name {name!r}.{suggestion} {_LIST_HINT}")


def _takes_img_size(name: str) -> bool:
    # Our entrypoints take img_size (random/spatial-MLP mixers need it); so do timm models whose cfg says their
    # input size is fixed (ViT, ...). timm's MetaFormers (and CNNs) adapt to any size and reject the argument.
    arch = name.split(".", 1)[0]
    if arch in MODEL_SPECS:
        return True
    cfg = timm.models.get_pretrained_cfg(arch)
    return bool(cfg is not None and cfg.fixed_input_size)


def create_model(
    name: str,
    num_classes: int | None = None,
    drop_path_rate: float | None = None,
    img_size: int | tuple[int, int] | None = None,
    pretrained: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """`timm.create_model` after `check_model_name`; None leaves a setting at the model's default.

    ``img_size`` is passed only to models whose weights depend on the input size; models that adapt to any
    size ignore it.
    """
    check_model_name(name)
    if img_size is not None and _takes_img_size(name):
        kwargs["img_size"] = img_size
    return timm.create_model(
        name, pretrained=pretrained, num_classes=num_classes, drop_path_rate=drop_path_rate, **kwargs
    )


def model_complexity(
    model_or_name: nn.Module | str, img_size: int | tuple[int, int] = 224, in_chans: int = 3
) -> dict[str, int]:
    """Parameters and multiply-accumulates of one forward pass on a 1 x in_chans x H x W input.

    Returns ``{"params": ..., "macs": ..., "frozen_params": ...}``. ``params`` counts ``nn.Parameter`` values
    (what the papers count); ``frozen_params`` counts RandomMixing's frozen matrices, kept as buffers and listed
    apart in the MetaFormer-baselines table. MACs are FlopCounterMode's FLOPs / 2: convolutions and matrix
    products, not pooling, norms or activations, matching fvcore's counts in the papers within about 1%.

    A name is built on the meta device (no memory, no compute: FLOPs follow from shapes); a module is run where
    it lives, in eval mode and without grad, and its training mode is restored.
    """
    if isinstance(model_or_name, str):
        with torch.device("meta"):
            model = create_model(model_or_name, img_size=img_size, in_chans=in_chans)
    else:
        model = model_or_name
    params = sum(p.numel() for p in model.parameters())
    frozen = sum(m.random_matrix.numel() for m in model.modules() if isinstance(m, RandomMixing))
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    first = next(model.parameters(), None)
    x = torch.zeros(
        1,
        in_chans,
        h,
        w,
        device=None if first is None else first.device,
        dtype=None if first is None else first.dtype,
    )
    was_training = model.training
    model.eval()
    try:
        # The math SDPA backend runs attention as matmuls the counter sees; the fused CPU kernel is not counted.
        with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return {"params": params, "macs": counter.get_total_flops() // 2, "frozen_params": frozen}
