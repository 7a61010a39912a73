"""A loader with test defaults: one rank, in-process, untransformed images, sample keys in every batch."""

from __future__ import annotations

from typing import Any

from metaformer_platform.data import build_loader


def make_loader(source: Any, split: str = "train", **overrides: Any):
    args: dict[str, Any] = dict(
        batch_size=5, rank=0, world_size=1, num_workers=0, transform=None, seed=0, shuffle=True,
        shuffle_buffer=8, with_keys=True,
    )
    args.update(overrides)
    return build_loader(source, split, **args)
