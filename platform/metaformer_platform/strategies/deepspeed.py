"""DeepSpeed ZeRO stage 1, 2 or 3: the engine owns backward, gradient reduction, clipping and the optimizer step.

Its config is generated from the strategy options and the step settings (``deepspeed_config``), never kept by hand: batch,
accumulation, clipping (DeepSpeed clips at 1.0 unless told otherwise, so it is always written), bf16 and
ZeRO. The optimizer is the torch one the Trainer builds with timm (DeepSpeed's FusedAdam/CPUAdam would
JIT-compile for minutes on CPU), and timm's LR schedule keeps driving its param_groups, which the ZeRO
optimizer shares. ``import deepspeed`` happens only in this module, and only when the strategy is used.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from metaformer_platform.strategies.base import OptimizerFactory, Strategy
from metaformer_platform.strategies.config import StepSettings, StrategyConfig

if TYPE_CHECKING:
    from metaformer_platform.strategies.base import DistContext

TAG = "deepspeed"  # the engine's checkpoint tag: its files live in <checkpoint>/deepspeed/
DEFAULT_EXTENSIONS_DIR = "~/.cache/metaformer-platform/torch_extensions"


def deepspeed_config(s: StrategyConfig, step: StepSettings) -> dict[str, Any]:
    """The DeepSpeed config of strategy options ``s`` for a worker stepping as ``step`` (per-rank micro-batch;
    DeepSpeed derives the global batch)."""
    zero: dict[str, Any] = {"stage": s.zero_stage}
    if s.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    return {
        "train_micro_batch_size_per_gpu": step.micro_batch,
        "gradient_accumulation_steps": step.grad_accum_steps,
        # 0.0 turns clipping off; left out, DeepSpeed would clip at 1.0.
        "gradient_clipping": float(step.clip_grad or 0.0),
        "bf16": {"enabled": step.precision == "bf16"},
        "fp16": {"enabled": False},
        "zero_optimization": zero,
        # The optimizer is timm's torch optimizer, not one of DeepSpeed's own.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def _extensions_dir(configured: str | None) -> str:
    configured = configured or os.environ.get("TORCH_EXTENSIONS_DIR") or DEFAULT_EXTENSIONS_DIR
    return str(Path(configured).expanduser())


def build_ops(extensions_dir: str | None = None) -> None:
    """Compile the op DeepSpeed's comm backend JIT-builds on its first start (its shared-memory collectives on a
    CPU machine: about 40 s on 2 cores) into the cache jobs use, so that no job pays it. ``make install`` runs
    this; on an accelerator that has no such op it does nothing."""
    os.environ["TORCH_EXTENSIONS_DIR"] = _extensions_dir(extensions_dir)
    from deepspeed.comm.torch import build_shm_op

    build_shm_op()


class DeepSpeedStrategy(Strategy):
    name = "deepspeed"
    native_format_runs_code = True  # the engine's loaders use torch.load(weights_only=False)

    def __init__(self, options: StrategyConfig, dist: DistContext, step: StepSettings) -> None:
        super().__init__(options, dist, step)
        self.engine: Any = None

    def setup(self, model: nn.Module, build_optimizer: OptimizerFactory) -> None:
        # DeepSpeed JIT-compiles a shared-memory op when its comm backend starts: in the cache build_ops fills.
        os.environ["TORCH_EXTENSIONS_DIR"] = _extensions_dir(self.options.extensions_dir)
        import deepspeed

        # The engine broadcasts and flattens parameters as contiguous bytes; inputs may still be channels_last.
        model = model.to(memory_format=torch.contiguous_format).to(self.dist.device)
        optimizer = build_optimizer(model)
        # Ray Train has already created the process group: DeepSpeed must join it, not make its own.
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=deepspeed_config(self.options, self.step_settings), dist_init_required=False
        )
        self.model = self.engine
        self.optimizer = optimizer

    @property
    def module(self) -> nn.Module:
        assert self.engine is not None, "setup() first"
        return self.engine.module

    def prepare_ema(self, ema_model: nn.Module) -> nn.Module:
        if self.options.zero_stage == 3:  # JobConfig refuses this before launch; kept for direct callers
            raise ValueError("an EMA needs whole parameters on every rank; DeepSpeed ZeRO-3 partitions them")
        # ZeRO-1/2 keep whole parameters in engine.module (bf16 ones when bf16 is on): the EMA stays fp32.
        return ema_model.to(self.dist.device)

    def no_sync(self, accumulating: bool) -> contextlib.AbstractContextManager[None]:
        # The Trainer calls step() once per optimizer step, so tell the engine where the boundary is
        # (it would otherwise count micro-steps itself); ZeRO-2/3 reduce only on the boundary.
        self.engine.set_gradient_accumulation_boundary(not accumulating)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        # The Trainer already divided the loss by the accumulation steps.
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self, clip_grad: float | None) -> float | None:
        # Clipping happens inside the engine, at the value written into its config from optim.clip_grad.
        self.engine.step()
        if clip_grad is None:
            return None
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def save(self, directory: Path) -> None:
        # Every rank writes its ZeRO partition (and, at stage 3, its parameter shard) into its own folder.
        (directory / TAG).mkdir(parents=True, exist_ok=True)
        self.engine.save_checkpoint(str(directory), tag=TAG, save_latest=False)
        # The fp32 master weights again, whole and pickle-free, for every reader but this run's resume.
        full = self._full_fp32_state()
        if full is not None:
            from metaformer_platform.storage.checkpoint_format import WEIGHTS_FILE, save_weights

            save_weights(full, directory / WEIGHTS_FILE)

    def _full_fp32_state(self) -> dict[str, torch.Tensor] | None:
        """The model's full fp32 weights on rank 0 (None elsewhere); every rank calls it (ZeRO gathers each
        parameter's partitions). Parameters without ZeRO's fp32 copy are whole in the module already."""
        from deepspeed.utils import safe_get_full_fp32_param

        state: dict[str, torch.Tensor] = {}
        for name, value in self.module.state_dict(keep_vars=True).items():  # the names a strict load expects
            full = safe_get_full_fp32_param(value) if isinstance(value, nn.Parameter) else None
            if full is not None:
                value = full
            state[name] = value.detach().to("cpu", torch.float32 if value.is_floating_point() else value.dtype)
        return state if self.dist.is_main else None

    def load(self, directory: Path, *, accept_unsigned: bool = False) -> None:
        from metaformer_platform.storage.checkpoint_format import verify_native

        if not (directory / TAG).is_dir():
            raise ValueError(f"{str(directory)!r} holds no DeepSpeed checkpoint (no {TAG}/ folder)")
        # the engine's loaders use torch.load(weights_only=False): only a folder signed with the deployment key
        verify_native(directory, accept_unsigned=accept_unsigned,
                      what=f"resuming {self.name} from {directory}")
        path, _ = self.engine.load_checkpoint(
            str(directory), tag=TAG, load_module_strict=True, load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )
        if path is None:
            raise ValueError(f"DeepSpeed could not load the checkpoint in {str(directory)!r}")

    @staticmethod
    def consolidate(directory: Path) -> dict[str, torch.Tensor]:
        if not (directory / TAG).is_dir():
            raise ValueError(f"{str(directory)!r} holds no DeepSpeed checkpoint (no {TAG}/ folder)")
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # The fp32 master weights, gathered from every rank's ZeRO partition (stages 1-3).
        state = get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=TAG)
        return {k: v.detach().to(torch.float32) for k, v in state.items()}
