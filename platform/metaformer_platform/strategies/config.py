"""The strategies' own typed config: how the model is distributed (``strategy.*`` in a job config, which composes
it), and the few training numbers a strategy needs to step (``StepSettings``), so that no strategy sees a job."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

STRATEGY_NAMES = ("ddp", "fsdp", "deepspeed")


class StrategyConfig(BaseModel):
    """How the model is distributed. Keys prefixed by a strategy's name apply to that strategy only."""

    # the job config's section rules: unknown keys are errors, assignments validated, floats finite
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    name: str = Field("ddp", description="how the model is distributed: one of metaformer_platform.strategies")
    find_unused_parameters: bool = Field(False, description="ddp: allow parameters without gradients")
    fsdp_reshard_after_forward: bool = Field(
        True, description="fsdp: free gathered parameters after forward (less memory, one more all-gather)"
    )
    fsdp_cpu_offload: bool = Field(False, description="fsdp: keep sharded parameters and optimizer state on CPU")
    fsdp_param_dtype: Literal["bf16", "fp32"] | None = Field(
        None, description="fsdp: dtype of gathered parameters for compute (null: bf16 when trainer.precision=bf16)"
    )
    fsdp_reduce_dtype: Literal["bf16", "fp32"] = Field("fp32", description="fsdp: dtype of gradient reduction")
    zero_stage: int = Field(2, description="deepspeed: ZeRO stage 1 (optimizer), 2 (+gradients), 3 (+parameters)")
    offload_optimizer: bool = Field(False, description="deepspeed: keep optimizer state in CPU memory (ZeRO-Offload)")
    extensions_dir: str | None = Field(
        None,
        description="deepspeed: cache of its JIT-compiled ops (null: TORCH_EXTENSIONS_DIR, else "
        "~/.cache/metaformer-platform/torch_extensions); a warm cache saves minutes per start",
    )

    @field_validator("zero_stage", mode="before")
    @classmethod
    def _zero_stage_in_range(cls, stage: object) -> object:
        if isinstance(stage, int) and not isinstance(stage, bool) and stage not in (1, 2, 3):
            raise ValueError(
                f"strategy.zero_stage must be 1, 2 or 3, got {stage} (stage 0 is plain data parallel: "
                "use strategy.name=ddp)"
            )
        return stage

    @field_validator("name")
    @classmethod
    def _known_strategy(cls, name: str) -> str:
        if name not in STRATEGY_NAMES:
            raise ValueError(f"unknown strategy {name!r}; choose one of {sorted(STRATEGY_NAMES)}")
        return name


@dataclass(frozen=True)
class StepSettings:
    """What a worker steps with, resolved for its world size and device: DeepSpeed generates its own config from
    these, FSDP2 its compute dtype."""

    micro_batch: int  # images per rank per micro-step
    grad_accum_steps: int
    clip_grad: float | None
    precision: Literal["fp32", "bf16"]
