"""Evaluation: top-1/top-5, per-class accuracy, loss and throughput over a validation split.

Two users share this code: ``Trainer.validate()`` (during training) and the evaluate job (``launch.run_job``
with ``stage="evaluate"``), which scores a checkpoint folder, an export folder or a registry version on the
validation shards. The metric sums are accumulated per rank and reduced with one all-reduce, so each sample of
the split is counted exactly once across ranks (the loader spreads the split over ranks without padding);
stand-ins for unreadable samples carry ``IGNORE_LABEL`` and are counted as skipped, not scored.

No Ray or MLflow here, and nothing of the training loop: ``workers.evaluate_worker`` (the evaluate job's worker
side) builds the model and loader with the Trainer's helpers and scores them with ``evaluate_loader``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from metaformer_platform.evaluation.metrics import MetricSums
from metaformer_platform.storage.weights import WeightsInfo

if TYPE_CHECKING:
    from metaformer_platform.config import JobConfig
    from metaformer_platform.data import Manifest

REPORT_FILE = "eval.json"


def split_hash(manifest: Any, split: str) -> tuple[str, str]:
    """(sha256, what it covers) of one split under its labels: the split's shard list, lengths and per-shard
    sha256 plus the class names when the manifest records shard checksums, else the bytes of ``_info.json``.
    The report's ``data_hash``; not the pipeline's key (``plan.manifest_hash``: the whole manifest, every split).

    Two evaluations with the same hash scored the same samples under the same labels (the registry's
    promotion gate compares top-1 only then)."""
    from metaformer_platform.data.manifest import sha256_of

    info = manifest.split(split)
    if info.shard_sha256:
        body = {
            "split": split,
            "filenames": list(info.filenames),
            "shard_lengths": list(info.shard_lengths),
            "shard_sha256": list(info.shard_sha256),
            "class_names": list(manifest.class_names),
            "num_classes": manifest.num_classes,
        }
        text = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(text).hexdigest(), f"split {split!r} of {manifest.info_name}"
    # the manifest's own file: a data set given as `.../subset.json` is that file, not its folder's _info.json
    return sha256_of(manifest.storage, manifest.info_name), manifest.info_name


def build_report(
    sums: MetricSums,
    *,
    cfg: JobConfig,
    weights: WeightsInfo,
    weights_uri: str,
    manifest: Manifest,
    expected_samples: int,
) -> dict[str, Any]:
    """The evaluation's JSON: the contract's ``eval/*`` numbers, per-class top-1 and what was evaluated on what.

    Raises ``RuntimeError`` when scored + skipped samples differ from the split's count in the manifest (a
    sample dropped or counted twice)."""
    from metaformer_platform.models import PAPER_TOP1

    metrics = sums.metrics("eval")
    if sums.samples + sums.skipped != expected_samples:
        raise RuntimeError(
            f"evaluation counted {sums.samples} samples + {sums.skipped} skipped, but split "
            f"{cfg.data.val_split!r} has {expected_samples}: samples were dropped or counted twice"
        )
    digest, digest_of = split_hash(manifest, str(cfg.data.val_split))  # set: the job plan checked it
    # The paper's number is for ImageNet-1k at 224 px: shown beside ours only for a 1000-class label set.
    paper = PAPER_TOP1.get(cfg.model.name) if cfg.model.num_classes == 1000 else None
    return {
        "model_name": cfg.model.name,
        "num_classes": cfg.model.num_classes,
        "weights": weights_uri,
        "weights_path": str(weights.path),
        "weights_kind": weights.kind,
        "weights_step": weights.step,
        "data_source": str(cfg.data.source),
        "split": cfg.data.val_split,
        "data_hash": digest,
        "data_hash_of": digest_of,
        "img_size": cfg.data.img_size,
        "crop_pct": cfg.data.crop_pct,
        # what the workers ran with (the config may say "auto")
        "precision": sums.settings.get("precision", cfg.trainer.precision),
        "channels_last": sums.settings.get("channels_last", cfg.trainer.channels_last),
        "num_workers": cfg.scaling.num_workers,
        **metrics,
        "expected_samples": expected_samples,
        "paper_top1": paper,
        "class_names": list(manifest.class_names),
        "per_class_samples": [int(n) for n in sums.class_samples.tolist()],
        "per_class_top1": sums.per_class_top1(),
    }


def write_report(report: dict[str, Any], run_dir: str | Path) -> str:
    """Write ``<run_dir>/eval.json`` (a local folder, or object storage such as ``s3://...``) atomically;
    returns where it went."""
    from metaformer_platform import storage

    target = storage.Location.parse(run_dir).join(REPORT_FILE)
    storage.write_bytes(target, (json.dumps(report, indent=1) + "\n").encode())
    return target.uri


def summary_line(report: dict[str, Any]) -> str:
    """One line for the terminal: measured numbers, and the paper's top-1 beside them where it applies."""
    line = (
        f"top-1 {report['eval/top1']:.2f}% top-5 {report['eval/top5']:.2f}% loss {report['eval/loss']:.4f} on "
        f"{int(report['eval/samples'])} images ({int(report['eval/skipped_samples'])} skipped), "
        f"{report['eval/images_per_s']:.1f} images/s"
    )
    if report.get("paper_top1") is not None:
        line += (
            f"\n{report['model_name']}: measured top-1 {report['eval/top1']:.2f}% at {report['img_size']} px, "
            f"paper (ImageNet-1k, 224 px) {report['paper_top1']:.1f}%"
        )
    return line
