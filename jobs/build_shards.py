"""Build ImageNet-style webdataset shards + _info.json, one Ray task per shard, to a folder or s3://.

    python jobs/build_shards.py --train /data/imagenet/train --val /data/imagenet/val \\
        --val-labels /data/imagenet/LOC_val_solution.csv --classes classes.tsv \\
        --out s3://bucket/imagenet --samples-per-shard 1000 --max-side 512
    ray job submit --working-dir . -- python jobs/build_shards.py ...
    python jobs/build_shards.py --train cifar10/train --val cifar10/test --any-class-names --name cifar10 --out DIR

Re-running the same command skips the shards already built intact and redoes the rest; _info.json is
written last. Exit status 2: bad input (nothing was built); 1: the build failed.
"""

import argparse
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from metaformer_platform.data.build import builder
from metaformer_platform.storage import aws_env


def run_on_ray(tasks: Sequence[builder.ShardTask], dest: str | Path) -> Iterator[builder.ShardResult]:
    """One Ray task per shard; results come back in completion order."""
    import ray

    remote = ray.remote(num_cpus=1, max_retries=3)(builder.build_shard)
    # Workers of a cluster started earlier do not inherit this shell's S3 endpoint (credentials they take
    # from their node, never from runtime_env: see storage/settings.py AWS_ENV_VARS).
    env = {"env_vars": aws_env()} if aws_env() else None
    pending = [remote.options(runtime_env=env).remote(task, dest) for task in tasks]
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        yield ray.get(done[0])


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", help="ImageFolder tree: train/<wnid>/*.JPEG")
    p.add_argument("--val", help="validation images: an ImageFolder tree (val/<wnid>/*.JPEG, detected) or a flat folder")
    p.add_argument("--val-labels", help="a flat --val folder's labels: LOC_val_solution.csv or '<file> <wnid>' lines")
    p.add_argument("--classes", help="index<TAB>wnid<TAB>name file (default: sorted train folders)")
    p.add_argument("--out", required=True, help="output folder, file:// or s3://bucket/prefix")
    p.add_argument("--name", default="imagenet-1k", help="dataset name in _info.json")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--shard-bytes", type=int, default=None, help="source bytes per shard (also or instead)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffled assignment to shards")
    p.add_argument("--no-shuffle", action="store_true", help="keep sorted order in the shards")
    p.add_argument("--max-side", type=int, default=None, help="re-encode to this longest side (e.g. 512)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality when re-encoding")
    p.add_argument("--any-class-names", action="store_true", help="class folders may have any names (e.g. CIFAR's airplane/, cat/): labels are their sorted order")
    p.add_argument("--local", action="store_true", help="build in this process, without Ray")
    p.add_argument("--overwrite", action="store_true", help="build into a non-empty destination that holds "
                   "another data set (its _info.json and same-named shards are replaced)")
    p.add_argument("--ray-address", default=None, help="Ray cluster (default: RAY_ADDRESS or a local one)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        options = builder.BuildOptions(
            samples_per_shard=args.samples_per_shard, shard_bytes=args.shard_bytes, seed=args.seed,
            shuffle=not args.no_shuffle, max_side=args.max_side, quality=args.quality,
        )
        classes, tasks = builder.prepare_build(
            train=args.train, val=args.val, val_labels=args.val_labels, classes_file=args.classes,
            require_wnids=not args.any_class_names, options=options,
        )
        run = builder.run_serially
        if not args.local:
            import ray

            ray.init(address=args.ray_address, include_dashboard=False, log_to_driver=True)
            run = run_on_ray
        extra = {"build": {**vars(options), "train": args.train, "val": args.val}}
        builder.build_dataset(args.out, tasks, classes=classes, name=args.name, extra=extra, run=run,
                              overwrite=args.overwrite)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        print(f"error: the build failed: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
