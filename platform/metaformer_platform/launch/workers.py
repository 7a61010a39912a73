"""What runs inside the Ray Train workers: the training worker and the evaluation worker, and their glue
(this rank's place in the group, the checkpoint reporter, recovery of checkpoints Ray never registered).

Each worker is given the job plan (``plan.JobPlan``, resolved on the driver) and, for training, the launch's
own facts (``Launch``: the run's lease, MLflow run and progress channel); it resolves only what depends on
where it runs (its rank and device, and from the device its ``WorkerSettings``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from metaformer_platform.config import JobConfig
from metaformer_platform.launch.checks import split_and_classes
from metaformer_platform.launch.plan import JobPlan
from metaformer_platform.storage import Location
from metaformer_platform.storage.checkpoint_format import checkpoint_name

if TYPE_CHECKING:
    import ray.train
    from torch import nn

    from metaformer_platform.evaluation.metrics import MetricSums
    from metaformer_platform.storage.checkpoint_format import Stamp
    from metaformer_platform.strategies.base import DistContext
    from metaformer_platform.tracking.console import EventQueue
    from metaformer_platform.training.trainer import RunTracker, Trainer

log = logging.getLogger("metaformer_platform.launch.driver")


@dataclass(frozen=True)
class Launch:
    """What the driver did at launch time, after planning: the run name's lease (its owner stamp), the MLflow
    run (None when tracking is off) and the channel to the driver's console."""

    owner: Stamp
    run_id: str | None
    tracking_uri: str | None  # redacted: it travels in Ray's payload (see tracking.runs.worker_tracking_uri)
    progress_queue: EventQueue | None  # a Ray queue actor handle
    stop_flag: object = None  # the driver's stop.StopFlag actor: raised on SIGTERM/SIGINT


def checkpoint_reporter(
    upload_mode: Literal["sync", "async"], dist: DistContext, flush: Callable[[], None] | None = None,
    owner: Stamp | None = None, on_failure: Literal["fail", "continue"] = "fail",
) -> Callable[[dict[str, float], Path | None], bool]:
    """The Trainer's ``report`` inside a Ray Train worker: ``ray.train.report`` with this rank's checkpoint
    part, uploaded (``upload_mode``: ``run.checkpoint_upload``) so that COMPLETE lands last.
    ``flush`` runs before a checkpoint is reported: the metrics up to it are stored before anything can
    resume from it. ``owner`` (the run's lease) stamps each folder, so recovery knows what its run wrote.
    ``on_failure="continue"`` (``run.on_upload_failure``): see ``report_unless_upload_fails``."""
    import ray.train

    def upload(checkpoint: ray.train.Checkpoint, dir_name: str) -> ray.train.Checkpoint:
        from metaformer_platform.storage.upload import upload_checkpoint_part

        storage = ray.train.get_context().get_storage()
        dest = storage.build_checkpoint_path_from_name(dir_name)
        upload_checkpoint_part(Path(checkpoint.path), storage.storage_filesystem, dest,
                               rank=dist.rank, world_size=dist.world_size)
        return ray.train.Checkpoint(path=dest, filesystem=storage.storage_filesystem)

    def report(metrics: dict[str, float], checkpoint_dir: Path | None) -> bool:
        name = checkpoint_name(int(metrics["step"]))
        if checkpoint_dir is None:
            ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)
            return False
        from metaformer_platform.training.checkpoint import checkpoint_dir_name

        storage = ray.train.get_context().get_storage()  # a quarantined folder's name is not reused (see there)
        name = checkpoint_dir_name(storage.storage_filesystem, storage.experiment_fs_path, int(metrics["step"]))
        if flush is not None:
            flush()
        if owner is not None:
            from metaformer_platform.storage.checkpoint_format import stamp

            stamp(checkpoint_dir, owner, dist.rank)
        if on_failure == "continue":
            if not report_unless_upload_fails(metrics, checkpoint_dir, name, dist):
                from metaformer_platform.training.checkpoint import CheckpointNotStored

                raise CheckpointNotStored(name)  # the Trainer trains on, and says so
            return False  # uploaded: the Trainer deletes its scratch copy
        async_upload = upload_mode == "async"
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


def report_unless_upload_fails(metrics: dict[str, float], checkpoint_dir: Path, name: str, dist: DistContext) -> bool:
    """``run.on_upload_failure=continue``: upload this rank's part here, in the training loop, then report.

    Ray's own upload cannot give up on a checkpoint: what its upload function returns is registered, and Ray
    prunes older checkpoints by it, and writes its snapshot to the storage that is down. So the ranks agree
    (a collective) whether every part landed; only then does rank 0 write COMPLETE and report the folder
    (``NO_UPLOAD``). Otherwise each rank has warned, naming the endpoint, and the round is reported without a
    checkpoint: Ray keeps the last good one, and the job's resume point stays there. Returns whether this rank
    saw it stored (rank 0 decides: its marker is the last write)."""
    import ray.train
    import torch
    import torch.distributed as tdist

    from metaformer_platform.storage.upload import upload_checkpoint_part_or_warn

    def every_rank(landed: bool) -> bool:
        if not dist.distributed:
            return landed
        flag = torch.tensor([int(landed)], device=dist.device)
        tdist.all_reduce(flag, op=tdist.ReduceOp.MIN)
        return bool(flag.item())

    storage = ray.train.get_context().get_storage()
    dest = storage.build_checkpoint_path_from_name(name)
    complete = upload_checkpoint_part_or_warn(checkpoint_dir, storage.storage_filesystem, dest, rank=dist.rank,
                                              world_size=dist.world_size, agree=every_rank)
    checkpoint = ray.train.Checkpoint(path=dest, filesystem=storage.storage_filesystem)
    ray.train.report(metrics, checkpoint=checkpoint if complete and dist.is_main else None, checkpoint_dir_name=name,
                     checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD)
    return complete


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


def _recover_checkpoint(dist: DistContext, owner: Stamp | None = None) -> tuple[ray.train.Checkpoint | None, bool]:
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
    A registered folder (Ray's own included) no longer complete (the strict marker's check) is moved there too,
    with a warning naming it, and the newest complete one is resumed from: no restart loop on a bad folder.
    """
    import ray.train
    import torch.distributed as tdist

    from metaformer_platform.training import checkpoint as ckpt

    latest = ray.train.get_checkpoint()
    storage = ray.train.get_context().get_storage()  # the filesystem and run folder Ray itself writes to
    plans: list[ckpt.Recovery | None] = [None]
    if dist.is_main:
        reported = ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
        if owner is not None:
            from metaformer_platform.training.ownership import quarantine_foreign

            moved = quarantine_foreign(storage.storage_filesystem, storage.experiment_fs_path,
                                       [Path(c.checkpoint.path).name for c in reported], owner["run_id"])
            if moved:
                log.warning("moved checkpoint folders this run did not write to _quarantine/: %s", ", ".join(moved))
        recovery = ckpt.recover_run_folder(
            storage.storage_filesystem,
            storage.experiment_fs_path,
            registered=[Path(c.checkpoint.path).name for c in reported],
            latest=Path(latest.path).name if latest else None,
        )
        if recovery.remove:
            log.warning("removed checkpoint folders Ray never registered: %s", ", ".join(recovery.remove))
        for name, why in recovery.quarantine:
            log.warning("checkpoint %s is not complete (%s): moved to _quarantine/, resuming from %s instead",
                        name, why, recovery.resume or "the start")
        plans[0] = recovery
    if dist.distributed:
        tdist.broadcast_object_list(plans, src=0)
    plan = plans[0]
    assert plan is not None, "rank 0 broadcast its plan"
    if plan.resume is None or (latest is not None and Path(latest.path).name == plan.resume):
        return (latest if plan.resume else None), False  # None: Ray's only checkpoints were quarantined
    if plan.adopt and dist.is_main:
        log.warning(
            "resuming from %s, newer than the %s Ray handed over: its report was lost with the worker that made it",
            plan.resume, Path(latest.path).name if latest else "nothing",
        )
    # not Ray's latest: one whose report was lost (adopted), or an older one Ray registered (Ray's was quarantined)
    path = f"{storage.experiment_fs_path}/{plan.resume}"
    return ray.train.Checkpoint(path=path, filesystem=storage.storage_filesystem), plan.adopt


def _train_worker(plan: JobPlan, launch: Launch) -> dict[str, object]:
    """Runs in every Ray Train worker: builds the Trainer from the plan (resuming from the newest complete
    checkpoint) and trains until done or, once the driver raises the stop flag, until the next step boundary's
    checkpoint. Returns the step it reached and whether it stopped early (rank 0's reaches the driver)."""
    from metaformer_platform.launch.stop import watch_stop
    from metaformer_platform.tracking.console import worker_progress
    from metaformer_platform.training.trainer import NullTracker, Trainer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg, dist = plan.cfg, _dist_context()
    log.info("rank %d of %d on node %d (local rank %d), pid %d", dist.rank, dist.world_size, dist.node_rank,
             dist.local_rank, os.getpid())
    run_tracker: RunTracker = NullTracker()  # the MLflow tracker itself (tags), before the progress wrapper
    if dist.is_main and launch.run_id and launch.tracking_uri:
        from metaformer_platform.tracking.runs import open_worker_tracker

        # launch.tracking_uri is redacted: the credentials come from this node (see worker_tracking_uri)
        run_tracker = open_worker_tracker(launch.tracking_uri, launch.run_id, system_metrics=cfg.tracking.system_metrics,
                                          buffer_limit=cfg.tracking.buffer_limit,
                                          outage_wait_s=cfg.tracking.outage_wait_s)
    progress, tracker = worker_progress(launch.progress_queue, plan.run_dir, dist, run_tracker,
                                         forward_warnings=not cfg.run.verbose)
    report = checkpoint_reporter(cfg.run.checkpoint_upload, dist, flush=tracker.flush, owner=launch.owner,
                                 on_failure=cfg.run.on_upload_failure)
    checkpoint, adopted = _checkpoint_to_resume(plan, dist, launch.owner)
    try:
        with checkpoint.as_directory() if checkpoint else nullcontext(None) as resume_dir:
            trainer = Trainer(
                cfg, dist, data_root=plan.data.root, tracker=tracker, report=report,
                resume_from=Path(resume_dir) if resume_dir else None,
                init_from=plan.init_from.on_this_node() if plan.init_from else None,
                draining=_ray_preemption_notice, checkpoint_scratch=checkpoint_scratch(plan.run_name, dist.rank),
            )
        _record_start(trainer, run_tracker, tracker, resumed=checkpoint is not None, elastic=cfg.scaling.elastic)
        progress.start(trainer)
        if adopted and checkpoint is not None:
            import ray.train

            # Registered without copying: Ray then hands it on the next restart and prunes it in turn.
            ray.train.report(
                {"step": float(trainer.step)},
                checkpoint=checkpoint if dist.is_main else None,
                checkpoint_dir_name=Path(checkpoint.path).name,
                checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD,
            )
        watching = watch_stop(launch.stop_flag, trainer) if launch.stop_flag is not None and dist.is_main else None
        try:
            trainer.train()
        finally:
            if watching is not None:
                watching.set()
        progress.finish(trainer.step, stopped=trainer.stopped)
    finally:
        tracker.close()
    return {"step": trainer.step, "stopped": trainer.stopped}


def checkpoint_scratch(run_name: str, rank: int) -> Path:
    """This rank's local folder for its checkpoints before upload, emptied now.

    Ray deletes each one once uploaded, but a worker killed before that (a SIGKILL, a lost node that comes back)
    leaves its copy behind: the suite's fault tests had left 36 whole checkpoints in /tmp. Under this user's and
    this run's name, the next attempt of the same run clears what the killed one left, and nothing else (one live
    job per run name: see training/ownership.py; each rank its own folder)."""
    import shutil
    import tempfile

    base = Path(tempfile.gettempdir()) / f"metaformer-checkpoints-{os.getuid()}"
    base.mkdir(mode=0o700, exist_ok=True)
    if base.is_symlink() or base.stat().st_uid != os.getuid():  # a shared /tmp: another user's folder or link
        raise PermissionError(f"{base} is not this user's own folder; remove it, or set TMPDIR to a private one")
    folder = base / run_name / f"rank-{rank:05d}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def _ray_preemption_notice() -> bool:
    """Ray Train's own preemption signal: a node of this worker group is being drained (spot reclaim, a
    Kubernetes node drain, ``ray drain-node``). A collective across the group's workers."""
    import ray.train

    return ray.train.get_preemption_info() is not None


def _checkpoint_to_resume(plan: JobPlan, dist: DistContext,
                          owner: Stamp) -> tuple[ray.train.Checkpoint | None, bool]:
    """The run's own newest complete checkpoint (and whether Ray has yet to register it), else the plan's
    ``run.resume_from``; checked to be one this strategy may read."""
    import ray.train

    checkpoint, adopted = _recover_checkpoint(dist, owner)
    if checkpoint is None and plan.resume_from:
        # A new run that continues another run's checkpoint; once it has its own, Ray hands those.
        loc = Location.parse(str(plan.resume_from))
        checkpoint = ray.train.Checkpoint(path=loc.fs_path, filesystem=loc.filesystem())
    if checkpoint is not None:  # FSDP2/DeepSpeed read pickles on resume: only this storage's own runs' folders
        from metaformer_platform.training.ownership import check_native_checkpoint

        check_native_checkpoint(plan.cfg.strategy.name, checkpoint.filesystem, checkpoint.path,
                                ray.train.get_context().get_storage().storage_fs_path, f"resuming from {checkpoint.path}",
                                accept_unsigned=plan.cfg.run.accept_unsigned_checkpoints)
    return checkpoint, adopted


def _record_start(trainer: Trainer, run_tracker: RunTracker, tracker: RunTracker, *, resumed: bool,
                  elastic: bool) -> None:
    """Where the run (re)starts, in MLflow: the step it resumed from, and an elastic group's world size."""
    if resumed:
        tracker.log_metrics({"run/resumed_from_step": float(trainer.step)}, step=trainer.step)
    if elastic or trainer.resized:
        from metaformer_platform.training.elastic import record_world_size

        record_world_size(run_tracker, trainer.step, trainer.dist.world_size, trainer.resizes,
                          changed=not resumed or trainer.resized)


def _eval_worker(plan: JobPlan) -> dict[str, object]:
    """Runs in every Ray Train worker: scores its share of the validation split and returns the sums over all
    ranks (Ray hands rank 0's return value to the driver as ``Result.return_value``)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    assert plan.init_from is not None, "an evaluate plan has weights"
    return evaluate_worker(plan.cfg, _dist_context(), plan.data.root, plan.init_from.on_this_node()).to_dict()


def load_weights_model(cfg: JobConfig, source: str | Path) -> nn.Module:
    """The configured model with the weights in ``source`` (export or any strategy's checkpoint), loaded
    strictly: an evaluation never runs with a freshly initialised layer."""
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
    from metaformer_platform.training import hardware
    from metaformer_platform.training.trainer import build_split_loader

    settings = hardware.resolve_settings(cfg.trainer, hardware.probe(dist.device), total_steps=0,
                                         cpus_per_worker=cfg.scaling.cpus_per_worker)
    split, num_classes = split_and_classes(cfg)
    torch.set_num_threads(settings.torch_threads)
    memory_format = torch.channels_last if settings.channels_last else torch.contiguous_format
    model = load_weights_model(cfg, weights).to(dist.device).to(memory_format=memory_format)
    loader = build_split_loader(cfg, data_root, dist, split, training=False, channels_last=settings.channels_last,
                                batch_size=cfg.trainer.batch_size)

    def autocast() -> AbstractContextManager[None]:
        if settings.precision == "bf16":
            return torch.autocast(device_type=dist.device.type, dtype=torch.bfloat16)
        return nullcontext()

    sums = evaluate_loader(
        model, loader, num_classes=num_classes, device=dist.device, memory_format=memory_format,
        autocast=autocast,
    )
    sums.settings = {"precision": settings.precision, "channels_last": settings.channels_last}
    return sums
