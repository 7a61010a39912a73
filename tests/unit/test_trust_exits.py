"""No secret at the exits (issue 24, finding 3): a pipeline member's error in the family report and on the console,
workers' warnings on the driver's console, the registry's "names nothing" error, and the plan Ray's workers
receive (what Ray pickles into its payload) hold no password; a worker still gets a working tracking URI."""

from __future__ import annotations

import functools
import io
import logging
from pathlib import Path

import cloudpickle
import pytest

from metaformer_platform.config import load_config

PASSWORD = "s3cr3t-pa55/w0rd"
DEBUG = ["model.name=poolformer_debug"]


def _real_mlflow_error(monkeypatch: pytest.MonkeyPatch) -> Exception:
    """What MLflow raises for a tracking server that cannot be reached: it names the URL, password included."""
    import mlflow

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    try:
        mlflow.MlflowClient(f"http://alice:{PASSWORD}@127.0.0.1:9").get_experiment_by_name("x")
    except Exception as err:
        assert PASSWORD in str(err)  # the leak this guards against
        return err
    raise AssertionError("nothing listens on port 9")


class _Artifacts:
    """The part of MlflowClient the report logs with: it keeps the files it was given."""

    def __init__(self) -> None:
        self.files: dict[str, str] = {}

    def log_artifacts(self, run_id: str, folder: str, path: str) -> None:
        self.files.update({f"{path}/{p.name}": p.read_text(errors="replace") for p in Path(folder).iterdir()})


def test_a_failed_members_error_is_masked_in_the_family_report(monkeypatch):
    from metaformer_platform.pipelines.outcome import MemberOutcome, PipelineResult
    from metaformer_platform.pipelines.report import family_report

    err = _real_mlflow_error(monkeypatch)
    failed = MemberOutcome("poolformer_s12", error=f"stage 'pretrain' failed: {type(err).__name__}: {err}")
    client = _Artifacts()
    text = family_report(client, PipelineResult("fam", [failed, MemberOutcome("poolformer_s24")], "parent"))
    assert "FAILED" in text and "http://alice:***@127.0.0.1:9" in text
    assert "report/family_report.md" in client.files
    assert not [name for name, body in {"text": text, **client.files}.items() if PASSWORD in body]


def test_a_stage_error_is_masked_on_the_console_and_in_the_outcome(monkeypatch):
    import threading
    from types import SimpleNamespace

    from metaformer_platform.pipelines.outcome import MemberOutcome
    from metaformer_platform.pipelines.plan import MemberPlan
    from metaformer_platform.pipelines.runner import PipelineRunner

    err = _real_mlflow_error(monkeypatch)
    printed: list[str] = []
    runner = PipelineRunner.__new__(PipelineRunner)  # no MLflow needed: the stage itself fails
    runner.out, runner._print_lock = printed.append, threading.Lock()

    def fail(*args: object) -> None:
        raise err

    monkeypatch.setattr(runner, "_run_stage", fail)
    stage = SimpleNamespace(name="pretrain", run_name="s12-pretrain", kind="pretrain")
    plan = MemberPlan("poolformer_s12", [stage])  # type: ignore[list-item]
    member = MemberOutcome("poolformer_s12")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(logging.getLogger("metaformer_platform.pipelines.runner"), "disabled", True)
        runner._run_member(plan, member, "1", "parent")
    assert member.error and "http://alice:***@127.0.0.1:9" in member.error and PASSWORD not in member.error
    assert member.stages[0].action == "failed" and PASSWORD not in member.stages[0].detail
    assert printed and not [line for line in printed if PASSWORD in line]


def test_worker_warnings_and_failures_reach_the_console_masked():
    from metaformer_platform.tracking.console import Console, ForwardHandler, ProgressSender, failure_notice

    queue: list = []
    sender = ProgressSender(type("Q", (), {"put_nowait": lambda self, item: queue.append(item)})(), "/runs/x",
                            main=False)
    logger = logging.getLogger("metaformer_platform.test_trust_exits")
    handler = ForwardHandler(sender, rank=1)
    logger.addHandler(handler)
    try:
        logger.warning("cannot reach %s", f"postgresql://me:{PASSWORD}@db/mlflow")
    finally:
        logger.removeHandler(handler)
    failure_notice(sender.queue).after_exception(None, {0: RuntimeError(f"boom at http://a:{PASSWORD}@h/")})
    assert len(queue) == 2 and not [e for e in queue if PASSWORD in e["message"]]
    out = io.StringIO()
    console = Console(out, bar=False)
    for event in queue:
        console.handle(event)
    console.handle({"kind": "log", "time": 0.0, "rank": 0, "level": "WARNING", "message": f"x://u:{PASSWORD}@h"})
    assert "postgresql://me:***@db/mlflow" in out.getvalue() and PASSWORD not in out.getvalue()


def test_the_registry_reraises_what_names_nothing_masked(tmp_path, monkeypatch):
    from metaformer_platform.storage import weights
    from metaformer_platform.tracking import registry

    def names_nothing(uri: str, tracking_uri: str) -> None:  # storage.weights' message names the registry's URI
        raise ValueError(f"{uri}: no registered model 'm' in the registry at {tracking_uri}; registered models: none")

    monkeypatch.setattr(weights, "model_version", names_nothing)
    with pytest.raises(ValueError, match=r"registry at postgresql://u:\*\*\*@db/x") as info:
        registry.get_model_version("models:/m@champion", tracking_uri=f"postgresql://u:{PASSWORD}@db/x")
    assert PASSWORD not in str(info.value)


def _plan(tmp_path: Path, tracking_uri: str):
    from metaformer_platform.launch.plan import DataSummary, JobPlan
    from metaformer_platform.training import hardware

    cfg = load_config(None, [*DEBUG, f"tracking.tracking_uri={tracking_uri!r}",
                             f"run.ray_address='ray://me:{PASSWORD}@head:10001'", "scaling.num_workers=1",
                             "scaling.cpus_per_worker=1", "scaling.use_gpu=false",
                             f"tracking.tags={{note: 'from postgresql://x:{PASSWORD}@db/y'}}"])
    return JobPlan(cfg=cfg, layout=hardware.Layout.of(cfg.scaling), data=DataSummary(tmp_path, 4, {"train": 8}),
                   init_from=None, resume_from=None, storage_path=str(tmp_path), registry_uri=tracking_uri,
                   remote_inputs=False)


def test_the_plan_ray_sends_to_the_workers_holds_no_secret(tmp_path):
    """What Ray pickles for the workers (driver.run_job: the worker function with the plan and the launch)."""
    from metaformer_platform.launch.workers import _train_worker

    plan = _plan(tmp_path, f"postgresql://user:{PASSWORD}@db/mlflow")
    sent = plan.for_workers()
    payload = cloudpickle.dumps(functools.partial(_train_worker, sent))
    assert PASSWORD.encode() not in payload and b"postgresql://user:***@db/mlflow" in payload
    assert sent.cfg.tracking.tracking_uri == "postgresql://user:***@db/mlflow" == sent.registry_uri
    assert sent.cfg.run.ray_address == "ray://me:***@head:10001"
    assert sent.cfg.to_yaml() == plan.cfg.to_yaml()  # the workers' checkpoints store the same config.yaml
    assert sent.cfg.scaling == plan.cfg.scaling and sent.layout == plan.layout
    assert plan.cfg.tracking.tracking_uri == f"postgresql://user:{PASSWORD}@db/mlflow"  # the driver's own is kept


def test_a_worker_takes_the_tracking_credentials_from_its_node(monkeypatch):
    from metaformer_platform.storage.redact import redact
    from metaformer_platform.tracking.runs import worker_tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    plain = "http://127.0.0.1:5000"
    assert worker_tracking_uri(plain) == plain
    # HTTP: the masked userinfo is dropped; MLflow's client sends MLFLOW_TRACKING_USERNAME/PASSWORD of the node
    assert worker_tracking_uri(redact(f"http://alice:{PASSWORD}@mlflow:5000/")) == "http://mlflow:5000/"
    assert worker_tracking_uri(redact(f"https://mlflow/x?token={PASSWORD}&a=1")) == "https://mlflow/x?a=1"
    # a database: only the node's MLFLOW_TRACKING_URI can carry the password
    db = f"postgresql://user:{PASSWORD}@db/mlflow"
    with pytest.raises(ValueError, match="MLFLOW_TRACKING_URI") as info:
        worker_tracking_uri(redact(db))
    assert PASSWORD not in str(info.value)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", db)
    assert worker_tracking_uri(redact(db)) == db
    assert worker_tracking_uri(redact(f"http://alice:{PASSWORD}@other:5000")) == "http://other:5000"
