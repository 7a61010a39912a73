"""Benchmark (CUDA only): poolformer_s12 training images/s at 224 px, the platform's GPU path vs eager AMP.

Both sides train the same model on the same GPU-resident batches, one after the other in one run:

- eager:    a plain timm loop as most start: timm model, bf16 autocast, contiguous tensors, torch AdamW
            (foreach), no compile;
- platform: the platform's Trainer with trainer.precision=bf16, channels_last, trainer.compile=true and
            optim.fused left on auto (fused AdamW on CUDA).

A second section measures the data path (`data.decode_device`), on local shards of the real photos in
../shared/data/imagenet-sample (repeated to --data-samples; skipped when absent), 224 px, crop + flip +
normalize + erasing (no RandAugment: the cuda path has none, so the CPU side runs without it too):

- loader alone: images/s out of the platform loader with decode on the CPU (2 workers) vs nvjpeg batch
  decode on the GPU (workers ship JPEG bytes);
- training: the platform's Trainer (poolformer_s12, bf16, channels_last) fed by each loader.

It prints both rates, their ratio (goal >= 1.5x) and the MFU: images/s x training FLOPs per image (counted
with torch's FlopCounterMode on one forward + backward) / the GPU's dense bf16 peak (known GPUs, or
--peak-tflops). Without CUDA it says so and exits 0.

    python tests/benchmarks/bench_gpu.py [--batch 128] [--steps 60] [--peak-tflops 989] [--data-samples 5000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import InMemoryLoader  # noqa: E402

MODEL, SIZE, WINDOW = "poolformer_s12", 224, 10
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}


def _batches(batch: int, num: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(batch, 3, SIZE, SIZE, generator=gen).cuda(), torch.randint(0, 1000, (batch,), generator=gen).cuda())
            for _ in range(num)]


def train_flops_per_image() -> float:
    """FLOPs of one forward + backward of one image (FlopCounterMode counts a multiply-add as 2)."""
    import timm
    from torch.utils.flop_counter import FlopCounterMode

    import metaformer_platform.models  # noqa: F401

    model = timm.create_model(MODEL, num_classes=1000).cuda()
    x = torch.randn(1, 3, SIZE, SIZE, device="cuda")
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    return float(counter.get_total_flops())


def eager(batches: list, steps: int) -> float:
    import timm
    from timm.optim import create_optimizer_v2

    torch.manual_seed(0)
    model = timm.create_model(MODEL, num_classes=1000).cuda().train()
    opt = create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.05)  # foreach, not fused
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    rates, start = [], time.perf_counter()
    for step in range(1, steps + 1):
        x, y = batches[step % len(batches)]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % WINDOW == 0:
            float(loss)  # the platform syncs on the loss at each log step: the same here
            rates.append(WINDOW * x.shape[0] / (time.perf_counter() - start))
            start = time.perf_counter()
    return statistics.median(rates[2:])


def platform(batches: list, steps: int, batch: int) -> float:
    from metaformer_platform.config import load_config
    from metaformer_platform.strategies.base import DistContext
    from metaformer_platform.training.trainer import Trainer

    cfg = load_config(None, [
        f"model.name={MODEL}", "model.num_classes=1000", "model.drop_path_rate=0.0", f"data.img_size={SIZE}",
        "data.val_split=null", "data.mixup_alpha=0", "data.cutmix_alpha=0", "data.label_smoothing=0.1",
        f"trainer.batch_size={batch}", f"trainer.max_steps={steps}", f"trainer.log_every_steps={WINDOW}",
        f"trainer.checkpoint_every_steps={10 * steps}", "trainer.precision=bf16", "trainer.channels_last=true",
        "trainer.compile=true", "optim.warmup_epochs=0", "scaling.num_workers=1", "tracking.enabled=false",
    ])
    rates: list[float] = []

    class Rates:
        def log_metrics(self, metrics: dict[str, float], step: int) -> None:
            if "train/images_per_s" in metrics:
                rates.append(metrics["train/images_per_s"])

    trainer = Trainer(cfg, DistContext(device=torch.device("cuda", 0)), data_root=None, tracker=Rates(),
                      loaders=(InMemoryLoader(batches), None))
    assert trainer.strategy.optimizer.defaults.get("fused") is True
    trainer.train()
    return statistics.median(rates[2:])  # the first windows hold the compilation


SAMPLE = Path(__file__).resolve().parents[3] / "shared" / "data" / "imagenet-sample"


def _loader_rate(loader, limit: int) -> float:
    it = iter(loader)
    next(it)
    torch.cuda.synchronize()
    seen, start = 0, time.perf_counter()
    for _images, labels in it:
        seen += len(labels)
        if seen >= limit:
            break
    torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


class _Rates:
    def __init__(self) -> None:
        self.rates: list[float] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if "train/images_per_s" in metrics:
            self.rates.append(metrics["train/images_per_s"])


def data_path(batch: int, samples: int, workers: int, steps: int) -> None:
    """images/s of the loader alone and of training with it, decode on the CPU vs on the GPU."""
    import tempfile

    from metaformer_platform.config import load_config
    from metaformer_platform.data import build_loader, build_split_transforms
    from metaformer_platform.data.build import builder
    from metaformer_platform.strategies.base import DistContext
    from metaformer_platform.training.trainer import Trainer

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_loader import _image_folder

    if not SAMPLE.is_dir():
        print(f"data path: needs the real photos at {SAMPLE}; skipped")
        return
    device = torch.device("cuda", 0)
    with tempfile.TemporaryDirectory(prefix="bench-gpu-data-") as tmp_name:
        tmp = Path(tmp_name)
        classes, tasks = builder.prepare_build(train=_image_folder(tmp, samples), classes_file=SAMPLE / "classes.tsv",
                                               options=builder.BuildOptions(samples_per_shard=500))
        builder.build_dataset(tmp / "shards", tasks, classes=classes, log=lambda _: None)
        for decode in ("cpu", "cuda"):
            worker, batch_tf = build_split_transforms(224, is_training=True, auto_augment=None, device=device,
                                                      decode_device=decode, memory_format=torch.channels_last)
            loader = build_loader(tmp / "shards", "train", batch_size=batch, rank=0, world_size=1,
                                  num_workers=workers, transform=worker, batch_transform=batch_tf, seed=0,
                                  shuffle=True, pin_memory=decode == "cpu")
            print(f"  loader alone, decode on {decode:4s}: {_loader_rate(loader, min(samples, 20 * batch)):9.1f} images/s")
        for decode in ("cpu", "cuda"):
            cfg = load_config(None, [
                f"model.name={MODEL}", "model.drop_path_rate=0.0", "data.img_size=224", f"data.source={tmp / 'shards'}",
                "data.val_split=null", "data.auto_augment=null", f"data.decode_device={decode}",
                f"data.num_workers={workers}", f"trainer.batch_size={batch}", f"trainer.max_steps={steps}",
                f"trainer.log_every_steps={WINDOW}", f"trainer.checkpoint_every_steps={10 * steps}",
                "trainer.precision=bf16", "trainer.channels_last=true", "optim.warmup_epochs=0",
                "scaling.num_workers=1", "tracking.enabled=false",
            ])
            tracker = _Rates()
            Trainer(cfg, DistContext(device=device), data_root=tmp / "shards", tracker=tracker).train()
            print(f"  training {MODEL}, decode on {decode:4s}: {statistics.median(tracker.rates[1:]):9.1f} images/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of this GPU")
    parser.add_argument("--data-samples", type=int, default=5000, help="photos for the data-path section (0: skip)")
    parser.add_argument("--workers", type=int, default=2, help="loader workers in the data-path section")
    args, _ = parser.parse_known_args()
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here; nothing measured (run it on a GPU machine)")
        return
    torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name(0)
    batches = _batches(args.batch)
    eager_rate = eager(batches, args.steps)
    platform_rate = platform(batches, args.steps, args.batch)
    flops = train_flops_per_image()
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    print(f"{MODEL} at {SIZE} px, batch {args.batch}, {args.steps} steps, on {name}")
    print(f"  eager AMP timm loop      {eager_rate:9.1f} images/s")
    print(f"  platform (bf16+CL+compile+fused AdamW) {platform_rate:9.1f} images/s   ratio {platform_rate / eager_rate:.2f}x")
    print(f"  training FLOPs per image {flops / 1e9:.2f} G")
    if peak:
        for label, rate in (("eager", eager_rate), ("platform", platform_rate)):
            print(f"  MFU {label:8s} {100 * rate * flops / (peak * 1e12):5.1f}% of {peak:g} TFLOPS bf16")
    else:
        print(f"  MFU: unknown peak for {name!r}; pass --peak-tflops")

    if args.data_samples:
        print(f"data path (data.decode_device), 224 px, batch {args.batch}, {args.workers} workers, on {name}:")
        data_path(args.batch, args.data_samples, args.workers, args.steps)


if __name__ == "__main__":
    main()
