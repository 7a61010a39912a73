"""DistributedDataParallel: a full replica per rank, gradients all-reduced (gloo on CPU, nccl on GPU)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from metaformer_platform.storage import checkpoint_format as fmt
from metaformer_platform.strategies.base import OptimizerFactory, Strategy


class DDPStrategy(Strategy):
    name = "ddp"

    def setup(self, model: nn.Module, build_optimizer: OptimizerFactory) -> None:
        model = model.to(self.dist.device)
        if self.dist.distributed:
            device_ids = [self.dist.device.index] if self.dist.device.type == "cuda" else None
            model = DistributedDataParallel(
                model,
                device_ids=device_ids,
                find_unused_parameters=self.options.find_unused_parameters,
            )
        self.model = model
        self.optimizer = build_optimizer(self.module)

    @property
    def module(self) -> nn.Module:
        assert self.model is not None, "setup() first"
        return self.model.module if isinstance(self.model, DistributedDataParallel) else self.model

    def no_sync(self, accumulating: bool) -> contextlib.AbstractContextManager[None]:
        if accumulating and isinstance(self.model, DistributedDataParallel):
            return self.model.no_sync()
        return contextlib.nullcontext()

    def save(self, directory: Path) -> None:
        # Replicas are identical, so rank 0 alone writes model and optimizer state.
        if self.dist.is_main:
            assert self.optimizer is not None
            fmt.save_tensors(self.module.state_dict(), directory / fmt.DDP_MODEL_FILE)
            fmt.save_tensors(self.optimizer.state_dict(), directory / fmt.DDP_OPTIMIZER_FILE)

    def load(self, directory: Path, *, accept_unsigned: bool = False) -> None:
        assert self.optimizer is not None
        state = fmt.load_tensors(directory / fmt.DDP_MODEL_FILE, map_location=self.dist.device)
        self.module.load_state_dict(state, strict=True)
        self.optimizer.load_state_dict(fmt.load_tensors(directory / fmt.DDP_OPTIMIZER_FILE, map_location=self.dist.device))

    @staticmethod
    def consolidate(directory: Path) -> dict[str, torch.Tensor]:
        return fmt.load_tensors(directory / fmt.DDP_MODEL_FILE)
