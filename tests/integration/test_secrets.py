"""No secret leaves the process that holds it (issue 10, items 3 and 4).

A 2-worker job (the session's S3 checkpoint job, which test_checkpoint_storage checks too) with
AWS_SECRET_ACCESS_KEY set on the driver, checkpoints on the session's S3 server and a
tracking URI that carries a password: the S3 secret reaches the workers through the nodes' own environment
(conftest.ray_cluster), never Ray's runtime_env, so it is in no file under Ray's session folder and on no
process command line seen while the job runs; neither secret is in any MLflow param or artifact, nor in the
checkpoint's config.yaml, nor in the printed hint.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient
from s3_checkpoint_job import S3_CKPT_PREFIX, S3_CKPT_RUN, TRACKING_PASSWORD


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
def secret_job(s3_checkpoint_job):
    """The session's S3 checkpoint job (conftest.s3_checkpoint_job, which test_checkpoint_storage reads too): its
    driver held the S3 credentials and a tracking URI with a password, and its command lines were watched."""
    return s3_checkpoint_job.result, s3_checkpoint_job.watch


def test_the_plan_sent_to_the_workers_holds_no_secret(s3_checkpoint_job, s3_server, mlflow_server):
    """Ray pickles the worker function with its plan into the payload it sends (its state API and dashboard can
    serve it): the tracking URI travels masked, and the workers still logged to MLflow with the URI they made
    of it (the suite's server checks no password; a real one gets the nodes' MLFLOW_TRACKING_USERNAME/PASSWORD)."""
    payloads = s3_checkpoint_job.worker_payloads
    assert len(payloads) == 1 and b"poolformer_debug" in payloads[0]
    assert b"metaformer:***@" in payloads[0]
    assert not [n for n in (TRACKING_PASSWORD, s3_server.secret_key) if n.encode() in payloads[0]]
    history = MlflowClient(mlflow_server).get_metric_history(s3_checkpoint_job.result.mlflow_run_id, "train/loss")
    # rank 0's tracker logged the job's last step, 14 (test_checkpoint_storage resumes this run by name to more
    # steps, before or after this test)
    assert 14 in {m.step for m in history}


def test_the_s3_secret_is_in_no_ray_session_file_and_no_command_line(secret_job, s3_server):
    import ray

    result, watch = secret_job
    assert result.metrics["step"] == 14  # the workers did reach S3: the credentials came from their nodes
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
        Bucket=s3_server.bucket, Key=f"{S3_CKPT_PREFIX}/{S3_CKPT_RUN}/checkpoint-00000014/config.yaml")["Body"].read()
    assert b"metaformer:***@" in body and not any(n.encode() in body for n in needles)
    assert result.mlflow_hint and TRACKING_PASSWORD not in result.mlflow_hint
