"""The training loop: counts optimizer steps, validates and checkpoints on a cadence, resumes exactly.

The Trainer knows nothing of Ray or MLflow: it is given where it sits (``DistContext``), a ``Tracker``
(rank 0 logs, the others do nothing) and a ``report`` callback that publishes a finished checkpoint folder
(Ray Train's ``ray.train.report`` under ``launch.py``; a plain function in tests and benchmarks).
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TextIO, cast, runtime_checkable

import numpy as np
import torch
import torch.distributed as tdist
from torch import nn

from metaformer_platform import data as mdata
from metaformer_platform.config import JobConfig
from metaformer_platform.data.faults import FaultCheckpointing, FaultCounting
from metaformer_platform.evaluation.metrics import evaluate_loader
from metaformer_platform.models import create_model
from metaformer_platform.storage import checkpoint_format as fmt
from metaformer_platform.strategies import get_strategy_class
from metaformer_platform.strategies.base import DistContext
from metaformer_platform.strategies.config import StepSettings
from metaformer_platform.training import checkpoint as ckpt
from metaformer_platform.training import elastic, hardware
from metaformer_platform.training.ledger import GroupMeter, mfu
from metaformer_platform.training.optim import build_optimizer, build_scheduler, use_fused
from metaformer_platform.training.steptime import StepTimer, watch_allreduce

if TYPE_CHECKING:
    from timm.utils import ModelEmaV3

log = logging.getLogger(__name__)

# Publishes a finished checkpoint folder. It returns True when it took the folder over (an asynchronous
# upload deletes it once uploaded); otherwise the Trainer deletes it as soon as ``report`` returns.
ReportFn = Callable[[dict[str, float], "Path | None"], "bool | None"]


class Tracker(Protocol):
    """What the Trainer needs from experiment tracking (see ``metaformer_platform.tracking.runs``)."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...


@runtime_checkable
class ParamsTracker(Tracker, Protocol):
    """A tracker that also records parameters: the Trainer logs the settings it resolved through it."""

    def log_params(self, params: dict[str, Any]) -> None: ...


class RunTracker(ParamsTracker, Protocol):
    """The tracker a Ray worker holds for the whole job (``tracking.MlflowTracker``, ``console.ProgressSender``,
    ``NullTracker``): flushed before each checkpoint is reported, closed once at the end."""

    def flush(self) -> None:
        """Block until every metric logged so far is stored."""
        ...

    def close(self) -> None:
        """Flush and release what the tracker holds."""
        ...


class NullTracker:
    """Tracks nothing: ranks other than 0, jobs without tracking, tests."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def _no_report(metrics: dict[str, float], checkpoint: Path | None) -> bool | None:
    return None


def build_model(cfg: JobConfig, num_classes: int) -> nn.Module:
    """The configured model (on the current default device; ``torch.device("meta")`` builds it for free)."""
    m = cfg.model
    return create_model(
        m.name, num_classes=num_classes, drop_path_rate=m.drop_path_rate, drop_rate=m.drop_rate,
        img_size=cfg.data.img_size, **m.kwargs,
    )


def build_split_loader(
    cfg: JobConfig, data_root: Path | str, dist: DistContext, split: str, *, training: bool, channels_last: bool,
    batch_size: int,
) -> mdata.ShardLoader:
    """This rank's loader of ``split`` with the configured transforms (shared with the evaluate job); its batches
    come in the memory format the model runs in (``channels_last``, resolved), so none is copied again, and
    hold ``batch_size`` images (this world size's micro-batch)."""
    d, t = cfg.data, cfg.trainer
    # Decode JPEGs no larger than the transform needs (eval resizes to img_size / crop_pct first).
    decode_size = d.img_size if training else math.ceil(d.img_size / d.crop_pct)
    # Workers ship uint8 images; normalize and random erasing run batched on the training device.
    transform, batch_transform = mdata.build_split_transforms(
        d.img_size,
        is_training=training,
        device=dist.device,
        memory_format=torch.channels_last if channels_last else torch.contiguous_format,
        crop_pct=d.crop_pct,
        auto_augment=d.auto_augment,
        re_prob=d.re_prob,
        interpolation=d.interpolation,
        hflip=d.hflip,
        decode_device=d.decode_device,
    )
    return mdata.build_loader(
        data_root,
        split,
        batch_size=batch_size,
        rank=dist.rank,
        world_size=dist.world_size,
        num_workers=d.num_workers,
        transform=transform,
        seed=t.seed,
        shuffle=training,
        shuffle_buffer=d.shuffle_buffer if training else 0,
        drop_last=training,
        decode_size=decode_size,
        max_bad_fraction=d.max_bad_fraction,
        max_member_bytes=d.max_member_bytes,
        batch_transform=batch_transform,
    )


class Trainer:
    """Builds model, strategy, data and schedule from a ``JobConfig`` and runs ``train()``.

    What depends on where it runs is resolved here, not copied into the config: ``batch`` (this world size's
    split of the global batch, ``training.elastic``) and ``settings`` (precision, memory format, compile and
    threads for this device, ``training.hardware``)."""

    def __init__(
        self,
        cfg: JobConfig,
        dist: DistContext,
        *,
        data_root: Path | str | None,
        tracker: Tracker | None = None,
        report: ReportFn | None = None,
        resume_from: Path | None = None,
        checkpoint_scratch: Path | None = None,
        draining: Callable[[], bool] | None = None,
        loaders: tuple[mdata.ShardLoader, mdata.ShardLoader | None] | None = None,
        init_from: Path | str | None = None,
    ) -> None:
        """``init_from``: this node's copy of ``model.init_from`` (the launcher's); the config's otherwise."""
        self.cfg, self.dist = cfg, dist
        self.tracker = tracker or NullTracker()
        self.report = report or _no_report
        self.scratch = checkpoint_scratch
        self._draining = draining  # Ray Train's preemption notice: see _drain_noticed
        self._drain_checkpointed = False
        self.batch = elastic.fit_to_world(cfg.scaling, cfg.trainer, dist.world_size, even=cfg.data.uses_mixup)
        self.data_root = data_root
        self.manifest = mdata.load_manifest(data_root) if data_root is not None else None
        self.num_classes = self._num_classes()
        caps = hardware.probe(dist.device)
        # the loaders make their batches in the model's memory format, resolved before the run length is known
        _, channels_last, _ = hardware.resolve_numerics(cfg.trainer, caps)
        self._build_loaders(loaders, channels_last)
        self.sample_log = self._open_sample_log()
        self.steps_per_epoch = max(len(self.train_loader) // self.batch.grad_accum_steps, 1)
        self.total_steps = cfg.trainer.max_steps or math.ceil(cfg.trainer.epochs * self.steps_per_epoch)
        # `auto` settings become the fastest ones for this device (the run length decides compile)
        self.settings = hardware.resolve_settings(cfg.trainer, caps, total_steps=self.total_steps,
                                                  cpus_per_worker=cfg.scaling.cpus_per_worker)
        self._seed()
        self._build_model(init_from or cfg.model.init_from)
        self.val_every = cfg.trainer.val_every_steps or self.steps_per_epoch
        assert self.strategy.optimizer is not None
        self.scheduler = build_scheduler(self.strategy.optimizer, cfg.optim, self.total_steps, self.steps_per_epoch)
        self._build_loss()
        self.meter = self._build_meter(caps)

        self.step = 0
        self.resizes: list[dict[str, int]] = []  # (step, from, to) of every change of world size, carried on
        self.resized = False  # whether this Trainer resumed a checkpoint of another world size
        self._batches: Iterator[tuple[torch.Tensor, ...]] | None = None
        self._step_keys: list[str] = []
        self.last_val: dict[str, float] = {}
        self.checkpoint_stalls: list[float] = []  # seconds training was blocked by each save_and_report
        self._stop_requested = threading.Event()  # set by request_stop(), from any thread
        self.stopped = False  # whether train() returned early, on request_stop(), at a checkpointed step
        # the stop flag is agreed over a CPU group: on NCCL a per-step collective would sync the device
        self._stop_group: tdist.ProcessGroup | None = None
        if dist.distributed and tdist.get_backend() != "gloo":
            self._stop_group = cast(tdist.ProcessGroup, tdist.new_group(backend="gloo"))
        if resume_from is not None:
            self.load_checkpoint(resume_from)

    # -- building blocks -------------------------------------------------------------------------

    def _num_classes(self) -> int:
        num_classes = self.cfg.model.num_classes or (self.manifest.num_classes if self.manifest is not None else None)
        if num_classes is None:
            raise ValueError("model.num_classes must be set when the Trainer's data manifest names no num_classes")
        return num_classes

    def _build_loaders(self, loaders: tuple[mdata.ShardLoader, mdata.ShardLoader | None] | None,
                       channels_last: bool) -> None:
        if loaders is not None:  # injected (benchmarks feed in-memory batches)
            self.train_loader, self.val_loader = loaders
            return
        d = self.cfg.data
        self.train_loader = self._loader(d.train_split, training=True, channels_last=channels_last)
        self.val_loader = self._loader(d.val_split, training=False, channels_last=channels_last) if d.val_split else None

    def _seed(self) -> None:
        torch.set_num_threads(self.settings.torch_threads)
        seed = self.cfg.trainer.seed
        # Every rank draws the same initial weights; data and augmentation seeds are derived per rank.
        torch.manual_seed(seed)
        # Mixup/CutMix draw from NumPy's global RNG: seeded per rank, so that the same job repeats exactly.
        random.seed(seed + self.dist.rank)
        np.random.seed(seed + self.dist.rank)

    def _build_model(self, init_from: Path | str | None) -> None:
        """The model (with its initial weights), its EMA, the strategy around it and what runs its forward."""
        cfg, t = self.cfg, self.cfg.trainer
        model = build_model(cfg, self.num_classes)
        if init_from:  # fine-tuning: another run's weights, of any strategy; a resume overrides them
            from metaformer_platform.training.export import init_from as load_initial

            new_head = load_initial(model, init_from)
            log.info("initialised from %s (new: %s)", init_from, ", ".join(new_head) or "nothing")
        self.memory_format = torch.channels_last if self.settings.channels_last else torch.contiguous_format
        model = model.to(memory_format=self.memory_format)
        # The EMA copies the plain model before the strategy wraps (FSDP2: shards) it, and is then placed
        # like it. fp32 whatever the training precision: a bf16 EMA could not hold (1 - decay) x update.
        self.ema = self._build_ema(model, t.ema_decay) if t.ema_decay is not None else None
        self.lr = cfg.optim.resolved_lr(self.batch.global_batch)
        step = StepSettings(self.batch.micro_batch, self.batch.grad_accum_steps, cfg.optim.clip_grad,
                            self.settings.precision)
        self.strategy = get_strategy_class(cfg.strategy.name)(cfg.strategy, self.dist, step)
        self.strategy.setup(model, lambda m: build_optimizer(m, cfg.optim, self.lr))
        self._log_settings(model)
        if self.ema is not None:
            self.ema.module = self.strategy.prepare_ema(self.ema.module)
        if self.settings.compile:
            hardware.inductor_cache_dir(cfg.data.cache_dir)
        wrapped = self.strategy.model
        assert wrapped is not None, "Strategy.setup() sets the model"
        # torch.compile of a module returns a module (an OptimizedModule); its signature says only "a callable".
        self.forward_model: nn.Module = cast(nn.Module, torch.compile(wrapped)) if self.settings.compile else wrapped
        self.timer = StepTimer(self.dist.device)
        watch_allreduce(self.strategy.model, self.timer)

    def _log_settings(self, model: nn.Module) -> None:
        self.settings.fused_optimizer = use_fused(model, self.cfg.optim)
        if self.cfg.optim.fused is None:
            self.settings.reasons["fused_optimizer"] = "auto: torch's fused kernel for this optimizer and device"
        if self.dist.is_main:
            log.info("%s", self.settings.summary())
            if isinstance(self.tracker, ParamsTracker):
                self.tracker.log_params(self.settings.params())

    def _build_meter(self, caps: hardware.Capabilities) -> GroupMeter:
        """The run ledger's counters of this worker group; on rank 0 with the model's training FLOPs per sample
        (3 x 2 x its MACs at the run's resolution, counted once on the meta device: no memory, no compute) and
        the device's peak at the run's precision (None where unknown: then MFU is left out)."""
        meter = GroupMeter(workers=self.dist.world_size, gpu=self.dist.device.type == "cuda",
                           global_batch=self.batch.global_batch)
        if self.dist.is_main:
            from metaformer_platform.models import model_complexity
            from metaformer_platform.training.peak_flops import device_peak

            with torch.device("meta"):
                model = build_model(self.cfg, self.num_classes)
            meter.flops_per_sample = 6.0 * model_complexity(model, self.cfg.data.img_size)["macs"]
            meter.peak_flops = device_peak(caps.device_type, caps.device_name, self.settings.precision,
                                           self.settings.torch_threads)
        return meter

    def _build_loss(self) -> None:
        d = self.cfg.data
        self.mixup = mdata.build_mixup(
            mixup_alpha=d.mixup_alpha,
            cutmix_alpha=d.cutmix_alpha,
            switch_prob=d.mixup_switch_prob,
            label_smoothing=d.label_smoothing,
            num_classes=self.num_classes,
        )
        if self.mixup is not None:
            from timm.loss import SoftTargetCrossEntropy

            self.train_loss: nn.Module = SoftTargetCrossEntropy()
        else:
            self.train_loss = nn.CrossEntropyLoss(label_smoothing=d.label_smoothing)

    def _build_ema(self, model: nn.Module, decay: float) -> ModelEmaV3:
        from timm.utils import ModelEmaV3

        return ModelEmaV3(model, decay=decay, use_warmup=self.cfg.trainer.ema_warmup, dtype=torch.float32)

    def _loader(self, split: str, *, training: bool, channels_last: bool) -> mdata.ShardLoader:
        if self.data_root is None:
            raise ValueError("the Trainer was given neither data_root nor loaders: pass one of them")
        return build_split_loader(self.cfg, self.data_root, self.dist, split, training=training,
                                  channels_last=channels_last, batch_size=self.batch.micro_batch)

    def _autocast(self) -> AbstractContextManager[None]:
        if self.settings.precision == "bf16":
            return torch.autocast(device_type=self.dist.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _open_sample_log(self) -> TextIO | None:
        """``trainer.sample_log_dir``: this process's file of sample keys per optimizer step (None when unset)."""
        folder = self.cfg.trainer.sample_log_dir
        if folder is None:
            return None
        self.train_loader.with_keys = True
        Path(folder).mkdir(parents=True, exist_ok=True)
        # one file per process: a restarted attempt replays steps, and the reader keeps the last attempt's
        return (Path(folder) / f"keys-rank{self.dist.rank:05d}-{time.time_ns()}.jsonl").open("a")

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next training batch; a new epoch starts (reshuffled) when the current one runs out."""
        while True:
            if self._batches is None:
                self._batches = iter(self.train_loader)
            try:
                images, targets, *keys = next(self._batches)
                break
            except StopIteration:  # the loader has moved itself to the next epoch
                self._batches = None
        if keys:
            self._step_keys.extend(keys[0])
        images = images.to(self.dist.device, non_blocking=True).to(memory_format=self.memory_format)
        return images, targets.to(self.dist.device, non_blocking=True)

    # -- the loop --------------------------------------------------------------------------------

    def train(self) -> dict[str, float]:
        """Run until ``total_steps``; returns the last step and validation metrics."""
        t = self.cfg.trainer
        log.info(
            "training %s: %d steps (%d per epoch), global batch %d, lr %.3g, from step %d",
            self.cfg.model.name, self.total_steps, self.steps_per_epoch, self.batch.global_batch, self.lr, self.step,
        )
        self.meter.begin(self.step)
        if self.step >= self.total_steps:
            # A finished run started again under its name: nothing to train, report where it stands.
            log.info("run is already complete at step %d", self.step)
            self.last_val = self.validate() if self.val_loader is not None else {}
            self.report({**self.last_val, "step": float(self.step)}, None)
            return {**self.last_val, "step": float(self.step)}
        assert self.strategy.model is not None, "setup() first"
        self.strategy.model.train()
        window_loss = torch.zeros((), device=self.dist.device)
        window_steps = 0
        metrics: dict[str, float] = {}
        while self.step < self.total_steps:
            window_loss += self._train_step()
            window_steps += 1
            self.step += 1
            if self.ema is not None:
                # the step number drives ModelEmaV3's decay: step 1 copies the weights, warmup ramps after
                self.ema.update(self.strategy.module, step=self.step)
                self.timer.mark("optimizer")
            self.scheduler.step_update(num_updates=self.step)

            if self.step % t.log_every_steps == 0 or self.step == self.total_steps:
                # the timer holds training time only: validation and checkpoints fall between its steps
                times = self.timer.window(window_steps)
                self.meter.add_window(times, window_steps, self.step)
                metrics = {
                    "train/loss": self._mean_across_ranks(window_loss / window_steps),
                    "train/lr": self.strategy.optimizer.param_groups[0]["lr"],  # type: ignore[union-attr]
                    "train/images_per_s": self.batch.global_batch / times["system/step_s"],
                    "train/epoch": self.step / self.steps_per_epoch,
                    **times,
                    "system/data_wait_frac": min(times["system/step_data_s"] / times["system/step_s"], 1.0),  # rank 0
                    **self._data_faults(),
                    **self._mfu(times["system/step_s"]),
                }
                self.tracker.log_metrics(metrics, step=self.step)
                window_loss.zero_()
                window_steps = 0

            if self.val_loader is not None and (self.step % self.val_every == 0 or self.step == self.total_steps):
                self._validate_in_training()

            stopping = self._stop_agreed()  # every rank, every step: all ranks stop at the same step
            drained = self._drain_noticed()
            if stopping or drained or self.step % t.checkpoint_every_steps == 0 or self.step == self.total_steps:
                self.save_and_report({**metrics, **self.last_val})
            if stopping:
                log.info("stopped on request at step %d, checkpointed", self.step)
                self.stopped = True
                break
        return {**metrics, **self.last_val, "step": float(self.step)}

    def _drain_noticed(self) -> bool:
        """Whether a node of this job has just been found draining (checked each log window, on every rank):
        true once per drain, so the job checkpoints before the node goes instead of losing the steps since the
        last checkpoint. Ray's notice is a collective, hence the same steps on every rank; after the checkpoint
        training goes on until Ray restarts the group without the node, from that checkpoint."""
        if self._draining is None or self.step % self.cfg.trainer.log_every_steps:
            return False
        if not self._draining():
            self._drain_checkpointed = False
            return False
        if self._drain_checkpointed:
            return False
        self._drain_checkpointed = True
        log.warning("a node of this job is being drained (preemption): checkpointing at step %d before it goes",
                    self.step)
        return True

    def _validate_in_training(self) -> None:
        """A validation between steps: timed for the run ledger, logged, then back to training mode."""
        began = time.perf_counter()
        self.last_val = self.validate()
        self.meter.validation_s += time.perf_counter() - began
        self.meter.step = self.step
        self.tracker.log_metrics(self.last_val, step=self.step)
        self.strategy.model.train()  # type: ignore[union-attr]

    def _mfu(self, step_s: float) -> dict[str, float]:
        """``system/train_mfu`` of a log window (rank 0's step time), when the device's peak is known."""
        m = self.meter
        value = mfu(m.flops_per_sample, self.batch.global_batch / step_s if step_s > 0 else 0.0, m.peak_flops,
                    self.dist.world_size)
        return {} if value is None else {"system/train_mfu": value}

    def request_stop(self) -> None:
        """Ask ``train()`` to checkpoint at the next step boundary and return (``stopped`` then says so).

        Safe from any thread (a signal watcher). One rank's request is enough: the ranks agree on it each step."""
        self._stop_requested.set()

    def _stop_agreed(self) -> bool:
        """Whether any rank has been asked to stop (a collective: every rank calls it once per step)."""
        flag = self._stop_requested.is_set()
        if not self.dist.distributed:
            return flag
        value = torch.tensor([1 if flag else 0], dtype=torch.int32)  # on the CPU: gloo, default or own group
        tdist.all_reduce(value, op=tdist.ReduceOp.MAX, group=self._stop_group)
        return bool(value.item())

    def _train_step(self) -> torch.Tensor:
        """One optimizer step over ``grad_accum_steps`` micro-batches; returns the mean loss (a tensor)."""
        accum = self.batch.grad_accum_steps
        self.timer.start()
        total = torch.zeros((), device=self.dist.device)
        for micro in range(accum):
            images, targets = self._next_batch()
            if self.mixup is not None:
                images, targets = self.mixup(images, targets)
            self.timer.mark("data")
            with self.strategy.no_sync(accumulating=micro < accum - 1):
                with self._autocast():
                    loss = self.train_loss(self.forward_model(images), targets)
                self.timer.mark("forward")
                self.strategy.backward(loss / accum)
                self.timer.mark("backward")
            total += loss.detach().float()
        self.strategy.step(self.cfg.optim.clip_grad)
        self.timer.mark("optimizer")
        if self.sample_log is not None:
            record = {"step": self.step + 1, "rank": self.dist.rank, "world_size": self.dist.world_size,
                      "keys": self._step_keys}
            self.sample_log.write(json.dumps(record) + "\n")
            self.sample_log.flush()
            self._step_keys = []
        return total / accum

    def _mean_across_ranks(self, value: torch.Tensor) -> float:
        if self.dist.distributed:
            value = value.detach().clone()
            tdist.all_reduce(value, op=tdist.ReduceOp.AVG if self.dist.device.type == "cuda" else tdist.ReduceOp.SUM)
            if self.dist.device.type != "cuda":
                value /= self.dist.world_size  # gloo has no AVG
        return float(value)

    def _data_faults(self) -> dict[str, float]:
        """Samples skipped as unreadable and distinct bad shards, over all ranks and both loaders, since
        this process started (each loader warns once per bad shard, naming it)."""
        stats = [
            loader.fault_stats()
            for loader in (self.train_loader, self.val_loader)
            if isinstance(loader, FaultCounting)  # injected benchmark loaders have none
        ]
        skipped = sum(s["skipped_samples"] for s in stats)
        shards = {name for s in stats for name in s["bad_shards"]}
        if self.dist.distributed:
            total = torch.tensor(float(skipped), dtype=torch.float64, device=self.dist.device)
            tdist.all_reduce(total)
            skipped = int(total)
            if skipped:  # the same on every rank, so all or none of them gather
                gathered: list[list[str] | None] = [None] * self.dist.world_size
                tdist.all_gather_object(gathered, sorted(shards))
                shards = {name for names in gathered for name in names or ()}
        return {"system/data_skipped_samples": float(skipped), "system/data_bad_shards": float(len(shards))}

    def validate(self) -> dict[str, float]:
        """Top-1/top-5 and loss over the whole validation split: each sample counted once across ranks.

        Unreadable samples come as stand-ins labelled IGNORE_LABEL, which are not scored and are reported
        as val/skipped_samples (val/samples + val/skipped_samples == the split's size). With an EMA, its
        weights are scored on the same split too, as ``val/ema_top1`` etc.
        """
        metrics = self._evaluate(self.strategy.module)
        if self.ema is not None:
            ema = self._evaluate(self.ema.module)
            metrics.update({f"val/ema_{k}": ema[f"val/{k}"] for k in ("loss", "top1", "top5")})
        return metrics

    def _evaluate(self, model: nn.Module) -> dict[str, float]:
        assert self.val_loader is not None
        sums = evaluate_loader(
            model, self.val_loader, num_classes=self.num_classes, device=self.dist.device,
            memory_format=self.memory_format, autocast=self._autocast,
        )
        if sums.samples == 0:
            raise RuntimeError(f"validation split {self.cfg.data.val_split!r} yielded no samples")
        return sums.metrics("val")

    def _fault_counting_loaders(self) -> dict[str, FaultCheckpointing]:
        named = {"train": self.train_loader, "val": self.val_loader}
        return {split: loader for split, loader in named.items() if isinstance(loader, FaultCheckpointing)}

    # -- state and checkpoints -------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Trainer state that every rank shares (model and optimizer belong to the strategy)."""
        return {
            "step": self.step,
            "scheduler": self.scheduler.state_dict(),
            "loader": self.train_loader.state_dict(),
            "model_name": self.cfg.model.name,
            "num_classes": self.num_classes,
            "world_size": self.dist.world_size,
            "resizes": self.resizes,
            # the label set goes with the weights, so an evaluation on other shards can be refused
            "class_names": list(self.manifest.class_names) if self.manifest is not None else [],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.resizes = list(state.get("resizes", []))
        self.resized = elastic.note_resume(self.resizes, self.step, state.get("world_size"), self.dist.world_size)
        self.scheduler.load_state_dict(state["scheduler"])
        self.train_loader.load_state_dict(state["loader"])
        self._batches = None

    def save_checkpoint(self, directory: Path) -> None:
        """Write this rank's part of a checkpoint into ``directory``."""
        directory.mkdir(parents=True, exist_ok=True)
        self.strategy.save(directory)
        if self.ema is not None:
            ema_state = self.strategy.ema_state_dict(self.ema.module)  # every rank (FSDP gathers)
            if ema_state is not None:
                fmt.save_tensors(ema_state, directory / fmt.EMA_FILE)
        fmt.save_tensors(ckpt.rng_state(), directory / fmt.RNG_FILE.format(self.dist.rank))
        faults = {split: loader.fault_state() for split, loader in self._fault_counting_loaders().items()}
        (directory / fmt.DATA_FAULTS_FILE.format(self.dist.rank)).write_text(json.dumps(faults))
        # The marker lists every rank's files: under Ray each rank uploads its own part, so the marker
        # alone does not prove the other parts arrived.
        parts: list[Any] = [fmt.describe_files(directory)]  # sizes and sha256 digests
        if self.dist.distributed:
            parts = [None] * self.dist.world_size
            tdist.all_gather_object(parts, fmt.describe_files(directory))
        if self.dist.is_main:
            fmt.save_tensors(self.state_dict(), directory / fmt.TRAINER_FILE)
            (directory / fmt.CONFIG_FILE).write_text(self.cfg.to_yaml())
            fmt.mark_complete(directory, [*parts, fmt.describe_files(directory, [fmt.TRAINER_FILE, fmt.CONFIG_FILE])])

    def load_checkpoint(self, directory: Path) -> None:
        """Restore model, optimizer, schedule, data position and this rank's RNG from ``directory``."""
        if (why := fmt.incomplete_reason(directory)) is not None:
            raise ValueError(
                f"{str(directory)!r} is not a complete checkpoint ({why}): "
                "it was written by a process that died mid-save, or is not a checkpoint folder"
            )
        state = fmt.load_tensors(directory / fmt.TRAINER_FILE)
        if state["model_name"] != self.cfg.model.name or state["num_classes"] != self.num_classes:
            raise ValueError(
                f"checkpoint {str(directory)!r} holds {state['model_name']} with {state['num_classes']} classes, "
                f"but this job trains {self.cfg.model.name} with {self.num_classes}: use another run.name "
                "to start fresh, or the matching model config to resume"
            )
        elastic.check_resume_world_size(self.cfg.strategy.name, state.get("world_size"), self.dist.world_size,
                                        str(directory))
        self.strategy.load(directory, accept_unsigned=self.cfg.run.accept_unsigned_checkpoints)
        if self.ema is not None:
            if (directory / fmt.EMA_FILE).is_file():
                self.strategy.load_ema_state_dict(self.ema.module, fmt.load_tensors(directory / fmt.EMA_FILE))
            else:  # EMA switched on for a run whose checkpoints have none: it starts at the resumed weights
                log.warning("%s holds no EMA: the EMA starts from the resumed weights", directory)
                self.ema.set(self.strategy.module)
        self.load_state_dict(state)
        rng_file = directory / fmt.RNG_FILE.format(self.dist.rank)
        if rng_file.is_file():
            ckpt.set_rng_state(fmt.load_tensors(rng_file))
        # this rank's skipped-sample counts go on, so a restarted job cannot slip under max_bad_fraction
        faults_file = directory / fmt.DATA_FAULTS_FILE.format(self.dist.rank)
        if faults_file.is_file():
            loaders = self._fault_counting_loaders()
            for split, saved in json.loads(faults_file.read_text()).items():
                if split in loaders:
                    loaders[split].load_fault_state(saved)
        log.info("resumed from %s at step %d", directory, self.step)

    def save_and_report(self, metrics: dict[str, float]) -> None:
        """Save a checkpoint to local scratch and hand it to ``report`` (which persists it).

        The scratch folder is deleted here unless ``report`` took it over (an asynchronous upload deletes it
        once uploaded). The time training was blocked is logged as ``system/checkpoint_stall_s``; a checkpoint
        ``report`` gave up storing (``CheckpointNotStored``) as ``system/checkpoint_dropped``, and training goes on.
        """
        start = time.perf_counter()
        scratch = Path(tempfile.mkdtemp(prefix=f"ckpt-{self.step:08d}-", dir=self.scratch))
        owned = dropped = False
        try:
            try:
                self.save_checkpoint(scratch)
            except (OSError, RuntimeError) as err:  # torch.save tells a full disk as a RuntimeError
                full = fmt.disk_full(err, scratch, "free space there, or give the workers a TMPDIR on a larger disk")
                if full is None:
                    raise
                raise full from err
            saved = time.perf_counter()
            try:
                owned = bool(self.report({**metrics, "step": float(self.step)}, scratch))
            except ckpt.CheckpointNotStored:
                dropped = True
        finally:
            if not owned:
                shutil.rmtree(scratch, ignore_errors=True)
        stall = time.perf_counter() - start
        self.checkpoint_stalls.append(stall)
        self.meter.checkpoint_s += stall
        self.meter.step = self.step
        self.tracker.log_metrics({"system/checkpoint_stall_s": stall, "system/checkpoint_save_s": saved - start,
                                  **({"system/checkpoint_dropped": 1.0} if dropped else {})}, step=self.step)
