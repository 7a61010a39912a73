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
    report: dict[str, Any] | None = None  # evaluate: the JSON written to <run dir>/eval.json


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


def _local_weights(source: str, registry_uri: str | None) -> Path:
    """A local folder for ``model.init_from``: a ``models:/NAME@ALIAS`` URI is downloaded from the registry
    (once per version), an object-storage URL (``s3://.../checkpoint-N``) into the weights cache."""
    from metaformer_platform import registry
    from metaformer_platform.data.storage import split_url

    if registry.is_registry_uri(source):
        return registry.resolve_model_uri(source, tracking_uri=registry_uri)
    if split_url(source)[0] not in ("", "file"):
        from metaformer_platform.evaluation import fetch_weights

        return fetch_weights(source)
    return Path(source.removeprefix("file://")).expanduser().resolve()


def resolve_init_from(cfg: JobConfig) -> Path | None:
    """``model.init_from`` as a local folder on the driver (None when unset); a registry URI that names nothing
    is a ValueError listing what the registry has."""
    return _local_weights(cfg.model.init_from, _registry_uri(cfg)) if cfg.model.init_from is not None else None


def _with_local_init_from(cfg: JobConfig, payload: dict[str, Any]) -> JobConfig:
    """In a worker: ``model.init_from`` becomes the driver's local copy when this node sees it, else this node's
    own download of the URI (the driver may run on another machine)."""
    source = cfg.model.init_from
    if source is None:
        return cfg
    driver_copy = payload.get("init_from_local")
    local = Path(driver_copy) if driver_copy and Path(driver_copy).exists() else _local_weights(source, payload["registry_uri"])
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"init_from": str(local)})})


def check_init_from(cfg: JobConfig, folder: Path | None = None) -> None:
    """``model.init_from`` (resolved to ``folder``) is an export or a complete checkpoint of the same model
    (read cheaply, on the driver); a fine-tune needs one."""
    if cfg.model.init_from is None:
        if cfg.stage == "finetune":
            raise ValueError(
                "a finetune job starts from trained weights: set model.init_from to a checkpoint folder, an "
                "export folder or a registered model (models:/NAME@ALIAS)"
            )
        return
    from metaformer_platform.evaluation import read_weights_info

    name = read_weights_info(folder or cfg.model.init_from).model_name
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
    from metaformer_platform.training.storage import filesystem_and_path, is_remote, local_copy

    remote = is_remote(cfg.run.resume_from)
    with local_copy(cfg.run.resume_from, [ckpt.COMPLETE_MARKER, ckpt.TRAINER_FILE]) as folder:
        if remote:  # completeness is judged where the files are, not on the two fetched here
            fs, path = filesystem_and_path(cfg.run.resume_from)
            why = None if ckpt.is_complete_on(fs, path) else f"{ckpt.COMPLETE_MARKER} is missing or lists files that are not there"
        else:
            why = ckpt.incomplete_reason(folder)
        if why is not None:
            raise ValueError(
                f"run.resume_from={cfg.run.resume_from!r} is not a complete checkpoint folder ({why}); point it "
                "at a run's checkpoint-NNNNNNNN folder"
            )
        state = ckpt.load_tensors(folder / ckpt.TRAINER_FILE)
    if remote:
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
    # A worker runs on one node: the total may suffice while no node (or too few) can hold a worker.
    per_worker = {name: amount / s.num_workers for name, amount in need.items() if amount > 0}
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    fits = sum(
        min((int(node.get(name, 0.0) // amount) for name, amount in per_worker.items()), default=s.num_workers)
        for node in nodes
    )
    if fits < s.num_workers:
        largest = max((node.get("CPU", 0.0) for node in nodes), default=0.0)
        wants = ", ".join(f"{amount:g} {name}" for name, amount in per_worker.items())
        raise ValueError(
            f"a worker needs {wants} on one node, and the cluster's {len(nodes)} nodes (the largest has "
            f"{largest:g} CPU) hold {fits} such workers, not scaling.num_workers={s.num_workers}: lower "
            "scaling.cpus_per_worker or add larger nodes"
        )


def _claim_run(storage_path: str, cfg: JobConfig) -> Any:
    """Hold ``run.name`` for this job (a ``RunLease``): a second job under a live run name is refused here,
    before anything starts, so it can neither touch the first's checkpoints nor reopen its MLflow run."""
    from metaformer_platform.training.ownership import claim_run

    return claim_run(storage_path, cfg.run_name)


def _connect_and_open_run(cfg: JobConfig, lease: Any = None) -> Any:
    """Join Ray, check the worker group fits, then open the job's MLflow run (a ``RunHandle``, or None when
    tracking is off): the last driver step before workers start, so a refused job leaves no run behind.
    On failure the job's ``lease`` on its run name is released."""
    try:
        connect_ray(cfg)
        check_cluster(cfg)
        if not cfg.tracking.enabled:
            return None
        from metaformer_platform.tracking import RunHandle

        return RunHandle(cfg)
    except BaseException:
        if lease is not None:
            lease.release()
        raise


def _with_default_threads(cfg: JobConfig) -> JobConfig:
    """``trainer.torch_threads`` unset means one torch thread per CPU the worker is given (not all of the node's)."""
    if cfg.trainer.torch_threads is not None:
        return cfg
    threads = max(1, int(cfg.scaling.cpus_per_worker))
    return cfg.model_copy(update={"trainer": cfg.trainer.model_copy(update={"torch_threads": threads})})


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


def checkpoint_reporter(
    cfg: JobConfig, dist: Any, flush: Callable[[], None] | None = None, owner: dict[str, str] | None = None
) -> Callable[[dict[str, float], Path | None], bool]:
    """The Trainer's ``report`` inside a Ray Train worker: ``ray.train.report`` with this rank's checkpoint
    part, uploaded (asynchronously unless ``run.checkpoint_upload=sync``) so that COMPLETE lands last.
    ``flush`` runs before a checkpoint is reported: the metrics up to it are stored before anything can
    resume from it. ``owner`` (the run's lease) stamps each folder, so recovery knows what its run wrote."""
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
        if flush is not None:
            flush()
        if owner is not None:
            from metaformer_platform.training.ownership import stamp

            stamp(checkpoint_dir, owner, dist.rank)
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


def _dist_context() -> Any:
    """Where this Ray Train worker sits. The data split is by global rank; node and local rank say where it runs."""
    import ray.train
    import ray.train.torch

    from metaformer_platform.strategies.base import DistContext

    ctx = ray.train.get_context()
    return DistContext(
        rank=ctx.get_world_rank(),
        world_size=ctx.get_world_size(),
        local_rank=ctx.get_local_rank(),
        node_rank=ctx.get_node_rank(),
        device=ray.train.torch.get_device(),
    )


def _recover_checkpoint(dist: Any, owner: dict[str, str] | None = None) -> tuple[Any, bool]:
    """The checkpoint to resume from, and whether Ray has yet to register it.

    ``ray.train.report`` uploads a checkpoint into the run folder and then only queues the report in the
    worker's memory; the controller collects it at its next poll (every 2 s) and registers the checkpoint
    once every rank's report of that round has arrived. A worker killed in between (SIGKILL, OOM, a lost
    node) takes the report with it: Ray hands the restarted group its previous checkpoint and never
    prunes the newer folder. (A worker that raises stays alive long enough to be polled, so its last
    report is registered.) Rank 0 therefore resumes from the newest complete folder in the run folder
    when it is newer than Ray's, registers it, and deletes the unregistered rest (partial uploads, older
    leftovers), so that every rank resumes from the same checkpoint. Unregistered folders its run did not
    write (no ``owner`` stamp of this run: copied in, another run's) are moved to ``_quarantine/`` first.
    """
    import ray.train
    import torch.distributed as tdist

    from metaformer_platform.training import checkpoint as ckpt

    latest = ray.train.get_checkpoint()
    storage = ray.train.get_context().get_storage()  # the filesystem and run folder Ray itself writes to
    plans: list[Any] = [None]
    if dist.is_main:
        reported = ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
        if owner is not None:
            from metaformer_platform.training.ownership import quarantine_foreign

            moved = quarantine_foreign(storage.storage_filesystem, storage.experiment_fs_path,
                                       [Path(c.checkpoint.path).name for c in reported], owner["run_id"])
            if moved:
                log.warning("moved checkpoint folders this run did not write to _quarantine/: %s", ", ".join(moved))
        plans[0] = ckpt.recover_run_folder(
            storage.storage_filesystem,
            storage.experiment_fs_path,
            registered=[Path(c.checkpoint.path).name for c in reported],
            latest=Path(latest.path).name if latest else None,
        )
        if plans[0].remove:
            log.warning("removed checkpoint folders Ray never registered: %s", ", ".join(plans[0].remove))
    if dist.distributed:
        tdist.broadcast_object_list(plans, src=0)
    plan = plans[0]
    if not plan.adopt:
        return latest, False
    if dist.is_main:
        log.warning(
            "resuming from %s, newer than the %s Ray handed over: its report was lost with the worker that made it",
            plan.resume, Path(latest.path).name if latest else "nothing",
        )
    path = f"{storage.experiment_fs_path}/{plan.resume}"
    return ray.train.Checkpoint(path=path, filesystem=storage.storage_filesystem), True


def _train_worker(payload: dict[str, Any]) -> None:
    """Runs in every Ray Train worker: builds the Trainer (resuming from the newest complete checkpoint) and trains."""
    import ray.train

    from metaformer_platform.training.trainer import NullTracker, Trainer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = _with_local_init_from(JobConfig.model_validate(payload["config"]), payload)
    dist = _dist_context()
    log.info("rank %d of %d on node %d (local rank %d), pid %d", dist.rank, dist.world_size, dist.node_rank,
             dist.local_rank, os.getpid())
    tracker: Any = NullTracker()
    if dist.is_main and payload.get("run_id"):
        from metaformer_platform.tracking import MlflowTracker

        tracker = MlflowTracker(payload["tracking_uri"], payload["run_id"], system_metrics=cfg.tracking.system_metrics)

    report = checkpoint_reporter(cfg, dist, flush=getattr(tracker, "flush", None), owner=payload.get("owner"))

    data_root = resolve_data_root(cfg)  # a cache hit on the driver's node; generated alike elsewhere
    checkpoint, adopted = _recover_checkpoint(dist, payload.get("owner"))
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
        if checkpoint is not None:
            tracker.log_metrics({"run/resumed_from_step": float(trainer.step)}, step=trainer.step)
        if adopted:
            # Registered without copying: Ray then hands it on the next restart and prunes it in turn.
            ray.train.report(
                {"step": float(trainer.step)},
                checkpoint=checkpoint if dist.is_main else None,
                checkpoint_dir_name=Path(checkpoint.path).name,
                checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD,
            )
        trainer.train()
    finally:
        if hasattr(tracker, "close"):
            tracker.close()


# -- the job ---------------------------------------------------------------------------------------


def run_job(cfg: JobConfig) -> JobResult:
    """Check, open the MLflow run, fit on Ray Train, and close the run with the job's outcome.

    ``stage="evaluate"`` scores the weights in ``model.init_from`` instead (see ``run_evaluate``)."""
    if cfg.stage == "evaluate":
        return run_evaluate(cfg)

    data_root = resolve_data_root(cfg)
    check_data(cfg, data_root)
    from metaformer_platform.data import load_manifest

    check_model(cfg, cfg.model.num_classes or load_manifest(data_root).num_classes)
    init_from_local = resolve_init_from(cfg)
    check_init_from(cfg, init_from_local)
    resume_from = check_resume_from(cfg)
    storage_path = resolve_storage_path(cfg.run.storage_path)
    cfg = _with_default_threads(cfg)
    lease = _claim_run(storage_path, cfg)
    handle = _connect_and_open_run(cfg, lease)
    payload = {
        "config": cfg.model_dump(mode="json"),
        "owner": lease.owner,
        "run_id": handle.run_id if handle else None,
        "tracking_uri": handle.tracking_uri if handle else None,
        "resume_from": str(resume_from) if resume_from else None,
        "registry_uri": _registry_uri(cfg),
        "init_from_local": str(init_from_local) if init_from_local else None,
    }
    s = cfg.scaling
    resources = {"CPU": s.cpus_per_worker, **s.resources_per_worker}
    worker_env = None
    from metaformer_platform.training.storage import filesystem_and_path, is_remote

    remote_storage = is_remote(storage_path)
    if isinstance(data_root, str) or remote_storage or (resume_from and is_remote(str(resume_from))):
        from metaformer_platform.data.s3 import aws_env

        # Workers of a cluster started before this job do not inherit the S3 endpoint the driver just checked
        # the data and storage with. Only settings travel: credentials come from the nodes (data/s3.py).
        worker_env = {"env_vars": aws_env()} if aws_env() else None
    import ray.train  # after the checks: bad input is refused without paying for Ray's import
    from ray.train.torch import TorchTrainer

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
        lease.release()
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


# -- the evaluate job ------------------------------------------------------------------------------


def _registry_uri(cfg: JobConfig) -> str:
    """Where workers look up ``models:/`` URIs: the driver's tracking URI (an absolute default)."""
    from metaformer_platform.tracking import resolve_tracking_uri

    return resolve_tracking_uri(cfg.tracking.tracking_uri)


def _eval_worker(payload: dict[str, Any]) -> dict[str, Any]:
    """Runs in every Ray Train worker: scores its share of the validation split and returns the sums over all
    ranks (Ray hands rank 0's return value to the driver as ``Result.return_value``)."""
    from metaformer_platform.evaluation import evaluate_worker

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = JobConfig.model_validate(payload["config"])
    dist = _dist_context()
    weights = Path(_with_local_init_from(cfg, payload).model.init_from)  # type: ignore[arg-type]
    data_root = resolve_data_root(cfg)
    return evaluate_worker(cfg, dist, data_root, weights).to_dict()


def run_evaluate(cfg: JobConfig) -> JobResult:
    """Score ``model.init_from`` (checkpoint, export or ``models:/`` URI) on ``data.val_split`` over the Ray
    Train workers; the report goes to ``<run dir>/eval.json``, its numbers and the file to the MLflow run."""
    import tempfile
    import time

    from metaformer_platform.evaluation import (
        NO_WEIGHTS,
        MetricSums,
        build_report,
        prepare_evaluation,
        write_report,
    )

    weights_folder = resolve_init_from(cfg)
    if weights_folder is None:
        raise ValueError(NO_WEIGHTS)
    data_root = resolve_data_root(cfg)
    cfg, weights, manifest = prepare_evaluation(cfg, weights_folder, data_root)
    check_model(cfg, cfg.model.num_classes)
    storage_path = resolve_storage_path(cfg.run.storage_path)
    cfg = _with_default_threads(cfg)
    import ray.train
    from ray.train.torch import TorchTrainer

    lease = _claim_run(storage_path, cfg)
    handle = _connect_and_open_run(cfg, lease)
    payload = {
        "config": cfg.model_dump(mode="json"),
        "init_from_local": str(weights.path),
        "registry_uri": _registry_uri(cfg),
    }
    s = cfg.scaling
    worker_env = None
    if isinstance(data_root, str):
        from metaformer_platform.data.s3 import aws_env

        worker_env = {"env_vars": aws_env()} if aws_env() else None
    trainer = TorchTrainer(
        _eval_worker,
        train_loop_config=payload,
        scaling_config=ray.train.ScalingConfig(
            num_workers=s.num_workers, use_gpu=s.use_gpu,
            resources_per_worker={"CPU": s.cpus_per_worker, **s.resources_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=cfg.run_name,
            storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            worker_runtime_env=worker_env,
        ),
    )
    run_dir = str(Path(storage_path) / cfg.run_name) if "://" not in storage_path else f"{storage_path}/{cfg.run_name}"
    succeeded = False
    try:
        result = trainer.fit()
        if result.error is not None:
            raise result.error
        sums = MetricSums.from_dict(result.return_value)
        report = build_report(
            sums, cfg=cfg, weights=weights, weights_uri=str(cfg.model.init_from), manifest=manifest,
            expected_samples=manifest.split(cfg.data.val_split).num_samples,
        )
        report["mlflow_run_id"] = handle.run_id if handle else None
        report_path = write_report(report, run_dir)
        metrics = {k: float(v) for k, v in report.items() if k.startswith("eval/")}
        if handle is not None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            step = int(weights.step or 0)
            handle.client.log_batch(handle.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])
            handle.client.set_tag(handle.run_id, "metaformer.eval_data_hash", report["data_hash"])
            handle.client.set_tag(handle.run_id, "metaformer.weights", str(cfg.model.init_from))
            if report["paper_top1"] is not None:
                handle.client.set_tag(handle.run_id, "metaformer.paper_top1", str(report["paper_top1"]))
            with tempfile.TemporaryDirectory() as tmp:
                handle.client.log_artifact(handle.run_id, write_report(report, tmp))
        log.info("evaluation report written to %s", report_path)
        succeeded = True
    finally:
        if handle is not None:
            handle.close(succeeded)
        lease.release()
    return JobResult(
        metrics=metrics,
        checkpoint_path=None,
        run_dir=run_dir,
        mlflow_run_id=handle.run_id if handle else None,
        mlflow_hint=handle.ui_hint() if handle else None,
        report=report,
    )
