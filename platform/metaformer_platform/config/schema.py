"""Typed job configuration: one pydantic model per component, loaded from YAML with dotted overrides.

The defaults are the PoolFormer paper's ImageNet-1k recipe (Yu et al., CVPR 2022, appendix): AdamW
(0.9, 0.999, eps 1e-8), weight decay 0.05, lr 1e-3 per 1024 images of global batch, cosine schedule with 5
warmup epochs, 300 epochs, RandAugment rand-m9-mstd0.5-inc1, mixup 0.8, cutmix 1.0, random erasing 0.25,
label smoothing 0.1. The per-size values (stochastic depth, crop_pct) live in ``jobs/configs/<size>.yaml``.

A job is configured as ``JobConfig``; ``load_config(path, overrides)`` is the only way in, so every entry
point validates the same way and reports a bad key or value with the field's path and the fix.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from metaformer_platform.storage.location import Location
from metaformer_platform.strategies.config import StrategyConfig


class _Section(BaseModel):
    """A config section: unknown keys are errors, assignments are validated."""

    # inf/nan pass `gt`/`le` checks in odd ways (epochs=.inf trains forever): every float must be finite.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# Upper bounds: values past these are typos or hostile configs (an img_size of 1e8 allocates terabytes
# before any check of the data), not plans; each is far above any real ImageNet-scale job.
MAX_COUNT = 10**9  # samples, steps, buffer sizes
MAX_EPOCHS = 100_000
MAX_IMG_SIZE = 4096
MAX_BATCH = 65_536
MAX_WORKERS = 4096
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_local_url(value: str | None) -> str | None:
    """A ``file://`` URL names a path on this machine: ``file:///abs`` or ``file://localhost/abs``. With
    another host (``file://host/x``) it used to be read silently as the relative path ``host/x``; the storage
    core's parser (one rule for every location) refuses it, and the message names the config key."""
    if value is not None and value.startswith("file://"):
        try:
            Location.parse(value)
        except ValueError as err:
            raise ValueError(f"{err}; or s3://bucket/prefix for shared storage") from None
    return value.replace("file://localhost/", "file:///", 1) if value else value


class SyntheticDataConfig(_Section):
    num_classes: int = Field(10, ge=2, le=1000, description="classes of the generated set")
    train_samples: int = Field(4000, ge=1, le=MAX_COUNT, description="generated training images")
    val_samples: int = Field(500, ge=1, le=MAX_COUNT, description="generated validation images")
    image_size: int = Field(32, ge=8, le=512, description="side of the generated images, px")
    samples_per_shard: int = Field(500, ge=1, le=MAX_COUNT, description="images per generated tar shard")
    seed: int = Field(0, description="seed of the generator (a new seed makes a new data set)")


class DataConfig(_Section):
    source: str = Field(
        "synthetic",
        description="'synthetic' (generated on first use into cache_dir), or a folder / file:// URL / "
        "s3://bucket/prefix holding webdataset shards and their _info.json, the manifest file itself "
        "(.../_info.json), or a brace pattern of shards (s3://bucket/imagenet/{train-{000000..000099},val-000000}.tar)",
    )
    cache_dir: str = Field("~/.cache/metaformer-platform", description="where generated data is cached")
    synthetic: SyntheticDataConfig = Field(default_factory=SyntheticDataConfig)
    train_split: str = Field("train", description="split of _info.json used for training")
    val_split: str | None = Field("val", description="split used for validation (null: no validation)")
    img_size: int = Field(224, ge=8, le=MAX_IMG_SIZE, description="training/eval resolution, px")
    crop_pct: float = Field(0.9, gt=0, le=1, description="eval: resize to img_size/crop_pct, centre crop")
    interpolation: str = Field("bicubic", description="resize interpolation")
    num_workers: int = Field(2, ge=0, le=256, description="DataLoader worker processes per rank")
    decode_device: Literal["cpu", "cuda"] = Field(
        "cpu",
        description="where training images are decoded and augmented: cpu (workers; the full paper recipe) or "
        "cuda (workers ship JPEG bytes, nvjpeg decodes batches on the GPU; crop/flip/erase only, needs "
        "auto_augment=null)",
    )
    shuffle_buffer: int = Field(1000, ge=0, le=10**6, description="shuffle window: consecutive samples of the epoch's order permuted together (any layout)")
    max_bad_fraction: float = Field(
        0.01,
        ge=0,
        le=1,
        description="unreadable samples (missing or corrupt shards, undecodable images) are skipped, counted "
        "and replaced; above this fraction of a rank's samples in one epoch the job fails naming the bad shards",
    )
    max_member_bytes: int = Field(
        64 << 20,  # data.faults.DEFAULT_MAX_MEMBER_BYTES
        ge=1 << 10,
        le=1 << 32,
        description="the largest tar member (one image) a loader worker holds, bytes; a larger one is a bad sample, "
        "refused from its header before anything is allocated for it",
    )
    auto_augment: str | None = Field("rand-m9-mstd0.5-inc1", description="timm auto-augment policy or null")
    re_prob: float = Field(0.25, ge=0, le=1, description="random erasing probability")
    hflip: float = Field(0.5, ge=0, le=1, description="horizontal flip probability")
    mixup_alpha: float = Field(0.8, ge=0, le=100, description="mixup alpha (0 disables)")
    cutmix_alpha: float = Field(1.0, ge=0, le=100, description="cutmix alpha (0 disables)")
    mixup_switch_prob: float = Field(0.5, ge=0, le=1, description="chance of cutmix instead of mixup")
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="label smoothing")

    @field_validator("source")
    @classmethod
    def _local_url(cls, value: str) -> str:
        return check_local_url(value)  # type: ignore[return-value]

    @property
    def uses_mixup(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    @model_validator(mode="after")
    def _gpu_decode_has_no_randaugment(self) -> DataConfig:
        if self.decode_device == "cuda" and self.auto_augment:
            raise ValueError(
                f"data.decode_device=cuda has no RandAugment (data.auto_augment={self.auto_augment!r}): set "
                "data.auto_augment=null, or decode on the CPU (data.decode_device=cpu)"
            )
        return self


class ModelConfig(_Section):
    name: str = Field("poolformer_s12", description="timm model name (see metaformer_platform.models)")
    num_classes: int | None = Field(None, ge=1, le=10**6, description="head size; null takes it from the data")
    drop_path_rate: float = Field(0.1, ge=0, lt=1, description="stochastic depth rate")
    drop_rate: float = Field(0.0, ge=0, lt=1, description="dropout before the head")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="extra timm.create_model kwargs")
    init_from: str | None = Field(
        None,
        description="initial weights: an export folder (model.safetensors) or a checkpoint folder of any strategy; "
        "a head of another num_classes stays freshly initialised (null: random init)",
    )

    @field_validator("init_from")
    @classmethod
    def _local_url(cls, value: str | None) -> str | None:
        return check_local_url(value)

    @field_validator("name")
    @classmethod
    def _known_model(cls, name: str) -> str:
        from metaformer_platform.models import check_model_name

        check_model_name(name)
        return name


class OptimConfig(_Section):
    name: str = Field("adamw", description="optimizer name for timm.optim.create_optimizer_v2")
    base_lr: float = Field(1e-3, gt=0, le=100, description="lr per 1024 images of global batch (linear scaling)")
    lr: float | None = Field(None, gt=0, le=100, description="absolute lr; overrides base_lr scaling when set")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam betas")
    eps: float = Field(1e-8, gt=0, le=1, description="Adam epsilon")
    momentum: float = Field(0.9, ge=0, lt=1, description="momentum for SGD-style optimizers")
    weight_decay: float = Field(0.05, ge=0, le=100, description="decoupled weight decay (not on norms/biases)")
    clip_grad: float | None = Field(None, gt=0, le=1e6, description="clip the gradient norm to this (null: off)")
    schedule: Literal["cosine"] = Field("cosine", description="lr schedule (timm CosineLRScheduler)")
    warmup_epochs: float = Field(5.0, ge=0, le=MAX_EPOCHS, description="linear warmup length in epochs")
    warmup_lr: float = Field(1e-6, ge=0, le=100, description="lr at the start of warmup")
    min_lr: float = Field(1e-5, ge=0, le=100, description="lr at the end of the cosine")
    fused: bool | None = Field(
        None,
        description="torch's fused (single-kernel) AdamW/Adam/SGD step (null: on for those optimizers, on CUDA and CPU)",
    )

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in betas):
            raise ValueError(f"each beta must be in [0, 1), got {list(betas)}")
        return betas

    def resolved_lr(self, global_batch: int) -> float:
        """The paper's linear scaling rule: lr = base_lr x global_batch / 1024, unless lr is set."""
        return self.lr if self.lr is not None else self.base_lr * global_batch / 1024


class TrainerConfig(_Section):
    epochs: float = Field(300, gt=0, le=MAX_EPOCHS, description="training length in epochs of the train split")
    max_steps: int | None = Field(None, ge=1, le=MAX_COUNT, description="training length in optimizer steps (overrides epochs)")
    batch_size: int = Field(128, ge=1, le=MAX_BATCH, description="images per worker per micro-step")
    grad_accum_steps: int = Field(1, ge=1, le=MAX_BATCH, description="micro-steps per optimizer step")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="bf16 autocast (CPU and CUDA) or fp32; auto: bf16 where the device trains faster in it "
        "(CUDA compute capability >= 8.0, CPUs with AMX), else fp32 (see metaformer_platform.training.hardware)",
    )
    channels_last: Literal["auto"] | bool = Field(
        "auto", description="NHWC memory format for model and inputs (auto: where measured faster)"
    )
    compile: Literal["auto"] | bool = Field(
        "auto",
        description="torch.compile the model (slow first step; auto: when the run is long enough to pay for "
        "it); the compiled kernels are cached under data.cache_dir/inductor",
    )
    seed: int = Field(42, description="seed of weights, data order and augmentation")
    log_every_steps: int = Field(10, ge=1, le=MAX_COUNT, description="step metrics cadence")
    val_every_steps: int | None = Field(None, ge=1, le=MAX_COUNT, description="validation cadence (null: once per epoch)")
    checkpoint_every_steps: int = Field(500, ge=1, le=MAX_COUNT, description="checkpoint cadence (and at the end)")
    torch_threads: int | None = Field(None, ge=1, le=1024, description="intra-op threads per worker (null: its CPUs)")
    ema_decay: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="keep an fp32 exponential moving average of the weights (timm ModelEmaV3) with this decay, "
        "updated after every optimizer step, validated as val/ema_* and saved with each checkpoint (null: off)",
    )
    sample_log_dir: str | None = Field(
        None,
        description="audit: a local folder where each rank appends the keys of the samples of each optimizer "
        "step (JSON lines, one file per process) to check the data order (null: off)",
    )
    ema_warmup: bool = Field(
        False, description="ModelEmaV3 warmup: decay = 1 - (1 + step)^(-2/3), capped at ema_decay (short runs)"
    )


class ScalingSettings(_Section):
    num_workers: Literal["auto"] | Annotated[int, Field(ge=1, le=MAX_WORKERS)] | tuple[int, int] = Field(
        "auto",
        description="training workers (one process each); auto: one per GPU, or on CPU-only nodes one per node; "
        "[min, max]: an elastic job that runs on as many as the cluster holds in that range, with the global "
        "batch of max workers (see README: Elastic jobs)",
    )
    elastic_resize_interval_s: float = Field(
        60.0, gt=0, le=86_400,
        description="elastic jobs: how often Ray checks whether the cluster holds more workers (a resize restarts "
        "the group from its newest checkpoint)",
    )
    use_gpu: Literal["auto"] | bool = Field("auto", description="one GPU per worker (auto: when the cluster has GPUs)")
    cpus_per_worker: Literal["auto"] | Annotated[float, Field(gt=0, le=1024)] = Field(
        "auto", description="CPUs reserved per worker (auto: all of a CPU-only node's, or its CPUs per GPU)"
    )
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict, description="extra Ray resources per worker (e.g. {'GPU': 1, 'memory': ...})"
    )

    @field_validator("num_workers", mode="before")
    @classmethod
    def _worker_range(cls, value: object) -> object:
        # YAML carries a range as a list; an int or "auto" goes on to the other checks.
        if not isinstance(value, list | tuple):
            return value
        if len(value) != 2 or not all(type(n) is int for n in value):
            raise ValueError(f"scaling.num_workers as a range is [min, max] of two integers, got {list(value)}")
        low, high = value
        if not 1 <= low <= high <= MAX_WORKERS:
            raise ValueError(
                f"scaling.num_workers=[{low}, {high}] needs 1 <= min <= max <= {MAX_WORKERS}; write a single "
                "number for a fixed worker count"
            )
        return (low, high) if low < high else low

    @property
    def elastic(self) -> bool:
        """Whether the worker count is a range (Ray resizes the group within it)."""
        return isinstance(self.num_workers, tuple)

    @property
    def min_workers(self) -> int:
        """The fewest workers the job runs with (the count itself when fixed; resolve ``auto`` first)."""
        if self.num_workers == "auto":
            raise ValueError("scaling.num_workers=auto is resolved by the launcher (or the Trainer) first")
        return self.num_workers[0] if isinstance(self.num_workers, tuple) else self.num_workers

    @property
    def max_workers(self) -> int:
        """The most workers the job runs with: the size its global batch is defined at."""
        if self.num_workers == "auto":
            raise ValueError("scaling.num_workers=auto is resolved by the launcher (or the Trainer) first")
        return self.num_workers[1] if isinstance(self.num_workers, tuple) else self.num_workers


class RunSettings(_Section):
    name: str | None = Field(None, description="run name; the same name resumes (default: <model>-<stage>)")
    storage_path: str = Field("~/metaformer-runs", description="where Ray Train keeps checkpoints (dir or s3://)")
    max_failures: int = Field(3, ge=-1, le=10_000, description="worker-group restarts before the job fails (-1: always)")
    num_to_keep: int | None = Field(2, ge=1, le=100_000, description="checkpoints kept (null: all)")
    checkpoint_upload: Literal["sync", "async"] = Field(
        "async",
        description="async: training goes on while Ray uploads a checkpoint to storage_path (stall = the local "
        "save only); sync: each rank waits for its upload",
    )
    on_upload_failure: Literal["fail", "continue"] = Field(
        "fail",
        description="a checkpoint upload to storage_path that fails after its retries: fail (the worker fails; Ray "
        "restarts the group from the last good checkpoint, up to max_failures) or continue (a warning naming the "
        "endpoint, and training goes on without that checkpoint; needs checkpoint_upload=sync: the ranks agree "
        "whether every part landed before it is reported)",
    )
    stop_grace_s: float = Field(
        20.0, gt=0, le=3600,
        description="on SIGTERM/SIGINT the workers finish their step and checkpoint; after this many seconds "
        "the driver stops at once instead (keep it under the pod's terminationGracePeriodSeconds: 30 by default)",
    )
    ray_address: str | None = Field(None, description="Ray cluster address (null: RAY_ADDRESS or a local Ray)")
    verbose: bool = Field(
        False,
        description="show Ray's own output (controller and worker logs, per-rank reports, Ray notices) besides the "
        "job's progress lines; the command-line flag --verbose sets it",
    )
    resume_from: str | None = Field(
        None,
        description="a complete checkpoint folder (same model and strategy) to continue from, with its whole "
        "training state, when the run has no checkpoint of its own yet",
    )
    accept_unsigned_checkpoints: bool = Field(
        False,
        description="resume FSDP2/DeepSpeed checkpoints whose COMPLETE marker is not signed with the deployment key "
        "(written before checkpoints were signed); their native files can run code when read: only for your own "
        "runs' older checkpoints, and said loudly each time",
    )

    @model_validator(mode="after")
    def _continue_needs_sync(self) -> RunSettings:
        if self.on_upload_failure == "continue" and self.checkpoint_upload != "sync":
            raise ValueError(
                "run.on_upload_failure=continue uploads each checkpoint in the training loop, so that every rank "
                "knows whether all parts landed before it is reported: set run.checkpoint_upload=sync with it"
            )
        return self

    @field_validator("name")
    @classmethod
    def _safe_name(cls, name: str | None) -> str | None:
        # It names a folder, an MLflow tag that a filter string quotes, and Ray's run: one safe alphabet.
        if name is not None and not RUN_NAME.fullmatch(name):
            raise ValueError(
                f"run.name {name!r} must be a plain folder name: 1-128 characters of [A-Za-z0-9._-], starting "
                "with a letter or digit"
            )
        return name

    @field_validator("storage_path", "resume_from")
    @classmethod
    def _local_urls(cls, value: str | None) -> str | None:
        return check_local_url(value)


class TrackingConfig(_Section):
    enabled: bool = Field(True, description="log to MLflow (rank 0 only)")
    tracking_uri: str | None = Field(
        None, description="MLflow URI (null: MLFLOW_TRACKING_URI, else MLflow's default sqlite:///mlflow.db)"
    )
    experiment: str = Field("metaformer", description="MLflow experiment name")
    run_name: str | None = Field(None, description="MLflow run name (default: run.name)")
    tags: dict[str, str] = Field(default_factory=dict, description="extra MLflow tags")
    system_metrics: bool = Field(True, description="log CPU/GPU/memory system metrics")
    buffer_limit: int = Field(
        100_000, ge=100,
        description="metric values, params and tags held while the MLflow server is unreachable (training goes "
        "on); past it new metric values are dropped, counted in the metric tracking/dropped_values",
    )
    outage_wait_s: float = Field(
        300.0, ge=0,
        description="how long the end of a job waits for an unreachable MLflow server, to deliver what is held "
        "and to close the run, before it gives up (and says so)",
    )


class CostConfig(_Section):
    """Prices for the run ledger's cost figures; unset, the ledger shows hours only (no price is guessed)."""

    accelerator_hour: float | None = Field(
        None, ge=0, le=10_000, description="price of one accelerator (GPU) for one hour (null: hours only)"
    )
    cpu_hour: float | None = Field(
        None, ge=0, le=10_000, description="price of one CPU worker for one hour, for jobs without GPUs (null: hours only)"
    )
    currency: str = Field("USD", pattern=r"^[A-Z]{3}$", description="ISO 4217 code the prices are in")


class JobConfig(_Section):
    stage: Literal["pretrain", "finetune", "evaluate"] = Field("pretrain", description="what this job does")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    strategy: StrategyConfig = Field(default_factory=StrategyConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    scaling: ScalingSettings = Field(default_factory=ScalingSettings)
    run: RunSettings = Field(default_factory=RunSettings)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    cost: CostConfig = Field(default_factory=CostConfig)

    @model_validator(mode="after")
    def _consistent(self) -> JobConfig:
        if self.data.uses_mixup and self.trainer.batch_size % 2:
            raise ValueError(
                f"trainer.batch_size={self.trainer.batch_size} must be even when mixup/cutmix is on "
                "(timm's Mixup flips the batch); use an even batch or set data.mixup_alpha=0 data.cutmix_alpha=0"
            )
        if self.trainer.ema_decay is not None and self.strategy.name == "deepspeed" and self.strategy.zero_stage == 3:
            raise ValueError(
                "trainer.ema_decay needs whole parameters on every rank, but DeepSpeed ZeRO-3 partitions them; "
                "use strategy.zero_stage=2 or strategy.name=fsdp (its EMA is sharded like the model), "
                "or set trainer.ema_decay=null"
            )
        if self.scaling.elastic:
            self._check_elastic()
        return self

    def _check_elastic(self) -> None:
        from metaformer_platform.config.batch import check_range

        where = f"scaling.num_workers={list(self.scaling.num_workers)}"  # type: ignore[arg-type]
        if self.strategy.name == "deepspeed":
            raise ValueError(
                f"{where} (an elastic job) cannot run with strategy.name=deepspeed: its ZeRO checkpoints load only "
                "at the world size that wrote them; use ddp or fsdp (their checkpoints reshard), or a fixed "
                "scaling.num_workers"
            )
        if self.stage == "evaluate":
            raise ValueError(f"{where}: an evaluation runs on a fixed number of workers; set one number")
        check_range(self.scaling.num_workers, self.trainer.batch_size, self.trainer.grad_accum_steps,  # type: ignore[arg-type]
                    even=self.data.uses_mixup)

    @property
    def global_batch(self) -> int:
        """Images per optimizer step across all workers (once ``scaling.num_workers`` is resolved); an elastic
        job keeps the global batch of its largest size at every size."""
        return self.trainer.batch_size * self.trainer.grad_accum_steps * self.scaling.max_workers

    @property
    def run_name(self) -> str:
        return self.run.name or f"{self.model.name}-{self.stage}"

    def flat(self) -> dict[str, Any]:
        """The resolved config as ``{"a.b.c": value}``: MLflow params, one per leaf (secrets masked)."""
        return dict(flatten(self.redacted()))

    def to_yaml(self) -> str:
        """The resolved config as YAML, for logs and stored copies (secrets in URIs masked)."""
        return yaml.safe_dump(self.redacted(), sort_keys=False)

    def redacted(self) -> dict[str, Any]:
        """``model_dump(mode="json")`` with passwords and tokens in URIs masked: what may be logged or stored."""
        from metaformer_platform.storage.redact import redact_tree

        return redact_tree(self.model_dump(mode="json"))


def flatten(tree: dict[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    """``{"a": {"b": 1}}`` as ``("a.b", 1)`` pairs (an empty dict is a leaf)."""
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from flatten(value, path + ".")
        else:
            yield path, value
