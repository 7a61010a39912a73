"""Benchmark: the job plan at scale, metadata only (the shards do not exist).

For manifests of ImageNet-1k's size (1,281,167 samples in 1,281 shards) and ImageNet-21k's (14M in 14,000),
at 8, 64 and 512 ranks, each in a fresh process (so its peak RSS is its own):

- the whole dry run (``jobs/pretrain.py --dry-run``'s path: ``build_plan(dry_run=True)`` + ``dryrun.dry_run``),
  after torch's and timm's imports: seconds (wall and CPU: on a shared machine CPU time is the steadier), and peak driver memory (ru_maxrss, what the plan added to it, and
  tracemalloc's peak of Python and numpy allocations in a second, traced plan);
- the shard reads per epoch against the ideal (each shard read once);
- with ``--per-rank``: ``ShardSet.plan`` called for every rank, as a driver would have to without
  ``ShardSet.reads`` (O(ranks x steps): each call builds every rank's schedule), CPU seconds timed on 3 ranks and
  extrapolated.

    python tests/benchmarks/bench_plan_scale.py [--ranks 8 64 512] [--per-rank]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

SETS = {"imagenet-1k": (1_281_167, 1_281), "imagenet-21k": (14_000_000, 14_000)}
SHARD_BYTES_PER_SAMPLE = 115_782  # capacity.SAMPLE_BYTES: an ImageNet JPEG and its tar headers


def write_metadata_only(root: Path, samples: int, shards: int) -> Path:
    """A manifest of ``samples`` in ``shards`` shards of equal length (the last one shorter) and no shard file."""
    from metaformer_platform.data.manifest import ShardInfo, manifest_dict, write_manifest

    per = samples // shards
    lengths = [per] * (shards - 1) + [samples - per * (shards - 1)]
    infos = [ShardInfo(f"train-{i:06d}.tar", n, f"{i:064x}", n * SHARD_BYTES_PER_SAMPLE) for i, n in enumerate(lengths)]
    val = [ShardInfo("val-000000.tar", 1_000, "0" * 64, 1_000 * SHARD_BYTES_PER_SAMPLE)]
    root.mkdir(parents=True, exist_ok=True)
    return write_manifest(root, manifest_dict("scale", {"train": infos, "val": val}, num_classes=1000))


def one(data: str, ranks: int, storage: str, per_rank: bool) -> dict[str, float]:
    """One dry run in this process: its figures, time and peak memory."""
    from metaformer_platform.config import load_config
    from metaformer_platform.launch.dryrun import dry_run
    from metaformer_platform.launch.plan import build_plan

    cfg = load_config(Path("jobs/configs/poolformer_s12.yaml"), [
        f"data.source={data}", f"scaling.num_workers={ranks}", f"run.storage_path={storage}", "tracking.enabled=false",
        "run.name=scale"])
    import metaformer_platform.training.trainer  # noqa: F401  # torch and timm: imports are not the plan's time

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start, cpu = time.perf_counter(), time.process_time()
    run = dry_run(build_plan(cfg, dry_run=True))
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tracemalloc.start()  # a second plan, traced (tracing slows it: the time above is untraced)
    dry_run(build_plan(cfg, dry_run=True))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    out = {"seconds": seconds, "cpu_s": cpu, "traced_peak_mb": peak / 2**20, "maxrss_mb": after, "rss_added_mb": after - before,
           "reads": run.data.reads, "shards": run.data.shards, "steps_per_epoch": run.data.steps_per_epoch,
           "bytes_per_epoch": run.data.bytes_per_epoch or 0}
    if per_rank:
        out["per_rank_plan_s"] = _per_rank_plan(cfg, ranks)
    return out


def _per_rank_plan(cfg: object, ranks: int) -> float:
    """Seconds ``ShardSet.plan`` would take for every rank (3 ranks timed, scaled to ``ranks``)."""
    from metaformer_platform.config import JobConfig
    from metaformer_platform.data import load_manifest
    from metaformer_platform.data.shardset import ShardSet

    assert isinstance(cfg, JobConfig)
    info = load_manifest(cfg.data.source, check_files=False).split("train")
    shards = ShardSet(info.filenames, info.shard_lengths)
    kw = {"world_size": ranks, "num_workers": cfg.data.num_workers, "batch_size": cfg.trainer.batch_size,
          "drop_last": True, "seed": 0, "epoch": 0, "shuffle": True, "window": cfg.data.shuffle_buffer}
    shards.plan(rank=0, **kw)  # type: ignore[arg-type]  # the epoch's order, computed once and cached
    start = time.process_time()
    for rank in range(3):
        shards.plan(rank=rank, **kw)  # type: ignore[arg-type]
    return (time.process_time() - start) / 3 * ranks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 64, 512])
    parser.add_argument("--per-rank", action="store_true", help="also time ShardSet.plan for every rank")
    parser.add_argument("--one", nargs=3, metavar=("DATA", "RANKS", "STORAGE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), args.one[2], args.per_rank)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        print(f"{'data set':<13} {'ranks':>5} {'plan s':>7} {'CPU s':>6} {'traced MB':>9} {'RSS MB':>7} {'+RSS MB':>7} {'reads':>7} "
              f"{'x ideal':>7} {'GB/epoch':>9}" + (f" {'per-rank plan CPU s':>19}" if args.per_rank else ""))
        for name, (samples, shards) in SETS.items():
            root = Path(tmp) / name
            write_metadata_only(root, samples, shards)
            for ranks in args.ranks:
                cmd = [sys.executable, __file__, "--one", str(root), str(ranks), str(Path(tmp) / "runs")]
                r = json.loads(subprocess.run(cmd + (["--per-rank"] if args.per_rank else []), check=True,
                                              capture_output=True, text=True).stdout.splitlines()[-1])
                print(f"{name:<13} {ranks:>5} {r['seconds']:>7.2f} {r['cpu_s']:>6.2f} {r['traced_peak_mb']:>9.0f} {r['maxrss_mb']:>7.0f} {r['rss_added_mb']:>7.0f} "
                      f"{r['reads']:>7} {r['reads'] / r['shards']:>7.2f} {r['bytes_per_epoch'] / 1e9:>9.1f}"
                      + (f" {r['per_rank_plan_s']:>19.1f}" if args.per_rank else ""), flush=True)


if __name__ == "__main__":
    main()
