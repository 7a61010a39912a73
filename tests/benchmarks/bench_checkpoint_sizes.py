"""Benchmark: checkpoints at size. For each PoolFormer size (S12 ... M48) and each strategy that runs on a CPU
with gloo (DDP, FSDP2, DeepSpeed ZeRO-1/2/3), the full-state checkpoint's bytes, the time to save it (the
Trainer's own ``save_checkpoint``: model, AdamW state, EMA where the strategy allows it, schedule, RNG) and
the time to upload it to SeaweedFS on 127.0.0.1 through the platform's path (``upload_checkpoint_part`` on
the ``pyarrow`` S3 filesystem Ray Train is given, as each worker's upload runs).

The models are not trained at 224 px here (a CPU takes minutes per step for M48): one optimizer step on a
tiny batch gives AdamW its state, and the save and upload of that state are what is measured. One rank
(a gloo group of one): a checkpoint's bytes do not depend on the world size for DDP (rank 0 writes the
model), and for FSDP2/ZeRO the parts of N ranks add up to the same bytes (each rank writes 1/N).

Part 2, the step stall: ``bench_checkpoint.stall`` (one Ray Train worker, the job's own checkpoint report)
for S12 and M48 with ``run.checkpoint_upload`` sync and async to s3://, at a small image size.

    PYTHONPATH=platform:infra/local python tests/benchmarks/bench_checkpoint_sizes.py \
        [--models poolformer_s12,...] [--strategies ddp,fsdp,zero1,zero2,zero3] [--skip-stall]
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import InMemoryLoader, make_batches, private_s3  # noqa: E402

MODELS = ("poolformer_s12", "poolformer_s24", "poolformer_s36", "poolformer_m36", "poolformer_m48")
STRATEGIES = {  # name in the table -> the job config's strategy settings
    "ddp": ["strategy.name=ddp"],
    "fsdp": ["strategy.name=fsdp"],
    "zero1": ["strategy.name=deepspeed", "strategy.zero_stage=1"],
    "zero2": ["strategy.name=deepspeed", "strategy.zero_stage=2"],
    "zero3": ["strategy.name=deepspeed", "strategy.zero_stage=3", "trainer.ema_decay=null"],
}


def _config(model: str, strategy: str, ema: bool) -> Any:
    from metaformer_platform.config import load_config

    return load_config(None, [
        f"model.name={model}", "model.num_classes=1000", "model.drop_path_rate=0.0", "data.img_size=64",
        "data.val_split=null", "data.mixup_alpha=0", "data.cutmix_alpha=0", "trainer.batch_size=2",
        "trainer.max_steps=1", "trainer.precision=fp32", "trainer.torch_threads=2", "optim.warmup_epochs=0",
        f"trainer.ema_decay={0.9999 if ema else 'null'}", "scaling.num_workers=1", "tracking.enabled=false",
        *STRATEGIES[strategy],
    ])


def measure(model: str, strategy: str, ema: bool, bucket: str, tmp: Path) -> dict[str, float]:
    """One step of ``model`` under ``strategy``, then its checkpoint saved (timed) and uploaded (timed)."""
    from metaformer_platform.storage import Location
    from metaformer_platform.storage.upload import upload_checkpoint_part
    from metaformer_platform.strategies.base import DistContext
    from metaformer_platform.training.trainer import Trainer

    cfg = _config(model, strategy, ema and strategy != "zero3")
    trainer = Trainer(cfg, DistContext(), data_root=None,
                      loaders=(InMemoryLoader(make_batches(1, 2, 64, seed=0, num_classes=1000)), None))
    trainer._train_step()
    folder = tmp / f"{model}-{strategy}"
    start = time.perf_counter()
    trainer.save_checkpoint(folder)
    saved = time.perf_counter() - start
    total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    where = Location.parse(f"s3://{bucket}/sizes/{model}-{strategy}")
    start = time.perf_counter()
    upload_checkpoint_part(folder, where.filesystem(), where.fs_path, rank=0, world_size=1)
    uploaded = time.perf_counter() - start
    params = sum(getattr(p, "ds_numel", p.numel()) for p in trainer.strategy.module.parameters())  # ZeRO-3: partitioned
    del trainer
    # about 1 GiB per M48 checkpoint: keep neither copy
    shutil.rmtree(folder)
    where.filesystem().delete_dir(where.fs_path)
    gc.collect()
    return {"params_m": params / 1e6, "mib": total / 2**20, "save_s": saved, "upload_s": uploaded,
            "save_mib_s": total / 2**20 / saved, "upload_mib_s": total / 2**20 / uploaded,
            "ema": float(ema and strategy != "zero3")}


def _stall_rows(args: argparse.Namespace, tmp: Path) -> list[tuple[str, str, dict[str, Any]]]:
    import bench_checkpoint
    import ray

    rows = []
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for model in args.stall_models.split(","):
            bench_checkpoint.MODEL = model
            stall_args = argparse.Namespace(img_size=args.stall_img_size, batch=4, steps=args.stall_steps,
                                            every=args.stall_every)
            for mode in ("sync", "async"):
                rows.append((model, mode, bench_checkpoint.stall(stall_args, "s3://bench/runs", mode)))
    finally:
        ray.shutdown()
    return rows


def _print(sizes: dict[tuple[str, str], dict[str, float]], stalls: list[tuple[str, str, dict[str, Any]]],
           args: argparse.Namespace) -> None:
    print(f"full-state checkpoints, 1 rank, gloo, SeaweedFS on 127.0.0.1 ({os.cpu_count()} CPUs shared; "
          "upload through upload_checkpoint_part onto pyarrow S3):")
    print(f"  {'model':15s} {'strategy':8s} {'params M':>8s} {'EMA':>3s} {'MiB':>7s} {'save s':>7s} {'MiB/s':>6s} "
          f"{'upload s':>8s} {'MiB/s':>6s}")
    for (model, strategy), r in sizes.items():
        print(f"  {model:15s} {strategy:8s} {r['params_m']:8.1f} {'yes' if r['ema'] else 'no':>3s} {r['mib']:7.0f} "
              f"{r['save_s']:7.2f} {r['save_mib_s']:6.0f} {r['upload_s']:8.2f} {r['upload_mib_s']:6.0f}")
    if stalls:
        print(f"step stall per checkpoint (1 Ray worker, ddp, {args.stall_img_size} px, batch 4, bf16, EMA, "
              f"every {args.stall_every} of {args.stall_steps} steps, to s3://):")
        for model, mode, r in stalls:
            s = statistics.median(r["stalls"])
            print(f"  {model:15s} {mode:5s} stall {s:6.2f} s = {s / r['step_s']:5.2f} steps of {r['step_s']:.2f} s "
                  f"(each: {', '.join(f'{x:.2f}' for x in r['stalls'])})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--no-ema", action="store_true", help="checkpoints without the EMA copy")
    parser.add_argument("--skip-stall", action="store_true")
    parser.add_argument("--stall-models", default="poolformer_s12,poolformer_m48")
    parser.add_argument("--stall-img-size", type=int, default=64)
    parser.add_argument("--stall-steps", type=int, default=12)
    parser.add_argument("--stall-every", type=int, default=4)
    args, _ = parser.parse_known_args()  # `make benchmark` passes one ARGS to every benchmark
    torch.set_num_threads(2)
    import torch.distributed as tdist

    sizes: dict[tuple[str, str], dict[str, float]] = {}
    stalls: list[tuple[str, str, dict[str, Any]]] = []
    with private_s3("bench-ckpt-sizes-") as s3:
        tmp = s3.tmp
        # FSDP2 and DeepSpeed need a process group, even of one (DeepSpeed: and the launcher's variables)
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        tdist.init_process_group("gloo", init_method=f"file://{tmp / 'store'}", rank=0, world_size=1)
        for model in args.models.split(","):
            for strategy in args.strategies.split(","):
                sizes[model, strategy] = measure(model, strategy, not args.no_ema, "bench", tmp / "ckpt")
                print(model, strategy, {k: round(v, 2) for k, v in sizes[model, strategy].items()}, flush=True)
        tdist.destroy_process_group()
        if not args.skip_stall:
            stalls = _stall_rows(args, tmp)
    _print(sizes, stalls, args)


if __name__ == "__main__":
    main()
