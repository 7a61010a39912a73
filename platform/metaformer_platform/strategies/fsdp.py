"""FSDP2 (``torch.distributed.fsdp.fully_shard``): parameters, gradients and optimizer state sharded over ranks.

Each MetaFormer block is one unit (its parameters are gathered just before it runs), then each stage (its
downsampling layer), then the root (stem and head). Checkpoints go through ``torch.distributed.checkpoint``:
every rank writes its own shard file into the checkpoint folder and rank 0 the metadata, so Ray Train's
merge of the ranks' folders is a complete DCP checkpoint.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from metaformer_platform.strategies.base import OptimizerFactory, Strategy

if TYPE_CHECKING:
    from torch.distributed.fsdp import MixedPrecisionPolicy

DCP_DIR = "fsdp"
_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def shard_units(model: nn.Module) -> list[list[nn.Module]]:
    """The modules FSDP2 wraps, innermost first: each stage's blocks, then the stage (per stage).

    Raises ``ValueError`` for a model that is not a MetaFormer-style ``stages[i].blocks`` network.
    """
    stages = getattr(model, "stages", None)
    units: list[list[nn.Module]] = []
    if isinstance(stages, nn.Module):
        for stage in stages.children():
            blocks = getattr(stage, "blocks", None)
            if not isinstance(blocks, nn.Module) or not list(blocks.children()):
                units = []
                break
            units.append([*blocks.children(), stage])
    if not units:
        raise ValueError(
            f"strategy.name=fsdp shards a MetaFormer per block and per stage, but {type(model).__name__} has no "
            "`stages[i].blocks` to wrap; use strategy.name=ddp or strategy.name=deepspeed for this model"
        )
    return units


class FSDPStrategy(Strategy):
    name = "fsdp"
    native_format_runs_code = True  # torch.distributed.checkpoint unpickles its .metadata

    @classmethod
    def check_model(cls, model: nn.Module) -> None:
        shard_units(model)

    def _mp_policy(self) -> MixedPrecisionPolicy:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        param = self.options.fsdp_param_dtype or ("bf16" if self.step_settings.precision == "bf16" else "fp32")
        return MixedPrecisionPolicy(param_dtype=_DTYPES[param], reduce_dtype=_DTYPES[self.options.fsdp_reduce_dtype])

    def setup(self, model: nn.Module, build_optimizer: OptimizerFactory) -> None:
        import torch.distributed as tdist
        from torch.distributed.device_mesh import init_device_mesh

        if not tdist.is_initialized():
            raise RuntimeError("strategy fsdp needs a process group (Ray Train's workers have one)")
        self._mesh = init_device_mesh(self.dist.device.type, (self.dist.world_size,))
        self.model = self._shard(model)
        self.optimizer = build_optimizer(self.model)

    def _shard(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

        units = shard_units(model)
        # FSDP2 shards contiguous parameters only; inputs may still be channels_last.
        model = model.to(memory_format=torch.contiguous_format).to(self.dist.device)
        offload = CPUOffloadPolicy(pin_memory=False) if self.options.fsdp_cpu_offload else OffloadPolicy()
        mp_policy = self._mp_policy()

        def shard(module: nn.Module) -> None:
            fully_shard(
                module, mesh=self._mesh, reshard_after_forward=self.options.fsdp_reshard_after_forward,
                mp_policy=mp_policy, offload_policy=offload,
            )

        for stage_units in units:
            for module in stage_units:
                shard(module)
        shard(model)
        return model

    def prepare_ema(self, ema_model: nn.Module) -> nn.Module:
        # Sharded exactly like the model, each rank's EMA shard follows its own parameter shard: the update
        # is local (no communication), and validating the EMA gathers it block by block like the model.
        return self._shard(ema_model)

    def ema_state_dict(self, ema_model: nn.Module) -> dict[str, torch.Tensor] | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # One all-gather per checkpoint; rank 0 gets the whole EMA, in the file format every strategy writes.
        state = get_model_state_dict(ema_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        # A model's state dict holds tensors only (the declared value type also allows containers).
        return cast("dict[str, torch.Tensor]", state) if self.dist.is_main else None

    def load_ema_state_dict(self, ema_model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        # Every rank read the whole file: each keeps its own shard of it.
        set_model_state_dict(ema_model, dict(state), options=StateDictOptions(full_state_dict=True, strict=True))

    @property
    def module(self) -> nn.Module:
        assert self.model is not None, "setup() first"
        return self.model

    def no_sync(self, accumulating: bool) -> contextlib.AbstractContextManager[None]:
        # Accumulate unsharded gradients locally; reduce-scatter once, on the last micro-step.
        assert self.model is not None, "setup() first"
        self.model.set_requires_gradient_sync(not accumulating)  # type: ignore[operator]
        return contextlib.nullcontext()

    def _state(self) -> dict[str, dict]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        assert self.model is not None and self.optimizer is not None
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        return {"model": model_state, "optim": optim_state}

    def save(self, directory: Path) -> None:
        import torch.distributed.checkpoint as dcp

        from metaformer_platform.storage.checkpoint_format import WEIGHTS_FILE, save_weights

        # Each rank saves into its own scratch folder; only rank 0 would create it otherwise.
        (directory / DCP_DIR).mkdir(parents=True, exist_ok=True)
        dcp.save(self._state(), checkpoint_id=directory / DCP_DIR)
        # The weights again, whole and pickle-free, for every reader but this run's resume (export, init_from,
        # evaluate): DCP's metadata is a pickle. One all-gather, as for the EMA.
        full = self.ema_state_dict(self.module)
        if full is not None:
            save_weights(full, directory / WEIGHTS_FILE)

    def load(self, directory: Path, *, accept_unsigned: bool = False) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        from metaformer_platform.storage.checkpoint_format import verify_native

        if not (directory / DCP_DIR / ".metadata").is_file():
            raise ValueError(f"{str(directory)!r} holds no FSDP checkpoint ({DCP_DIR}/.metadata is missing)")
        assert self.model is not None and self.optimizer is not None, "setup() first"
        # DCP unpickles .metadata: only a folder signed with the deployment key, every file as signed
        verify_native(directory, accept_unsigned=accept_unsigned,
                      what=f"resuming {self.name} from {directory}")
        state = self._state()
        dcp.load(state, checkpoint_id=directory / DCP_DIR)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

    @staticmethod
    def consolidate(directory: Path) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

        if not (directory / DCP_DIR / ".metadata").is_file():
            raise ValueError(f"{str(directory)!r} holds no FSDP checkpoint ({DCP_DIR}/.metadata is missing)")
        # Reads only the model entries (no optimizer state) and needs no process group.
        state = _load_state_dict_from_keys({"model"}, checkpoint_id=str(directory / DCP_DIR))
        return {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in state["model"].items()}
