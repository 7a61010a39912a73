"""Benchmark: step time of ddp / fsdp / deepspeed ZeRO-1/2/3 (2 Ray Train workers) vs a bare timm loop.

The bare loop runs in one process with the same global batch (2 x the per-worker batch) and all the
threads; each strategy runs the platform's Trainer in 2 workers of 1 thread each on in-memory batches. Each
side's figure is the median step time over windows after a warm-up; the script prints each strategy's
ratio to the bare loop (the platform's overhead plus the strategy's communication). One after another, so
they never share the CPU; on a shared host, run it when the machine is otherwise idle.

    python tests/benchmarks/bench_strategies.py [--model poolformer_s12] [--size 32] [--batch 8] [--steps 30]

Ray needs a loopback-only network namespace on the project's sandbox (see the README).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import WINDOW, bare_loop, bench_config, make_batches, platform_loop  # noqa: E402

STRATEGIES = {
    "ddp": ["strategy.name=ddp"],
    "fsdp": ["strategy.name=fsdp"],
    "zero1": ["strategy.name=deepspeed", "strategy.zero_stage=1"],
    "zero2": ["strategy.name=deepspeed", "strategy.zero_stage=2"],
    "zero3": ["strategy.name=deepspeed", "strategy.zero_stage=3"],
}


def main() -> None:
    import ray

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="poolformer_s12")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8, help="images per worker per step")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="threads per worker (the bare loop gets 2x)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    args = parser.parse_args()
    ray.init(address="local", num_cpus=2 * args.threads, include_dashboard=False, log_to_driver=False)
    results: dict[str, float] = {}
    try:
        bare = bare_loop(args.model, make_batches(args.steps, 2 * args.batch, args.size, seed=0),
                         threads=2 * args.threads, precision=args.precision, label_smoothing=0.0)
        for name in args.strategies.split(","):
            cfg = bench_config(args.model, batch=args.batch, steps=args.steps, threads=args.threads,
                               precision=args.precision, num_workers=2, label_smoothing=0.0, extra=STRATEGIES[name])
            results[name] = platform_loop(cfg, size=args.size, seed=1)
    finally:
        ray.shutdown()
    print(f"model {args.model}, {args.size} px, global batch {2 * args.batch} ({args.batch} per worker x 2), "
          f"{args.precision}, channels_last, median of {WINDOW}-step windows after the first")
    print(f"bare timm loop, 1 process, {2 * args.threads} threads: {1000 * bare:7.1f} ms/step")
    for name, seconds in results.items():
        print(f"{name:6s} 2 workers x {args.threads} thread(s):     {1000 * seconds:7.1f} ms/step  "
              f"ratio to bare {seconds / bare:.2f}")


if __name__ == "__main__":
    main()
