"""What the benchmarks share: a private S3 server in a temporary folder; for the training benchmarks, seeded
in-memory batches, a bare timm loop, and the platform's Trainer run in Ray Train workers on the same batches.
Each training side reports the median seconds per optimizer step over windows of ``WINDOW`` steps, leaving
out the first window (warm-up)."""

from __future__ import annotations

import contextlib
import os
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

WINDOW = 5


@dataclass(frozen=True)
class PrivateS3:
    """A benchmark's temporary folder and the S3 server whose data lies in it (``tmp / "s3"``)."""

    tmp: Path
    url: str
    key: str
    secret: str


@contextlib.contextmanager
def private_s3(prefix: str, bucket: str = "bench") -> Iterator[PrivateS3]:
    """A temporary folder (name starting ``prefix``) and a SeaweedFS on 127.0.0.1 in it with fresh credentials
    and one empty ``bucket``; this process's AWS_* variables point at it (they stay so: every S3 client the
    benchmark makes, boto3 or pyarrow, finds it). The server stops and the folder goes on exit."""
    import boto3
    import devstack  # infra/local on PYTHONPATH, as `make benchmark` runs it; only the S3 benchmarks need it

    with tempfile.TemporaryDirectory(prefix=prefix) as tmp_name:
        tmp = Path(tmp_name)
        key, secret = "bench" + secrets.token_hex(4), secrets.token_hex(16)
        svc = devstack.start_s3(tmp / "s3", key, secret, log_dir=tmp)
        try:
            os.environ.update(devstack.s3_env(svc.url, key, secret))
            boto3.client("s3").create_bucket(Bucket=bucket)
            yield PrivateS3(tmp, svc.url, key, secret)
        finally:
            devstack.stop_service(svc)


def make_batches(num: int, batch: int, size: int, seed: int, num_classes: int = 10) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, 3, size, size, generator=gen), torch.randint(0, num_classes, (batch,), generator=gen))
        for _ in range(num)
    ]


class InMemoryLoader:
    """The loader protocol the Trainer uses, over a fixed list of batches."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.batches = batches
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = state["epoch"]


def bare_loop(model_name: str, batches: list, *, threads: int, precision: str, label_smoothing: float) -> float:
    """Seconds per step of a plain timm loop: timm model and AdamW, autocast, channels_last, nothing else. The
    AdamW step is torch's fused kernel, as the platform's default (``optim.fused`` auto) picks on CPU and CUDA:
    the comparison is of the loops around the same step, not of two optimizer kernels."""
    import timm
    from timm.optim import create_optimizer_v2

    import metaformer_platform.models  # noqa: F401 - registers the debug and extra models

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = timm.create_model(model_name, num_classes=10).to(memory_format=torch.channels_last).train()
    opt = create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.05, fused=True)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    times, start = [], time.perf_counter()
    for step, (x, y) in enumerate(batches, 1):
        with autocast:
            loss = loss_fn(model(x.to(memory_format=torch.channels_last)), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss.detach())  # the platform syncs the loss at each log step; do the same work here
        if step % WINDOW == 0:
            times.append((time.perf_counter() - start) / WINDOW)
            start = time.perf_counter()
    return statistics.median(times[1:])


def bench_config(
    model: str, *, batch: int, steps: int, threads: int, precision: str, num_workers: int,
    label_smoothing: float, extra: list[str] = (),  # type: ignore[assignment]
) -> Any:
    """A job config for the Trainer on in-memory batches: no validation, no tracking, one final checkpoint."""
    from metaformer_platform.config import load_config

    return load_config(None, [
        f"model.name={model}", "model.num_classes=10", "model.drop_path_rate=0.0",
        f"trainer.batch_size={batch}", f"trainer.max_steps={steps}", f"trainer.log_every_steps={WINDOW}",
        f"trainer.checkpoint_every_steps={10 * steps}", f"trainer.torch_threads={threads}",
        f"trainer.precision={precision}", "trainer.channels_last=true", "data.val_split=null",
        "data.mixup_alpha=0", "data.cutmix_alpha=0", f"data.label_smoothing={label_smoothing}",
        f"scaling.num_workers={num_workers}", f"scaling.cpus_per_worker={threads}", "tracking.enabled=false",
        *extra,
    ])


def _trainer_worker(payload: dict[str, Any]) -> None:
    import ray.train

    from metaformer_platform.config import JobConfig
    from metaformer_platform.strategies.base import DistContext
    from metaformer_platform.training.trainer import Trainer

    cfg = JobConfig.model_validate(payload["config"])
    ctx = ray.train.get_context()
    rates: list[float] = []

    class Recorder:
        def log_metrics(self, metrics: dict[str, float], step: int) -> None:
            if "train/images_per_s" in metrics:
                rates.append(metrics["train/images_per_s"])

    dist = DistContext(rank=ctx.get_world_rank(), world_size=ctx.get_world_size())
    batches = make_batches(cfg.trainer.max_steps, cfg.trainer.batch_size, payload["size"], payload["seed"] + dist.rank)
    Trainer(cfg, dist, data_root=None, tracker=Recorder(), loaders=(InMemoryLoader(batches), None)).train()
    if dist.is_main:
        # Ray Train v2 keeps only metrics that come with a checkpoint: hand the figure back through a file.
        Path(payload["out"]).write_text(str(cfg.global_batch / statistics.median(rates[1:])))


def platform_loop(cfg: Any, *, size: int, seed: int) -> float:
    """Seconds per step of the platform's Trainer in ``cfg.scaling.num_workers`` Ray Train workers."""
    import ray.cloudpickle
    import ray.train
    from ray.train.torch import TorchTrainer

    # Workers cannot import this folder: ship the worker function by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    out = Path(tempfile.mkdtemp()) / "seconds_per_step"
    s = cfg.scaling
    TorchTrainer(
        _trainer_worker,
        train_loop_config={"config": cfg.model_dump(mode="json"), "size": size, "seed": seed, "out": str(out)},
        scaling_config=ray.train.ScalingConfig(num_workers=s.num_workers, resources_per_worker={"CPU": s.cpus_per_worker}),
        run_config=ray.train.RunConfig(storage_path=tempfile.mkdtemp(prefix="metaformer-bench-"), name="bench"),
    ).fit()
    return float(out.read_text())
