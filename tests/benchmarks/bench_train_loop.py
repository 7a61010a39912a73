"""Benchmark: the platform's training loop (1 Ray Train worker) vs a bare single-process timm loop.

Both train the same model on the same in-memory batches with the same threads, precision and memory
format; each measures the median step time over windows after a warm-up. The two alternate for ``--rounds``
rounds, one at a time so they never share the CPU. The ratio of throughputs (goal >= 0.98) is the median of
the per-round ratios: the two runs of a round are minutes apart at most, so a VM whose speed drifts over a
session (measured here: rounds of one side from 144 to 193 images/s) moves both; the best-of-rounds ratio is
printed beside it.

    python tests/benchmarks/bench_train_loop.py [--model poolformer_s12] [--steps 60] [--batch 64] [--size 64]

Ray needs a loopback-only network namespace on the project's sandbox (see the README).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import WINDOW, bare_loop, bench_config, make_batches, platform_loop  # noqa: E402

LABEL_SMOOTHING = 0.1


def main() -> None:
    import ray

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="poolformer_s12")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds; the median per-round ratio counts")
    args = parser.parse_args()
    cfg = bench_config(args.model, batch=args.batch, steps=args.steps, threads=args.threads, precision=args.precision,
                       num_workers=1, label_smoothing=LABEL_SMOOTHING)
    batches = make_batches(args.steps, args.batch, args.size, seed=0)  # the worker draws the same (seed 0 + rank 0)
    # One Ray cluster for the whole run, idle while the bare loop runs, so both sides share its background.
    ray.init(address="local", num_cpus=args.threads, include_dashboard=False, log_to_driver=False)
    platform, bare = [], []
    try:
        for _ in range(args.rounds):
            platform.append(args.batch / platform_loop(cfg, size=args.size, seed=0))
            bare.append(args.batch / bare_loop(args.model, batches, threads=args.threads, precision=args.precision,
                                               label_smoothing=LABEL_SMOOTHING))
    finally:
        ray.shutdown()
    ratios = [p / b for p, b in zip(platform, bare, strict=True)]
    print(f"model {args.model}, batch {args.batch}, {args.size} px, {args.threads} threads, {args.precision} + "
          f"channels_last, {args.steps} steps, median of {WINDOW}-step windows after the first, "
          f"{args.rounds} alternating rounds")
    print(f"bare timm loop (driver process): {max(bare):8.1f} images/s best  (rounds: {', '.join(f'{b:.1f}' for b in bare)})")
    print(f"platform (1 Ray Train worker):   {max(platform):8.1f} images/s best  "
          f"(rounds: {', '.join(f'{p:.1f}' for p in platform)})")
    print(f"ratio platform / bare: {statistics.median(ratios):.3f} median of rounds "
          f"({', '.join(f'{r:.3f}' for r in ratios)}); best of rounds {max(platform) / max(bare):.3f}  (goal >= 0.98)")


if __name__ == "__main__":
    main()
