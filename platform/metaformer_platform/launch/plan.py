"""The job plan: a ``JobConfig`` turned once, on the driver, into what the job runs with.

``build_plan`` runs every input check once and resolves every ``auto`` the driver can know: the worker layout,
threads, the data root and a summary of its manifest, the initial weights (the local copy of ``model.init_from``
and what they are), the resume point, the run folder, the registry URI and, for an evaluate job, the weights'
model and the split it scores. The workers receive the plan (frozen, typed) and re-resolve none of it; what only
a worker can know (its rank, its device, and from the device its precision, memory format and compile) it
resolves itself (``training.hardware.WorkerSettings``). The config is copied here and nowhere else.

Order: every check of the input runs before Ray is joined; the layout, which needs the cluster, comes last.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from pydantic import BaseModel

from metaformer_platform.config import JobConfig
from metaformer_platform.launch import checks
from metaformer_platform.storage import Location
from metaformer_platform.storage.redact import redact, redact_tree
from metaformer_platform.training import hardware
from metaformer_platform.training.ownership import check_run_free

if TYPE_CHECKING:
    from metaformer_platform.data import Manifest
    from metaformer_platform.storage.weights import WeightsInfo

log = logging.getLogger(__name__)
_Model = TypeVar("_Model", bound=BaseModel)


@dataclass(frozen=True)
class DataSummary:
    """Where the shards are and what their manifest says (read once, on the driver)."""

    root: str | Path
    num_classes: int | None
    samples: dict[str, int]  # per split


@dataclass(frozen=True)
class InitialWeights:
    """``model.init_from``: as configured, the driver's local copy, and what the weights are."""

    source: str
    local: Path
    info: WeightsInfo
    registry_uri: str

    def on_this_node(self) -> Path:
        """The driver's copy when this node sees it, else this node's own fetch through the weights resolver
        (the driver may run on another machine)."""
        if self.local.exists():
            return self.local
        from metaformer_platform.storage.weights import resolve
        from metaformer_platform.tracking.runs import worker_tracking_uri

        return resolve(self.source, tracking_uri=worker_tracking_uri(self.registry_uri))


@dataclass(frozen=True)
class JobPlan:
    """A job, checked and resolved: what the driver launches and every worker receives."""

    cfg: JobConfig  # scaling and threads resolved; an evaluate job's model set to its weights'
    layout: hardware.Layout
    data: DataSummary
    init_from: InitialWeights | None
    resume_from: Path | str | None  # a local folder, or the s3:// URI each worker reads it at
    storage_path: str  # absolute, checked writable
    registry_uri: str  # where models:/ URIs are looked up
    remote_inputs: bool  # whether any input is on object storage (the workers then need the S3 settings)

    @property
    def run_name(self) -> str:
        return self.cfg.run_name

    @property
    def run_dir(self) -> str:
        return Location.parse(self.storage_path).join(self.run_name).uri

    def for_workers(self) -> JobPlan:
        """The plan as Ray's workers receive it: every secret masked (``storage.redact``), as in what is logged.
        Ray pickles it into the payload it sends, which its state API and dashboard can serve; the workers take
        credentials from their node's environment (``tracking.runs.worker_tracking_uri``, the AWS chain)."""
        init = self.init_from and replace(self.init_from, source=redact(self.init_from.source),
                                          registry_uri=redact(self.init_from.registry_uri))
        return replace(self, cfg=_masked(self.cfg), init_from=init, registry_uri=redact(self.registry_uri))

    @property
    def worker_count(self) -> str:
        """The number of workers as a person reads it: ``2``, or ``1-2 (elastic)``."""
        n = self.layout.num_workers
        return f"{n[0]}-{n[1]} (elastic)" if isinstance(n, tuple) else str(n)


@dataclass(frozen=True)
class _Inputs:
    """What the input checks found, before the layout is chosen."""

    cfg: JobConfig  # an evaluate job's set to its weights' model
    data_root: str | Path
    manifest: Manifest
    num_classes: int | None  # the head's: model.num_classes, else the data's (evaluate: the weights')
    local: Path | None  # the driver's copy of model.init_from
    weights: WeightsInfo | None
    resume_from: Path | str | None


def build_plan(cfg: JobConfig, *, dry_run: bool = False) -> JobPlan:
    """Check ``cfg`` and resolve it into a ``JobPlan`` (pretrain, fine-tune and evaluate alike). Raises
    ``ValueError`` naming the key and the fix for bad input, before any cluster time is spent. A ``dry_run``
    plan reads the manifest only (its shards need not exist: none is listed or opened)."""
    checks.check_tracking_servers(cfg)  # first: the inputs' checks may fetch models:/ weights from the registry
    inputs = _evaluate_inputs(cfg, dry_run) if cfg.stage == "evaluate" else _training_inputs(cfg, dry_run)
    storage_path = checks.resolve_storage_path(cfg.run.storage_path)
    check_run_free(storage_path, cfg.run_name)
    registry = checks.registry_uri(cfg)
    # `auto` workers are judged as one until the layout is chosen, then (when it chose more) with its count.
    configured = cfg.scaling.num_workers
    _check_batches(inputs, 1 if configured == "auto" else _most(configured))
    # The launch layer's checks come first, then those of lower layers (the model on the meta device, the
    # layout): the config goes down once instead of down and up again for each check.
    checks.check_model(inputs.cfg, inputs.num_classes)
    # Once the input is known good (a bad one reports its own error, and holds nothing), before Ray is joined; a
    # dry run trains nothing: it must not hold the store against a real job.
    if not dry_run:
        checks.claim_sqlite_store(cfg)
    # The layout needs the cluster, so it is chosen only once every check of the input has passed.
    s = inputs.cfg.scaling
    layout = _cluster_layout(inputs.cfg) if "auto" in (s.num_workers, s.cpus_per_worker, s.use_gpu) else hardware.Layout.of(s)
    if configured == "auto" and _most(layout.num_workers) > 1:
        _check_batches(inputs, _most(layout.num_workers))
    # unset threads: one torch thread per CPU the worker is given (not all of the node's)
    threads = cfg.trainer.torch_threads or max(1, int(layout.cpus_per_worker))
    cfg = _resolved(inputs.cfg, scaling={"num_workers": layout.num_workers,
                                         "cpus_per_worker": layout.cpus_per_worker, "use_gpu": layout.use_gpu},
                    trainer={"torch_threads": threads})
    initial = None
    if inputs.local is not None and inputs.weights is not None:
        initial = InitialWeights(str(cfg.model.init_from), inputs.local, inputs.weights, registry)
    return JobPlan(
        cfg=cfg, layout=layout, init_from=initial,
        data=DataSummary(inputs.data_root, inputs.manifest.num_classes,
                         {name: split.num_samples for name, split in inputs.manifest.splits.items()}),
        resume_from=inputs.resume_from, storage_path=storage_path, registry_uri=registry,
        remote_inputs=_any_remote(str(inputs.data_root), cfg.run.resume_from, cfg.model.init_from),
    )


def _training_inputs(cfg: JobConfig, dry_run: bool) -> _Inputs:
    from metaformer_platform.data import load_manifest

    data_root = checks.resolve_data_root(cfg)
    manifest = load_manifest(data_root, check_files=not dry_run)
    checks.check_data(cfg, manifest, data_root)
    local = checks.resolve_init_from(cfg)
    weights = checks.check_init_from(cfg, local)
    num_classes = cfg.model.num_classes or manifest.num_classes
    return _Inputs(cfg, data_root, manifest, num_classes, local, weights, checks.check_resume_from(cfg))


def _evaluate_inputs(cfg: JobConfig, dry_run: bool) -> _Inputs:
    local = checks.resolve_init_from(cfg)
    if local is None:
        raise ValueError(checks.NO_WEIGHTS)
    data_root = checks.resolve_data_root(cfg)
    weights, manifest = checks.prepare_evaluation(cfg, local, data_root, check_files=not dry_run)
    return _Inputs(evaluation_config(cfg, weights), data_root, manifest, weights.num_classes, local, weights, None)


def evaluation_config(cfg: JobConfig, weights: WeightsInfo) -> JobConfig:
    """An evaluate job's config set to what its weights decide (``checks.evaluation_updates``)."""
    return _resolved(cfg, **checks.evaluation_updates(cfg, weights))


def _check_batches(inputs: _Inputs, workers: int) -> None:
    if inputs.cfg.stage == "evaluate":
        checks.check_eval_batches(inputs.cfg, inputs.manifest, workers)
    else:
        checks.check_rank_batches(inputs.cfg, inputs.manifest, inputs.data_root, workers)


def _most(num_workers: int | tuple[int, int]) -> int:
    return num_workers[1] if isinstance(num_workers, tuple) else num_workers


def _resolved(cfg: JobConfig, **sections: dict[str, object]) -> JobConfig:
    """``cfg`` with ``sections`` (section name -> the fields resolved there): the one place a job config is copied."""
    update = {name: getattr(cfg, name).model_copy(update=fields) for name, fields in sections.items() if fields}
    return cfg.model_copy(update=update) if update else cfg


def _masked(model: _Model) -> _Model:
    """``model`` with every string in it (sections recursively, dicts and lists too) passed through ``redact``."""
    update = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        masked = _masked(value) if isinstance(value, BaseModel) else redact_tree(value)
        if masked != value:
            update[name] = masked
    return model.model_copy(update=update) if update else model


def _cluster_layout(cfg: JobConfig) -> hardware.Layout:
    """``scaling.*: auto`` made concrete: the fastest worker layout for the cluster the job runs on (see
    ``training.hardware.resolve_layout``). A local Ray is not started for it: it would take this machine's CPUs
    and GPUs, which are probed directly."""
    if (cfg.run.ray_address or os.environ.get("RAY_ADDRESS")
            or ("ray" in sys.modules and sys.modules["ray"].is_initialized())):
        import ray

        checks.connect_ray(cfg)
        layout = hardware.resolve_layout(cfg.scaling, [n["Resources"] for n in ray.nodes() if n.get("Alive")])
    else:
        layout = machine_layout(cfg)
    log.info(
        "worker layout: %s worker(s) x %g CPU%s (%s)", layout.num_workers, layout.cpus_per_worker,
        " + 1 GPU" if layout.use_gpu else "", layout.reason)
    return layout


def machine_layout(cfg: JobConfig) -> hardware.Layout:
    """``cfg``'s layout when its scaling is set, else the one ``auto`` resolves to on this machine (its CPUs and
    GPUs probed directly, no Ray): what a plan without a cluster assumes."""
    s = cfg.scaling
    if "auto" not in (s.num_workers, s.cpus_per_worker, s.use_gpu):
        return hardware.Layout.of(s)
    import torch

    return hardware.resolve_layout(s, [{"CPU": float(hardware.available_cpus()), "GPU": float(torch.cuda.device_count())}])


def _any_remote(*sources: str | None) -> bool:
    """Whether any of the job's inputs is on object storage (a models:/ URI is not a location: MLflow serves it)."""
    return any(s and not s.startswith("models:/") and Location.parse(s).remote for s in sources)
