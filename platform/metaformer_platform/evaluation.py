"""Evaluation: top-1/top-5, per-class accuracy, loss and throughput over a validation split.

Two users share this code: ``Trainer.validate()`` (during training) and the evaluate job (``launch.run_job``
with ``stage="evaluate"``), which scores a checkpoint folder, an export folder or a registry version on the
validation shards. The metric sums are accumulated per rank and reduced with one all-reduce, so each sample of
the split is counted exactly once across ranks (the loader spreads the split over ranks without padding);
stand-ins for unreadable samples carry ``IGNORE_LABEL`` and are counted as skipped, not scored.

No Ray or MLflow here: ``launch.py`` runs ``evaluate_worker`` inside the Ray Train workers and logs the report.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
import torch.nn.functional as F
from torch import nn

from metaformer_platform.data import IGNORE_LABEL

REPORT_FILE = "eval.json"
NO_WEIGHTS = (
    "an evaluate job scores trained weights: set model.init_from to a checkpoint folder, an export folder or a "
    "registered model (models:/NAME@ALIAS)"
)
_SCALARS = ("loss", "top1", "top5", "count", "skipped")


class MetricSums:
    """Sums of one evaluation pass on one rank: loss, top-1/top-5 hits, scored and skipped samples, and
    per-class (scored, top-1 hits). ``all_reduce()`` adds them up over ranks; ``metrics()`` divides."""

    def __init__(self, num_classes: int, device: torch.device | str = "cpu") -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = num_classes
        self.device = torch.device(device)
        self.scalars = torch.zeros(len(_SCALARS), dtype=torch.float64, device=self.device)
        self.class_samples = torch.zeros(num_classes, dtype=torch.float64, device=self.device)
        self.class_top1 = torch.zeros(num_classes, dtype=torch.float64, device=self.device)
        self.seconds = 0.0

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Score one batch; targets equal to ``IGNORE_LABEL`` (stand-ins) are left out of every sum."""
        logits = logits.float()
        if logits.shape[1] != self.num_classes:
            raise ValueError(f"the model has {logits.shape[1]} outputs but the metrics expect {self.num_classes}")
        valid = targets.ne(IGNORE_LABEL)
        labels = targets[valid]
        if labels.numel():
            lo, hi = (int(v) for v in torch.stack(labels.aminmax()).tolist())  # one device sync per batch
            if lo < 0 or hi >= self.num_classes:
                raise ValueError(
                    f"label {hi if hi >= self.num_classes else lo} is outside the model's {self.num_classes} "
                    "classes: the data has another label set than the weights"
                )
        top = logits.topk(min(5, self.num_classes), dim=1).indices
        hits = top.eq(targets[:, None]) & valid[:, None]
        top1 = hits[:, 0]
        self.scalars += torch.stack(
            [
                F.cross_entropy(logits, targets, reduction="sum", ignore_index=IGNORE_LABEL).double(),
                top1.sum().double(),
                hits.any(dim=1).sum().double(),
                valid.sum().double(),
                torch.zeros((), dtype=torch.float64, device=self.device),
            ]
        )
        self.class_samples += torch.bincount(labels, minlength=self.num_classes).double()
        self.class_top1 += torch.bincount(targets[top1], minlength=self.num_classes).double()

    def add_skipped(self, count: int) -> None:
        self.scalars[4] += count

    def all_reduce(self) -> None:
        """Sum over the process group (one collective); the pass time becomes the slowest rank's."""
        if not (tdist.is_available() and tdist.is_initialized()):
            return
        flat = torch.cat([self.scalars, self.class_samples, self.class_top1])
        tdist.all_reduce(flat)
        n, c = len(_SCALARS), self.num_classes
        self.scalars, self.class_samples, self.class_top1 = flat[:n], flat[n : n + c], flat[n + c :]
        seconds = torch.tensor(self.seconds, dtype=torch.float64, device=self.device)
        tdist.all_reduce(seconds, op=tdist.ReduceOp.MAX)
        self.seconds = float(seconds)

    @property
    def samples(self) -> int:
        return int(self.scalars[3])

    @property
    def skipped(self) -> int:
        return int(self.scalars[4])

    def metrics(self, prefix: str) -> dict[str, float]:
        """``{prefix}/loss|top1|top5|samples|skipped_samples|images_per_s`` (accuracies in percent)."""
        loss, top1, top5, count, skipped = self.scalars.tolist()
        if count == 0:
            raise RuntimeError("the evaluation scored no samples")
        return {
            f"{prefix}/loss": loss / count,
            f"{prefix}/top1": 100.0 * top1 / count,
            f"{prefix}/top5": 100.0 * top5 / count,
            f"{prefix}/samples": count,
            f"{prefix}/skipped_samples": skipped,
            f"{prefix}/images_per_s": count / self.seconds if self.seconds > 0 else 0.0,
        }

    def per_class_top1(self) -> list[float | None]:
        """Top-1 (%) of each class; None for a class with no scored sample."""
        return [
            100.0 * hit / n if n else None
            for hit, n in zip(self.class_top1.tolist(), self.class_samples.tolist(), strict=True)
        ]

    def to_dict(self) -> dict[str, Any]:
        """Plain numbers and lists: what a Ray Train worker hands back to the driver."""
        return {
            "scalars": self.scalars.tolist(),
            "class_samples": self.class_samples.tolist(),
            "class_top1": self.class_top1.tolist(),
            "seconds": self.seconds,
        }

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> MetricSums:
        sums = cls(len(state["class_samples"]))
        sums.scalars = torch.tensor(state["scalars"], dtype=torch.float64)
        sums.class_samples = torch.tensor(state["class_samples"], dtype=torch.float64)
        sums.class_top1 = torch.tensor(state["class_top1"], dtype=torch.float64)
        sums.seconds = float(state["seconds"])
        return sums


def _skipped(loader: Any) -> int:
    return loader.fault_stats()["skipped_samples"] if hasattr(loader, "fault_stats") else 0


@torch.no_grad()
def evaluate_loader(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    num_classes: int,
    device: torch.device,
    memory_format: torch.memory_format = torch.contiguous_format,
    autocast: Callable[[], AbstractContextManager[Any]] = nullcontext,
) -> MetricSums:
    """One pass over ``loader`` with ``model`` in eval mode; the sums are reduced over the process group."""
    model.eval()
    sums = MetricSums(num_classes, device)
    skipped_before = _skipped(loader)
    start = time.perf_counter()
    for images, targets in loader:
        images = images.to(device).to(memory_format=memory_format)
        with autocast():
            logits = model(images)
        sums.update(logits, targets.to(device))
    sums.seconds = time.perf_counter() - start
    sums.add_skipped(_skipped(loader) - skipped_before)
    sums.all_reduce()
    return sums


# -- what the weights are ----------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightsInfo:
    """What an export or checkpoint folder says about the model in it (read without loading weights)."""

    kind: str  # "export" or "checkpoint"
    path: Path
    model_name: str
    num_classes: int
    model_kwargs: dict[str, Any]
    class_names: tuple[str, ...]  # empty when the weights do not record them
    img_size: int | None
    crop_pct: float | None
    step: int | None


def read_weights_info(source: str | Path) -> WeightsInfo:
    """Read ``model.json`` of an export, or ``trainer.pt`` + ``config.yaml`` of a complete checkpoint.

    Raises ``ValueError`` for a folder that is neither.
    """
    import yaml

    from metaformer_platform.training import checkpoint as ckpt
    from metaformer_platform.training.export import META_FILE, WEIGHTS_FILE

    folder = Path(str(source).removeprefix("file://")).expanduser().resolve()
    if (folder / META_FILE).is_file() and (folder / WEIGHTS_FILE).is_file():
        info = json.loads((folder / META_FILE).read_text())
        pcfg = info.get("pretrained_cfg") or {}
        return WeightsInfo(
            "export", folder, info["model_name"], int(info["num_classes"]), dict(info.get("model_kwargs") or {}),
            tuple(info.get("class_names") or ()), info.get("img_size"), info.get("crop_pct", pcfg.get("crop_pct")),
            info.get("step"),
        )
    if ckpt.is_complete(folder) and (folder / ckpt.TRAINER_FILE).is_file():
        state = ckpt.load_tensors(folder / ckpt.TRAINER_FILE)
        config = yaml.safe_load((folder / ckpt.CONFIG_FILE).read_text()) if (folder / ckpt.CONFIG_FILE).is_file() else {}
        data, model = config.get("data") or {}, config.get("model") or {}
        return WeightsInfo(
            "checkpoint", folder, state["model_name"], int(state["num_classes"]), dict(model.get("kwargs") or {}),
            tuple(state.get("class_names") or ()), data.get("img_size"), data.get("crop_pct"), int(state["step"]),
        )
    raise ValueError(
        f"model.init_from={str(source)!r} is neither an export (model.json + model.safetensors) nor a complete "
        "checkpoint folder (checkpoint-NNNNNNNN with a COMPLETE marker); point it at one of those, or at a "
        "registered model (models:/NAME@ALIAS)"
    )


def default_weights_cache() -> Path:
    """Where weights named by an object-storage URL are downloaded (``$METAFORMER_WEIGHTS_CACHE`` wins)."""
    import os

    return Path(os.environ.get("METAFORMER_WEIGHTS_CACHE") or Path.home() / ".cache/metaformer-platform/weights")


def fetch_weights(url: str, cache_dir: str | Path | None = None) -> Path:
    """A local copy of the checkpoint or export folder at ``url`` (``s3://bucket/runs/NAME/checkpoint-N``),
    downloaded once into the cache (checked against the listed sizes, renamed into place when complete).

    Raises ``ValueError`` when the folder holds neither a complete checkpoint nor an export: nothing is
    downloaded then."""
    import os
    import shutil
    import tempfile

    from metaformer_platform.data import open_storage
    from metaformer_platform.training import checkpoint as ckpt
    from metaformer_platform.training.export import META_FILE, WEIGHTS_FILE

    storage = open_storage(url.rstrip("/"))
    sizes = storage.list_sizes() if hasattr(storage, "list_sizes") else None
    if sizes is None:
        raise ValueError(f"model.init_from={url!r}: cannot list the objects there; use a local folder or allow listing")
    names = set(sizes)
    if not ({ckpt.COMPLETE_MARKER, ckpt.TRAINER_FILE} <= names or {META_FILE, WEIGHTS_FILE} <= names):
        raise ValueError(
            f"model.init_from={url!r} is neither an export (model.json + model.safetensors) nor a complete "
            f"checkpoint (no {ckpt.COMPLETE_MARKER} marker among {len(names)} objects); point it at one of those"
        )
    target = Path(cache_dir or default_weights_cache()).expanduser() / hashlib.sha256(url.encode()).hexdigest()[:24]

    def cached() -> bool:
        return target.is_dir() and all(
            (target / n).is_file() and (target / n).stat().st_size == size for n, size in sizes.items()
        )

    if cached():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        for name, size in sizes.items():
            dest = tmp / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            with storage.open(name) as src, dest.open("wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
            if dest.stat().st_size != size:
                raise ValueError(f"{storage.describe(name)}: read {dest.stat().st_size} bytes, listed {size}")
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            if not cached():  # not another process finishing the same download first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


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


def prepare_evaluation(cfg: Any, weights_folder: Path | None, data_root: str | Path) -> tuple[Any, WeightsInfo, Any]:
    """Check an evaluate job on the driver; returns (config set to the weights' model, the weights, the manifest).

    The weights decide the model (name, classes, kwargs) and, unless the config sets them, the resolution and
    crop they were trained at. Raises ``ValueError`` for no ``model.init_from``, weights of another model than
    a configured ``model.name``, no validation split, or shards of another label set than the weights'.
    """
    from metaformer_platform.data import batch_schedule, load_manifest

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
    split = manifest.split(cfg.data.val_split)  # raises, naming the splits there are
    from metaformer_platform.data import INFO_NAME

    check_label_set(weights, manifest.num_classes, manifest.class_names, manifest.storage.describe(INFO_NAME))
    # every rank must get the same number of non-empty batches (raises naming the fix otherwise)
    batch_schedule(split.num_samples, world_size=cfg.scaling.num_workers, batch_size=cfg.trainer.batch_size,
                   drop_last=False)
    return cfg, weights, manifest


# -- the evaluate job's worker side ---------------------------------------------------------------------


def load_weights_model(cfg: Any, source: str | Path) -> nn.Module:
    """The configured model with the weights in ``source`` (export or any strategy's checkpoint), loaded
    strictly: an evaluation never runs with a freshly initialised layer."""
    from metaformer_platform.training.export import read_weights
    from metaformer_platform.training.trainer import build_model

    weights, name = read_weights(source)
    if name != cfg.model.name:
        raise ValueError(f"{str(source)!r} holds {name}, not {cfg.model.name}")
    model = build_model(cfg, cfg.model.num_classes)
    model.load_state_dict(weights, strict=True)
    return model


def evaluate_worker(cfg: Any, dist: Any, data_root: str | Path, weights: str | Path) -> MetricSums:
    """On one rank: load the weights, read this rank's share of ``cfg.data.val_split``, return the reduced sums."""
    from metaformer_platform import hardware
    from metaformer_platform.training.trainer import build_split_loader

    cfg, _ = hardware.resolve_for_worker(cfg, dist.device, world_size=dist.world_size, total_steps=0)
    if cfg.trainer.torch_threads:
        torch.set_num_threads(cfg.trainer.torch_threads)
    memory_format = torch.channels_last if cfg.trainer.channels_last else torch.contiguous_format
    model = load_weights_model(cfg, weights).to(dist.device).to(memory_format=memory_format)
    loader = build_split_loader(cfg, data_root, dist, cfg.data.val_split, training=False)

    def autocast() -> AbstractContextManager[Any]:
        if cfg.trainer.precision == "bf16":
            return torch.autocast(device_type=dist.device.type, dtype=torch.bfloat16)
        return nullcontext()

    return evaluate_loader(
        model, loader, num_classes=cfg.model.num_classes, device=dist.device, memory_format=memory_format,
        autocast=autocast,
    )


def build_report(
    sums: MetricSums,
    *,
    cfg: Any,
    weights: WeightsInfo,
    weights_uri: str,
    manifest: Any,
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
    digest, digest_of = data_hash(manifest, cfg.data.val_split)
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
        "precision": cfg.trainer.precision,
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
    import os

    body = json.dumps(report, indent=1) + "\n"
    run_dir = str(run_dir)
    if "://" not in run_dir or run_dir.startswith("file://"):
        path = Path(run_dir.removeprefix("file://")) / REPORT_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{REPORT_FILE}.tmp-{os.getpid()}")
        tmp.write_text(body)
        os.replace(tmp, path)
        return str(path)
    from metaformer_platform.data import open_storage

    open_storage(run_dir).write_bytes(REPORT_FILE, body.encode())  # type: ignore[attr-defined]
    return f"{run_dir.rstrip('/')}/{REPORT_FILE}"


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
