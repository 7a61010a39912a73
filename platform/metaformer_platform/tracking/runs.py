"""MLflow tracking: the job's driver opens and closes the run, rank 0 logs into it.

The run is created on the driver before any worker starts, so its status is always settled by the driver
(FINISHED, or FAILED when the job fails), and a job restarted with the same ``run.name`` continues the same
MLflow run instead of opening a second one. Rank 0 logs through an ``Outbox``: one thread delivers its metrics,
params and tags in order while training goes on; an unreachable tracking server (an outage of any length) is
waited out with the values held, up to ``tracking.buffer_limit`` (past it new metric values are dropped and
counted), and the console says when it went down and when it is back (see docs/operations.md, "Tracking outages").
"""

from __future__ import annotations

import itertools
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Literal, cast

from metaformer_platform.config import JobConfig
from metaformer_platform.storage.redact import MASK, redact
from metaformer_platform.training.ledger import monitor_metric

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import LoggedModel, Metric, Param, Run, RunTag

    from metaformer_platform.training.ledger import Summary

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
DATASET_DIGEST_CHARS = 36  # MLflow stores a dataset digest in 36 characters; the full hash goes in the profile
# One request to a tracking server, never retried by MLflow's client (its default retries a call for about four
# minutes): an outage is told apart in seconds, and the platform does its own retrying where it waits it out.
SERVER_TIMEOUT_S = 5.0
SEND_TIMEOUT_S = 15.0  # a batch's: a busy server may be slow to answer without being out
RETRY_FIRST_S, RETRY_MAX_S = 0.5, 5.0  # the back-off between tries while a server is down
# MLflow's own client's retries for the calls the platform does not make itself (system metrics, an evaluation's
# report, a logged model): 3 tries (a few seconds of back-off), 15 s without an answer each, instead of its 7
# tries over about four minutes; a value already in the environment is kept
CLIENT_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(SEND_TIMEOUT_S))}
DROPPED_METRIC = "tracking/dropped_values"  # how many metric values the outbox dropped at its bound, so far
# MLflow's limits per log_batch call
BATCH_ITEMS, BATCH_PARAMS, BATCH_TAGS = 1000, 100, 100


def resolve_tracking_uri(configured: str | None) -> str:
    """The URI every process should use: the config's, else MLFLOW_TRACKING_URI, else MLflow's default.

    MLflow's default is ``sqlite:///mlflow.db`` relative to the working directory; Ray workers run
    elsewhere, so the default is pinned to an absolute path on the driver. Bounds MLflow's client retries in this
    process (``bound_client_retries``): every driver finds its URI here.
    """
    bound_client_retries()
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def bound_client_retries() -> None:
    """Bound MLflow's own client retries (``CLIENT_RETRIES``) in this process, so that a tracking outage holds
    up a call MLflow makes for seconds, not minutes."""
    for key, value in CLIENT_RETRIES.items():
        os.environ.setdefault(key, value)


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


def open_worker_tracker(sent_uri: str, run_id: str, *, system_metrics: bool, buffer_limit: int = 100_000,
                        outage_wait_s: float = 300.0) -> MlflowTracker:
    """Rank 0's ``MlflowTracker`` on the URI the driver sent (see ``worker_tracking_uri``); a server that refuses
    the node's credentials (or their absence) fails with what to set, not only MLflow's 401."""
    from mlflow.exceptions import MlflowException

    uri = worker_tracking_uri(sent_uri)
    try:
        return MlflowTracker(uri, run_id, system_metrics=system_metrics, buffer_limit=buffer_limit,
                             outage_wait_s=outage_wait_s)
    except MlflowException as err:
        if uri == sent_uri:
            raise
        raise RuntimeError(redact(
            f"the worker cannot open MLflow run {run_id} at {sent_uri}: {err}. The driver sends no tracking "
            "credentials to Ray's workers: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or "
            "MLFLOW_TRACKING_TOKEN), or MLFLOW_TRACKING_URI with the password, in every Ray node's environment"
        )) from None


def served(uri: str) -> bool:
    """Whether ``uri`` names a tracking server (http/https); an sqlite or local URI needs none."""
    return uri.startswith(("http://", "https://"))


class ServerError(Exception):
    """A tracking server's request that failed: no answer (``status`` None) or an HTTP error. Its text names the
    server's URI redacted, never a credential."""

    def __init__(self, uri: str, status: int | None, detail: str) -> None:
        super().__init__(f"MLflow at {redact(uri)}: {detail}")
        self.status = status
        self.detail = detail

    @property
    def transient(self) -> bool:
        """An outage (no answer, a timeout, throttling or a server error), not a refusal of the request."""
        return self.status is None or self.status in (408, 429) or self.status >= 500


def call_server(uri: str, endpoint: str, body: Mapping[str, object], *,
                timeout: float = SERVER_TIMEOUT_S) -> dict[str, object]:
    """POST ``body`` to ``endpoint`` of the tracking server at ``uri``, with the credentials MLflow's own client
    sends (MLFLOW_TRACKING_USERNAME/PASSWORD, MLFLOW_TRACKING_TOKEN, or the URI's user info); the JSON answer.
    Raises ``ServerError``. One immediate second try, no back-off: MLflow's session keeps connections alive, and
    the server closes an idle one after 5 s (uvicorn's keep-alive), which the next request finds broken (seen:
    a false outage between two log cadences); the store takes a resent batch once (same timestamps)."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    try:
        response = http_request(get_default_host_creds(uri), endpoint, "POST", max_retries=1, backoff_factor=0,
                                timeout=timeout, json=dict(body))
    except (MlflowException, OSError, ValueError) as err:  # requests' errors, an invalid URL (requests, urllib3):
        # their text holds the URI as given: say what happened, not what it said
        what = f"no answer within {timeout:g} s" if "timeout" in str(err).lower() else "no connection"
        raise ServerError(uri, None, what) from None
    if response.status_code != 200:
        raise ServerError(uri, response.status_code, f"HTTP {response.status_code} {response.reason} on {endpoint}")
    return response.json() if response.text.strip() else {}


def check_server(uri: str, timeout: float = SERVER_TIMEOUT_S) -> ServerError | None:
    """Whether the tracking server at ``uri`` answers and lets this client in: one search of experiments, the
    lightest call that needs the same authorisation as a run's logging. None when it does."""
    try:
        call_server(uri, "/api/2.0/mlflow/experiments/search", {"max_results": 1}, timeout=timeout)
    except ServerError as err:
        return err
    return None


def transient(err: Exception) -> bool:
    """Whether a tracking call's failure is an outage to wait out (a server's, or a locked sqlite store), not
    a refusal that sending again cannot change."""
    if isinstance(err, ServerError):
        return err.transient
    from mlflow.exceptions import MlflowException

    if isinstance(err, MlflowException):
        return err.get_http_status_code() >= 500
    return True


def retry_outage(action: Callable[[], object], what: str, uri: str, wait_s: float) -> bool:
    """``action()`` (one call to the tracking store), tried again while the store is out, for up to ``wait_s``
    seconds; a log line when it is found out, one when it is back or given up. False when given up; a refusal
    (not an outage) is raised."""
    start, delay, said = time.monotonic(), RETRY_FIRST_S, False
    while True:
        try:
            action()
        except Exception as err:
            if not transient(err):
                raise
            waited = time.monotonic() - start
            if waited >= wait_s:
                log.error("gave up after %.0f s trying to %s: %s (tracking.outage_wait_s=%g)", waited, what, err,
                          wait_s)
                return False
            if not said:
                log.warning("%s; retrying to %s for up to %g s (tracking.outage_wait_s)", err, what, wait_s)
                said = True
            time.sleep(min(delay, wait_s - waited))
            delay = min(2 * delay, RETRY_MAX_S)
            continue
        if said:
            log.warning("MLflow at %s is back: done, %s", redact(uri), what)
        return True


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
        import json

        from mlflow.entities import Dataset, DatasetInput, InputTag

        from metaformer_platform.data import load_manifest
        from metaformer_platform.data.manifest import sha256_of

        manifest = load_manifest(data_root)
        digest = sha256_of(manifest.storage, manifest.info_name)
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
        from mlflow.exceptions import MlflowException

        try:
            self.client.log_inputs(self.run_id, datasets=inputs)
        except MlflowException as err:
            # Two runs logging the same new dataset at once (a pipeline's members): the server's check-then-insert
            # races and one gets the UNIQUE constraint; the dataset exists now, so a second try links it.
            if "UNIQUE constraint" not in str(err):
                raise
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
        status = "KILLED" if stopped is not None else "FINISHED" if succeeded else "FAILED"
        uri, wait_s = self.tracking_uri, self.cfg.tracking.outage_wait_s

        def tag() -> None:
            assert stopped is not None
            if served(uri):  # one request per try: the waiting is retry_outage's, bounded
                call_server(uri, "/api/2.0/mlflow/runs/set-tag", {"run_id": self.run_id, "key": STOPPED_TAG,
                                                                   "value": stopped})
            else:
                self.client.set_tag(self.run_id, STOPPED_TAG, stopped)

        def terminate() -> None:
            if served(uri):
                call_server(uri, "/api/2.0/mlflow/runs/update", {
                    "run_id": self.run_id, "run_uuid": self.run_id, "status": status,
                    "end_time": int(time.time() * 1000)})
            else:
                self.client.set_terminated(self.run_id, status=status)

        start = time.monotonic()
        if stopped is not None:
            retry_outage(tag, f"tag MLflow run {self.run_id} {STOPPED_TAG}={stopped}", uri, wait_s)
        left = max(0.0, wait_s - (time.monotonic() - start))
        if not retry_outage(terminate, f"mark MLflow run {self.run_id} {status}", uri, left):
            log.error("MLflow run %s stays RUNNING at %s: mark it %s when the server is back "
                      "(MlflowClient().set_terminated(%r, status=%r))", self.run_id, redact(uri), status,
                      self.run_id, status)

    def log_ledger(self, summary: Summary, text: str, currency: str) -> None:
        """The run ledger's figures as ``system/ledger_*`` metrics (at the last step trained: a later attempt's values are
        the latest), the currency tag when priced, and ``ledger.json`` as an artifact."""
        from mlflow.entities import Metric

        from metaformer_platform.training import ledger

        step = max((int(cast(int, i.get("to_step", 0))) for i in summary["intervals"]), default=0)
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step)
                                                    for k, v in summary["metrics"].items()])
        if ledger.COST in summary["metrics"]:
            self.client.set_tag(self.run_id, ledger.CURRENCY_TAG, currency)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / ledger.ARTIFACT
            path.write_text(text)
            self.client.log_artifact(self.run_id, str(path))

    def ui_hint(self) -> str:
        from metaformer_platform.tracking import ui

        where = ui.link(self.tracking_uri, self.experiment_id, self.run_id)
        where = where if where.startswith("run `") else f"open {where}"
        return f"MLflow run {self.run_id} (experiment {self.cfg.tracking.experiment!r}): {where}"


def close_orphan(client: MlflowClient, run: Run, why: str, last_seen: float | None = None) -> int | None:
    """Close ``run``, left RUNNING by a driver that is gone (its lease shows it: ``ownership.lost_driver``), as
    KILLED with ``metaformer.orphaned=driver-lost``, ``why`` and the last step it logged (the metric
    ``run/orphaned_at_step``, at that step), ended when its driver was last seen. Returns that step."""
    steps = [max((m.step for m in client.get_metric_history(run.info.run_id, key)), default=-1)
             for key in run.data.metrics if not monitor_metric(key) and key != ORPHANED_STEP_METRIC]
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


Kind = Literal["metric", "param", "tag"]


class Outbox:
    """What rank 0 logs, on its way to the tracking store: a queue (first in, first out) and one thread that
    sends it in order, in batches, through ``send(metrics, params, tags)``.

    An outage of any length is waited out (tried again with a back-off; the values resent keep their
    timestamps, which the store takes once), training going on meanwhile. The queue holds at most ``limit``
    items: past it new metric values are dropped and counted (params and tags are few, and always kept); the
    count is logged as the metric ``tracking/dropped_values`` once the store is back. ``on_change`` gets one line
    when the store goes out and one when it is back (the driver's console), not one per failed call. A batch the
    store refuses (not an outage) is dropped with a warning: sending it again would be refused again."""

    def __init__(self, send: Callable[[list[Metric], list[Param], list[RunTag]], None], *, limit: int,
                 where: str, on_change: Callable[[str], None] | None = None) -> None:
        self._send = send
        self.limit = limit
        self.where = where  # the store's URI, redacted: for the lines
        self.on_change = on_change
        self._items: deque[tuple[Kind, Metric | Param | RunTag]] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._abandoned = threading.Event()
        self.down_since: float | None = None  # time.monotonic() of the first failure of the outage
        self.dropped = 0  # metric values not queued: the queue was full
        self.refused = 0  # values the store refused (not an outage)
        self._dropped_logged = 0
        self._last_step = 0
        self._thread = threading.Thread(target=self._run, name="mlflow-outbox", daemon=True)
        self._thread.start()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, kind: Kind, item: Metric | Param | RunTag, *, bound: bool = True) -> None:
        """Queue ``item`` (never waits); a metric value beyond the bound is dropped and counted."""
        with self._cond:
            if kind == "metric":
                self._last_step = max(self._last_step, int(getattr(item, "step", 0)))
                if bound and len(self._items) >= self.limit:
                    if not self.dropped:
                        log.warning("tracking: %d values held for MLflow at %s (tracking.buffer_limit): new metric "
                                    "values are dropped, and counted in %s", self.limit, self.where, DROPPED_METRIC)
                    self.dropped += 1
                    return
            self._items.append((kind, item))
            self._cond.notify_all()

    def _run(self) -> None:
        delay = RETRY_FIRST_S
        while True:
            with self._cond:
                while not self._items and not self._closing:
                    self._cond.wait()
                if not self._items or self._abandoned.is_set():
                    return
                batch = self._head()
            try:
                self._send(*_split(batch))
            except Exception as err:  # judged by transient(): an outage is waited out, a refusal is dropped
                if transient(err):
                    self._went_down(err)
                    if self._abandoned.wait(delay):
                        return
                    delay = min(2 * delay, RETRY_MAX_S)
                    continue
                self.refused += len(batch)
                log.warning("tracking: MLflow at %s refused %d values, dropped: %s", self.where, len(batch), err)
            delay = RETRY_FIRST_S
            self._sent(len(batch))

    def _head(self) -> list[tuple[Kind, Metric | Param | RunTag]]:
        """The first items that fit one log_batch call (in order; left in the queue until sent)."""
        batch: list[tuple[Kind, Metric | Param | RunTag]] = []
        counts = {"param": 0, "tag": 0}
        for kind, item in itertools.islice(self._items, BATCH_ITEMS):
            if kind != "metric":
                if counts[kind] == (BATCH_PARAMS if kind == "param" else BATCH_TAGS):
                    break
                counts[kind] += 1
            batch.append((kind, item))
        return batch

    def _sent(self, count: int) -> None:
        with self._cond:
            held = len(self._items)
            for _ in range(count):
                self._items.popleft()
            self._cond.notify_all()
        if self.down_since is not None:
            self._came_back(held)

    def _went_down(self, err: Exception) -> None:
        with self._cond:
            first = self.down_since is None
            if first:
                self.down_since = time.monotonic()
            self._cond.notify_all()  # a flush waits no longer
        if first:
            self._tell(f"tracking: MLflow is out ({err}); training goes on, holding what it logs (up to "
                       f"{self.limit} values) until the server is back")

    def _came_back(self, held: int) -> None:
        from mlflow.entities import Metric

        assert self.down_since is not None
        outage, self.down_since = time.monotonic() - self.down_since, None
        with self._cond:
            dropped = self.dropped
        line = f"tracking: MLflow at {self.where} is back after {outage:.0f} s; delivering the {held} values held"
        if dropped > self._dropped_logged:
            self._dropped_logged = dropped
            self.put("metric", Metric(DROPPED_METRIC, float(dropped), int(time.time() * 1000), self._last_step),
                     bound=False)
            line += f"; {dropped} metric values were dropped at tracking.buffer_limit ({DROPPED_METRIC})"
        self._tell(line)

    def _tell(self, line: str) -> None:
        if self.on_change is not None:
            log.info("%s", line)
            self.on_change(line)
        else:
            log.warning("%s", line)

    def flush(self) -> None:
        """Wait until everything queued so far is stored; not while the store is out (training goes on)."""
        with self._cond:
            while self._items and self.down_since is None and self._thread.is_alive():
                self._cond.wait(0.5)

    def close(self, wait_s: float) -> int:
        """Deliver what is queued, waiting out an outage for up to ``wait_s`` seconds, then stop; returns how
        many values were not delivered (said in a line)."""
        start = time.monotonic()
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            while self._items and self._thread.is_alive():
                down = self.down_since
                if down is not None and time.monotonic() - max(down, start) >= wait_s:
                    break
                self._cond.wait(0.5)
            left = len(self._items)
            self._abandoned.set()
        self._thread.join(timeout=SEND_TIMEOUT_S + 1)
        if left:
            self._tell(f"tracking: gave up on MLflow at {self.where} after waiting {time.monotonic() - start:.0f} s "
                       f"(tracking.outage_wait_s): {left} values not delivered")
        return left


def _split(batch: list[tuple[Kind, Metric | Param | RunTag]]) -> tuple[list[Metric], list[Param], list[RunTag]]:
    """A batch's metrics, params and tags, each in order."""
    def of(kind: Kind) -> list[Metric | Param | RunTag]:
        return [item for k, item in batch if k == kind]

    return (cast("list[Metric]", of("metric")), cast("list[Param]", of("param")),
            cast("list[RunTag]", of("tag")))


class MlflowTracker:
    """Rank 0's logger: metrics, params and tags go to an existing run through an ``Outbox`` (training never
    waits on the tracking server, nor stops for it); system metrics when asked.

    A restarted job resumes from its last checkpoint and replays the steps after it, which the attempt
    before the restart may already have logged: each metric keeps the steps it had (``logged_up_to``), so
    no step appears twice. (A resumed job computes the same values: resumes are exact.)
    """

    def __init__(self, tracking_uri: str, run_id: str, *, system_metrics: bool = True, buffer_limit: int = 100_000,
                 outage_wait_s: float = 300.0) -> None:
        import mlflow

        bound_client_retries()  # the system metrics monitor's calls
        mlflow.set_tracking_uri(tracking_uri)
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.outage_wait_s = outage_wait_s
        self._client = mlflow.MlflowClient(tracking_uri)
        run = self._client.get_run(run_id)
        self.logged_up_to: dict[str, int] = {
            key: max(m.step for m in self._client.get_metric_history(run_id, key))
            for key in run.data.metrics
            if not monitor_metric(key)  # the system metrics monitor keeps its own step
        }
        self._params = set(run.data.params)  # MLflow params cannot change: a resumed run keeps its own
        self.outbox = Outbox(self._send, limit=buffer_limit, where=redact(tracking_uri))
        self._monitor = None
        if system_metrics:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(run_id, sampling_interval=10, resume_logging=True)
            self._monitor.start()

    def _send(self, metrics: list[Metric], params: list[Param], tags: list[RunTag]) -> None:
        """One log_batch: to a server as one request (the outbox does the retrying), else to the local store."""
        if not served(self.tracking_uri):
            self._client.log_batch(self.run_id, metrics=metrics, params=params, tags=tags)
            return
        import json

        from mlflow.protos.service_pb2 import LogBatch
        from mlflow.utils.proto_json_utils import message_to_json

        body = LogBatch(run_id=self.run_id, metrics=[m.to_proto() for m in metrics],
                        params=[p.to_proto() for p in params], tags=[t.to_proto() for t in tags])
        call_server(self.tracking_uri, "/api/2.0/mlflow/runs/log-batch", json.loads(message_to_json(body)),
                    timeout=SEND_TIMEOUT_S)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for key, value in metrics.items():
            if step > self.logged_up_to.get(key, -1):
                self.outbox.put("metric", Metric(key, float(value), now, step))

    def log_params(self, params: Mapping[str, object]) -> None:
        """Params the worker decides (the settings resolved for its device); kept as they were on a resume
        (MLflow params cannot change)."""
        from mlflow.entities import Param

        for key, value in params.items():
            if key not in self._params:
                self._params.add(key)
                self.outbox.put("param", Param(key, _param_value(value)))

    def set_tag(self, key: str, value: str) -> None:
        """A run tag the worker decides (e.g. the list of an elastic job's resizes); later values replace it."""
        from mlflow.entities import RunTag

        self.outbox.put("tag", RunTag(key, redact(value)))

    def flush(self) -> None:
        """Wait until every metric logged so far is stored, unless the tracking server is out: then training
        goes on at once (a checkpoint is not held up by tracking), and the values wait in the outbox."""
        self.outbox.flush()

    def close(self) -> None:
        """Deliver what is held (waiting out an outage up to ``tracking.outage_wait_s``): before the driver
        closes the run."""
        if self._monitor is not None:
            self._monitor.finish()
        self.outbox.close(self.outage_wait_s)


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
