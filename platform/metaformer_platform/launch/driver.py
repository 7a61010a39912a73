"""Run a job on Ray Train: check everything on the driver, then ``TorchTrainer.fit()`` around the worker.

Order matters: every check that can fail on bad input (config, data, storage, cluster size) runs before
the MLflow run is opened and before any worker starts, so a bad job costs no cluster time and leaves
no RUNNING run or half-written checkpoint behind.

- ``checks.py``: the driver-side checks (data, model, weights, resume point, storage, cluster);
- ``workers.py``: what runs in the Ray Train workers (training, evaluation);
- here: the job assembly, once for every kind of job (``build_trainer``), and the jobs (``run_job``).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from metaformer_platform.config import JobConfig
from metaformer_platform.launch.checks import (  # noqa: F401  (re-exported: jobs, pipelines and tests import them here)
    check_cluster,
    check_data,
    check_init_from,
    check_model,
    check_resume_from,
    registry_uri,
    resolve_data_root,
    resolve_init_from,
    resolve_storage_path,
    with_default_threads,
)
from metaformer_platform.launch.workers import (  # noqa: F401  (re-exported, as above)
    _dist_context,
    _eval_worker,
    _train_worker,
    _with_local_init_from,
    checkpoint_reporter,
)
from metaformer_platform.storage import Location
from metaformer_platform.training.ownership import check_run_free

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


# -- joining the cluster -------------------------------------------------------------------------


def resolve_scaling(cfg: JobConfig) -> JobConfig:
    """``scaling.*: auto`` made concrete: the fastest worker layout for the cluster the job runs on (see
    ``metaformer_platform.training.hardware.resolve_layout``). A local Ray is not started for it: it would take this
    machine's CPUs and GPUs, which are probed directly."""
    s = cfg.scaling
    if "auto" not in (s.num_workers, s.cpus_per_worker, s.use_gpu):
        return cfg
    from metaformer_platform.training import hardware

    if (cfg.run.ray_address or os.environ.get("RAY_ADDRESS")
            or ("ray" in sys.modules and sys.modules["ray"].is_initialized())):
        import ray

        connect_ray(cfg)
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    else:
        import torch

        nodes = [{"CPU": float(hardware.available_cpus()), "GPU": float(torch.cuda.device_count())}]
    layout = hardware.resolve_layout(s, nodes)
    log.info("worker layout: %s worker(s) x %g CPU%s (%s)", layout.num_workers, layout.cpus_per_worker,
             " + 1 GPU" if layout.use_gpu else "", layout.reason)
    scaling = s.model_copy(update={
        "num_workers": layout.num_workers, "cpus_per_worker": layout.cpus_per_worker, "use_gpu": layout.use_gpu,
    })
    return cfg.model_copy(update={"scaling": scaling})


def connect_ray(cfg: JobConfig) -> None:
    """Join the configured cluster (``run.ray_address`` or RAY_ADDRESS), or start a local one."""
    import ray

    if ray.is_initialized():
        return
    from metaformer_platform.launch.ray_logs import ray_init_options

    address = cfg.run.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **ray_init_options(cfg.run.verbose))
    else:
        # "local" starts a private cluster instead of attaching to whatever `ray start` left in /tmp/ray.
        ray.init(address="local", include_dashboard=False, **ray_init_options(cfg.run.verbose))


def _claim_run(storage_path: str, cfg: JobConfig) -> Any:
    """Hold ``run.name`` for this job (a ``RunLease``): a second job under a live run name is refused here,
    before anything starts, so it can neither touch the first's checkpoints nor reopen its MLflow run (the
    read-only ``check_run_free`` with the input checks refuses it earlier still, before Ray is joined)."""
    from metaformer_platform.training.ownership import claim_run

    return claim_run(storage_path, cfg.run_name)


def _connect_and_open_run(cfg: JobConfig, storage_path: str) -> tuple[Any, Any]:
    """Join Ray, check the worker group fits, claim the run name (the lease), then open the job's MLflow run
    (a ``RunHandle``, or None when tracking is off): the last driver steps before workers start, so a refused
    job writes nothing and leaves no run behind. On failure the lease is released."""
    connect_ray(cfg)
    check_cluster(cfg)
    lease = _claim_run(storage_path, cfg)
    try:
        if not cfg.tracking.enabled:
            return lease, None
        from metaformer_platform.tracking.runs import RunHandle

        return lease, RunHandle(cfg)
    except BaseException:
        lease.release()
        raise


# -- job assembly: one for every kind of job --------------------------------------------------------


def state_api_served() -> bool:
    """Whether the connected Ray cluster's own dashboard serves Ray's State API, asked as Ray Train's
    placement-group cleaner asks it. The cluster's GCS names the dashboard's default address even when none
    started, and another cluster's dashboard on this host may answer there (the suite's local stack beside the
    session cluster, say): an answer counts only if it lists this cluster's nodes."""
    import ray
    from ray.util.state import list_nodes

    try:
        listed = list_nodes(address=ray.get_runtime_context().gcs_address, timeout=5, raise_on_missing_output=False)
    except Exception:  # refused (no dashboard), unauthorized (another's), timed out: not an API to rely on
        return False
    ours = {node["NodeID"] for node in ray.nodes()}
    return bool(listed) and {node.node_id for node in listed} <= ours


def build_trainer(
    cfg: JobConfig,
    worker: Callable[[dict[str, Any]], Any],
    payload: dict[str, Any],
    storage: Location,
    *,
    remote_inputs: bool,
    callbacks: list[Any] | None = None,
) -> Any:
    """The ``TorchTrainer`` of a job (pretrain, fine-tune and evaluate alike): its scaling, its run folder on
    ``storage`` (for s3://, a filesystem built from the one S3 settings resolver: Ray's own URI resolution
    ignores AWS_ENDPOINT_URL), the failure and checkpoint policies, and the workers' environment."""
    # After the checks: bad input is refused without paying for Ray's import. Train v2's classes from their own
    # modules: `ray.train.RunConfig` etc. pick v1 or v2 at run time (RAY_TRAIN_V2_ENABLED, on by default), which
    # a type checker cannot follow, and these jobs need v2's (worker_runtime_env, logging_config, return_value).
    from ray.train.v2.api.config import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.v2.torch.torch_trainer import TorchTrainer

    from metaformer_platform.launch.ray_logs import train_logging_config
    from metaformer_platform.storage import aws_env
    from metaformer_platform.training.hardware import Layout

    class Trainer(TorchTrainer):
        """Ray's TorchTrainer without the helper actors that can do nothing for these jobs:

        - its Ray Data plumbing: these jobs stream their own shards and pass Ray no Dataset, yet Train 2.60 starts
          a DatasetManager actor for every run regardless (one more process on the head node, importing Ray Data,
          on every job's start; 1.8 s of a short job's 18 s on 2 CPUs, measured);
        - its placement-group cleaner, on a cluster that serves no State API (no dashboard: the local cluster,
          ``ray start --include-dashboard=false``). The cleaner asks that API every second whether the controller
          lives and, when the call fails, only warns and asks again: there it can never clean anything up, and
          its process costs every job's start ~1.4 s of CPU (measured on 2 cores)."""

        def _create_default_callbacks(self) -> list[Any]:
            from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
            from ray.train.v2._internal.callbacks.placement_group_callback import (
                PlacementGroupCleanerCallback,
            )

            inert: list[type] = [] if self.datasets else [DatasetsCallback]
            if not state_api_served():
                inert.append(PlacementGroupCleanerCallback)
            return [c for c in super()._create_default_callbacks() if not isinstance(c, tuple(inert))]

    s = cfg.scaling
    layout = Layout.of(s)  # resolve_scaling ran in the job's checks
    # Workers of a cluster started before this job do not inherit the S3 endpoint and credentials the driver
    # just checked the data and storage with.
    env = aws_env() if (storage.remote or remote_inputs) else {}
    return Trainer(
        worker,
        train_loop_config=payload,
        scaling_config=ScalingConfig(
            num_workers=layout.num_workers, use_gpu=layout.use_gpu,
            resources_per_worker={"CPU": layout.cpus_per_worker, **s.resources_per_worker},
            # a range (min, max) makes Ray's elastic policy resize the group; ignored for a fixed count
            elastic_resize_monitor_interval_s=s.elastic_resize_interval_s,
        ),
        run_config=RunConfig(
            name=cfg.run_name,
            storage_path=storage.fs_path,
            storage_filesystem=storage.filesystem() if storage.remote else None,
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.num_to_keep),
            worker_runtime_env={"env_vars": env} if env else None,
            logging_config=train_logging_config(cfg.run.verbose),
            callbacks=callbacks,
        ),
    )


def _worker_count(cfg: JobConfig) -> str:
    """``scaling.num_workers`` as a person reads it: ``2``, or ``1-2 (elastic)``."""
    s = cfg.scaling
    return f"{s.min_workers}-{s.max_workers} (elastic)" if s.elastic else str(s.num_workers)


def _on(storage: Location, fs_path: str) -> str:
    """A path on ``storage``'s filesystem (what Ray reports) as a location users write (s3://bucket/key)."""
    return Location.parse(f"s3://{fs_path}").uri if storage.remote else fs_path


def _any_remote(*sources: str | None) -> bool:
    """Whether any of the job's inputs is on object storage (a models:/ URI is not a location: MLflow serves it)."""
    return any(s and not s.startswith("models:/") and Location.parse(s).remote for s in sources)


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
    check_run_free(storage_path, cfg.run_name)
    # The layout needs the cluster, so it is chosen only once every check of the input has passed.
    cfg = resolve_scaling(cfg)
    check_data(cfg, data_root)
    cfg = with_default_threads(cfg)
    lease, handle = _connect_and_open_run(cfg, storage_path)
    if handle is not None:
        handle.log_data(cfg, data_root)
    payload = {
        "config": cfg.model_dump(mode="json"),
        "owner": lease.owner,
        "run_id": handle.run_id if handle else None,
        "tracking_uri": handle.tracking_uri if handle else None,
        "resume_from": str(resume_from) if resume_from else None,
        "registry_uri": registry_uri(cfg),
        "init_from_local": str(init_from_local) if init_from_local else None,
    }
    storage = Location.parse(storage_path)
    remote_inputs = _any_remote(str(data_root), cfg.run.resume_from, cfg.model.init_from)
    from metaformer_platform.tracking.console import ProgressPrinter, failure_notice

    # rank 0's progress lines, printed by this process (see console.py)
    count = _worker_count(cfg)
    printer = ProgressPrinter(
        f"run {cfg.run_name}: starting {count} Ray Train worker{'' if count == '1' else 's'} ({cfg.strategy.name})"
    )
    payload["progress_queue"] = printer.queue
    payload["run_dir"] = storage.join(str(cfg.run_name)).uri
    trainer = build_trainer(
        cfg, _train_worker, payload, storage, remote_inputs=remote_inputs, callbacks=[failure_notice(printer.queue)]
    )
    succeeded = False
    try:
        with printer:
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
        checkpoint_path=_on(storage, result.checkpoint.path) if result.checkpoint else None,
        run_dir=storage.join(str(cfg.run_name)).uri,
        mlflow_run_id=handle.run_id if handle else None,
        mlflow_hint=handle.ui_hint() if handle else None,
    )


# -- the evaluate job ------------------------------------------------------------------------------


def run_evaluate(cfg: JobConfig) -> JobResult:
    """Score ``model.init_from`` (checkpoint, export or ``models:/`` URI) on ``data.val_split`` over the Ray
    Train workers; the report goes to ``<run dir>/eval.json``, its numbers and the file to the MLflow run."""
    import tempfile
    import time

    from metaformer_platform.evaluation.metrics import MetricSums
    from metaformer_platform.evaluation.report import (
        NO_WEIGHTS,
        build_report,
        check_eval_batches,
        prepare_evaluation,
        split_and_classes,
        write_report,
    )

    weights_folder = resolve_init_from(cfg)
    if weights_folder is None:
        raise ValueError(NO_WEIGHTS)
    data_root = resolve_data_root(cfg)
    cfg, weights, manifest = prepare_evaluation(cfg, weights_folder, data_root)
    check_model(cfg, cfg.model.num_classes)
    storage_path = resolve_storage_path(cfg.run.storage_path)
    check_run_free(storage_path, cfg.run_name)
    cfg = resolve_scaling(cfg)
    check_eval_batches(cfg, manifest)  # again, with the number of workers the layout chose
    cfg = with_default_threads(cfg)
    lease, handle = _connect_and_open_run(cfg, storage_path)
    if handle is not None:
        handle.log_data(cfg, data_root)
    payload = {
        "config": cfg.model_dump(mode="json"),
        "init_from_local": str(weights.path),
        "registry_uri": registry_uri(cfg),
    }
    storage = Location.parse(storage_path)
    trainer = build_trainer(cfg, _eval_worker, payload, storage, remote_inputs=_any_remote(str(data_root)))
    run_dir = storage.join(str(cfg.run_name)).uri
    succeeded = False
    try:
        result = trainer.fit()
        if result.error is not None:
            raise result.error
        sums = MetricSums.from_dict(result.return_value)
        report = build_report(
            sums, cfg=cfg, weights=weights, weights_uri=str(cfg.model.init_from), manifest=manifest,
            expected_samples=manifest.split(split_and_classes(cfg)[0]).num_samples,
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
