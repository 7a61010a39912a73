"""No secret leaves the process that holds it (issue 10, items 3 and 4).

A 2-worker job with AWS_SECRET_ACCESS_KEY set on the driver, checkpoints on the session's S3 server and a
tracking URI that carries a password: the S3 secret reaches the workers through the nodes' own environment
(conftest.ray_cluster), never Ray's runtime_env, so it is in no file under Ray's session folder and on no
process command line seen while the job runs; neither secret is in any MLflow param or artifact, nor in the
checkpoint's config.yaml, nor in the printed hint.
"""

from __future__ import annotations

import threading
from pathlib import Path

import psutil
import pytest
from mlflow import MlflowClient

from metaformer_platform.config import load_config
from metaformer_platform.launch import run_job

CONFIGS = Path(__file__).resolve().parents[2] / "jobs" / "configs"
TRACKING_PASSWORD = "tr4ck1ng-pa55w0rd-do-not-log"


class CmdlineWatch:
    """Scans every process's command line (psutil) every 50 ms while a job runs, for a given string."""

    def __init__(self, needles: list[str]) -> None:
        self.needles = [n.encode() for n in needles]
        self.hits: list[str] = []
        self.scanned: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for proc in psutil.process_iter(["pid", "cmdline"]):
                cmdline = " ".join(proc.info["cmdline"] or []).encode()
                self.scanned.add(proc.info["pid"])
                if any(n in cmdline for n in self.needles):
                    self.hits.append(f"{proc.info['pid']}: {cmdline[:200]!r}")
            self._stop.wait(0.05)

    def __enter__(self) -> CmdlineWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _files_holding(folder: Path, needles: list[str]) -> list[str]:
    found = []
    for path in folder.rglob("*"):
        try:
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                found += [f"{path}: {n}" for n in needles if n.encode() in data]
        except OSError:
            continue  # sockets, files removed while walking
    return found


@pytest.fixture(scope="module")
def secret_job(ray_cluster, mlflow_server, s3_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("secrets")
    host = mlflow_server.removeprefix("http://")
    tracking = f"http://metaformer:{TRACKING_PASSWORD}@{host}"  # the server checks none: the URI is the point
    cfg = load_config(CONFIGS / "default.yaml", [
        "model.name=poolformer_debug",
        "data.synthetic.num_classes=4", "data.synthetic.train_samples=256", "data.synthetic.val_samples=32",
        "data.synthetic.samples_per_shard=64", f"data.cache_dir={tmp / 'cache'}", "data.num_workers=0",
        "trainer.batch_size=16", "trainer.max_steps=4", "trainer.checkpoint_every_steps=2", "trainer.precision=fp32",
        "optim.warmup_epochs=0", f"run.storage_path=s3://{s3_server.bucket}/secret-runs", "run.name=it-secrets",
        f"tracking.tracking_uri={tracking}", "tracking.experiment=it-secrets", "tracking.system_metrics=false",
    ])
    with pytest.MonkeyPatch.context() as mp:
        for key, value in s3_server.env.items():  # the driver has the S3 credentials, as a user's shell does
            mp.setenv(key, value)
        with CmdlineWatch([s3_server.secret_key, TRACKING_PASSWORD]) as watch:
            result = run_job(cfg)
    return result, watch


def test_the_s3_secret_is_in_no_ray_session_file_and_no_command_line(secret_job, s3_server):
    import ray

    result, watch = secret_job
    assert result.metrics["step"] == 4  # the workers did reach S3: the credentials came from their nodes
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    assert session.is_dir() and any(session.rglob("*.log")), session
    assert _files_holding(session, [s3_server.secret_key]) == []
    assert len(watch.scanned) > 5 and watch.hits == []


def test_no_secret_in_mlflow_params_artifacts_checkpoints_or_hint(secret_job, s3_server, mlflow_server, tmp_path):
    result, _ = secret_job
    needles = [s3_server.secret_key, TRACKING_PASSWORD]
    client = MlflowClient(mlflow_server)
    run = client.get_run(result.mlflow_run_id)
    params = run.data.params
    assert params["tracking.tracking_uri"].startswith("http://metaformer:***@")
    assert not [k for k, v in {**params, **run.data.tags}.items() if any(n in v for n in needles)]
    artifacts = Path(client.download_artifacts(result.mlflow_run_id, "", str(tmp_path)))
    assert (artifacts / "config.yaml").is_file()
    assert _files_holding(artifacts, needles) == []
    body = s3_server.client().get_object(
        Bucket=s3_server.bucket, Key="secret-runs/it-secrets/checkpoint-00000004/config.yaml")["Body"].read()
    assert b"metaformer:***@" in body and not any(n.encode() in body for n in needles)
    assert result.mlflow_hint and TRACKING_PASSWORD not in result.mlflow_hint
