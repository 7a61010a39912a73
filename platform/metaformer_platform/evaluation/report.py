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
from metaformer_platform.storage.weights import WeightsInfo, read_weights_info

if TYPE_CHECKING:
    from metaformer_platform.config import JobConfig
    from metaformer_platform.data import Manifest

REPORT_FILE = "eval.json"
NO_WEIGHTS = (
    "an evaluate job scores trained weights: set model.init_from to a checkpoint folder, an export folder or a "
    "registered model (models:/NAME@ALIAS)"
)
# -- what the weights are ----------------------------------------------------------------------------


def check_label_set(weights: WeightsInfo, num_classes: int | None, class_names: tuple[str, ...], where: str) -> None:
    """The data's classes are the weights' classes (count, and names where both record them)."""
    if num_classes is not None and num_classes != weights.num_classes:
        raise ValueError(
            f"{where} has {num_classes} classes but {weights.model_name} in {str(weights.path)!r} was trained "
            f"with {weights.num_classes}: evaluate on shards of the label set the weights were trained on (or "
            "fine-tune them on this data first: jobs/finetune.py)"
        )
    if class_names and weights.class_names and tuple(class_names) != tuple(weights.class_names):
        first = next(
            i for i, (a, b) in enumerate(zip(class_names, weights.class_names, strict=True)) if a != b
        )
        raise ValueError(
            f"{where} names its classes differently from the weights in {str(weights.path)!r}: class {first} is "
            f"{class_names[first]!r} in the data but {weights.class_names[first]!r} in the weights; evaluate on "
            "shards with the same class order"
        )


def data_hash(manifest: Any, split: str) -> tuple[str, str]:
    """(sha256, what it covers) of the validation data: the split's shard list, lengths and per-shard sha256
    plus the class names when the manifest records shard checksums, else the bytes of ``_info.json``.

    Two evaluations with the same hash scored the same samples under the same labels (the registry's
    promotion gate compares top-1 only then)."""
    from metaformer_platform.data import INFO_NAME

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
        return hashlib.sha256(text).hexdigest(), f"split {split!r} of {INFO_NAME}"
    return hashlib.sha256(manifest.storage.read_bytes(INFO_NAME)).hexdigest(), INFO_NAME


# -- the evaluate job's driver side ---------------------------------------------------------------------


def prepare_evaluation(
    cfg: JobConfig, weights_folder: Path | None, data_root: str | Path
) -> tuple[JobConfig, WeightsInfo, Manifest]:
    """Check an evaluate job on the driver; returns (config set to the weights' model, the weights, the manifest).

    The weights decide the model (name, classes, kwargs) and, unless the config sets them, the resolution and
    crop they were trained at. Raises ``ValueError`` for no ``model.init_from``, weights of another model than
    a configured ``model.name``, no validation split, or shards of another label set than the weights'.
    """
    from metaformer_platform.data import load_manifest

    if weights_folder is None:
        raise ValueError(NO_WEIGHTS)
    weights = read_weights_info(weights_folder)
    m, d = cfg.model, cfg.data
    if "name" in m.model_fields_set and m.name != weights.model_name:
        raise ValueError(
            f"model.init_from={m.init_from!r} holds {weights.model_name}, but model.name={m.name}: drop "
            f"model.name (the weights decide it) or set model.name={weights.model_name}"
        )
    if m.num_classes is not None and m.num_classes != weights.num_classes:
        raise ValueError(
            f"model.num_classes={m.num_classes} but the weights in {m.init_from!r} have {weights.num_classes} "
            "classes: set model.num_classes=null"
        )
    if d.val_split is None:
        raise ValueError("an evaluate job scores data.val_split: set it to a split of the data (e.g. data.val_split=val)")
    data_update: dict[str, Any] = {}
    if "img_size" not in d.model_fields_set and weights.img_size:
        data_update["img_size"] = int(weights.img_size)
    if "crop_pct" not in d.model_fields_set and weights.crop_pct:
        data_update["crop_pct"] = float(weights.crop_pct)
    cfg = cfg.model_copy(update={
        "model": m.model_copy(
            update={"name": weights.model_name, "num_classes": weights.num_classes, "kwargs": weights.model_kwargs}
        ),
        "data": d.model_copy(update=data_update),
    })
    manifest = load_manifest(data_root)
    from metaformer_platform.data import INFO_NAME

    check_label_set(weights, manifest.num_classes, manifest.class_names, manifest.storage.describe(INFO_NAME))
    check_eval_batches(cfg, manifest)
    return cfg, weights, manifest


def split_and_classes(cfg: JobConfig) -> tuple[str, int]:
    """``(data.val_split, model.num_classes)`` of a config ``prepare_evaluation`` has set up (the weights decide
    the classes): what the evaluation reads and scores. A ValueError names what is still unset."""
    split, classes = cfg.data.val_split, cfg.model.num_classes
    if split is None or classes is None:
        raise ValueError(
            "an evaluation needs data.val_split and model.num_classes (prepare_evaluation takes the classes from "
            f"the weights), got data.val_split={split!r} model.num_classes={classes!r}"
        )
    return split, classes


def check_eval_batches(cfg: JobConfig, manifest: Manifest) -> None:
    """Every rank gets the same number of non-empty batches of ``data.val_split`` (raises naming the fix otherwise).

    ``scaling.num_workers: auto`` is judged as one worker until the launcher has chosen the layout, which needs
    the cluster (``launch.resolve_scaling``); the launcher checks again with the number it chose."""
    from metaformer_platform.data import batch_schedule

    split = manifest.split(split_and_classes(cfg)[0])  # raises, naming the splits there are
    workers = cfg.scaling.num_workers if isinstance(cfg.scaling.num_workers, int) else 1
    batch_schedule(split.num_samples, world_size=workers, batch_size=cfg.trainer.batch_size, drop_last=False)


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
    digest, digest_of = data_hash(manifest, split_and_classes(cfg)[0])
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
