"""Benchmark (CUDA only): poolformer_s12 training images/s at 224 px, the platform's GPU path vs eager AMP.

Both sides train the same model on the same GPU-resident batches, one after the other in one run:

- eager:    a plain timm loop as most start: timm model, bf16 autocast, contiguous tensors, torch AdamW
            (foreach), no compile;
- platform: the platform's Trainer with trainer.precision=bf16, channels_last, trainer.compile=true and
            optim.fused left on auto (fused AdamW on CUDA).

It prints both rates, their ratio (goal >= 1.5x) and the MFU: images/s x training FLOPs per image (counted
with torch's FlopCounterMode on one forward + backward) / the GPU's dense bf16 peak (known GPUs, or
--peak-tflops). Without CUDA it says so and exits 0.

    python tests/benchmarks/bench_gpu.py [--batch 128] [--steps 60] [--peak-tflops 989]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of this GPU")
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


if __name__ == "__main__":
    main()
