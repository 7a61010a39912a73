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
from pathlib import Path
from typing import Any

from metaformer_platform.config import JobConfig

log = logging.getLogger(__name__)

RUN_NAME_TAG = "metaformer.run_name"
STAGE_TAG = "metaformer.stage"
PARAM_BATCH = 100  # MLflow's limit of params per log_batch call


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


def _family(model_name: str) -> str:
    return model_name.rsplit("_", 1)[0] if "_" in model_name else model_name


class RunHandle:
    """A tracked run as seen by the driver: create or resume, then close with the job's outcome."""

    def __init__(self, cfg: JobConfig) -> None:
        import mlflow

        self.cfg = cfg
        self.tracking_uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
        self.client = mlflow.MlflowClient(self.tracking_uri)
        experiment = self.client.get_experiment_by_name(cfg.tracking.experiment)
        self.experiment_id = (
            experiment.experiment_id if experiment else self.client.create_experiment(cfg.tracking.experiment)
        )
        previous = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{RUN_NAME_TAG}` = '{cfg.run_name}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        self.resumed = bool(previous)
        if previous:
            self.run_id = previous[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            # The configured tags hold for the run as it continues now (a pipeline's parent run, say).
            for key, value in cfg.tracking.tags.items():
                self.client.set_tag(self.run_id, key, value)
            log.info("continuing MLflow run %s (%s)", self.run_id, cfg.run_name)
        else:
            tags = {
                RUN_NAME_TAG: cfg.run_name,
                STAGE_TAG: cfg.stage,
                "model": cfg.model.name,
                "family": _family(cfg.model.name),
                "strategy": cfg.strategy.name,
                "mlflow.source.git.commit": git_commit(),
                **cfg.tracking.tags,
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

    def log_params(self, params: dict[str, Any]) -> None:
        """Extra derived params (e.g. total steps, resolved lr), logged once."""
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        new = [Param(k, _param_value(v)) for k, v in params.items() if k not in existing]
        if new:
            self.client.log_batch(self.run_id, params=new)

    def close(self, succeeded: bool) -> None:
        status = "FINISHED" if succeeded else "FAILED"
        self.client.set_terminated(self.run_id, status=status)

    def ui_hint(self) -> str:
        from metaformer_platform.redact import redact

        uri = redact(self.tracking_uri)  # printed: a database password in the URI must not be
        if uri.startswith(("http://", "https://")):
            where = f"open {uri}/#/experiments/{self.experiment_id}/runs/{self.run_id}"
        else:
            mlflow_cli = Path(sys.executable).parent / "mlflow"
            where = f"run `{mlflow_cli} ui --backend-store-uri {uri}` and open http://127.0.0.1:5000"
        return f"MLflow run {self.run_id} (experiment {self.cfg.tracking.experiment!r}): {where}"


def _param_value(value: Any) -> str:
    text = str(value)
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
        self._monitor = None
        if system_metrics:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(run_id, sampling_interval=10, resume_logging=True)
            self._monitor.start()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        new = {k: float(v) for k, v in metrics.items() if step > self.logged_up_to.get(k, -1)}
        if new:
            self._mlflow.log_metrics(new, step=step, run_id=self.run_id, synchronous=False)

    def flush(self) -> None:
        """Wait until every metric logged so far is stored."""
        self._mlflow.flush_async_logging()

    def close(self) -> None:
        """Flush pending metrics (must run before the driver closes the run)."""
        if self._monitor is not None:
            self._monitor.finish()
        self._mlflow.flush_async_logging()
