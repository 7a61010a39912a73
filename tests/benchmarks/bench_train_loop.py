"""Benchmark: the platform's training loop (1 Ray Train worker) vs a bare single-process timm loop.

Both train the same model on the same in-memory batches with the same threads, precision and memory
format; each measures the median step time over windows after a warm-up. The two alternate for ``--rounds``
rounds, one at a time so they never share the CPU. The ratio of throughputs (goal >= 0.98) is the median of
the per-round ratios: the two runs of a round are minutes apart at most, so a VM whose speed drifts over a
session (measured here: rounds of one side from 144 to 193 images/s) moves both; the best-of-rounds ratio is
printed beside it.

    python tests/benchmarks/bench_train_loop.py [--model poolformer_s12] [--steps 60] [--batch 64] [--size 64]

``--ledger`` measures the run ledger's cost instead, in this process (no Ray): the Trainer with its ledger
meter (and a progress snapshot per log window, as rank 0 sends them) against the same Trainer with the meter's
calls made no-ops, alternating rounds, logging every step (the worst case: the meter is touched only at the
log cadence, validations and checkpoints); and the meter's own cost per window, timed alone.

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


class _NoMeter:
    """The ledger meter with nothing to do: the Trainer's loop without the run ledger."""

    validation_s = checkpoint_s = 0.0
    step = 0
    flops_per_sample = peak_flops = None

    def begin(self, step: int) -> None:
        pass

    def add_window(self, times: dict[str, float], steps: int, step: int) -> None:
        pass

    def snapshot(self) -> None:
        return None


def _ledger_round(cfg, batches: list, *, ledger: bool) -> float:
    """Median seconds per step of the Trainer in this process, with or without its ledger meter."""
    from common import InMemoryLoader

    from metaformer_platform.strategies.base import DistContext
    from metaformer_platform.training.trainer import Trainer

    step_s: list[float] = []

    class Recorder:
        def log_metrics(self, metrics: dict[str, float], step: int) -> None:
            if "system/step_s" in metrics:
                step_s.append(metrics["system/step_s"])
                trainer.meter.snapshot()  # what rank 0's progress channel adds to each event

    trainer = Trainer(cfg, DistContext(), data_root=None, tracker=Recorder(), loaders=(InMemoryLoader(batches), None))
    if not ledger:
        trainer.meter = _NoMeter()  # type: ignore[assignment]
    trainer.train()
    return statistics.median(step_s[WINDOW:])


def ledger_overhead(args: argparse.Namespace) -> None:
    """The run ledger's share of the step time, side by side (see the module's docstring)."""
    import time

    from metaformer_platform.training.ledger import GroupMeter

    cfg = bench_config(args.model, batch=args.batch, steps=args.steps, threads=args.threads, precision=args.precision,
                       num_workers=1, label_smoothing=LABEL_SMOOTHING, extra=["trainer.log_every_steps=1"])
    batches = make_batches(args.steps, args.batch, args.size, seed=0)
    on, off = [], []
    for _ in range(args.rounds):
        on.append(_ledger_round(cfg, batches, ledger=True))
        off.append(_ledger_round(cfg, batches, ledger=False))
    meter, times = GroupMeter(workers=1, gpu=False, global_batch=args.batch), {
        "system/step_data_s": 0.01, "system/step_forward_s": 0.1, "system/step_backward_s": 0.2, "system/step_optimizer_s": 0.05, "system/step_s": 0.36}
    meter.begin(0)
    calls = 20000
    begin = time.perf_counter()
    for step in range(calls):
        meter.add_window(times, 1, step)
        meter.snapshot()
    per_window = (time.perf_counter() - begin) / calls
    ratios = [a / b for a, b in zip(on, off, strict=True)]
    print(f"model {args.model}, batch {args.batch}, {args.size} px, {args.threads} threads, {args.precision}, "
          f"{args.steps} steps logged every step, {args.rounds} alternating rounds")
    print(f"step time with the ledger:    {', '.join(f'{1000 * v:.1f}' for v in on)} ms")
    print(f"step time without the ledger: {', '.join(f'{1000 * v:.1f}' for v in off)} ms")
    print(f"ratio with / without: {statistics.median(ratios):.4f} median of rounds ({', '.join(f'{r:.4f}' for r in ratios)})")
    print(f"the meter alone: {1e6 * per_window:.1f} us per log window = {100 * per_window / statistics.median(off):.4f}% "
          f"of a step (goal < 0.5%)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="poolformer_s12")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds; the median per-round ratio counts")
    parser.add_argument("--ledger", action="store_true", help="the run ledger's overhead per step instead (no Ray)")
    args = parser.parse_args()
    if args.ledger:
        ledger_overhead(args)
        return
    import ray

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
