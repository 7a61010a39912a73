"""Benchmark: step time of ddp / fsdp / deepspeed ZeRO-1/2/3 (2 Ray Train workers) vs a bare timm loop.

The bare loop runs in one process with the same global batch (2 x the per-worker batch) and all the
threads; each strategy runs the platform's Trainer in 2 workers of 1 thread each on in-memory batches. Each
side's figure is the median step time over windows after a warm-up; the script prints each strategy's
ratio to the bare loop (the platform's overhead plus the strategy's communication). One after another, so
they never share the CPU; on a shared host, run it when the machine is otherwise idle.

    python tests/benchmarks/bench_strategies.py [--model poolformer_s12] [--size 32] [--batch 8] [--steps 30]

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
STRATEGIES = {
    "ddp": ["strategy.name=ddp"],
    "fsdp": ["strategy.name=fsdp"],
    "zero1": ["strategy.name=deepspeed", "strategy.zero_stage=1"],
    "zero2": ["strategy.name=deepspeed", "strategy.zero_stage=2"],
    "zero3": ["strategy.name=deepspeed", "strategy.zero_stage=3"],
}


def _batches(num: int, batch: int, size: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, size, size, generator=gen), torch.randint(0, 10, (batch,), generator=gen))
            for _ in range(num)]


def bare_loop(args: argparse.Namespace) -> float:
    """Seconds per step of a plain timm loop over the global batch (same precision and memory format)."""
    import timm
    from timm.optim import create_optimizer_v2

    import metaformer_platform.models  # noqa: F401

    torch.set_num_threads(2 * args.threads)
    torch.manual_seed(0)
    model = timm.create_model(args.model, num_classes=10).to(memory_format=torch.channels_last).train()
    opt = create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.05)
    loss_fn = torch.nn.CrossEntropyLoss()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16")
    times, start = [], time.perf_counter()
    for step, (x, y) in enumerate(_batches(args.steps, 2 * args.batch, args.size, 0), 1):
        with autocast:
            loss = loss_fn(model(x.to(memory_format=torch.channels_last)), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss.detach())
        if step % WINDOW == 0:
            times.append((time.perf_counter() - start) / WINDOW)
            start = time.perf_counter()
    return statistics.median(times[1:])


def _worker(payload: dict[str, Any]) -> None:
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

    class Loader:
        def __init__(self, batches: list) -> None:
            self.batches = batches

        def __len__(self) -> int:
            return len(self.batches)

        def __iter__(self):
            return iter(self.batches)

        def state_dict(self) -> dict:
            return {}

        def load_state_dict(self, state: dict) -> None:
            pass

    batches = _batches(cfg.trainer.max_steps, cfg.trainer.batch_size, payload["size"], 1 + ctx.get_world_rank())
    dist = DistContext(rank=ctx.get_world_rank(), world_size=ctx.get_world_size())
    trainer = Trainer(cfg, dist, data_root=None, tracker=Recorder(), loaders=(Loader(batches), None))
    trainer.train()
    if dist.is_main:  # images/s of the global batch -> seconds per step
        Path(payload["out"]).write_text(str(cfg.global_batch / statistics.median(rates[1:])))


def platform_loop(args: argparse.Namespace, strategy: list[str]) -> float:
    import ray.train
    from ray.train.torch import TorchTrainer

    from metaformer_platform.config import load_config

    cfg = load_config(None, [
        f"model.name={args.model}", "model.num_classes=10", "model.drop_path_rate=0.0",
        f"trainer.batch_size={args.batch}", f"trainer.max_steps={args.steps}", f"trainer.log_every_steps={WINDOW}",
        f"trainer.checkpoint_every_steps={10 * args.steps}", f"trainer.torch_threads={args.threads}",
        f"trainer.precision={args.precision}", "trainer.channels_last=true", "data.val_split=null",
        "data.mixup_alpha=0", "data.cutmix_alpha=0", "data.label_smoothing=0",
        "scaling.num_workers=2", f"scaling.cpus_per_worker={args.threads}", "tracking.enabled=false", *strategy,
    ])
    out = Path(tempfile.mkdtemp()) / "seconds_per_step"
    TorchTrainer(
        _worker,
        train_loop_config={"config": cfg.model_dump(mode="json"), "size": args.size, "out": str(out)},
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": args.threads}),
        run_config=ray.train.RunConfig(storage_path="/tmp/metaformer-bench", name=f"bench-{time.time_ns()}"),
    ).fit()
    return float(out.read_text())


def main() -> None:
    import ray

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="poolformer_s12")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8, help="images per worker per step")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="threads per worker (the bare loop gets 2x)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    args = parser.parse_args()
    ray.init(address="local", num_cpus=2 * args.threads, include_dashboard=False, log_to_driver=False)
    results: dict[str, float] = {}
    try:
        bare = bare_loop(args)
        for name in args.strategies.split(","):
            results[name] = platform_loop(args, STRATEGIES[name])
    finally:
        ray.shutdown()
    print(f"model {args.model}, {args.size} px, global batch {2 * args.batch} ({args.batch} per worker x 2), "
          f"{args.precision}, channels_last, median of {WINDOW}-step windows after the first")
    print(f"bare timm loop, 1 process, {2 * args.threads} threads: {1000 * bare:7.1f} ms/step")
    for name, seconds in results.items():
        print(f"{name:6s} 2 workers x {args.threads} thread(s):     {1000 * seconds:7.1f} ms/step  "
              f"ratio to bare {seconds / bare:.2f}")


if __name__ == "__main__":
    main()
