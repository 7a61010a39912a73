"""Benchmark: the platform's training loop (1 Ray Train worker) vs a bare single-process timm loop.

Both train the same model on the same in-memory batches with the same threads, precision and memory
format; each measures images/s over windows of steps after a warm-up, and the script prints the ratio
of the medians (goal >= 0.97). They run one after the other so they never share the CPU.

    python tests/benchmarks/bench_train_loop.py [--model poolformer_s12] [--steps 40] [--batch 64] [--size 64]

Ray needs a loopback-only network namespace on the project's sandbox (see the README).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

WINDOW = 5


class InMemoryLoader:
    """The loader protocol the Trainer uses, over batches generated from a fixed seed."""

    def __init__(self, num_batches: int, batch: int, size: int, num_classes: int) -> None:
        gen = torch.Generator().manual_seed(0)
        self.batches = [
            (torch.randn(batch, 3, size, size, generator=gen), torch.randint(0, num_classes, (batch,), generator=gen))
            for _ in range(num_batches)
        ]
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


def _config(args: argparse.Namespace) -> Any:
    from metaformer_platform.config import load_config

    return load_config(
        None,
        [
            f"model.name={args.model}", "model.num_classes=10", "model.drop_path_rate=0.0",
            f"trainer.batch_size={args.batch}", f"trainer.max_steps={args.steps}", f"trainer.log_every_steps={WINDOW}",
            f"trainer.checkpoint_every_steps={10 * args.steps}", f"trainer.torch_threads={args.threads}",
            "trainer.precision=bf16", "trainer.channels_last=true", "data.val_split=null",
            "data.mixup_alpha=0", "data.cutmix_alpha=0", "data.label_smoothing=0.1",
            "scaling.num_workers=1", f"scaling.cpus_per_worker={args.threads}", "tracking.enabled=false",
        ],
    )


def bare_loop(args: argparse.Namespace) -> float:
    """The reference: timm model, timm AdamW, bf16 autocast, channels_last; nothing else."""
    import timm
    from timm.optim import create_optimizer_v2

    import metaformer_platform.models  # noqa: F401 - registers the debug and extra models

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    loader = InMemoryLoader(args.steps, args.batch, args.size, 10)
    model = timm.create_model(args.model, num_classes=10).to(memory_format=torch.channels_last).train()
    opt = create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.05)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    rates, start = [], time.perf_counter()
    for step, (x, y) in enumerate(loader, 1):
        x = x.to(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss)  # the platform syncs the loss at each log step; do the same work here
        if step % WINDOW == 0:
            rates.append(WINDOW * args.batch / (time.perf_counter() - start))
            start = time.perf_counter()
    return statistics.median(rates[1:])


def _platform_worker(payload: dict[str, Any]) -> None:
    import ray.train

    from metaformer_platform.config import JobConfig
    from metaformer_platform.strategies.base import DistContext
    from metaformer_platform.training.trainer import Trainer

    cfg = JobConfig.model_validate(payload["config"])
    rates: list[float] = []

    class Recorder:
        def log_metrics(self, metrics: dict[str, float], step: int) -> None:
            if "train/images_per_s" in metrics:
                rates.append(metrics["train/images_per_s"])

    ctx = ray.train.get_context()
    dist = DistContext(rank=ctx.get_world_rank(), world_size=ctx.get_world_size())
    loader = InMemoryLoader(cfg.trainer.max_steps, cfg.trainer.batch_size, payload["size"], 10)
    trainer = Trainer(cfg, dist, data_root=None, tracker=Recorder(), loaders=(loader, None))
    trainer.train()
    # Ray Train v2 keeps only metrics that come with a checkpoint: hand the figure back through a file.
    Path(payload["out"]).write_text(str(statistics.median(rates[1:])))


def platform_loop(args: argparse.Namespace) -> float:
    import ray.train
    from ray.train.torch import TorchTrainer

    cfg = _config(args)
    out = Path(tempfile.mkdtemp()) / "images_per_s"
    TorchTrainer(
        _platform_worker,
        train_loop_config={"config": cfg.model_dump(mode="json"), "size": args.size, "out": str(out)},
        scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": args.threads}),
        run_config=ray.train.RunConfig(storage_path="/tmp/metaformer-bench", name=f"bench-{time.time_ns()}"),
    ).fit()
    return float(out.read_text())


def main() -> None:
    import ray

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="poolformer_s12")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; the best of each side counts")
    args = parser.parse_args()
    # One Ray cluster for the whole run, idle while the bare loop runs, so both sides share its background.
    ray.init(address="local", num_cpus=args.threads, include_dashboard=False, log_to_driver=False)
    platform, bare = [], []
    try:
        for _ in range(args.rounds):
            platform.append(platform_loop(args))
            bare.append(bare_loop(args))
    finally:
        ray.shutdown()
    print(f"model {args.model}, batch {args.batch}, {args.size} px, {args.threads} threads, bf16 + channels_last, "
          f"{args.steps} steps, median of {WINDOW}-step windows after the first, best of {args.rounds} rounds")
    print(f"bare timm loop (driver process): {max(bare):8.1f} images/s  (rounds: {', '.join(f'{b:.1f}' for b in bare)})")
    print(f"platform (1 Ray Train worker):   {max(platform):8.1f} images/s  "
          f"(rounds: {', '.join(f'{p:.1f}' for p in platform)})")
    print(f"ratio platform / bare: {max(platform) / max(bare):.3f}  (goal >= 0.97)")


if __name__ == "__main__":
    main()
