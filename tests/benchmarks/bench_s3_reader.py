"""Benchmark: S3 bytes/s through the platform's reader vs raw boto3 `get_object().read()` (goal >= 0.9x).

A private SeaweedFS on 127.0.0.1 holds shards built by the shard builder from the real photos in
../shared/data/imagenet-sample (original JPEGs, not re-encoded), repeated to fill them. Each round reads
every shard once per path, the paths alternating, and the script prints the medians and their ratios:

- raw:     boto3 `get_object(...)["Body"].read()` of each whole shard;
- storage: `S3Store.open()` read to the end (the resumable, large-buffer stream);
- reader:  `iter_shard()` over the same stream (tar parsing into samples, read and parsed serially);
- fetched: `read_shard()` of the whole shard, then `iter_shard()` over it in memory (what the loader's
           shard prefetcher does on S3, here without the overlap it has there);
- loader:  `iter_shard()` through the loader's own shard prefetcher (`stream._Prefetcher`, 1 shard ahead in
           a background thread): samples out as a loader worker gets them, download and parsing overlapped;
- wds:     webdataset's own tar iterator through our registered s3:// gopen handler.

    python tests/benchmarks/bench_s3_reader.py [--shards 4] [--shard-mb 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from pathlib import Path

from common import private_s3

from metaformer_platform.data.build import builder
from metaformer_platform.data.reader import iter_shard, read_shard
from metaformer_platform.data.stream import _Prefetcher
from metaformer_platform.storage import open_store, register_webdataset_s3

SAMPLE = Path(__file__).resolve().parents[3] / "shared" / "data" / "imagenet-sample"


def _photos(tmp: Path, total_bytes: int) -> Path:
    """An ImageFolder of the sample's photos, linked as many times as needed to reach `total_bytes`."""
    if not SAMPLE.is_dir():
        raise SystemExit(f"needs the real photos at {SAMPLE}")
    photos = sorted(SAMPLE.glob("n*/*.JPEG"))
    root, size, i = tmp / "train", 0, 0
    while size < total_bytes:
        src = photos[i % len(photos)]
        dst = root / src.parent.name / f"{src.stem}_{i // len(photos)}.JPEG"
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.symlink_to(src)
        size += src.stat().st_size
        i += 1
    return root


class _InMemory:
    """One shard's bytes as a storage (the loader's prefetcher hands iter_shard such a stream)."""

    def __init__(self, data: bytes):
        self.data = data

    def open(self, name: str) -> io.BytesIO:
        return io.BytesIO(self.data)

    def describe(self, name: str) -> str:
        return name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--shard-mb", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args, _ = parser.parse_known_args()  # `make benchmark` passes one ARGS to every benchmark

    import boto3
    import webdataset as wds

    with private_s3("bench-s3-") as server:
        tmp = server.tmp
        s3 = boto3.client("s3")
        train = _photos(tmp, args.shards * args.shard_mb << 20)
        classes, tasks = builder.prepare_build(
            train=train,
            classes_file=SAMPLE / "classes.tsv",
            options=builder.BuildOptions(samples_per_shard=None, shard_bytes=args.shard_mb << 20),
        )
        url = "s3://bench/imagenet"
        builder.build_dataset(url, tasks, classes=classes, log=lambda _: None)
        storage = open_store(url)
        names = [t.filename for t in tasks["train"]]
        total = sum(storage.size(n) for n in names)
        register_webdataset_s3()

        def raw() -> None:
            for n in names:
                s3.get_object(Bucket="bench", Key=f"imagenet/{n}")["Body"].read()

        def stream() -> None:
            for n in names:
                with storage.open(n) as f:
                    while f.read(1 << 20):
                        pass

        def reader() -> None:
            for n in names:
                for _ in iter_shard(storage, n):
                    pass

        def prefetched() -> None:  # what the loader runs on S3: whole shards fetched, then parsed in memory
            for n in names:
                data = read_shard(storage, n)
                for _ in iter_shard(_InMemory(data), n):
                    pass

        def loader() -> None:  # the loader worker's read path: the next shards download while one parses
            fetcher = _Prefetcher(storage, names, depth=1)  # build_loader's default on S3
            try:
                for n in names:
                    for _ in iter_shard(fetcher, n):
                        pass
            finally:
                fetcher.close()

        def webdataset() -> None:
            for _ in wds.WebDataset([f"{url}/{n}" for n in names], shardshuffle=False):
                pass

        paths = {"raw": raw, "storage": stream, "reader": reader, "fetched": prefetched, "loader": loader,
                 "wds": webdataset}
        rates: dict[str, list[float]] = {p: [] for p in paths}
        for _ in range(args.rounds):
            for name, fn in paths.items():
                start = time.perf_counter()
                fn()
                rates[name].append(total / (time.perf_counter() - start) / 2**20)

    med = {p: statistics.median(r) for p, r in rates.items()}
    print(f"{len(names)} shards, {total / 2**20:.0f} MiB (original JPEGs), {args.rounds} rounds, SeaweedFS on 127.0.0.1")
    for name in paths:
        print(f"  {name:8s} {med[name]:8.1f} MiB/s   ratio to raw boto3 {med[name] / med['raw']:.2f}x")


if __name__ == "__main__":
    main()
