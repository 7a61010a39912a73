"""Shared command line of the job entry points: ``[--config FILE] [key.path=value ...]``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from metaformer_platform.config import ConfigError, JobConfig, describe_keys, load_config
from metaformer_platform.launch.stop import JobStopped


def parse_job_config(stage: str, description: str, argv: Sequence[str] | None, default_config: Path | None) -> JobConfig:
    """Parse the command line into a validated config; ``--help`` lists every key with its default."""
    return _parse(stage, description, argv, default_config)[0]


def _parse(stage: str, description: str, argv: Sequence[str] | None,
           default_config: Path | None) -> tuple[JobConfig, bool]:
    """The command line's config, and whether it asks for a dry run (``--dry-run``)."""
    parser = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Overrides are key.path=value (value read as YAML). Keys:\n" + describe_keys(),
    )
    default_hint = f" (default: {default_config})" if default_config else ""
    parser.add_argument("--config", type=Path, default=default_config, help=f"YAML config file{default_hint}")
    parser.add_argument(
        "--verbose", action="store_true", help="also show Ray's own logs (same as run.verbose=true)"
    )
    parser.add_argument(
        "--dry-run", action="store_true",
        help="check and plan the job, print its layout, steps, shard reads, bytes, checkpoint sizes and estimate, "
        "and exit (no training; no Ray unless scaling.num_workers=auto names a cluster)",
    )
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")
    args = parser.parse_args(argv)
    verbose = ["run.verbose=true"] if args.verbose else []
    return load_config(args.config, [f"stage={stage}", *args.overrides, *verbose]), args.dry_run


def run_main(stage: str, description: str, argv: Sequence[str] | None = None, default_config: Path | None = None) -> int:
    """Parse, run, print the outcome; returns the process exit code (2: bad input, 1: the job failed,
    143/130: stopped by SIGTERM/SIGINT at a checkpoint, see ``stop.py``)."""
    from metaformer_platform.storage.redact import redact, redact_logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    redact_logging()  # log records and their tracebacks, printed by this process: no password in them
    try:
        cfg, dry = _parse(stage, description, argv, default_config)
        if dry:
            print(redact(plan_only(cfg)), flush=True)
            return 0
        from metaformer_platform.launch.driver import run_job
        from metaformer_platform.launch.stop import STOPS

        with STOPS.handling():  # from the plan on: a signal before the workers start stops the job cleanly too
            result = run_job(cfg)
    except JobStopped as stopped:  # SIGTERM/SIGINT: checkpointed, the MLflow run closed as stopped
        print(f"\n{stage} {stopped.describe()}", flush=True)
        if stopped.mlflow_hint:
            print(stopped.mlflow_hint, flush=True)
        return stopped.exit_code
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(redact(f"error: {err}"), file=sys.stderr, flush=True)
        return 2
    except Exception as err:  # the job ran and failed: say so plainly, with the cause
        print(redact(f"error: the {stage} job failed: {type(err).__name__}: {err}"), file=sys.stderr, flush=True)
        return 1
    m = result.metrics
    if result.report is not None:  # evaluate
        from metaformer_platform.evaluation.report import summary_line

        print(redact(f"\n{stage} finished: {result.report['model_name']} from {result.report['weights']}"))
        print(summary_line(result.report))
        print(f"report: {result.run_dir}/eval.json")
        if result.mlflow_hint:
            print(result.mlflow_hint)
        sys.stdout.flush()
        return 0
    print(f"\n{stage} finished: step {int(m.get('step', 0))}", end="")
    if "val/top1" in m:
        print(f", validation top-1 {m['val/top1']:.2f}% top-5 {m.get('val/top5', 0):.2f}% "
              f"on {int(m.get('val/samples', 0))} images", end="")
    print(f"\ncheckpoints: {result.run_dir}")
    if result.checkpoint_path:
        print(f"latest checkpoint: {result.checkpoint_path}")
    if result.mlflow_hint:
        print(result.mlflow_hint)
    # Ray's exit handlers can end the process before Python flushes a redirected stdout.
    sys.stdout.flush()
    return 0


def plan_only(cfg: JobConfig) -> str:
    """The job's dry run as printed (``launch.dryrun``): planned, sized and estimated, nothing run."""
    import os
    import time

    from metaformer_platform.launch.dryrun import dry_run, text
    from metaformer_platform.launch.plan import build_plan

    start = time.perf_counter()
    plan = build_plan(cfg, dry_run=True)
    notes = []
    if cfg.scaling.num_workers == "auto" and not (cfg.run.ray_address or os.environ.get("RAY_ADDRESS")):
        notes.append(f"scaling.num_workers=auto and no Ray cluster named (run.ray_address or RAY_ADDRESS): planned "
                     f"for this machine, {plan.worker_count} worker(s); set scaling.num_workers=N to plan N ranks")
    run = dry_run(plan, tuple(notes))
    return text(run, time.perf_counter() - start)
