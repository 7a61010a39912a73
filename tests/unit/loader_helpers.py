"""Loaders for unit tests: the real loader with test defaults (one rank, in-process, untransformed images, sample
keys in every batch), and a fixed list of random batches in the loader protocol the Trainer uses."""

from __future__ import annotations

from typing import Any

import torch

from metaformer_platform.data import build_loader


def make_loader(source: Any, split: str = "train", **overrides: Any):
    args: dict[str, Any] = dict(
        batch_size=5, rank=0, world_size=1, num_workers=0, transform=None, seed=0, shuffle=True,
        shuffle_buffer=8, with_keys=True,
    )
    args.update(overrides)
    return build_loader(source, split, **args)


def keyed_images(loader: Any) -> dict[str, Any]:
    """{sample key: image tensor} over the rest of the loader's epoch (a loader made `with_keys=True`)."""
    return {k: img for images, _, keys in loader for k, img in zip(keys, images, strict=True)}


def resumed_after(make: Any, batches: int) -> Any:
    """A fresh loader from `make()` resumed from the state of another one stopped after `batches` batches."""
    interrupted = make()
    for seen, _ in enumerate(interrupted, 1):
        if seen == batches:
            break
    resumed = make()
    resumed.load_state_dict(interrupted.state_dict())
    return resumed


class RandomBatches:
    """``n`` seeded random batches of ``batch`` 32 px images with labels below ``classes``, as a Trainer loader."""

    def __init__(self, n: int, batch: int, *, classes: int = 4, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.batches = [(torch.randn(batch, 3, 32, 32, generator=gen), torch.randint(0, classes, (batch,), generator=gen))
                        for _ in range(n)]

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
