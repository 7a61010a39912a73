"""Run a job on Ray Train: check everything on the driver, then ``TorchTrainer.fit()`` around the Trainer.

Order matters: every check that can fail on bad input (config, data, storage, cluster size) runs before
the MLflow run is opened and before any worker starts, so a bad job costs no cluster time and leaves
no RUNNING run or half-written checkpoint behind.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metaformer_platform.config import JobConfig

log = logging.getLogger(__name__)


@dataclass
class JobResult:
    """What a finished job hands back to its entry point."""

    metrics: dict[str, float]
    checkpoint_path: str | None
    run_dir: str
    mlflow_run_id: str | None
    mlflow_hint: str | None


# -- driver-side checks ---------------------------------------------------------------------------


def resolve_data_root(cfg: JobConfig) -> str | Path:
    """Where the job's shards are: a local folder (the synthetic set is generated there on first use), or
    the URL itself for object storage (s3://...), which the loader and `load_manifest` read directly."""
    from metaformer_platform import data as mdata
    from metaformer_platform.data.storage import split_url

    if cfg.data.source == "synthetic":
        s = cfg.data.synthetic
        return mdata.ensure_synthetic_shards(
            Path(cfg.data.cache_dir).expanduser() / "synthetic",
            num_classes=s.num_classes,
            train_samples=s.train_samples,
            val_samples=s.val_samples,
            image_size=s.image_size,
            samples_per_shard=s.samples_per_shard,
            seed=s.seed,
        )
    scheme, _ = split_url(cfg.data.source)
    if scheme not in ("", "file"):
        return cfg.data.source
    source = cfg.data.source.removeprefix("file://")
    return Path(source).expanduser().resolve()


def check_data(cfg: JobConfig, data_root: str | Path) -> None:
    """The manifest is valid, has the splits the job uses, and each rank gets at least one batch."""
    from metaformer_platform import data as mdata

    manifest = mdata.load_manifest(data_root)
    if cfg.data.val_split:
        manifest.split(cfg.data.val_split)  # raises, naming the splits there are
    train = manifest.split(cfg.data.train_split)
    per_rank = train.num_samples // cfg.scaling.num_workers
    if per_rank < cfg.trainer.batch_size * cfg.trainer.grad_accum_steps:
        raise ValueError(
            f"the {cfg.data.train_split!r} split of {str(data_root)!r} has {train.num_samples} samples, "
            f"{per_rank} per worker: fewer than one step of trainer.batch_size={cfg.trainer.batch_size} x "
            f"grad_accum_steps={cfg.trainer.grad_accum_steps}; lower the batch size or scaling.num_workers"
        )
    if cfg.model.num_classes is None and manifest.num_classes is None:
        raise ValueError(f"{str(data_root)!r}/_info.json does not say num_classes: set model.num_classes")
    if cfg.model.num_classes is not None and manifest.num_classes and cfg.model.num_classes < manifest.num_classes:
        raise ValueError(
            f"model.num_classes={cfg.model.num_classes} but the data has {manifest.num_classes} classes; "
            "set model.num_classes=null to take it from the data"
        )


def check_model(cfg: JobConfig, num_classes: int) -> None:
    """The model builds with the configured kwargs (on the meta device: no memory, no time)."""
    import torch

    from metaformer_platform.strategies import get_strategy_class
    from metaformer_platform.training.trainer import build_model

    try:
        with torch.device("meta"):
            model = build_model(cfg, num_classes)
    except TypeError as err:
        raise ValueError(f"model {cfg.model.name!r} does not build with model.kwargs={cfg.model.kwargs}: {err}") from None
    get_strategy_class(cfg.strategy.name).check_model(model)


def check_init_from(cfg: JobConfig) -> None:
    """``model.init_from`` is an export or a complete checkpoint of the same model (read cheaply, on the driver)."""
    if cfg.model.init_from is None:
        return
    import json

    from metaformer_platform.training import checkpoint as ckpt
    from metaformer_platform.training.export import META_FILE
    from metaformer_platform.training.storage import local_copy

    # s3://: only the small files that say what the folder is are fetched here
    with local_copy(cfg.model.init_from, [META_FILE, ckpt.COMPLETE_MARKER, ckpt.TRAINER_FILE]) as folder:
        name = None
        if (folder / META_FILE).is_file():
            name = json.loads((folder / META_FILE).read_text())["model_name"]
        elif ckpt.is_complete(folder) and (folder / ckpt.TRAINER_FILE).is_file():
            name = ckpt.load_tensors(folder / ckpt.TRAINER_FILE)["model_name"]
    if name is None:
        raise ValueError(
            f"model.init_from={cfg.model.init_from!r} is neither an export (model.json + model.safetensors) nor a "
            "complete checkpoint folder; point it at one of those"
        )
    if name != cfg.model.name:
        raise ValueError(
            f"model.init_from={cfg.model.init_from!r} holds {name}, but this job trains {cfg.model.name}: "
            f"set model.name={name} or choose weights of {cfg.model.name}"
        )


def check_resume_from(cfg: JobConfig) -> Path | str | None:
    """``run.resume_from`` as a local folder (or its s3:// URI), refused unless it is a complete checkpoint
    of this model."""
    if cfg.run.resume_from is None:
        return None
    from metaformer_platform.training import checkpoint as ckpt
    from metaformer_platform.training.storage import is_remote, local_copy

    with local_copy(cfg.run.resume_from, [ckpt.COMPLETE_MARKER, ckpt.TRAINER_FILE]) as folder:
        if not ckpt.is_complete(folder):
            raise ValueError(
                f"run.resume_from={cfg.run.resume_from!r} is not a complete checkpoint folder (no "
                f"{ckpt.COMPLETE_MARKER} marker); point it at a run's checkpoint-NNNNNNNN folder"
            )
        state = ckpt.load_tensors(folder / ckpt.TRAINER_FILE)
    if is_remote(cfg.run.resume_from):
        folder = cfg.run.resume_from  # type: ignore[assignment]  (each worker downloads it)
    if state["model_name"] != cfg.model.name:
        raise ValueError(
            f"run.resume_from={cfg.run.resume_from!r} holds {state['model_name']}, but this job trains "
            f"{cfg.model.name}: set model.name={state['model_name']} or choose another checkpoint"
        )
    return folder


def resolve_storage_path(storage_path: str) -> str:
    """An absolute local path (created and checked writable) or an s3:// URI (checked writable)."""
    from metaformer_platform.training.storage import check_writable, is_remote

    if is_remote(storage_path):
        check_writable(storage_path.rstrip("/"))  # a missing bucket or refused key stops the job here
        return storage_path.rstrip("/")
    path = Path(storage_path.removeprefix("file://")).expanduser().resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ValueError(
            f"run.storage_path {storage_path!r} cannot be written ({err.strerror}); choose a folder you can "
            "write, or an s3:// URI"
        ) from None
    return str(path)


def check_cluster(cfg: JobConfig) -> None:
    """The cluster has room for the worker group (Ray would otherwise wait for it forever)."""
    import ray

    resources = ray.cluster_resources()
    s = cfg.scaling
    need = {"CPU": s.num_workers * s.cpus_per_worker}
    if s.use_gpu:
        need["GPU"] = s.num_workers * s.resources_per_worker.get("GPU", 1.0)
    for name, amount in s.resources_per_worker.items():
        if name not in {"CPU", "GPU"}:
            need[name] = s.num_workers * amount
    for name, amount in need.items():
        have = resources.get(name, 0.0)
        if have < amount:
            raise ValueError(
                f"the job needs {amount:g} {name} (scaling.num_workers={s.num_workers} x "
                f"{amount / s.num_workers:g} per worker) but the Ray cluster has {have:g}: lower "
                "scaling.num_workers or scaling.cpus_per_worker, or add nodes"
            )


def connect_ray(cfg: JobConfig) -> None:
    """Join the configured cluster (``run.ray_address`` or RAY_ADDRESS), or start a local one."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.run.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # "local" starts a private cluster instead of attaching to whatever `ray start` left in /tmp/ray.
        ray.init(address="local", include_dashboard=False, log_to_driver=True)


# -- the worker ------------------------------------------------------------------------------------


def checkpoint_reporter(cfg: JobConfig, dist: Any) -> Callable[[dict[str, float], Path | None], bool]:
    """The Trainer's ``report`` inside a Ray Train worker: ``ray.train.report`` with this rank's checkpoint
    part, uploaded (asynchronously unless ``run.checkpoint_upload=sync``) so that COMPLETE lands last."""
    import ray.train

    def upload(checkpoint: ray.train.Checkpoint, dir_name: str) -> ray.train.Checkpoint:
        from metaformer_platform.training.storage import upload_checkpoint_part

        storage = ray.train.get_context().get_storage()
        dest = storage.build_checkpoint_path_from_name(dir_name)
        upload_checkpoint_part(Path(checkpoint.path), storage.storage_filesystem, dest,
                               rank=dist.rank, world_size=dist.world_size)
        return ray.train.Checkpoint(path=dest, filesystem=storage.storage_filesystem)

    def report(metrics: dict[str, float], checkpoint_dir: Path | None) -> bool:
        name = f"checkpoint-{int(metrics['step']):08d}"
        if checkpoint_dir is None:
            ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)
            return False
        async_upload = cfg.run.checkpoint_upload == "async"
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(str(checkpoint_dir)),
            checkpoint_dir_name=name,
            # async: training goes on while a Ray thread uploads; Ray deletes the scratch folder only once
            # its upload has finished (and it registers the checkpoint only once every rank's has)
            checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC if async_upload
            else ray.train.CheckpointUploadMode.SYNC,
            delete_local_checkpoint_after_upload=True,
            checkpoint_upload_fn=upload,
        )
        return True  # Ray owns the scratch folder now

    return report


def _train_worker(payload: dict[str, Any]) -> None:
    """Runs in every Ray Train worker: builds the Trainer (resuming when Ray hands a checkpoint) and trains."""
    import ray.train
    import ray.train.torch

    from metaformer_platform.strategies.base import DistContext
    from metaformer_platform.training.trainer import NullTracker, Trainer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = JobConfig.model_validate(payload["config"])
    ctx = ray.train.get_context()
    dist = DistContext(
        rank=ctx.get_world_rank(),
        world_size=ctx.get_world_size(),
        local_rank=ctx.get_local_rank(),
        node_rank=ctx.get_node_rank(),
        device=ray.train.torch.get_device(),
    )
    tracker: Any = NullTracker()
    if dist.is_main and payload.get("run_id"):
        from metaformer_platform.tracking import MlflowTracker

        tracker = MlflowTracker(payload["tracking_uri"], payload["run_id"], system_metrics=cfg.tracking.system_metrics)

    report = checkpoint_reporter(cfg, dist)

    data_root = resolve_data_root(cfg)  # a cache hit on the driver's node; generated alike elsewhere
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and payload.get("resume_from"):
        # A new run that continues another run's checkpoint; once it has its own, Ray hands those.
        from metaformer_platform.training.storage import filesystem_and_path, is_remote

        if is_remote(payload["resume_from"]):
            fs, path = filesystem_and_path(payload["resume_from"])
            checkpoint = ray.train.Checkpoint(path=path, filesystem=fs)
        else:
            checkpoint = ray.train.Checkpoint.from_directory(payload["resume_from"])
    try:
        with checkpoint.as_directory() if checkpoint else nullcontext(None) as resume_dir:
            trainer = Trainer(
                cfg,
                dist,
                data_root=data_root,
                tracker=tracker,
                report=report,
                resume_from=Path(resume_dir) if resume_dir else None,
            )
        trainer.train()
    finally:
        if hasattr(tracker, "close"):
            tracker.close()


# -- the job ---------------------------------------------------------------------------------------


def run_job(cfg: JobConfig) -> JobResult:
    """Check, open the MLflow run, fit on Ray Train, and close the run with the job's outcome."""
    import ray.train
    from ray.train.torch import TorchTrainer

    data_root = resolve_data_root(cfg)
    check_data(cfg, data_root)
    from metaformer_platform.data import load_manifest

    check_model(cfg, cfg.model.num_classes or load_manifest(data_root).num_classes)
    check_init_from(cfg)
    resume_from = check_resume_from(cfg)
    storage_path = resolve_storage_path(cfg.run.storage_path)
    if cfg.trainer.torch_threads is None:
        cfg = cfg.model_copy(
            update={"trainer": cfg.trainer.model_copy(update={"torch_threads": max(1, int(cfg.scaling.cpus_per_worker))})}
        )
    connect_ray(cfg)
    check_cluster(cfg)

    handle = None
    if cfg.tracking.enabled:
        from metaformer_platform.tracking import RunHandle

        handle = RunHandle(cfg)
    payload = {
        "config": cfg.model_dump(mode="json"),
        "run_id": handle.run_id if handle else None,
        "tracking_uri": handle.tracking_uri if handle else None,
        "resume_from": str(resume_from) if resume_from else None,
    }
    s = cfg.scaling
    resources = {"CPU": s.cpus_per_worker, **s.resources_per_worker}
    worker_env = None
    from metaformer_platform.training.storage import filesystem_and_path, is_remote

    remote_storage = is_remote(storage_path)
    if isinstance(data_root, str) or remote_storage or (resume_from and is_remote(str(resume_from))):
        from metaformer_platform.data.s3 import aws_env

        # Workers of a cluster started before this job do not inherit the S3 endpoint and credentials
        # the driver just checked the data and storage with.
        worker_env = {"env_vars": aws_env()} if aws_env() else None
    # s3://: Ray's own URI resolution ignores AWS_ENDPOINT_URL, so it gets a filesystem built from it
    storage_fs, ray_storage_path = filesystem_and_path(storage_path) if remote_storage else (None, storage_path)
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config=payload,
        scaling_config=ray.train.ScalingConfig(
            num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=cfg.run_name,
            storage_path=ray_storage_path,
            storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.num_to_keep),
            worker_runtime_env=worker_env,
        ),
    )
    succeeded = False
    try:
        result = trainer.fit()
        succeeded = result.error is None
        if result.error is not None:
            raise result.error
    finally:
        if handle is not None:
            handle.close(succeeded)
    return JobResult(
        metrics={k: v for k, v in (result.metrics or {}).items() if isinstance(v, int | float)},
        checkpoint_path=(
            None if not result.checkpoint
            else f"s3://{result.checkpoint.path}" if remote_storage else result.checkpoint.path
        ),
        run_dir=f"{storage_path}/{cfg.run_name}" if remote_storage else str(Path(storage_path) / cfg.run_name),
        mlflow_run_id=handle.run_id if handle else None,
        mlflow_hint=handle.ui_hint() if handle else None,
    )
