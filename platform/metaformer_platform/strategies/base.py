"""The strategy seam: how a model and its optimizer are distributed, stepped and checkpointed.

The Trainer talks to one ``Strategy``; DDP, FSDP2 and DeepSpeed differ only behind this interface
(DeepSpeed owns its optimizer step, FSDP2 shards parameters and checkpoints per rank).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from metaformer_platform.strategies.config import StepSettings, StrategyConfig


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job: ranks and the device it computes on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    node_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()


OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]


class Strategy(ABC):
    """Wraps a model for distributed training and owns backward, the optimizer step and model checkpoints."""

    name: str
    # Whether load() reads files that can run code (pickles): then it reads only the job's own run's checkpoints.
    native_format_runs_code: bool = False

    def __init__(self, options: StrategyConfig, dist: DistContext, step: StepSettings) -> None:
        self.options = options
        self.dist = dist
        self.step_settings = step  # DeepSpeed's own config is generated from these
        self.model: nn.Module | None = None
        # The torch optimizer the LR schedule drives (DeepSpeed wraps it, but its param_groups stay these).
        self.optimizer: torch.optim.Optimizer | None = None

    @classmethod
    def check_model(cls, model: nn.Module) -> None:
        """Raise ``ValueError`` when this strategy cannot distribute ``model`` (called on the driver, meta device)."""
        return None

    @staticmethod
    @abstractmethod
    def consolidate(directory: Path) -> dict[str, torch.Tensor]:
        """The full fp32 model state dict of the checkpoint in ``directory``, in one process, no process group,
        read from the strategy's native files (which may run code when ``native_format_runs_code``: only for
        checkpoints the caller trusts; ``checkpoint_format.model_weights`` reads the pickle-free copy)."""

    @abstractmethod
    def setup(self, model: nn.Module, build_optimizer: OptimizerFactory) -> None:
        """Move ``model`` to the device, wrap it, and build its optimizer (after wrapping, as FSDP needs)."""

    @property
    @abstractmethod
    def module(self) -> nn.Module:
        """The plain model underneath the wrapper (for eval, EMA and export)."""

    def no_sync(self, accumulating: bool) -> contextlib.AbstractContextManager[None]:
        """Skip gradient communication on micro-steps that only accumulate."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, clip_grad: float | None) -> float | None:
        """Clip (when asked), step the optimizer and zero the gradients; returns the gradient norm if clipped."""
        assert self.optimizer is not None and self.model is not None
        norm = None
        if clip_grad is not None:
            norm = float(nn.utils.clip_grad_norm_(self.model.parameters(), clip_grad))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    @abstractmethod
    def save(self, directory: Path) -> None:
        """Write model and optimizer state for this rank into ``directory`` (every rank calls it)."""

    @abstractmethod
    def load(self, directory: Path, *, accept_unsigned: bool = False) -> None:
        """Restore what ``save`` wrote (every rank calls it). A strategy whose files can run code when read
        (pickles) reads only a folder signed with the deployment key, unless ``accept_unsigned``
        (``run.accept_unsigned_checkpoints``, for checkpoints written before signing)."""

    # -- the EMA of the weights: it lives where the parameters live ----------------------------------

    def prepare_ema(self, ema_model: nn.Module) -> nn.Module:
        """Place the EMA copy (made from the plain model before ``setup``) like the parameters it follows.

        Replicating strategies keep a whole fp32 copy on the device; FSDP shards it like the model.
        """
        return ema_model.to(self.dist.device)

    def ema_state_dict(self, ema_model: nn.Module) -> dict[str, torch.Tensor] | None:
        """The EMA's full weights on CPU, for rank 0 to save (every rank calls it; None on the others)."""
        return {k: v.detach().cpu() for k, v in ema_model.state_dict().items()} if self.dist.is_main else None

    def load_ema_state_dict(self, ema_model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Restore full EMA weights (as ``ema_state_dict`` returned them) on every rank."""
        ema_model.load_state_dict(state, strict=True)

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.module.parameters()
