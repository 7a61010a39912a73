"""The capacity model: what a PoolFormer job needs per node and how long it runs, from measured and published
rates. ``docs/capacity.md`` is generated from it (``python -m metaformer_platform.launch.capacity``; a unit test
checks they agree) and the dry run's estimates use it when MLflow holds no earlier run to go by.

Every figure names its source (``SOURCES``). What is assumed rather than measured says so:

- A GPU's training rate is timm's measured RTX 3090 rate (AMP) scaled by memory bandwidth: PoolFormer's token
  mixer (pooling) and norms are memory-bound, so bandwidth, not tensor FLOPs, is the conservative scale.
- Resolution scales the rate by pixels (224 / img_size)^2; a model outside the table by its forward MACs
  against poolformer_s12's.
- Ranks scale linearly (no communication overhead, no data wait): a lower bound on wall time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

IMAGENET_TRAIN = 1_281_167  # ILSVRC-2012 train images
PAPER_EPOCHS = 300  # PoolFormer paper's recipe, 224 px
SAMPLES_PER_SHARD = 1_000  # jobs/build_shards.py default: about 1,281 ImageNet shards

SOURCES = {
    "timm": "timm's benchmark, results/benchmark-train-amp-nchw-pt112-cu113-rtx3090.csv "
    "(huggingface/pytorch-image-models): train_samples_per_sec, AMP, NCHW, PyTorch 1.12, RTX 3090",
    "design": "DESIGN.md, measured facts: MACs at 224 px counted with torch's FlopCounterMode; poolformer_s12 "
    "at 64 px, bf16, 2 CPUs (AVX512-BF16/AMX): 125 img/s",
    "h100": "NVIDIA H100 datasheet: H100 SXM5 memory bandwidth 3,350 GB/s",
    "rtx3090": "NVIDIA GeForce RTX 3090 specifications: memory bandwidth 936 GB/s",
    "loader": "docs/data.md: CPU time per sample of the loader on local shards, 4.6 ms (224 px, RandAugment); "
    "of it decode + crop 1.89 ms and RandAugment 1.1 ms, which data.decode_device=cuda moves off the CPU",
    "jpeg": "the project's imagenet-sample (1,000 ImageNet photos): 113,734 bytes per JPEG on average, "
    "+ 2,048 bytes of tar headers and padding per sample",
    "upload": "docs/storage.md: checkpoint upload to SeaweedFS through the platform's path, 110 MiB/s (one "
    "stream, 2-core machine; a lower bound for a cluster node)",
}


@dataclass(frozen=True)
class Size:
    """One family member: parameters (timm, exact), forward MACs at 224 px and timm's RTX 3090 training rate."""

    params: int
    gmacs_224: float
    rtx3090_images_per_s: float


SIZES: dict[str, Size] = {
    "poolformer_s12": Size(11_915_176, 1.81, 1234.11),
    "poolformer_s24": Size(21_388_968, 3.39, 681.93),
    "poolformer_s36": Size(30_862_760, 4.97, 425.00),
    "poolformer_m36": Size(56_172_520, 8.76, 303.34),
    "poolformer_m48": Size(73_473_448, 11.53, 220.53),
}
BANDWIDTH_GBS = {"rtx3090": 936.0, "h100": 3350.0}
REFERENCE_GPU = "h100"
CPU_GMACS_PER_S = 125 * 1.81 * (64 / 224) ** 2 / 2  # per CPU: the measured s12 rate at 64 px on 2 CPUs
LOADER_CPU_S = 4.6e-3  # per sample, CPU decode and augment
LOADER_GPU_DECODE_CPU_S = (4.6 - 1.89 - 1.1) * 1e-3  # read, tar parse, collate, IPC: what stays on the CPU
SAMPLE_BYTES = 113_734 + 2_048
UPLOAD_BYTES_PER_S = 110 * 2**20
BYTES_PER_PARAM = 4 + 8 + 4  # fp32 weights, AdamW's two moments, the fp32 EMA


def gpu_images_per_s(model: str, *, gpu: str = REFERENCE_GPU, img_size: int = 224, gmacs_224: float | None = None) -> float:
    """Training images/s of one GPU for ``model`` (a table size, or any model given its ``gmacs_224``)."""
    if gpu not in BANDWIDTH_GBS:
        raise ValueError(f"no rate for GPU {gpu!r}; the capacity model knows {sorted(BANDWIDTH_GBS)}")
    s12 = SIZES["poolformer_s12"]
    size = SIZES.get(model)
    at_224 = size.rtx3090_images_per_s if size else s12.rtx3090_images_per_s * s12.gmacs_224 / _gmacs(model, gmacs_224)
    return at_224 * BANDWIDTH_GBS[gpu] / BANDWIDTH_GBS["rtx3090"] * (224 / img_size) ** 2


def cpu_images_per_s(model: str, *, cpus: float, img_size: int = 224, gmacs_224: float | None = None) -> float:
    """Training images/s of a CPU worker with ``cpus`` CPUs, from the measured s12 rate, scaled by MACs."""
    return cpus * CPU_GMACS_PER_S / (_gmacs(model, gmacs_224) * (img_size / 224) ** 2)


def _gmacs(model: str, gmacs_224: float | None) -> float:
    if gmacs_224 is not None:
        return gmacs_224
    if model in SIZES:
        return SIZES[model].gmacs_224
    raise ValueError(f"no MAC count for {model!r}: pass gmacs_224 (launch.capacity.forward_gmacs counts it)")


def forward_gmacs(model: object, img_size: int = 224) -> float:
    """Forward MACs (G) of a built ``torch.nn.Module`` for one image, counted on the meta device (no memory)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"), FlopCounterMode(display=False) as counter:
        model(torch.empty(1, 3, img_size, img_size))  # type: ignore[operator]
    return counter.get_total_flops() / 2e9


@dataclass(frozen=True)
class NodeNeeds:
    """What a node of ``gpus`` GPUs training one size consumes."""

    model: str
    gpus: int
    images_per_s: float
    cores_cpu_decode: float
    cores_gpu_decode: float
    s3_bytes_per_s: float
    s3_requests_per_s: float
    checkpoint_bytes: int
    upload_s: float


def node_needs(model: str, gpus: int = 8, gpu: str = REFERENCE_GPU) -> NodeNeeds:
    """Per node: images/s at the GPUs' rate, loader cores (CPU / GPU decode), S3 traffic, checkpoint size and
    upload time (one checkpoint of the whole job: weights, AdamW moments and EMA, fp32)."""
    rate = gpus * gpu_images_per_s(model, gpu=gpu)
    ckpt = SIZES[model].params * BYTES_PER_PARAM
    return NodeNeeds(
        model=model, gpus=gpus, images_per_s=rate,
        cores_cpu_decode=rate * LOADER_CPU_S, cores_gpu_decode=rate * LOADER_GPU_DECODE_CPU_S,
        s3_bytes_per_s=rate * SAMPLE_BYTES, s3_requests_per_s=rate / SAMPLES_PER_SHARD,
        checkpoint_bytes=ckpt, upload_s=ckpt / UPLOAD_BYTES_PER_S,
    )


def retrain(model: str, gpus: int, *, epochs: float = PAPER_EPOCHS, samples: int = IMAGENET_TRAIN,
            gpu: str = REFERENCE_GPU) -> tuple[float, float]:
    """(wall seconds, GPU-hours) of training ``model`` for ``epochs`` on ``gpus`` GPUs, linear scaling."""
    wall = epochs * samples / (gpus * gpu_images_per_s(model, gpu=gpu))
    return wall, wall * gpus / 3600


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h"


def markdown() -> str:
    """The tables of ``docs/capacity.md`` (regenerate them with ``python -m metaformer_platform.launch.capacity``)."""
    rows = [
        "| size | params | GMACs | img/s per GPU (RTX 3090, timm) | img/s per GPU (H100, scaled) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, size in SIZES.items():
        rows.append(f"| {name} | {size.params:,} | {size.gmacs_224} | {size.rtx3090_images_per_s:,.0f} | "
                    f"{gpu_images_per_s(name):,.0f} |")
    rows += ["", "Per node of 8 H100s:", "",
             "| size | images/s | loader cores, CPU decode | loader cores, GPU decode | S3 MB/s | S3 GET/s | "
             "checkpoint | upload |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name in SIZES:
        n = node_needs(name)
        rows.append(f"| {name} | {n.images_per_s:,.0f} | {math.ceil(n.cores_cpu_decode)} | "
                    f"{math.ceil(n.cores_gpu_decode)} | {n.s3_bytes_per_s / 1e6:,.0f} | {n.s3_requests_per_s:.1f} | "
                    f"{n.checkpoint_bytes / 1e9:.2f} GB | {n.upload_s:.1f} s |")
    rows += ["", f"The weekly retrain ({PAPER_EPOCHS} epochs of ImageNet-1k, 224 px), wall time / GPU-hours:", "",
             "| size | 8 GPUs | 32 GPUs | 64 GPUs |", "| --- | ---: | ---: | ---: |"]
    total = 0.0
    for name in SIZES:
        cells = []
        for gpus in (8, 32, 64):
            wall, gpu_hours = retrain(name, gpus)
            cells.append(f"{_hours(wall)} / {gpu_hours:,.0f}")
        total += retrain(name, 8)[1]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    rows += ["", f"All five sizes: {total:,.0f} GPU-hours a week (the same at every GPU count: linear scaling)."]
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown())
