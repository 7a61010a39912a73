"""Family pipelines: a family of models through a chain of stages (pretrain -> finetune -> evaluate), then the
registry's promotion gate and a family report. See ``spec`` (the file), ``plan`` (configs, keys), ``runner``
(Ray jobs, MLflow, idempotency) and ``report``.

    python pipelines/poolformer_family.py [--pipeline FILE] [--dry-run] [key.path=value ...]
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from metaformer_platform.pipelines.outcome import PipelineResult
from metaformer_platform.pipelines.plan import MemberPlan, StagePlan, expand, resolve
from metaformer_platform.pipelines.runner import PipelineRunner
from metaformer_platform.pipelines.spec import PipelineError, PipelineSpec, load_pipeline, parse_pipeline

__all__ = [
    "MemberPlan",
    "PipelineError",
    "PipelineResult",
    "PipelineRunner",
    "PipelineSpec",
    "StagePlan",
    "expand",
    "load_pipeline",
    "main",
    "parse_command",
    "parse_pipeline",
    "plan_pipeline",
    "resolve",
    "run_pipeline",
]


def plan_pipeline(
    path: str | Path, overrides: Sequence[str] = (), out: Callable[[str], None] = print
) -> PipelineRunner:
    """Load, expand and resolve a pipeline file (reads data manifests and the registry, writes nothing)."""
    from metaformer_platform.tracking.runs import resolve_tracking_uri

    spec, base = load_pipeline(path)
    plans = expand(spec, base, list(overrides))
    tracking_uri = resolve_tracking_uri(spec.tracking_uri)
    resolve(spec, plans, tracking_uri)
    return PipelineRunner(spec, plans, tracking_uri, out=out)


def run_pipeline(
    path: str | Path, overrides: Sequence[str] = (), *, dry_run: bool = False, out: Callable[[str], None] = print
) -> PipelineResult:
    """Plan, print the plan, and (unless ``dry_run``) run it; returns what happened to every member."""
    from metaformer_platform.tracking.runs import training_experiment

    runner = plan_pipeline(path, overrides, out)
    experiment_id = training_experiment(runner.client, runner.spec.experiment, create=False)
    preview = runner.preview(experiment_id)
    out(runner.describe(preview))
    if dry_run:
        from metaformer_platform.pipelines.plan import describe_estimates

        actions = {(m.model, s.stage): s.action for m in preview for s in m.stages}
        out(describe_estimates(runner.plans, actions, runner.tracking_uri))
        return PipelineResult(runner.spec.name, preview, dry_run=True)
    result = runner.run()
    out("\n" + result.report)
    if result.failed:
        out(f"\n{len(result.failed)} of {len(result.members)} members failed: "
            + "; ".join(f"{m.model}: {m.error}" for m in result.failed))
    else:
        out(f"\nall {len(result.members)} members succeeded; parent MLflow run {result.parent_run_id}")
    return result


def parse_command(argv: Sequence[str] | None, default_pipeline: Path | None = None) -> argparse.Namespace:
    """``[--pipeline FILE] [--dry-run] [key.path=value ...]``: the pipeline entry points' arguments."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", type=Path, default=default_pipeline, required=default_pipeline is None,
                        help=f"pipeline YAML (default: {default_pipeline})")
    parser.add_argument("--dry-run", action="store_true", help="print the plan (what would run or be skipped) and exit")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="job config overrides for every stage")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None, default_pipeline: Path | None = None) -> int:
    """The pipelines' command line; exit status 0 (all members ok, or a dry run: the plan names what is wrong per
    member, e.g. unreachable data or storage), 1 (a member failed), 2 (bad pipeline), 143/130 (stopped by
    SIGTERM/SIGINT at the running stages' checkpoints)."""
    from metaformer_platform.launch.stop import JobStopped
    from metaformer_platform.storage.redact import redact, redact_logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    redact_logging()  # a failed member's traceback is logged: no password in it
    args = parse_command(argv, default_pipeline)
    try:
        result = run_pipeline(args.pipeline, args.overrides, dry_run=args.dry_run,
                              out=lambda text: print(text, flush=True))
    except PipelineError as err:
        print(redact(f"error: {err}"), file=sys.stderr, flush=True)
        return 2
    except JobStopped as stopped:  # SIGTERM/SIGINT: the running stages checkpointed; the same command continues
        print(f"pipeline {stopped.describe()}", flush=True)
        return stopped.exit_code
    sys.stdout.flush()
    if result.dry_run:
        return 0
    return 1 if result.failed or any(m.error for m in result.members) else 0
