"""Benchmark: a full-state checkpoint of poolformer_m48 to S3, and how long it stalls training.

A private SeaweedFS on 127.0.0.1 (``common.private_s3``). Two parts, each measured side by side in one run:

1. Upload bytes/s. The Trainer writes a full-state checkpoint of poolformer_m48 (model, AdamW state, EMA,
   schedule, RNG) once; then, rounds alternating, the same folder goes up (a) through the platform's path,
   ``upload_checkpoint_part`` onto the ``pyarrow.fs.S3FileSystem`` that Ray Train is given (what each
   worker's ``checkpoint_upload_fn`` runs), and (b) by raw boto3 ``upload_file`` of each file (its default
   multipart transfer). Goal: (a) >= 0.8x (b).
2. Training stall per checkpoint. The Trainer in one Ray Train worker trains m48 on in-memory batches and
   checkpoints every ``--every`` steps through ``launch.checkpoint_reporter`` (the job's own report), to a
   local folder and to s3://, with ``run.checkpoint_upload`` sync and async. The stall is the time
   ``save_and_report`` blocks training; the step is the median step time. Goal (async): stall <= 1 step.

    python tests/benchmarks/bench_checkpoint.py [--rounds 3] [--img-size 160 --batch 8 --steps 12 --every 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import InMemoryLoader, make_batches, private_s3  # noqa: E402

MODEL = "poolformer_m48"


def _config(args: argparse.Namespace, *extra: str) -> Any:
    from metaformer_platform.config import load_config

    return load_config(None, [
        f"model.name={MODEL}", "model.num_classes=1000", "model.drop_path_rate=0.0",
        f"data.img_size={args.img_size}", "data.val_split=null", "data.mixup_alpha=0", "data.cutmix_alpha=0",
        f"trainer.batch_size={args.batch}", f"trainer.max_steps={args.steps}", "trainer.log_every_steps=1",
        f"trainer.checkpoint_every_steps={args.every}", "trainer.precision=bf16", "trainer.channels_last=true",
        "trainer.torch_threads=2", "trainer.ema_decay=0.9999", "optim.warmup_epochs=0",
        "scaling.num_workers=1", "scaling.cpus_per_worker=2", "tracking.enabled=false", *extra,
    ])


def _full_state_checkpoint(args: argparse.Namespace, folder: Path) -> int:
    """One optimizer step (so AdamW has its state), then the Trainer's own full-state save; returns bytes."""
    from metaformer_platform.strategies.base import DistContext
    from metaformer_platform.training.trainer import Trainer

    cfg = _config(args, "trainer.max_steps=1")
    batches = make_batches(1, 2, 64, seed=0, num_classes=1000)
    trainer = Trainer(cfg, DistContext(), data_root=None, loaders=(InMemoryLoader(batches), None))
    trainer._train_step()
    trainer.save_checkpoint(folder)
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def upload_rates(args: argparse.Namespace, bucket: str) -> tuple[int, dict[str, float]]:
    import boto3

    from metaformer_platform.storage import Location
    from metaformer_platform.storage.upload import upload_checkpoint_part

    s3 = boto3.client("s3")
    upload = Location.parse(f"s3://{bucket}/upload")
    fs, root = upload.filesystem(), upload.fs_path
    with tempfile.TemporaryDirectory(prefix="bench-ckpt-") as tmp:
        folder = Path(tmp) / "checkpoint"
        total = _full_state_checkpoint(args, folder)
        files = [p for p in sorted(folder.rglob("*")) if p.is_file()]

        def platform(i: int) -> None:
            upload_checkpoint_part(folder, fs, f"{root}/platform-{i}", rank=0, world_size=1)

        def raw(i: int) -> None:
            for p in files:
                s3.upload_file(str(p), bucket, f"upload/raw-{i}/{p.relative_to(folder)}")

        rates: dict[str, list[float]] = {"platform": [], "boto3": []}
        for i in range(args.rounds):
            for name, fn in (("platform", platform), ("boto3", raw)):
                start = time.perf_counter()
                fn(i)
                rates[name].append(total / (time.perf_counter() - start) / 2**20)
    return total, {k: statistics.median(v) for k, v in rates.items()}


def _stall_worker(payload: dict[str, Any]) -> None:
    import ray.train

    from metaformer_platform.config import JobConfig
    from metaformer_platform.launch.workers import checkpoint_reporter
    from metaformer_platform.strategies.base import DistContext
    from metaformer_platform.training.trainer import Trainer

    cfg = JobConfig.model_validate(payload["config"])
    ctx = ray.train.get_context()
    dist = DistContext(rank=ctx.get_world_rank(), world_size=ctx.get_world_size())
    steps: list[float] = []
    last = [time.perf_counter()]

    class StepClock:
        """Step times from the log cadence (every step), leaving out the steps a checkpoint ended."""

        def log_metrics(self, metrics: dict[str, float], step: int) -> None:
            now = time.perf_counter()
            if "train/loss" in metrics and step % cfg.trainer.checkpoint_every_steps != 1 and step > 1:
                steps.append(now - last[0])
            last[0] = now

    batches = make_batches(cfg.trainer.max_steps, cfg.trainer.batch_size, cfg.data.img_size, seed=0, num_classes=1000)
    trainer = Trainer(cfg, dist, data_root=None, tracker=StepClock(), report=checkpoint_reporter(cfg.run.checkpoint_upload, dist),
                      loaders=(InMemoryLoader(batches), None))
    start = time.perf_counter()
    trainer.train()
    Path(payload["out"]).write_text(json.dumps({
        "step_s": statistics.median(steps), "stalls": trainer.checkpoint_stalls,
        "loop_s": time.perf_counter() - start,
    }))


def stall(args: argparse.Namespace, storage: str, mode: str) -> dict[str, Any]:
    import ray.cloudpickle
    import ray.train
    from ray.train.torch import TorchTrainer

    from metaformer_platform.storage import Location, aws_env

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.cloudpickle.register_pickle_by_value(sys.modules["common"])
    cfg = _config(args, f"run.checkpoint_upload={mode}")
    out = Path(tempfile.mkdtemp()) / "stall.json"
    where = Location.parse(storage)
    fs, path = (where.filesystem(), where.fs_path) if where.remote else (None, storage)
    TorchTrainer(
        _stall_worker,
        train_loop_config={"config": cfg.model_dump(mode="json"), "out": str(out)},
        scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 2}),
        run_config=ray.train.RunConfig(storage_path=path, storage_filesystem=fs, name=f"stall-{mode}-{time.time_ns()}",
                                       worker_runtime_env={"env_vars": aws_env()}),
    ).fit()
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--img-size", type=int, default=160)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--every", type=int, default=4)
    parser.add_argument("--skip-stall", action="store_true", help="part 1 only (no Ray)")
    parser.add_argument("--where", choices=["both", "local", "s3"], default="both", help="part 2's storage")
    args, _ = parser.parse_known_args()  # `make benchmark` passes one ARGS to every benchmark
    torch.set_num_threads(2)

    import ray

    with private_s3("bench-ckpt-s3-") as s3:
        total, rates = upload_rates(args, "bench")
        stalls: dict[tuple[str, str], dict[str, Any]] = {}
        if not args.skip_stall:
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
            try:
                for where, storage in (("local", str(s3.tmp / "runs")), ("s3", "s3://bench/runs")):
                    if args.where not in ("both", where):
                        continue
                    for mode in ("sync", "async"):
                        stalls[where, mode] = stall(args, storage, mode)
            finally:
                ray.shutdown()

    print(f"{MODEL} full-state checkpoint (model + AdamW state + EMA + schedule + RNG): {total / 2**20:.0f} MiB, "
          f"{args.rounds} rounds, SeaweedFS on 127.0.0.1")
    for name, rate in rates.items():
        print(f"  upload {name:9s} {rate:8.1f} MiB/s   ratio to raw boto3 {rate / rates['boto3']:.2f}x")
    if stalls:
        print(f"training stall per checkpoint (1 Ray worker, {args.img_size} px, batch {args.batch}, bf16, "
              f"checkpoint every {args.every} of {args.steps} steps):")
        for (where, mode), r in stalls.items():
            s = statistics.median(r["stalls"])
            print(f"  {where:5s} {mode:5s} stall {s:6.2f} s = {s / r['step_s']:5.2f} steps of {r['step_s']:.2f} s "
                  f"(each: {', '.join(f'{x:.2f}' for x in r['stalls'])}); training loop {r['loop_s']:.1f} s")


if __name__ == "__main__":
    main()
