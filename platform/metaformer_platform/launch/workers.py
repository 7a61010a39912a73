"""What runs inside the Ray Train workers: the training worker and the evaluation worker, and their glue
(this rank's place in the group, the checkpoint reporter, recovery of checkpoints Ray never registered).

The driver side (checks, job assembly) is in ``checks.py`` and ``launch.py``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from metaformer_platform.config import JobConfig
from metaformer_platform.launch.checks import resolve_data_root
from metaformer_platform.storage import Location

if TYPE_CHECKING:
    from torch import nn

    from metaformer_platform.evaluation.metrics import MetricSums
    from metaformer_platform.strategies.base import DistContext

log = logging.getLogger("metaformer_platform.launch.driver")


def _with_local_init_from(cfg: JobConfig, payload: dict[str, Any]) -> JobConfig:
    """In a worker: ``model.init_from`` becomes the driver's local copy when this node sees it, else this node's
    own fetch through the weights resolver (the driver may run on another machine)."""
    from metaformer_platform.storage.weights import resolve

    source = cfg.model.init_from
    if source is None:
        return cfg
    driver_copy = payload.get("init_from_local")
    local = (Path(driver_copy) if driver_copy and Path(driver_copy).exists()
             else resolve(source, tracking_uri=payload["registry_uri"]))
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"init_from": str(local)})})


def checkpoint_reporter(
    cfg: JobConfig, dist: Any, flush: Callable[[], None] | None = None, owner: dict[str, str] | None = None
) -> Callable[[dict[str, float], Path | None], bool]:
    """The Trainer's ``report`` inside a Ray Train worker: ``ray.train.report`` with this rank's checkpoint
    part, uploaded (asynchronously unless ``run.checkpoint_upload=sync``) so that COMPLETE lands last.
    ``flush`` runs before a checkpoint is reported: the metrics up to it are stored before anything can
    resume from it. ``owner`` (the run's lease) stamps each folder, so recovery knows what its run wrote."""
    import ray.train

    def upload(checkpoint: ray.train.Checkpoint, dir_name: str) -> ray.train.Checkpoint:
        from metaformer_platform.storage.upload import upload_checkpoint_part

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
            from metaformer_platform.storage.checkpoint_format import stamp

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


def _dist_context() -> DistContext:
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

    from metaformer_platform.training.trainer import NullTracker, RunTracker, Trainer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = _with_local_init_from(JobConfig.model_validate(payload["config"]), payload)
    dist = _dist_context()
    log.info("rank %d of %d on node %d (local rank %d), pid %d", dist.rank, dist.world_size, dist.node_rank,
             dist.local_rank, os.getpid())
    tracker: RunTracker = NullTracker()
    if dist.is_main and payload.get("run_id"):
        from metaformer_platform.tracking.runs import MlflowTracker

        tracker = MlflowTracker(payload["tracking_uri"], payload["run_id"], system_metrics=cfg.tracking.system_metrics)
    run_tracker = tracker  # the MLflow tracker itself (tags), before the progress wrapper
    from metaformer_platform.tracking.console import worker_progress

    progress, tracker = worker_progress(
        payload.get("progress_queue"), payload.get("run_dir", ""), dist, tracker, forward_warnings=not cfg.run.verbose
    )

    report = checkpoint_reporter(cfg, dist, flush=tracker.flush, owner=payload.get("owner"))

    data_root = resolve_data_root(cfg)  # a cache hit on the driver's node; generated alike elsewhere
    checkpoint, adopted = _recover_checkpoint(dist, payload.get("owner"))
    if checkpoint is None and payload.get("resume_from"):
        # A new run that continues another run's checkpoint; once it has its own, Ray hands those.
        loc = Location.parse(payload["resume_from"])
        checkpoint = ray.train.Checkpoint(path=loc.fs_path, filesystem=loc.filesystem())
    if checkpoint is not None:  # FSDP2/DeepSpeed read pickles on resume: only this storage's own runs' folders
        from metaformer_platform.training.ownership import check_native_checkpoint

        check_native_checkpoint(cfg.strategy.name, checkpoint.filesystem, checkpoint.path,
                                ray.train.get_context().get_storage().storage_fs_path, f"resuming from {checkpoint.path}",
                                accept_unsigned=cfg.run.accept_unsigned_checkpoints)
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
        if cfg.scaling.elastic or trainer.resized:
            from metaformer_platform.training.elastic import record_world_size

            record_world_size(run_tracker, trainer.step, dist.world_size, trainer.resizes,
                              changed=checkpoint is None or trainer.resized)
        progress.start(trainer)
        if adopted:
            # Registered without copying: Ray then hands it on the next restart and prunes it in turn.
            ray.train.report(
                {"step": float(trainer.step)},
                checkpoint=checkpoint if dist.is_main else None,
                checkpoint_dir_name=Path(checkpoint.path).name,
                checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD,
            )
        trainer.train()
        progress.finish(trainer.step)
    finally:
        tracker.close()


def _eval_worker(payload: dict[str, Any]) -> dict[str, Any]:
    """Runs in every Ray Train worker: scores its share of the validation split and returns the sums over all
    ranks (Ray hands rank 0's return value to the driver as ``Result.return_value``)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = JobConfig.model_validate(payload["config"])
    dist = _dist_context()
    weights = Path(_with_local_init_from(cfg, payload).model.init_from)  # type: ignore[arg-type]
    data_root = resolve_data_root(cfg)
    return evaluate_worker(cfg, dist, data_root, weights).to_dict()


def load_weights_model(cfg: JobConfig, source: str | Path) -> nn.Module:
    """The configured model with the weights in ``source`` (export or any strategy's checkpoint), loaded
    strictly: an evaluation never runs with a freshly initialised layer."""
    from metaformer_platform.evaluation.report import split_and_classes
    from metaformer_platform.training.export import read_weights
    from metaformer_platform.training.trainer import build_model

    weights, name = read_weights(source)
    if name != cfg.model.name:
        raise ValueError(f"{str(source)!r} holds {name}, not {cfg.model.name}")
    model = build_model(cfg, split_and_classes(cfg)[1])
    model.load_state_dict(weights, strict=True)
    return model


def evaluate_worker(cfg: JobConfig, dist: DistContext, data_root: str | Path, weights: str | Path) -> MetricSums:
    """On one rank: load the weights, read this rank's share of ``cfg.data.val_split``, return the reduced sums."""
    import torch

    from metaformer_platform.evaluation.metrics import evaluate_loader
    from metaformer_platform.evaluation.report import split_and_classes
    from metaformer_platform.training import hardware
    from metaformer_platform.training.trainer import build_split_loader

    cfg, settings = hardware.resolve_for_worker(cfg, dist.device, world_size=dist.world_size, total_steps=0)
    split, num_classes = split_and_classes(cfg)
    torch.set_num_threads(settings.torch_threads)
    memory_format = torch.channels_last if settings.channels_last else torch.contiguous_format
    model = load_weights_model(cfg, weights).to(dist.device).to(memory_format=memory_format)
    loader = build_split_loader(cfg, data_root, dist, split, training=False, channels_last=settings.channels_last)

    def autocast() -> AbstractContextManager[Any]:
        if settings.precision == "bf16":
            return torch.autocast(device_type=dist.device.type, dtype=torch.bfloat16)
        return nullcontext()

    sums = evaluate_loader(
        model, loader, num_classes=num_classes, device=dist.device, memory_format=memory_format,
        autocast=autocast,
    )
    sums.settings = {"precision": settings.precision, "channels_last": settings.channels_last}
    return sums
