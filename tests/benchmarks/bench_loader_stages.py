"""Benchmark: where each training sample's time goes, stage by stage, in one process (ms per sample).

Three paths over the same real photos (../shared/data/imagenet-sample repeated to --samples, webdataset
shards of the ORIGINAL JPEGs built into a temporary folder), the paper's 224 px training transform:

- "float": the platform loader as it was before the uint8 split: full JPEG decode (draft only for short
  sides >= 448), timm's float transform in the worker (crop, flip, RandAugment, ToTensor, Normalize,
  RandomErasing), float32 batches through the worker queue;
- "uint8": the split path (data/augment.py): crop box from the JPEG header, decode + crop, flip,
  RandAugment, uint8 HWC in the worker; normalize + erasing batched in the main process; twice: with
  main's decode (PIL draft + PIL resize, "PIL decode") and with this one (simplejpeg + torch's resize);
- "ImageFolder": torchvision's ImageFolder + the float transform, reading the JPEG files.

Stages: read (shard bytes from storage / file bytes), tar parse (iter_shard over in-memory shards),
decode, each transform, collate (torch.stack of a batch), IPC (moving a finished batch from 2 DataLoader
workers to the main process: CPU time of the main process and the workers, whose only other work is
copying a ready batch, measured apart and left out), and the main-process
batch transform. One thread, stages timed in CPU time of the thread (time.thread_time) around each call,
so that other processes on a shared machine do not inflate them; the paths alternate in
rounds and the medians of the per-round means are printed. The sum is the single-core cost of a
sample, i.e. the ceiling of a loader on one core (2 workers on 2 cores: at best half of it per sample).

    python tests/benchmarks/bench_loader_stages.py [--samples 5000] [--measure 600] [--rounds 3] [--batch 64]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

SAMPLE = Path(__file__).resolve().parents[3] / "shared" / "data" / "imagenet-sample"
BENCH = Path(__file__).resolve().parent


# CPU time of this thread, not wall time: the stage costs then hold on a shared, loaded machine too.
_clock = time.thread_time


def _ipc_ms(batch, workers: int, batches: int) -> float:
    """CPU ms per sample (main process + workers) to move ready batches from DataLoader workers to the
    main process: the shared-memory copy, pickling, the queue, unpickling. Each worker yields copies of
    `batch`; the copy itself (measured apart) is left out."""
    import psutil
    import torch
    from torch.utils.data import DataLoader, IterableDataset

    class Ready(IterableDataset):
        def __iter__(self):
            info = torch.utils.data.get_worker_info()
            for _ in range(batches // (info.num_workers if info else 1)):
                yield batch.clone()

    def cpu(procs) -> float:
        return sum(sum(p.cpu_times()[:2]) for p in procs)

    it = iter(DataLoader(Ready(), batch_size=None, num_workers=workers, prefetch_factor=2))
    for _ in range(4):  # steady state: the workers run ahead by their prefetch, before and after the window
        next(it)
    procs = [psutil.Process(), *(psutil.Process(w.pid) for w in it._workers)]  # type: ignore[attr-defined]
    start, n = cpu(procs), 0
    for _ in range(batches - 8):  # stop while the workers are still alive
        n += len(next(it))
    spent = cpu(procs) - start
    del it
    t0 = _clock()
    for _ in range(8):
        batch.clone()
    clone = (_clock() - t0) / 8 * (n / len(batch))
    return 1000 * (spent - clone) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--measure", type=int, default=600, help="samples timed per path and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers for the IPC stage")
    args, _ = parser.parse_known_args()
    if not SAMPLE.is_dir():
        raise SystemExit(f"needs the real photos at {SAMPLE}")

    import torch
    from PIL import Image

    from metaformer_platform.data import build_split_transforms, build_transforms, load_manifest
    from metaformer_platform.data.augment import to_hwc_tensor
    from metaformer_platform.data.build import builder
    from metaformer_platform.data.reader import decode_image, iter_shard, open_image
    from metaformer_platform.data.stream import _sample_seed, _seed_sample

    sys.path.insert(0, str(BENCH))
    from bench_loader import _image_folder, main_decode

    torch.set_num_threads(1)
    float_tf = build_transforms(224, is_training=True)
    worker_tf, batch_tf = build_split_transforms(224, is_training=True)
    # (name, callable) per step; the float path's crop runs on the decoded image
    float_steps = [(type(t).__name__, t) for t in float_tf.transforms]
    uint8_steps = [(type(t).__name__, t) for t in worker_tf.steps]

    with tempfile.TemporaryDirectory(prefix="bench-stages-") as tmp_name:
        tmp = Path(tmp_name)
        folder = _image_folder(tmp, args.samples)
        classes, tasks = builder.prepare_build(
            train=folder, classes_file=SAMPLE / "classes.tsv", options=builder.BuildOptions(samples_per_shard=500)
        )
        builder.build_dataset(tmp / "shards", tasks, classes=classes, log=lambda _: None)
        manifest = load_manifest(tmp / "shards")
        storage = manifest.storage
        names = list(manifest.split("train").filenames)
        files = sorted(p for p in folder.rglob("*.JPEG"))

        def platform_round(split: bool, start: int, pil_decode: bool = False) -> dict[str, float]:  # noqa: C901
            # pil_decode: main's crop decode (what the loader still does for JPEGs simplejpeg refuses)
            with main_decode() if pil_decode else contextlib.nullcontext():
                return _platform_round(split, start)

        def _platform_round(split: bool, start: int) -> dict[str, float]:  # noqa: C901 - one stage per block
            t: dict[str, float] = defaultdict(float)
            n, images, seeds = 0, [], []
            shard_i = start // 500 % len(names)
            while n < args.measure:
                name = names[shard_i % len(names)]
                shard_i += 1
                t0 = _clock()
                data = storage.read_bytes(name)
                read = _clock() - t0

                class Mem:
                    def open(self, _, data=data):
                        return io.BytesIO(data)

                    def describe(self, n_):
                        return n_

                t0 = _clock()
                samples = list(iter_shard(Mem(), name))
                parse = _clock() - t0
                # a shard is read and parsed whole: charge the samples used here their share of it
                share = min(len(samples), args.measure - n) / len(samples)
                t["read"] += read * share
                t["tar parse"] += parse * share
                for s in samples[: args.measure - n]:
                    seed = _sample_seed(0, 0, s.key)
                    _seed_sample(seed)
                    t0 = _clock()
                    img = open_image(s) if split else decode_image(s, 224)
                    t["decode" if not split else "open (header)"] += _clock() - t0
                    for label, step in uint8_steps if split else float_steps:
                        t0 = _clock()
                        img = step(img)
                        t[label if label != "DraftRandomResizedCrop" else "decode + crop"] += (
                            _clock() - t0
                        )
                    if split:
                        t0 = _clock()
                        img = to_hwc_tensor(img)
                        t["to uint8 tensor"] += _clock() - t0
                    images.append(img)
                    seeds.append(seed)
                    n += 1
                    if len(images) == args.batch:
                        t0 = _clock()
                        batch = torch.stack(images)
                        t["collate"] += _clock() - t0
                        if split:
                            t0 = _clock()
                            batch_tf(batch, torch.tensor(seeds))
                            t["batch normalize + erase (main)"] += _clock() - t0
                        images, seeds = [], []
            return {k: 1000 * v / n for k, v in t.items()}

        def folder_round(start: int) -> dict[str, float]:
            t: dict[str, float] = defaultdict(float)
            images = []
            for k in range(args.measure):
                path = files[(start + k) % len(files)]
                _seed_sample(_sample_seed(0, 0, str(path)))
                t0 = _clock()
                with open(path, "rb") as f:
                    data = f.read()
                t["read"] += _clock() - t0
                t0 = _clock()
                img = Image.open(io.BytesIO(data)).convert("RGB")  # torchvision's pil_loader
                t["decode"] += _clock() - t0
                for label, step in float_steps:
                    t0 = _clock()
                    img = step(img)
                    t[label] += _clock() - t0
                images.append(img)
                if len(images) == args.batch:
                    t0 = _clock()
                    torch.stack(images)
                    t["collate"] += _clock() - t0
                    images = []
            return {k: 1000 * v / args.measure for k, v in t.items()}

        rounds: dict[str, list[dict[str, float]]] = {
            "float": [], "uint8, PIL decode (main)": [], "uint8, simplejpeg": [], "ImageFolder": []
        }
        for r in range(args.rounds):
            start = r * args.measure
            rounds["float"].append(platform_round(False, start))
            rounds["uint8, PIL decode (main)"].append(platform_round(True, start, pil_decode=True))
            rounds["uint8, simplejpeg"].append(platform_round(True, start))
            rounds["ImageFolder"].append(folder_round(start))
            print(f"  round {r + 1}: " + ", ".join(f"{p} {sum(v[-1].values()):.2f} ms" for p, v in rounds.items()),
                  flush=True)
        ipc_float = statistics.median(
            _ipc_ms(torch.zeros(args.batch, 3, 224, 224), args.workers, 40) for _ in range(args.rounds)
        )
        ipc_uint8 = statistics.median(
            _ipc_ms(torch.zeros(args.batch, 224, 224, 3, dtype=torch.uint8), args.workers, 40)
            for _ in range(args.rounds)
        )

    med = {p: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for p, rs in rounds.items()}
    med["float"]["IPC, float32 batch"] = ipc_float
    med["ImageFolder"]["IPC, float32 batch"] = ipc_float
    med["uint8, PIL decode (main)"]["IPC, uint8 batch"] = ipc_uint8
    med["uint8, simplejpeg"]["IPC, uint8 batch"] = ipc_uint8
    stages: list[str] = []
    for p in med.values():
        stages += [k for k in p if k not in stages]
    print(f"ms per sample, one thread, median of {args.rounds} alternating rounds of {args.measure} samples; "
          f"{args.samples} samples of ../shared/data/imagenet-sample (original JPEGs); batch {args.batch}")
    print(f"| stage | {' | '.join(med)} |")
    print("| --- |" + " ---: |" * len(med))
    for stage in stages:
        print(f"| {stage} | " + " | ".join(f"{p[stage]:.3f}" if stage in p else "-" for p in med.values()) + " |")
    print("| **total** | " + " | ".join(f"**{sum(p.values()):.2f}**" for p in med.values()) + " |")
    base = sum(med["ImageFolder"].values())
    print("single-core samples/s: " + ", ".join(f"{p} {1000 / sum(v.values()):.0f} ({base / sum(v.values()):.2f}x "
                                                 "ImageFolder)" for p, v in med.items()))


if __name__ == "__main__":
    main()
