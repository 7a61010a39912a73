"""Run a job on Ray Train: plan it on the driver (``plan.build_plan``: every check, every ``auto``), then
``TorchTrainer.fit()`` around the worker.

Order matters: every check that can fail on bad input (config, data, storage, cluster size) runs before the
run name is claimed and the MLflow run is opened, and before any worker starts, so a bad job costs no cluster
time and leaves no RUNNING run or half-written checkpoint behind. The input checks run before Ray is joined;
only the layout and the cluster's room need it.

- ``plan.py``: the job plan (``checks.py``: the checks it runs);
- ``workers.py``: what runs in the Ray Train workers (training, evaluation), given the plan;
- here: the launch-time actions (join Ray, claim the run name, open the MLflow run), the job assembly, once for
  every kind of job (``build_trainer``), and the jobs (``run_job``, ``run_evaluate``).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from metaformer_platform.config import JobConfig
from metaformer_platform.launch.checks import check_cluster, connect_ray
from metaformer_platform.launch.plan import JobPlan, build_plan
from metaformer_platform.launch.stop import STOPS, JobStop, JobStopped, make_flag
from metaformer_platform.launch.workers import Launch, _eval_worker, _train_worker
from metaformer_platform.storage import Location
from metaformer_platform.storage.redact import redact

if TYPE_CHECKING:
    from ray.train.v2.api.result import Result
    from ray.train.v2.torch.torch_trainer import TorchTrainer

    from metaformer_platform.tracking.runs import RunHandle
    from metaformer_platform.training.ledger import RunLedger
    from metaformer_platform.training.ownership import RunLease

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


# -- launch-time actions ---------------------------------------------------------------------------


def _connect_and_open_run(plan: JobPlan) -> tuple[RunLease, RunHandle | None]:
    """Join Ray, check the worker group fits, claim the run name (the lease), then open the job's MLflow run
    (None when tracking is off): the last driver steps before workers start, so a refused job writes nothing
    and leaves no run behind. The lease holds ``run.name`` for this job: a second job under a live run name is
    refused here, so it can neither touch the first's checkpoints nor reopen its MLflow run (the read-only
    ``check_run_free`` of the plan refuses it earlier still, before Ray is joined). On failure it is released."""
    from metaformer_platform.training.ownership import claim_run

    STOPS.check(plan.run_name)  # a signal while planning: nothing joined or claimed yet
    connect_ray(plan.cfg)
    STOPS.reclaim()  # joining Ray installed Ray's SIGTERM handler, which aborts the driver
    check_cluster(plan.cfg, plan.layout)
    STOPS.check(plan.run_name)
    lease = claim_run(plan.storage_path, plan.run_name)
    try:
        if not plan.cfg.tracking.enabled:
            return lease, None
        from metaformer_platform.tracking.runs import RunHandle

        handle = RunHandle(plan.cfg)
        handle.log_data(plan.cfg, plan.data.root)
        from metaformer_platform.launch.estimate import start_logging_estimate

        start_logging_estimate(handle.client, handle.run_id, plan)
        return lease, handle
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
    plan: JobPlan,
    worker: Callable[[], object],
    *,
    callbacks: list[Any] | None = None,
    stop: JobStop | None = None,
) -> TorchTrainer:
    """The ``TorchTrainer`` of a job (pretrain, fine-tune and evaluate alike): its scaling, its run folder on
    ``plan.storage_path`` (for s3://, a filesystem built from the one S3 settings resolver: Ray's own URI
    resolution ignores AWS_ENDPOINT_URL), the failure and checkpoint policies, and the workers' environment.
    ``worker`` takes no argument: it carries the plan (typed; Ray pickles it to every worker). ``stop``: where
    the job's Ray Train controller is noted for a graceful stop (see ``stop.py``)."""
    # After the checks: bad input is refused without paying for Ray's import. Train v2's classes from their own
    # modules: `ray.train.RunConfig` etc. pick v1 or v2 at run time (RAY_TRAIN_V2_ENABLED, on by default), which
    # a type checker cannot follow, and these jobs need v2's (worker_runtime_env, logging_config, return_value).
    from ray.train.v2.api.config import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

    from metaformer_platform.launch.ray_logs import train_logging_config
    from metaformer_platform.storage import aws_env

    cfg, layout, storage = plan.cfg, plan.layout, Location.parse(plan.storage_path)
    # Workers of a cluster started before this job do not inherit the S3 endpoint and credentials the driver
    # just checked the data and storage with.
    env = aws_env() if (storage.remote or plan.remote_inputs) else {}
    return _trainer_class(stop)(
        worker,
        scaling_config=ScalingConfig(
            num_workers=layout.num_workers, use_gpu=layout.use_gpu,
            resources_per_worker={"CPU": layout.cpus_per_worker, **cfg.scaling.resources_per_worker},
            # a range (min, max) makes Ray's elastic policy resize the group; ignored for a fixed count
            elastic_resize_monitor_interval_s=cfg.scaling.elastic_resize_interval_s,
        ),
        run_config=RunConfig(
            name=plan.run_name,
            storage_path=storage.fs_path,
            storage_filesystem=storage.filesystem() if storage.remote else None,
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.num_to_keep),
            worker_runtime_env={"env_vars": env} if env else None,
            logging_config=train_logging_config(cfg.run.verbose),
            callbacks=callbacks,
        ),
    )


def _trainer_class(stop: JobStop | None = None) -> type[TorchTrainer]:
    """The TorchTrainer class the jobs run (see its docstring)."""
    from ray.train.v2.torch.torch_trainer import TorchTrainer

    class Trainer(TorchTrainer):
        """Ray's TorchTrainer without the helper actors that can do nothing for these jobs:

        - its Ray Data plumbing: these jobs stream their own shards and pass Ray no Dataset, yet Train 2.60 starts
          a DatasetManager actor for every run regardless (one more process on the head node, importing Ray Data,
          on every job's start; 1.8 s of a short job's 18 s on 2 CPUs, measured);
        - its placement-group cleaner, on a cluster that serves no State API (no dashboard: the local cluster,
          ``ray start --include-dashboard=false``). The cleaner asks that API every second whether the controller
          lives and, when the call fails, only warns and asks again: there it can never clean anything up, and
          its process costs every job's start ~1.4 s of CPU (measured on 2 cores);
        - its SIGINT handler, which aborts the run without a checkpoint: ``stop.STOPS`` handles SIGINT and
          SIGTERM alike, and is given the controller here (Ray calls this only when fit() runs in the main
          thread), to abort a job that has nothing to save."""

        def _register_sigint_handler(self, controller: Any) -> None:
            if stop is not None:
                stop.controller = controller
                if STOPS.reason is not None and stop.flag is None:  # asked to stop before the controller was up
                    stop.request(STOPS.reason)

        def _create_default_callbacks(self) -> list[Any]:
            from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
            from ray.train.v2._internal.callbacks.placement_group_callback import (
                PlacementGroupCleanerCallback,
            )

            inert: list[type] = [] if self.datasets else [DatasetsCallback]
            if not state_api_served():
                inert.append(PlacementGroupCleanerCallback)
            return [c for c in super()._create_default_callbacks() if not isinstance(c, tuple(inert))]

    return Trainer


def _on(storage: Location, fs_path: str) -> str:
    """A path on ``storage``'s filesystem (what Ray reports) as a location users write (s3://bucket/key)."""
    return Location.parse(f"s3://{fs_path}").uri if storage.remote else fs_path


def _fit(trainer: TorchTrainer, lease: RunLease, handle: RunHandle | None, report: Callable[[Result], None],
         stop: JobStop, around: AbstractContextManager[object] | None = None,
         record: Callable[[], None] | None = None) -> None:
    """Fit (inside ``around``: the console's progress printer), raise a failed job's error, raise ``JobStopped``
    when a signal stopped it (``stop.py``), or hand the result to ``report``; then ``record`` (the run ledger),
    close the MLflow run with the outcome and release the run name."""
    succeeded, stopped = False, None
    stop.on_force += [lambda tag: handle.close(False, stopped=tag)] if handle is not None else []
    stop.on_force.append(lambda tag: lease.release())
    try:
        with STOPS.handling(), STOPS.job(stop), around or nullcontext():
            try:
                STOPS.check(stop.run_name)  # a signal since the run was opened: no worker is started
                result: Result | None = cast("Result", trainer.fit())  # Train v2's Result: see build_trainer
            except Exception:
                if STOPS.reason is None:
                    raise
                result = None  # a job with nothing to save, aborted by Ray Train's own abort
            if result is not None and result.error is not None:
                raise result.error
        if result is None or _stopped_early(result):
            stopped = STOPS.reason or "sigterm"
            raise _job_stopped(stopped, trainer, result, handle)
        report(result)
        succeeded = True
    finally:
        if record is not None:
            record()
        if handle is not None:
            handle.close(succeeded, stopped=stopped)
        lease.release()


def _stopped_early(result: Result) -> bool:
    """Whether the training workers returned on a stop request (``workers._train_worker``'s return value)."""
    value = result.return_value
    return isinstance(value, dict) and bool(value.get("stopped"))


def _job_stopped(reason: str, trainer: TorchTrainer, result: Result | None, handle: RunHandle | None) -> JobStopped:
    """Where a stopped job stopped: the step and checkpoint its workers reached (None for an evaluation)."""
    run = trainer.run_config
    step = checkpoint = None
    if result is not None:
        step = int(cast("dict[str, Any]", result.return_value)["step"])
        if result.checkpoint is not None:  # a filesystem of its own: on S3 (build_trainer)
            remote = run.storage_filesystem is not None
            checkpoint = _on(Location.parse(f"s3://{run.storage_path}" if remote else str(run.storage_path)),
                             result.checkpoint.path)
    return JobStopped(reason, str(run.name), step, checkpoint, handle.ui_hint() if handle else None)


# -- the jobs --------------------------------------------------------------------------------------


def run_job(cfg: JobConfig) -> JobResult:
    """Plan, open the MLflow run, fit on Ray Train, and close the run with the job's outcome.

    ``stage="evaluate"`` scores the weights in ``model.init_from`` instead (see ``run_evaluate``)."""
    started = time.time()  # the run ledger's wall time starts with the driver: planning is the job's time too
    plan = build_plan(cfg)
    if plan.cfg.stage == "evaluate":
        return run_evaluate(plan)
    lease, handle = _connect_and_open_run(plan)
    from metaformer_platform.tracking.console import Console, ProgressPrinter, failure_notice, ledger_events

    ledger = _open_ledger(plan, started)
    # rank 0's progress lines, printed by this process (see console.py)
    count = plan.worker_count
    printer = ProgressPrinter(
        f"run {plan.run_name}: starting {count} Ray Train worker{'' if count == '1' else 's'} ({plan.cfg.strategy.name})",
        console=Console(ledger=ledger),
    )
    stop = JobStop(plan.run_name, plan.cfg.run.stop_grace_s, flag=make_flag())
    launch = Launch(owner=lease.owner, run_id=handle.run_id if handle else None,
                    tracking_uri=redact(handle.tracking_uri) if handle else None, progress_queue=printer.queue,
                    stop_flag=stop.flag)
    # Ray pickles the worker with what it carries into a payload its state API can serve: secrets masked there
    trainer = build_trainer(plan, functools.partial(_train_worker, plan.for_workers(), launch),
                            callbacks=[failure_notice(printer.queue), ledger_events(printer.queue)], stop=stop)
    results: list[Result] = []
    _fit(trainer, lease, handle, results.append, stop, around=printer,
         record=functools.partial(_record_ledger, ledger, plan.run_dir, handle))
    storage, result = Location.parse(plan.storage_path), results[0]
    return JobResult(
        metrics={k: v for k, v in (result.metrics or {}).items() if isinstance(v, int | float)},
        checkpoint_path=_on(storage, result.checkpoint.path) if result.checkpoint else None,
        run_dir=plan.run_dir,
        mlflow_run_id=handle.run_id if handle else None,
        mlflow_hint=handle.ui_hint() if handle else None,
    )


def _open_ledger(plan: JobPlan, started: float) -> RunLedger:
    """This attempt's run ledger, after the attempts of earlier drivers of the same run name (its run folder's
    ``ledger.json``), priced at ``cost.*``."""
    from metaformer_platform.storage import files
    from metaformer_platform.training.ledger import ARTIFACT, RunLedger, load_attempts

    where = Location.parse(plan.run_dir).join(ARTIFACT).uri
    earlier = []
    if files.exists(where):
        try:
            earlier = load_attempts(files.read_bytes(where).decode())
        except (ValueError, TypeError, KeyError) as err:  # unreadable: a fresh ledger, the old file kept aside
            log.warning("the run ledger %s is unreadable (%s): this attempt starts a new one", where, err)
            files.write_bytes(f"{where}.unreadable", files.read_bytes(where))
    c = plan.cfg.cost
    return RunLedger(started, earlier, accelerator_hour=c.accelerator_hour, cpu_hour=c.cpu_hour, currency=c.currency)


def _record_ledger(ledger: RunLedger, run_dir: str, handle: RunHandle | None) -> None:
    """The run ledger, ended now: ``ledger.json`` in the run folder (the next attempt appends to it) and, with
    tracking, its figures and the file on the MLflow run. Never hides the job's own outcome: a failure to store
    it is a warning."""
    from metaformer_platform.storage import files
    from metaformer_platform.training.ledger import ARTIFACT

    ledger.finish(stopped=ledger.attempt.stopped)
    text = ledger.to_json()
    try:
        files.write_bytes(Location.parse(run_dir).join(ARTIFACT).uri, text.encode())
        if handle is not None:
            handle.log_ledger(ledger.summary(), text, ledger.currency)
    except Exception as err:  # storage or tracking down at the very end: the job's outcome stands
        log.warning("the run ledger was not stored: %s", redact(str(err)))


def run_evaluate(plan: JobPlan) -> JobResult:
    """Score the planned weights (``model.init_from``: checkpoint, export or ``models:/`` URI) on
    ``data.val_split`` over the Ray Train workers; the report goes to ``<run dir>/eval.json``, its numbers and
    the file to the MLflow run."""
    lease, handle = _connect_and_open_run(plan)
    stop = JobStop(plan.run_name, plan.cfg.run.stop_grace_s)  # nothing to save: Ray Train's abort stops it
    trainer = build_trainer(plan, functools.partial(_eval_worker, plan.for_workers()), stop=stop)
    reports: list[dict[str, Any]] = []
    _fit(trainer, lease, handle, lambda result: reports.append(_report_evaluation(plan, result, handle)), stop)
    report = reports[0]
    return JobResult(
        metrics={k: float(v) for k, v in report.items() if k.startswith("eval/")},
        checkpoint_path=None,
        run_dir=plan.run_dir,
        mlflow_run_id=handle.run_id if handle else None,
        mlflow_hint=handle.ui_hint() if handle else None,
        report=report,
    )


def _report_evaluation(plan: JobPlan, result: Result, handle: RunHandle | None) -> dict[str, Any]:
    """The evaluation's report from the workers' sums, written to the run folder and to the MLflow run."""
    from metaformer_platform.data import load_manifest
    from metaformer_platform.evaluation.metrics import MetricSums
    from metaformer_platform.evaluation.report import build_report, write_report

    assert plan.init_from is not None, "an evaluate plan has weights"
    cfg, weights = plan.cfg, plan.init_from.info
    sums = result.return_value  # rank 0's _eval_worker's
    if not isinstance(sums, dict):
        raise RuntimeError(f"the evaluation workers returned {type(sums).__name__}, not their metric sums")
    report = build_report(
        MetricSums.from_dict(sums), cfg=cfg, weights=weights, weights_uri=str(cfg.model.init_from),
        manifest=load_manifest(plan.data.root), expected_samples=plan.data.samples[str(cfg.data.val_split)],
    )
    report["mlflow_run_id"] = handle.run_id if handle else None
    report_path = write_report(report, plan.run_dir)
    if handle is not None:
        _log_evaluation(handle, report, int(weights.step or 0), str(cfg.model.init_from))
    log.info("evaluation report written to %s", report_path)
    return report


def _log_evaluation(handle: RunHandle, report: dict[str, Any], step: int, weights_uri: str) -> None:
    """The report's ``eval/*`` numbers, its data hash and weights as tags, and the file, in the MLflow run."""
    import tempfile
    import time

    from mlflow.entities import Metric

    from metaformer_platform.evaluation.report import write_report
    from metaformer_platform.tracking.registry import TAG_EVAL_DATA_HASH

    now = int(time.time() * 1000)
    metrics = [Metric(k, float(v), now, step) for k, v in report.items() if k.startswith("eval/")]
    handle.client.log_batch(handle.run_id, metrics=metrics)
    handle.client.set_tag(handle.run_id, TAG_EVAL_DATA_HASH, report["data_hash"])
    handle.client.set_tag(handle.run_id, "metaformer.weights", redact(weights_uri))
    if report["paper_top1"] is not None:
        handle.client.set_tag(handle.run_id, "metaformer.paper_top1", str(report["paper_top1"]))
    with tempfile.TemporaryDirectory() as tmp:
        handle.client.log_artifact(handle.run_id, write_report(report, tmp))
