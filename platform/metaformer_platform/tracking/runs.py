"""MLflow tracking: the job's driver opens and closes the run, rank 0 logs into it.

The run is created on the driver before any worker starts, so its status is always settled by the driver
(FINISHED, or FAILED when the job fails), and a job restarted with the same ``run.name`` continues the same
MLflow run instead of opening a second one. Workers log metrics asynchronously so the training step never
waits on the tracking server.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from metaformer_platform.config import JobConfig
from metaformer_platform.storage.redact import MASK, redact

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import LoggedModel, Run
    from mlflow.utils.async_logging.run_operations import RunOperations

log = logging.getLogger(__name__)

RUN_NAME_TAG = "metaformer.run_name"
STAGE_TAG = "metaformer.stage"
STOPPED_TAG = "metaformer.stopped"  # a run stopped by SIGTERM/SIGINT (status KILLED): the signal, "-forced" if cut short
ORPHANED_TAG = "metaformer.orphaned"  # a run closed KILLED by whoever met it after its driver was lost: "driver-lost"
ORPHANED_WHY_TAG = "metaformer.orphaned_why"  # how the lease showed the driver gone
ORPHANED_STEP_METRIC = "run/orphaned_at_step"  # the last step it logged before its driver was lost
PARAM_BATCH = 100  # MLflow's limit of params per log_batch call
# MLflow 3's UI opens an experiment on its GenAI "Traces" overview unless it takes the experiment for model
# training. Its bundle (mlflow/server/js) reads the kind from this experiment tag (MLflow's Python package
# has no constant for it); 3.17's UI, whose workspace toggle flag is on, takes it from the GenAI / Model
# training toggle instead (remembered per browser; the URL parameter below sets it), so the platform sets both.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"
UI_TRAINING_VIEW = "?workflowType=machine_learning"
DATASET_DIGEST_CHARS = 36  # MLflow stores a dataset digest in 36 characters; the full hash goes in the profile


def resolve_tracking_uri(configured: str | None) -> str:
    """The URI every process should use: the config's, else MLFLOW_TRACKING_URI, else MLflow's default.

    MLflow's default is ``sqlite:///mlflow.db`` relative to the working directory; Ray workers run
    elsewhere, so the default is pinned to an absolute path on the driver.
    """
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def worker_tracking_uri(sent: str) -> str:
    """The tracking URI a Ray Train worker opens, given the one its driver sent, which is ``redact``ed: Ray pickles
    what it sends to the workers into a payload that its state API and dashboard can serve, so no credential
    travels with a job. They come from the worker's node instead:

    - ``MLFLOW_TRACKING_URI`` of the node's environment, when it is the URI the driver used (it redacts to the
      same text): it carries the password (the only way for a database URI: ``postgresql://user:PW@db/x``);
    - else, for an HTTP(S) server, the URI without the masked parts: MLflow's client then sends the
      ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` (or ``MLFLOW_TRACKING_TOKEN``) of the node's
      environment (none: no credentials, which a server that checks none accepts);
    - a database URI with a masked password and no such variable: a ``ValueError`` that says what to set."""
    if MASK not in sent:
        return sent
    env = os.environ.get("MLFLOW_TRACKING_URI", "")
    if env and redact(env) == sent:
        return env
    if sent.startswith(("http://", "https://")):
        scheme, rest = sent.split("://", 1)
        authority, sep, tail = rest.partition("/")
        host = authority.rsplit("@", 1)[-1]
        path, qsep, query = tail.partition("?")
        kept = "&".join(p for p in query.split("&") if not p.endswith(f"={MASK}"))
        return f"{scheme}://{host}{sep}{path}" + (f"?{kept}" if kept else "")
    raise ValueError(
        f"the tracking URI {sent} has a password, which the driver does not send to Ray's workers: set "
        "MLFLOW_TRACKING_URI to the full URI in the environment of every Ray node (where `ray start` runs, or a "
        "Kubernetes Secret mounted as env) and in the driver's, instead of tracking.tracking_uri"
    )


def open_worker_tracker(sent_uri: str, run_id: str, *, system_metrics: bool) -> MlflowTracker:
    """Rank 0's ``MlflowTracker`` on the URI the driver sent (see ``worker_tracking_uri``); a server that refuses
    the node's credentials (or their absence) fails with what to set, not only MLflow's 401."""
    from mlflow.exceptions import MlflowException

    uri = worker_tracking_uri(sent_uri)
    try:
        return MlflowTracker(uri, run_id, system_metrics=system_metrics)
    except MlflowException as err:
        if uri == sent_uri:
            raise
        raise RuntimeError(redact(
            f"the worker cannot open MLflow run {run_id} at {sent_uri}: {err}. The driver sends no tracking "
            "credentials to Ray's workers: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or "
            "MLFLOW_TRACKING_TOKEN), or MLFLOW_TRACKING_URI with the password, in every Ray node's environment"
        )) from None


def git_commit() -> str:
    """The commit of the code being run (``METAFORMER_GIT_COMMIT`` wins: a Ray working dir has no .git)."""
    if os.environ.get("METAFORMER_GIT_COMMIT"):
        return os.environ["METAFORMER_GIT_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def training_experiment(client: MlflowClient, name: str, *, create: bool = True) -> str | None:
    """The id of experiment ``name``, marked as a model-training experiment (created when missing and
    ``create``; None otherwise). An experiment the platform uses that lacks the mark (made by an older
    version, or by hand) gets it; a kind someone set explicitly is left alone."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: TRAINING_KIND}) if create else None
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)
    return experiment.experiment_id


def entry_point() -> str:
    """The script this process runs (``mlflow.source.name``): relative to the repository when it is one of
    its entry points (``jobs/pretrain.py``), else as given."""
    script = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path("python")
    repo = Path(__file__).resolve().parents[3]
    try:
        return script.resolve().relative_to(repo).as_posix()
    except ValueError:
        return str(script)


def source_tags() -> dict[str, str]:
    """The tags MLflow's UI shows in a run's Source column (its own fluent API sets them; the client does not)."""
    return {"mlflow.source.name": entry_point(), "mlflow.source.type": "LOCAL", "mlflow.source.git.commit": git_commit()}


def _family(model_name: str) -> str:
    return model_name.rsplit("_", 1)[0] if "_" in model_name else model_name


class RunHandle:
    """A tracked run as seen by the driver: create or resume, then close with the job's outcome."""

    def __init__(self, cfg: JobConfig) -> None:
        import mlflow

        self.cfg = cfg
        self.tracking_uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
        self.client = mlflow.MlflowClient(self.tracking_uri)
        self.experiment_id = str(training_experiment(self.client, cfg.tracking.experiment))
        previous = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{RUN_NAME_TAG}` = '{cfg.run_name}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        self.resumed = bool(previous)
        if previous:
            self.run_id = previous[0].info.run_id
            set_before = set(previous[0].data.tags)
            if previous[0].info.status == "RUNNING":  # this job holds the run name now: its last driver is gone
                close_orphan(self.client, previous[0], "its run name was taken over by a new job")
                set_before |= {ORPHANED_TAG, ORPHANED_WHY_TAG}
            self.client.update_run(self.run_id, status="RUNNING")
            for tag in (STOPPED_TAG, ORPHANED_TAG, ORPHANED_WHY_TAG):  # stopped or orphaned before, running again
                if tag in set_before:
                    self.client.delete_tag(self.run_id, tag)
            # The configured tags hold for the run as it continues now (a pipeline's parent run, say).
            for key, value in cfg.tracking.tags.items():
                self.client.set_tag(self.run_id, key, redact(value))
            log.info("continuing MLflow run %s (%s)", self.run_id, cfg.run_name)
        else:
            tags = {
                RUN_NAME_TAG: cfg.run_name,
                STAGE_TAG: cfg.stage,
                "model": cfg.model.name,
                "family": _family(cfg.model.name),
                "strategy": cfg.strategy.name,
                **source_tags(),
                **{key: redact(value) for key, value in cfg.tracking.tags.items()},
            }
            run = self.client.create_run(
                self.experiment_id, run_name=cfg.tracking.run_name or cfg.run_name, tags=tags
            )
            self.run_id = run.info.run_id
            self._log_config()

    def _log_config(self) -> None:
        from mlflow.entities import Param

        params = [Param(k, _param_value(v)) for k, v in sorted(self.cfg.flat().items())]
        for i in range(0, len(params), PARAM_BATCH):
            self.client.log_batch(self.run_id, params=params[i : i + PARAM_BATCH])
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "config.yaml"
            path.write_text(self.cfg.to_yaml())
            self.client.log_artifact(self.run_id, str(path))

    def log_data(self, cfg: JobConfig, data_root: str | Path) -> None:
        """The data the job reads, as MLflow dataset inputs (the runs table's Dataset column and lineage):
        one per split with context ``train`` / ``validation``, its digest the manifest's sha256 (the data
        set's identity, as the pipeline's ``metaformer.data_manifest_hash``), its source ``data.source``."""
        import hashlib
        import json

        from mlflow.entities import Dataset, DatasetInput, InputTag

        from metaformer_platform.data import load_manifest

        manifest = load_manifest(data_root)
        digest = hashlib.sha256(manifest.storage.read_bytes(manifest.info_name)).hexdigest()
        uri = str(data_root) if cfg.data.source == "synthetic" else cfg.data.source
        splits = [] if cfg.stage == "evaluate" else [(cfg.data.train_split, "train")]
        if cfg.data.val_split:
            splits.append((cfg.data.val_split, "validation"))
        inputs = []
        for split, context in splits:
            info = manifest.split(split)
            profile = {"manifest_sha256": digest, "split": split, "samples": info.num_samples,
                       "shards": info.num_shards, "classes": manifest.num_classes}
            dataset = Dataset(
                name=f"{manifest.name}/{split}", digest=digest[:DATASET_DIGEST_CHARS],
                source_type="s3" if uri.startswith("s3://") else "local",
                source=json.dumps({"uri": uri, "split": split}), profile=json.dumps(profile),
            )
            inputs.append(DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)]))
        self.client.log_inputs(self.run_id, datasets=inputs)

    def log_params(self, params: Mapping[str, object]) -> None:
        """Extra derived params (e.g. total steps, resolved lr), logged once."""
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        new = [Param(k, _param_value(v)) for k, v in params.items() if k not in existing]
        if new:
            self.client.log_batch(self.run_id, params=new)

    def close(self, succeeded: bool, stopped: str | None = None) -> None:
        """FINISHED or FAILED; KILLED with the tag ``metaformer.stopped`` = ``stopped`` (the signal) when the job
        was stopped from outside (``launch/stop.py``): MLflow has no status of its own for a stopped run."""
        if stopped is not None:
            self.client.set_tag(self.run_id, STOPPED_TAG, stopped)
        status = "KILLED" if stopped is not None else "FINISHED" if succeeded else "FAILED"
        self.client.set_terminated(self.run_id, status=status)

    def ui_hint(self) -> str:
        uri = redact(self.tracking_uri)  # printed: a database password in the URI must not be
        if uri.startswith(("http://", "https://")):
            where = f"open {uri}/#/experiments/{self.experiment_id}/runs/{self.run_id}{UI_TRAINING_VIEW}"
        else:
            mlflow_cli = Path(sys.executable).parent / "mlflow"
            where = (f"run `{mlflow_cli} ui --backend-store-uri {uri}` and open "
                     f"http://127.0.0.1:5000/#/experiments/{self.experiment_id}{UI_TRAINING_VIEW}")
        return f"MLflow run {self.run_id} (experiment {self.cfg.tracking.experiment!r}): {where}"


def close_orphan(client: MlflowClient, run: Run, why: str, last_seen: float | None = None) -> int | None:
    """Close ``run``, left RUNNING by a driver that is gone (its lease shows it: ``ownership.lost_driver``), as
    KILLED with ``metaformer.orphaned=driver-lost``, ``why`` and the last step it logged (the metric
    ``run/orphaned_at_step``, at that step), ended when its driver was last seen. Returns that step."""
    steps = [max((m.step for m in client.get_metric_history(run.info.run_id, key)), default=-1)
             for key in run.data.metrics if not key.startswith("system/") and key != ORPHANED_STEP_METRIC]
    step = max(steps, default=-1)
    client.set_tag(run.info.run_id, ORPHANED_TAG, "driver-lost")
    client.set_tag(run.info.run_id, ORPHANED_WHY_TAG, why)
    if step >= 0:
        client.log_metric(run.info.run_id, ORPHANED_STEP_METRIC, float(step), step=step)
    client.set_terminated(run.info.run_id, status="KILLED",
                          end_time=int(last_seen * 1000) if last_seen is not None else None)
    log.warning("MLflow run %s (%s) was left RUNNING by a driver that is gone (%s): closed KILLED at step %s",
                run.info.run_id, run.data.tags.get(RUN_NAME_TAG, run.info.run_name), why, step if step >= 0 else "none")
    return step if step >= 0 else None


def _param_value(value: object) -> str:
    text = redact(str(value))
    return text if len(text) <= 6000 else text[:5997] + "..."


class MlflowTracker:
    """Rank 0's logger: metrics go to an existing run, asynchronously; system metrics when asked.

    A restarted job resumes from its last checkpoint and replays the steps after it, which the attempt
    before the restart may already have logged: each metric keeps the steps it had (``logged_up_to``), so
    no step appears twice. (A resumed job computes the same values: resumes are exact.)
    """

    def __init__(self, tracking_uri: str, run_id: str, *, system_metrics: bool = True) -> None:
        import mlflow

        mlflow.set_tracking_uri(tracking_uri)
        self._mlflow = mlflow
        self.run_id = run_id
        client = mlflow.MlflowClient(tracking_uri)
        self.logged_up_to: dict[str, int] = {
            key: max(m.step for m in client.get_metric_history(run_id, key))
            for key in client.get_run(run_id).data.metrics
            if not key.startswith("system/")  # the system metrics monitor keeps its own step
        }
        self._pending: list[RunOperations] = []  # the RunOperations of the metrics not yet known to be stored
        self._monitor = None
        if system_metrics:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(run_id, sampling_interval=10, resume_logging=True)
            self._monitor.start()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        new = {k: float(v) for k, v in metrics.items() if step > self.logged_up_to.get(k, -1)}
        if new:
            operations = self._mlflow.log_metrics(new, step=step, run_id=self.run_id, synchronous=False)
            if operations is not None:  # always, when asynchronous
                self._pending.append(operations)

    def log_params(self, params: Mapping[str, object]) -> None:
        """Params the worker decides (the settings resolved for its device); kept as they were on a resume
        (MLflow params cannot change)."""
        client = self._mlflow.MlflowClient()
        existing = client.get_run(self.run_id).data.params
        for key, value in params.items():
            if key not in existing:
                client.log_param(self.run_id, key, _param_value(value))

    def set_tag(self, key: str, value: str) -> None:
        """A run tag the worker decides (e.g. the list of an elastic job's resizes); later values replace it."""
        self._mlflow.MlflowClient().set_tag(self.run_id, key, redact(value))

    def flush(self) -> None:
        """Wait until every metric logged so far is stored.

        Waits on the futures ``log_metrics`` returned, not ``mlflow.flush_async_logging()``: that one stops and
        restarts MLflow's logging thread, whose idle ``queue.get(timeout=1)`` made every flush (each checkpoint
        and the end of each job) take a full second when nothing was pending. A failed batch is logged, not
        raised, as MLflow's own flush does: a tracking hiccup does not stop training."""
        pending, self._pending = self._pending, []
        for operations in pending:
            try:
                operations.wait()
            except self._mlflow.exceptions.MlflowException as err:
                log.warning("some metrics were not stored in MLflow run %s: %s", self.run_id, err)

    def close(self) -> None:
        """Flush pending metrics (must run before the driver closes the run)."""
        if self._monitor is not None:
            self._monitor.finish()
        self.flush()


def log_export_model(
    client: MlflowClient, run_id: str, export_dir: Path, files: list[str], *, name: str, tags: dict[str, str],
    step: int | None,
) -> LoggedModel:
    """``files`` of the export in ``export_dir`` as an MLflow 3 LoggedModel of ``run_id`` (the runs table's
    Model column): plain files, no flavour (``mlflow.pytorch`` would pickle or need an input example),
    listed as the run's output at ``step``, with the run's metrics of that step linked to it. Returns the
    READY ``LoggedModel``."""
    import shutil

    from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric

    run = client.get_run(run_id)
    model = client.create_logged_model(
        run.info.experiment_id, name=name, source_run_id=run_id, tags=tags, model_type="timm-safetensors",
    )
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for file in files:
                shutil.copy2(export_dir / file, Path(tmp) / file)
            client.log_model_artifacts(model.model_id, tmp)
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=step or 0)])
        if step is not None:  # as mlflow's own log_model does: the run's metrics of that step, now the model's too
            linked = [
                Metric(m.key, m.value, m.timestamp, m.step, run_id=run_id, model_id=model.model_id)
                for key in run.data.metrics
                for m in client.get_metric_history(run_id, key)
                if m.step == step and m.model_id is None
            ]
            for i in range(0, len(linked), 1000):  # MLflow's limit of metrics per log_batch
                client.log_batch(run_id, metrics=linked[i : i + 1000])
    except BaseException:
        client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
        raise
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    return client.get_logged_model(model.model_id)
