"""Evaluation metrics: top-1/top-5, per-class accuracy, loss and throughput over a validation split.

Two users share this code: ``Trainer.validate()`` (during training) and the evaluate job's workers. The metric
sums are accumulated per rank and reduced with one all-reduce, so each sample of the split is counted exactly
once across ranks (the loader spreads the split over ranks without padding); stand-ins for unreadable samples
carry ``IGNORE_LABEL`` and are counted as skipped, not scored. No Ray, MLflow or training loop here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.distributed as tdist
import torch.nn.functional as F
from torch import nn

from metaformer_platform.data import IGNORE_LABEL
from metaformer_platform.data.faults import FaultCounting

_SCALARS = ("loss", "top1", "top5", "count", "skipped")


class MetricSums:
    """Sums of one evaluation pass on one rank: loss, top-1/top-5 hits, scored and skipped samples, and
    per-class (scored, top-1 hits). ``all_reduce()`` adds them up over ranks; ``metrics()`` divides."""

    def __init__(self, num_classes: int, device: torch.device | str = "cpu") -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = num_classes
        self.device = torch.device(device)
        self.scalars = torch.zeros(len(_SCALARS), dtype=torch.float64, device=self.device)
        self.class_samples = torch.zeros(num_classes, dtype=torch.float64, device=self.device)
        self.class_top1 = torch.zeros(num_classes, dtype=torch.float64, device=self.device)
        self.seconds = 0.0
        # what the pass ran with, once the worker has resolved ``auto`` (e.g. {"precision": "bf16"})
        self.settings: dict[str, Any] = {}

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Score one batch; targets equal to ``IGNORE_LABEL`` (stand-ins) are left out of every sum."""
        logits = logits.float()
        if logits.shape[1] != self.num_classes:
            raise ValueError(f"the model has {logits.shape[1]} outputs but the metrics expect {self.num_classes}")
        valid = targets.ne(IGNORE_LABEL)
        labels = targets[valid]
        if labels.numel():
            lo, hi = (int(v) for v in torch.stack(labels.aminmax()).tolist())  # one device sync per batch
            if lo < 0 or hi >= self.num_classes:
                raise ValueError(
                    f"label {hi if hi >= self.num_classes else lo} is outside the model's {self.num_classes} "
                    "classes: the data has another label set than the weights"
                )
        top = logits.topk(min(5, self.num_classes), dim=1).indices
        hits = top.eq(targets[:, None]) & valid[:, None]
        top1 = hits[:, 0]
        self.scalars += torch.stack(
            [
                F.cross_entropy(logits, targets, reduction="sum", ignore_index=IGNORE_LABEL).double(),
                top1.sum().double(),
                hits.any(dim=1).sum().double(),
                valid.sum().double(),
                torch.zeros((), dtype=torch.float64, device=self.device),
            ]
        )
        self.class_samples += torch.bincount(labels, minlength=self.num_classes).double()
        self.class_top1 += torch.bincount(targets[top1], minlength=self.num_classes).double()

    def add_skipped(self, count: int) -> None:
        self.scalars[4] += count

    def all_reduce(self) -> None:
        """Sum over the process group (one collective); the pass time becomes the slowest rank's."""
        if not (tdist.is_available() and tdist.is_initialized()):
            return
        flat = torch.cat([self.scalars, self.class_samples, self.class_top1])
        tdist.all_reduce(flat)
        n, c = len(_SCALARS), self.num_classes
        self.scalars, self.class_samples, self.class_top1 = flat[:n], flat[n : n + c], flat[n + c :]
        seconds = torch.tensor(self.seconds, dtype=torch.float64, device=self.device)
        tdist.all_reduce(seconds, op=tdist.ReduceOp.MAX)
        self.seconds = float(seconds)

    @property
    def samples(self) -> int:
        return int(self.scalars[3])

    @property
    def skipped(self) -> int:
        return int(self.scalars[4])

    def metrics(self, prefix: str) -> dict[str, float]:
        """``{prefix}/loss|top1|top5|samples|skipped_samples|images_per_s`` (accuracies in percent)."""
        loss, top1, top5, count, skipped = self.scalars.tolist()
        if count == 0:
            raise RuntimeError("the evaluation scored no samples")
        return {
            f"{prefix}/loss": loss / count,
            f"{prefix}/top1": 100.0 * top1 / count,
            f"{prefix}/top5": 100.0 * top5 / count,
            f"{prefix}/samples": count,
            f"{prefix}/skipped_samples": skipped,
            f"{prefix}/images_per_s": count / self.seconds if self.seconds > 0 else 0.0,
        }

    def per_class_top1(self) -> list[float | None]:
        """Top-1 (%) of each class; None for a class with no scored sample."""
        return [
            100.0 * hit / n if n else None
            for hit, n in zip(self.class_top1.tolist(), self.class_samples.tolist(), strict=True)
        ]

    def to_dict(self) -> dict[str, Any]:
        """Plain numbers and lists: what a Ray Train worker hands back to the driver."""
        return {
            "scalars": self.scalars.tolist(),
            "class_samples": self.class_samples.tolist(),
            "class_top1": self.class_top1.tolist(),
            "seconds": self.seconds,
            "settings": self.settings,
        }

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> MetricSums:
        sums = cls(len(state["class_samples"]))
        sums.scalars = torch.tensor(state["scalars"], dtype=torch.float64)
        sums.class_samples = torch.tensor(state["class_samples"], dtype=torch.float64)
        sums.class_top1 = torch.tensor(state["class_top1"], dtype=torch.float64)
        sums.seconds = float(state["seconds"])
        sums.settings = dict(state.get("settings", {}))
        return sums


def _skipped(loader: Any) -> int:
    return int(loader.fault_stats()["skipped_samples"]) if isinstance(loader, FaultCounting) else 0


@torch.no_grad()
def evaluate_loader(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    num_classes: int,
    device: torch.device,
    memory_format: torch.memory_format = torch.contiguous_format,
    autocast: Callable[[], AbstractContextManager[Any]] = nullcontext,
) -> MetricSums:
    """One pass over ``loader`` with ``model`` in eval mode; the sums are reduced over the process group."""
    model.eval()
    sums = MetricSums(num_classes, device)
    skipped_before = _skipped(loader)
    start = time.perf_counter()
    for images, targets in loader:
        images = images.to(device).to(memory_format=memory_format)
        with autocast():
            logits = model(images)
        sums.update(logits, targets.to(device))
    sums.seconds = time.perf_counter() - start
    sums.add_skipped(_skipped(loader) - skipped_before)
    sums.all_reduce()
    return sums
