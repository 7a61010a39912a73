"""The family side by side, in MLflow and against the previous retrain.

- Every stage run gets the same comparison metrics (``COLUMNS``: top-1, top-5, images/s, params, GMACs,
  resolution, training time, worker-hours, cost) and a ``metaformer.data`` tag, so the experiment's runs table
  lines up the members and stages in the same columns. They are unprefixed: MLflow's run page lays out a
  prefix's charts as a section, sections in string order, then the unprefixed ("Model metrics") last, so the
  curves (``train/``, ``val/``) come first. The stage runs are not nested under the pipeline's run (MLflow's
  table folds nested runs under their parent); ``metaformer.pipeline_run_id`` links them to it instead.
- A member's figures add up its stage runs' ``system/ledger_*`` and ``system/estimate_*`` metrics (logged by the jobs; absent
  on older runs); the pipeline's run carries them as ``MEMBER/*`` metrics and a table (``mlflow.log_table``).
- Week over week: the previous retrain is the last FINISHED run of the same pipeline in the experiment
  (``runner.previous_retrain``); its ``MEMBER/*`` metrics are what this run is compared with, and ``regressions`` says which changes are flagged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

    from metaformer_platform.pipelines.outcome import MemberOutcome, StageOutcome
    from metaformer_platform.pipelines.plan import StagePlan
    from metaformer_platform.pipelines.spec import RegressionSpec

TAG_PIPELINE_RUN = "metaformer.pipeline_run_id"
TAG_DATA = "metaformer.data"
# The comparison metrics every stage run carries (``stage_figures``), in the order the runs table shows them.
COLUMNS = ("top1", "top5", "images_per_s", "params_m", "gmacs", "img_size", "train_s", "worker_hours", "cost")
# Summed over a member's stage runs.
SUMMED = ("wall_s", "queued_s", "starting_s", "train_s", "data_wait_s", "compute_s", "validation_s",
          "checkpoint_stall_s", "lost_work_s", "recovery_gap_s", "resize_gap_s", "shutdown_s", "worker_hours",
          "cost", "time_to_final_top1_s", "worker_hours_to_final_top1")
ESTIMATES = ("wall_s", "worker_hours", "cost")
# Where the time went that did not train: the report names a member's largest ones.
LOSSES = ("queued_s", "starting_s", "data_wait_s", "validation_s", "checkpoint_stall_s", "lost_work_s",
          "recovery_gap_s", "resize_gap_s", "shutdown_s")
# Week over week: figure, its threshold's field in ``RegressionSpec``, and whether a rise is the bad direction.
WEEKLY = (("top1", "top1_drop", False), ("time_to_final_top1_s", "time_increase_pct", True),
          ("worker_hours", "worker_hours_increase_pct", True), ("cost", "cost_increase_pct", True))


def complexity(model: str, num_classes: int | None, img_size: int, kwargs: dict[str, Any] | None = None) -> dict[str, int]:
    """Params and MACs of ``model`` with this head and input size (built on the meta device)."""
    import torch

    from metaformer_platform.models import create_model, model_complexity

    with torch.device("meta"):
        net = create_model(model, num_classes=num_classes, img_size=img_size, **(kwargs or {}))
    return model_complexity(net, img_size)


def stage_figures(stage: StagePlan, metrics: Mapping[str, float]) -> dict[str, float]:
    """The comparison metrics (``COLUMNS``) of one stage run: the same columns for pretrain, fine-tune and evaluate."""
    cfg = stage.cfg
    size = complexity(stage.member, stage.num_classes, cfg.data.img_size, cfg.model.kwargs)
    kind = "eval" if not stage.trains else "val"
    found = {
        "top1": metrics.get(f"{kind}/top1"),
        "top5": metrics.get(f"{kind}/top5"),
        "images_per_s": metrics.get("eval/images_per_s" if not stage.trains else "train/images_per_s"),
        "params_m": size["params"] / 1e6,
        "gmacs": size["macs"] / 1e9,
        "img_size": float(cfg.data.img_size),
        "train_s": metrics.get("system/ledger_train_s"),
        "worker_hours": metrics.get("system/ledger_worker_hours"),
        "cost": metrics.get("system/ledger_cost"),
    }
    # 4 significant digits: columns to read across runs (91.67, not 91.66666666); the runs' own metrics keep all
    return {k: float(f"{v:.4g}") for k, v in found.items() if v is not None}


def log_stage_figures(client: MlflowClient, run_id: str, stage: StagePlan) -> None:
    """Put the stage's comparison metrics and its data's name on its run (from what the run logged)."""
    from mlflow.entities import Metric

    run = client.get_run(run_id)
    step = int(run.data.metrics.get("step", 0))
    figures = stage_figures(stage, run.data.metrics)
    client.log_batch(run_id, metrics=[Metric(k, v, 0, step) for k, v in figures.items()])
    client.set_tag(run_id, TAG_DATA, f"{stage.data_name or 'unnamed'} {stage.cfg.data.img_size}px")


def member_figures(client: MlflowClient, stages: list[StageOutcome]) -> dict[str, float]:
    """One member's figures: top-1/top-5 of its evaluation, and its stage runs' ledger and estimates summed."""
    runs = [client.get_run(s.run_id).data.metrics for s in stages if s.run_id and s.action != "blocked"]
    out: dict[str, float] = {}
    for key in SUMMED:
        values = [m[f"system/ledger_{key}"] for m in runs if f"system/ledger_{key}" in m]
        if values:
            out[key] = float(sum(values))
    for key in ESTIMATES:
        values = [m[f"system/estimate_{key}"] for m in runs if f"system/estimate_{key}" in m]
        if values:
            out[f"estimate_{key}"] = float(sum(values))
    productive = [m["system/ledger_goodput"] * m["system/ledger_wall_s"] for m in runs if "system/ledger_goodput" in m and "system/ledger_wall_s" in m]
    if productive and out.get("wall_s"):
        out["goodput"] = sum(productive) / out["wall_s"]
    for m in runs:
        if "eval/top1" in m:
            out["top1"], out["top5"] = float(m["eval/top1"]), float(m.get("eval/top5", math.nan))
    return {k: v for k, v in out.items() if math.isfinite(v)}


def largest_losses(figures: Mapping[str, float], count: int = 2) -> list[tuple[str, float]]:
    """The ``count`` largest categories of time that did not train, largest first (name without ``_s``)."""
    found = [(k.removesuffix("_s"), figures[k]) for k in LOSSES if figures.get(k)]
    return sorted(found, key=lambda item: -item[1])[:count]


def previous_figures(run: Run | None, member: str) -> dict[str, float]:
    """A member's figures as the previous retrain's pipeline run recorded them (``MEMBER/*`` metrics)."""
    if run is None:
        return {}
    prefix = f"{member}/"
    return {k.removeprefix(prefix): v for k, v in run.data.metrics.items() if k.startswith(prefix)}


def change(now: float | None, before: float | None, relative: bool) -> float | None:
    """``now`` minus ``before``: in points, or with ``relative`` in percent of ``before``; None if one is missing."""
    if now is None or before is None:
        return None
    if not relative:
        return now - before
    return (now - before) / before * 100 if before else None


def regressions(now: Mapping[str, float], before: Mapping[str, float], limits: RegressionSpec) -> list[str]:
    """The figures that got worse than the pipeline's ``regressions`` allow, each with the change and limit."""
    found = []
    for key, field, rise_is_bad in WEEKLY:
        delta = change(now.get(key), before.get(key), rise_is_bad)
        limit = float(getattr(limits, field))
        if delta is None:
            continue
        if rise_is_bad and delta > limit:
            found.append(f"{key} {delta:+.1f}% (limit +{limit:g}%)")
        elif not rise_is_bad and -delta > limit:
            found.append(f"{key} {delta:+.2f} points (limit -{limit:g})")
    return found


def log_summary(client: MlflowClient, parent: str, members: list[MemberOutcome]) -> None:
    """The family's figures on the pipeline's run: ``MEMBER/*`` and ``family/*`` metrics, and a table."""
    from mlflow.entities import Metric

    metrics = [Metric(f"{m.model}/{k}", v, 0, 0) for m in members for k, v in m.figures.items()]
    totals: dict[str, float] = {}
    for m in members:
        for key in ("wall_s", "queued_s", "worker_hours", "cost"):
            if key in m.figures:
                totals[key] = totals.get(key, 0.0) + m.figures[key]
    top1 = [m.figures["top1"] for m in members if "top1" in m.figures]
    if top1:
        totals["best_top1"] = max(top1)
    totals["members_ok"] = float(sum(m.ok for m in members))
    metrics += [Metric(f"family/{k}", v, 0, 0) for k, v in totals.items()]
    for start in range(0, len(metrics), 900):  # log_batch takes at most 1000 metrics
        client.log_batch(parent, metrics=metrics[start : start + 900])
    columns = sorted({k for m in members for k in m.figures})
    table = {"member": [m.model for m in members], **{k: [m.figures.get(k) for m in members] for k in columns}}
    client.log_table(parent, data=table, artifact_file="report/family_table.json")
