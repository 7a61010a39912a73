"""Benchmark: the platform's loader on S3 shards (and local shards) vs torchvision `ImageFolder` + `DataLoader`
on local JPEGs.

All paths produce the paper's training tensors (random-resized crop to 224 px, flip, RandAugment
rand-m9-mstd0.5-inc1, normalize, random erasing 0.25) with the same number of DataLoader workers and batch
size, from the same photos: ../shared/data/imagenet-sample (1000 real ImageNet JPEGs) linked repeatedly
into an ImageFolder of at least --samples images. ImageFolder runs timm's float transform in its workers
(`build_transforms`). The platform runs its split transform (`build_split_transforms`): uint8 from the
workers, normalize + erasing batched in the main process, which is timed with the loader; its crop is
decoded by simplejpeg (and, for the "PIL decode (main)" row, by PIL as on main before it). It reads
webdataset shards of the ORIGINAL JPEGs from a private SeaweedFS on 127.0.0.1 and from a local folder
(to separate what the S3 server on the same cores costs), and with --max-side N also shards re-encoded by
the builder to that maximum side. Each path is timed after a warm-up batch, one after the other so they
never share the CPU, in alternating rounds; the script prints the median samples/s and ratios (goal
>= 1.5x), and the CPU ms per sample of all the run's processes (main, workers, S3 server), which a
machine shared with other users disturbs far less than wall time: say so with the figures.

    python tests/benchmarks/bench_loader.py [--samples 5000] [--workers 2] [--batch 64] [--max-side 0]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from common import private_s3

from metaformer_platform.data import build_loader, build_split_transforms, build_transforms
from metaformer_platform.data.build import builder

SAMPLE = Path(__file__).resolve().parents[3] / "shared" / "data" / "imagenet-sample"
BASELINE = "torchvision ImageFolder, local JPEGs"


def _image_folder(tmp: Path, samples: int) -> Path:
    photos = sorted(SAMPLE.glob("n*/*.JPEG"))
    root = tmp / "train"
    for i in range(samples):
        src = photos[i % len(photos)]
        dst = root / src.parent.name / f"{src.stem}_{i // len(photos)}.JPEG"
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.symlink_to(src)
    return root


@contextlib.contextmanager
def main_decode():
    """Within it, the workers' crop decode is main's (PIL draft + PIL resize), as for the JPEGs simplejpeg
    refuses: the "before" rows of the loader benchmarks. Same boxes and draws; only the decoder differs."""
    from metaformer_platform.data import augment

    real = augment._jpeg_in_memory
    augment._jpeg_in_memory = lambda _img: None
    try:
        yield
    finally:
        augment._jpeg_in_memory = real


class _MainDecode:
    """A worker transform run under `main_decode` (in the DataLoader worker that calls it)."""

    lazy_decode = True

    def __init__(self, worker):
        self.worker = worker

    def __call__(self, img):
        with main_decode():
            return self.worker(img)


def _in_processes(workers: int):
    def run(tasks, dest):
        with ProcessPoolExecutor(workers) as pool:
            yield from pool.map(builder.build_shard, tasks, [dest] * len(tasks))

    return run


def _tree_cpu() -> tuple[float, dict[int, float]]:
    """CPU seconds (user + system) of this process and its reaped children (DataLoader workers that have
    exited), and per live descendant (the S3 server, workers still running)."""
    import resource

    import psutil

    own = sum(
        getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
        for f in ("ru_utime", "ru_stime")
    )
    live = {}
    for p in psutil.Process().children(recursive=True):
        try:
            live[p.pid] = sum(p.cpu_times()[:2])
        except psutil.Error:
            pass
    return own, live


def _rate(batches, limit: int) -> tuple[float, float]:
    """(samples/s over `limit` samples after the first (warm-up) batch, CPU ms per sample of this process
    tree from the loader's start: this process, the workers reaped inside the window, and every live
    descendant, those started inside the window (the loader's workers) counted whole). The CPU figure is what
    other users of a shared machine disturb least."""
    own0, live0 = _tree_cpu()
    it = iter(batches)
    first = len(next(it)[1])
    seen, start = 0, time.perf_counter()
    for batch in it:
        seen += len(batch[1])
        if seen >= limit:
            break
    wall = time.perf_counter() - start
    own1, live1 = _tree_cpu()
    spent = own1 - own0 + sum(v - live0.get(pid, 0.0) for pid, v in live1.items())
    return seen / wall, 1000 * spent / (first + seen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--measure", type=int, default=1000, help="samples timed per path and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--max-side", type=int, default=0, help="also shards re-encoded to this max side (0: no)")
    args, _ = parser.parse_known_args()  # `make benchmark` passes one ARGS to every benchmark
    if not SAMPLE.is_dir():
        raise SystemExit(f"needs the real photos at {SAMPLE}")

    import torch
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    torch.set_num_threads(1)
    worker_tf, batch_tf = build_split_transforms(224, is_training=True)
    paths: dict[str, object] = {}  # name -> a fresh iterable of batches
    with private_s3("bench-loader-") as s3:
        tmp = s3.tmp
        train = _image_folder(tmp, args.samples)
        builds = [("S3 shards, original JPEGs", "s3://bench/orig", None),
                  ("local shards, original JPEGs", str(tmp / "local"), None)]
        if args.max_side:
            builds.append((f"S3 shards, max side {args.max_side}", f"s3://bench/{args.max_side}", args.max_side))
        for label, url, max_side in builds:
            classes, tasks = builder.prepare_build(
                train=train,
                classes_file=SAMPLE / "classes.tsv",
                options=builder.BuildOptions(samples_per_shard=500, max_side=max_side),
            )
            start = time.perf_counter()
            builder.build_dataset(url, tasks, classes=classes, run=_in_processes(2), log=lambda _: None)
            print(f"built {url} ({label}) in {time.perf_counter() - start:.0f} s")
            paths[f"platform loader, {label}"] = build_loader(
                url, "train", batch_size=args.batch, rank=0, world_size=1, num_workers=args.workers,
                transform=worker_tf, batch_transform=batch_tf, seed=0, shuffle=True,
            )
        paths["platform loader, S3 shards, original JPEGs, PIL decode (main)"] = build_loader(
            "s3://bench/orig", "train", batch_size=args.batch, rank=0, world_size=1, num_workers=args.workers,
            transform=_MainDecode(worker_tf), batch_transform=batch_tf, seed=0, shuffle=True,
        )
        float_tf = build_transforms(224, is_training=True)
        # the loader as it was before the uint8 split: timm's float transform in the workers
        paths["platform loader, S3 shards, original, float transform (before)"] = build_loader(
            "s3://bench/orig", "train", batch_size=args.batch, rank=0, world_size=1, num_workers=args.workers,
            transform=float_tf, seed=0, shuffle=True, decode_size=224,
        )
        folder = ImageFolder(str(train), transform=float_tf)
        paths[BASELINE] = DataLoader(folder, batch_size=args.batch, shuffle=True, num_workers=args.workers)
        # Rounds alternate the paths, so a change in the machine's load hits them alike; medians reported.
        rates: dict[str, list[float]] = {name: [] for name in paths}
        cpus: dict[str, list[float]] = {name: [] for name in paths}
        for r in range(args.rounds):
            for name, batches in paths.items():
                rate, cpu = _rate(batches, args.measure)
                rates[name].append(rate)
                cpus[name].append(cpu)
                print(f"  round {r + 1}: {name:62s} {rate:7.1f} samples/s {cpu:6.2f} CPU ms/sample", flush=True)

    base = statistics.median(rates[BASELINE])
    print(f"{args.samples} samples, {args.workers} workers, batch {args.batch}, 224 px training transform, "
          f"median of {args.rounds} alternating rounds of {args.measure} samples")
    base_cpu = statistics.median(cpus[BASELINE])
    print(f"  {'':62s} samples/s (ratio)   CPU ms/sample, all processes (ImageFolder's / this)")
    for name, values in rates.items():
        rate, cpu = statistics.median(values), statistics.median(cpus[name])
        print(f"  {name:62s} {rate:7.1f} ({rate / base:.2f}x)   {cpu:6.2f} ({base_cpu / cpu:.2f}x)")


if __name__ == "__main__":
    main()
