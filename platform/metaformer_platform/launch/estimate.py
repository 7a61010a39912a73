"""Estimates before spending: a job's expected wall time, worker-hours (accelerator-hours with GPUs) and cost at
its planned layout, from the best evidence there is:

1. earlier FINISHED runs in MLflow of the same model, resolution and hardware (and precision, when the config
   names one): their measured ``train/images_per_s`` per worker and, when the run ledger logged it,
   ``system/ledger_goodput``;
2. else the capacity model (``launch.capacity``: published and measured rates).

The estimate says which it used. The MLflow lookup runs under a deadline and any failure of it (tracking down,
a refused login) falls back to the table: an estimate never fails a job.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from metaformer_platform.config import JobConfig
from metaformer_platform.launch import capacity
from metaformer_platform.training import hardware

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

    from metaformer_platform.launch.plan import JobPlan

log = logging.getLogger(__name__)

SOURCE_TAG = "metaformer.estimate.source"
LOOKUP_TIMEOUT_S = 5.0
EVAL_SPEEDUP = 3.0  # a forward pass is about a third of a training step's work (forward + backward)


@dataclass(frozen=True)
class Rate:
    """Training images/s of one worker, the fraction of wall time that is training, and where they come from."""

    images_per_s: float
    goodput: float
    source: str


@dataclass(frozen=True)
class Estimate:
    """What a job is expected to take."""

    images: int
    wall_s: float
    worker_hours: float
    accelerators: bool
    cost: float | None
    currency: str
    source: str

    def metrics(self) -> dict[str, float]:
        """As MLflow metrics (``system/estimate_*``); the cost only when priced."""
        out = {"system/estimate_wall_s": self.wall_s, "system/estimate_worker_hours": self.worker_hours}
        if self.cost is not None:
            out["system/estimate_cost"] = self.cost
        return out

    def line(self) -> str:
        """One line for a person: wall, hours, cost, and what it rests on."""
        hours = "accelerator-hours" if self.accelerators else "worker-hours"
        cost = f", {self.cost:,.2f} {self.currency}" if self.cost is not None else " (no price: set cost.*)"
        return (f"expected {_duration(self.wall_s)} wall, {self.worker_hours:,.2f} {hours}{cost} for "
                f"{self.images:,} images; from {self.source}")


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def job_steps(cfg: JobConfig, split_samples: int, workers: int) -> tuple[int, int]:
    """(steps per epoch, steps in all) of a job over ``workers`` ranks, as the Trainer counts them (an evaluate
    job: its batches, once)."""
    from metaformer_platform.data import batch_schedule

    t, training = cfg.trainer, cfg.stage != "evaluate"
    batches = len(batch_schedule(split_samples, world_size=workers, batch_size=t.batch_size, drop_last=training)[0])
    if not training:
        return batches, batches
    per_epoch = max(batches // t.grad_accum_steps, 1)
    return per_epoch, t.max_steps or math.ceil(t.epochs * per_epoch)


def images_to_process(cfg: JobConfig, split_samples: int, workers: int) -> int:
    """Images a job goes through: a training job's steps x global batch, an evaluate job's split once."""
    if cfg.stage == "evaluate":
        return split_samples
    t = cfg.trainer
    return job_steps(cfg, split_samples, workers)[1] * t.batch_size * t.grad_accum_steps * workers


def estimate_job(cfg: JobConfig, *, workers: int, use_gpu: bool, cpus_per_worker: float, images: int,
                 tracking_uri: str | None, gmacs_224: float | None = None) -> Estimate:
    """The estimate of a job of ``images`` images at ``workers`` workers (its planned layout)."""
    rate = None
    if tracking_uri is not None and cfg.tracking.enabled:
        rate = earlier_rate(cfg, tracking_uri, use_gpu=use_gpu)
    if rate is None:
        rate = table_rate(cfg, use_gpu=use_gpu, cpus_per_worker=cpus_per_worker, gmacs_224=gmacs_224)
    speed = rate.images_per_s * (EVAL_SPEEDUP if cfg.stage == "evaluate" else 1.0)
    wall = images / (speed * workers) / rate.goodput
    hours = wall * workers / 3600
    price = cfg.cost.accelerator_hour if use_gpu else cfg.cost.cpu_hour
    return Estimate(images, wall, hours, use_gpu, None if price is None else hours * price, cfg.cost.currency,
                    rate.source + (" (evaluation: 3x the training rate)" if cfg.stage == "evaluate" else ""))


def plan_estimate(plan: JobPlan) -> Estimate:
    """The estimate of a planned job at its layout."""
    cfg = plan.cfg
    split = cfg.data.train_split if cfg.stage != "evaluate" else str(cfg.data.val_split)
    return config_estimate(cfg, plan.layout, plan.data.samples[split], plan.data.num_classes, plan.registry_uri)


def config_estimate(cfg: JobConfig, layout: hardware.Layout, split_samples: int, data_classes: int | None,
                    tracking_uri: str | None) -> Estimate:
    """The estimate of a job of ``cfg`` at ``layout`` (an elastic job at its largest size) that reads a split of
    ``split_samples`` samples."""
    n = layout.num_workers
    workers = n[1] if isinstance(n, tuple) else n
    gmacs = None if cfg.model.name in capacity.SIZES else _gmacs_224(cfg, data_classes)
    return estimate_job(cfg, workers=workers, use_gpu=layout.use_gpu, cpus_per_worker=layout.cpus_per_worker,
                        images=images_to_process(cfg, split_samples, workers), tracking_uri=tracking_uri,
                        gmacs_224=gmacs)


_GMACS: dict[tuple[str, int, int], float] = {}


def _gmacs_224(cfg: JobConfig, data_classes: int | None) -> float:
    """Forward GMACs at 224 px of a model outside the capacity table, counted on the meta device once per
    model config in a process (a pipeline or a test session plans the same model many times)."""
    classes = int(cfg.model.num_classes or data_classes or 1000)
    key = (cfg.model.model_dump_json(), cfg.data.img_size, classes)
    if key not in _GMACS:
        import torch

        from metaformer_platform.training.trainer import build_model

        with torch.device("meta"):
            model = build_model(cfg, classes)
        _GMACS[key] = capacity.forward_gmacs(model, cfg.data.img_size) * (224 / cfg.data.img_size) ** 2
    return _GMACS[key]


def start_logging_estimate(client: MlflowClient, run_id: str, plan: JobPlan) -> threading.Thread:
    """``log_estimate`` beside the job, not before it: the estimate waits on MLflow (bounded) and counts the
    model's MACs, and a job's start should wait on neither. Not a daemon: the driver's exit waits for it."""
    thread = threading.Thread(target=log_estimate, args=(client, run_id, plan), name="estimate")
    thread.start()
    return thread


def log_estimate(client: MlflowClient, run_id: str, plan: JobPlan) -> Estimate | None:
    """Log the job's estimate on its MLflow run (``system/estimate_*`` metrics and the source tag), for the family
    report to set against the actuals. Never fails the job: a failure is logged and skipped."""
    try:
        est = plan_estimate(plan)
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in est.metrics().items()],
                         tags=[RunTag(SOURCE_TAG, est.source[:5000])])
    except Exception as err:  # an estimate is advice: the job goes on without it
        log.warning("estimate not logged (%s: %s)", type(err).__name__, err)
        return None
    log.info("estimate: %s", est.line())
    return est


def table_rate(cfg: JobConfig, *, use_gpu: bool, cpus_per_worker: float, gmacs_224: float | None) -> Rate:
    """One worker's rate from the capacity model (GPU: the reference GPU's; CPU: from the measured CPU rate)."""
    name, size = cfg.model.name, cfg.data.img_size
    if use_gpu:
        value = capacity.gpu_images_per_s(name, img_size=size, gmacs_224=gmacs_224)
        where = f"the capacity model ({capacity.REFERENCE_GPU} rate of {name} at {size} px, docs/capacity.md)"
    else:
        value = capacity.cpu_images_per_s(name, cpus=cpus_per_worker, img_size=size, gmacs_224=gmacs_224)
        where = f"the capacity model (measured CPU rate scaled to {name} at {size} px, docs/capacity.md)"
    return Rate(value, 1.0, where)


def earlier_rate(cfg: JobConfig, tracking_uri: str, *, use_gpu: bool, timeout_s: float = LOOKUP_TIMEOUT_S) -> Rate | None:
    """The measured rate of the latest matching FINISHED run in MLflow, or None (none there, tracking down, or
    no answer within ``timeout_s``: the lookup thread is left to finish on its own)."""
    found: list[Rate | None] = []

    def lookup() -> None:
        try:
            found.append(_lookup(cfg, tracking_uri, use_gpu))
        except Exception as err:  # tracking down or refusing: the table answers instead
            log.info("estimate: no MLflow evidence (%s: %s); using the capacity model", type(err).__name__, err)

    worker = threading.Thread(target=lookup, name="estimate-lookup", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        log.info("estimate: MLflow did not answer in %.0f s; using the capacity model", timeout_s)
        return None
    return found[0] if found else None


def _lookup(cfg: JobConfig, tracking_uri: str, use_gpu: bool) -> Rate | None:
    if tracking_uri.startswith("sqlite:///") and not _sqlite_exists(tracking_uri):
        return None  # MLflow would create the database: nothing was tracked there
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    if experiment is None:
        return None
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=(f"params.`model.name` = '{cfg.model.name}' and params.`data.img_size` = '{cfg.data.img_size}' "
                       "and attributes.status = 'FINISHED'"),
        order_by=["attributes.start_time DESC"], max_results=50,
    )
    for run in runs:
        rate = _run_rate(run, cfg, use_gpu)
        if rate is not None:
            return rate
    return None


def _run_rate(run: Run, cfg: JobConfig, use_gpu: bool) -> Rate | None:
    """The per-worker rate of ``run`` when it matches the job's hardware and precision, else None."""
    params, metrics = run.data.params, run.data.metrics
    device = params.get("resolved.device", "")
    if "train/images_per_s" not in metrics or not device.startswith("cuda" if use_gpu else "cpu"):
        return None
    if cfg.trainer.precision != "auto" and params.get("resolved.precision") != cfg.trainer.precision:
        return None
    try:
        workers = int(params.get("scaling.num_workers", ""))
    except ValueError:  # an elastic run's range: its size changed during the run
        return None
    goodput = metrics.get("system/ledger_goodput")
    goodput = goodput if goodput and 0 < goodput <= 1 else 1.0
    where = (f"MLflow run {run.info.run_id} ({run.info.run_name}: {metrics['train/images_per_s']:,.1f} img/s on "
             f"{workers} worker(s), {device}" + (f", goodput {goodput:.2f})" if goodput < 1 else ")"))
    return Rate(metrics["train/images_per_s"] / workers, goodput, where)


def _sqlite_exists(uri: str) -> bool:
    from pathlib import Path

    return Path(uri.removeprefix("sqlite:///")).exists()
