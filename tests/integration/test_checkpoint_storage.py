"""Checkpoints on a real S3 server (the session's SeaweedFS, checking SigV4) through Ray Train.

A 2-worker DDP job with an EMA streams its shards from s3:// and writes its checkpoints there with asynchronous
uploads: each one complete (every rank's part, COMPLETE last), the scratch folders gone; started again under its name it resumes from
S3 (the same MLflow run, no step twice); export, ``model.init_from`` and ``run.resume_from`` take the s3://
checkpoint; a missing bucket or refused credentials stop the job before any worker starts.
"""

from __future__ import annotations

import pytest
import torch
from mlflow import MlflowClient
from s3_checkpoint_job import S3_CKPT_PREFIX as PREFIX
from s3_checkpoint_job import S3_CKPT_RUN as RUN
from s3_checkpoint_job import s3_checkpoint_config as _cfg

from metaformer_platform.launch.checks import check_resume_from, resolve_data_root
from metaformer_platform.launch.driver import run_job

# A small local data set for the refusals: they must be about the checkpoint storage alone.
LOCAL_DATA = ("data.source=synthetic", "data.synthetic.num_classes=4", "data.synthetic.train_samples=64",
              "data.synthetic.val_samples=16", "data.synthetic.samples_per_shard=64")


@pytest.fixture(scope="module")
def s3_env(s3_server):
    with pytest.MonkeyPatch.context() as mp:
        for key, value in s3_server.env.items():
            mp.setenv(key, value)
        yield s3_server


@pytest.fixture(scope="module")
def first_run(s3_checkpoint_job, s3_env):
    """The session's S3 checkpoint job (conftest.s3_checkpoint_job, which test_secrets reads too)."""
    job = s3_checkpoint_job
    return job.workdir, job.result, job.scratch_left


def _keys(s3_server, prefix: str) -> dict[str, int]:
    pages = s3_server.client().get_paginator("list_objects_v2").paginate(Bucket=s3_server.bucket, Prefix=prefix)
    return {o["Key"][len(prefix):]: o["Size"] for page in pages for o in page.get("Contents", [])}


def test_checkpoints_are_uploaded_complete_to_s3(first_run, s3_env, mlflow_server):
    tmp, result, scratch_left = first_run
    assert result.metrics["step"] == 14
    # its shards on S3 reached the workers (their loader processes): every validation sample scored once
    assert result.metrics["val/samples"] == 64
    assert result.checkpoint_path == f"s3://{s3_env.bucket}/{PREFIX}/{RUN}/checkpoint-00000014"
    assert result.run_dir == f"s3://{s3_env.bucket}/{PREFIX}/{RUN}"
    for step in (7, 14):
        files = {k for k, size in _keys(s3_env, f"{PREFIX}/{RUN}/checkpoint-{step:08d}/").items() if k}
        expected = {"COMPLETE", "PART-rank00000", "PART-rank00001", "model.pt", "optimizer.pt", "ema.pt",
                    "trainer.pt", "config.yaml", "rng-rank00000.pt", "rng-rank00001.pt",
                    "data-faults-rank00000.json", "data-faults-rank00001.json"}
        assert expected <= files, sorted(files)
    assert not scratch_left  # Ray deleted each rank's scratch folder once its upload was done
    client = MlflowClient(mlflow_server)
    stalls = client.get_metric_history(result.mlflow_run_id, "system/checkpoint_stall_s")
    assert sorted(m.step for m in stalls) == [7, 14] and all(0 < m.value < 60 for m in stalls)
    assert {m.step for m in client.get_metric_history(result.mlflow_run_id, "val/ema_top1")} == {14}


def test_restart_by_name_resumes_from_s3(first_run, s3_env, mlflow_server):
    tmp, first, _ = first_run
    result = run_job(_cfg(tmp, mlflow_server, s3_env.bucket, "trainer.max_steps=21"))
    assert result.mlflow_run_id == first.mlflow_run_id and result.metrics["step"] == 21
    steps = sorted(m.step for m in MlflowClient(mlflow_server).get_metric_history(result.mlflow_run_id, "train/loss"))
    assert steps == [7, 14, 21]  # resumed at 14; started over, 7 and 14 would be there twice
    assert "COMPLETE" in _keys(s3_env, f"{PREFIX}/{RUN}/checkpoint-00000021/")


def test_export_init_from_and_resume_from_take_an_s3_checkpoint(first_run, s3_env, mlflow_server, tmp_path):
    from metaformer_platform.strategies.base import DistContext
    from metaformer_platform.training.export import export_checkpoint
    from metaformer_platform.training.trainer import Trainer

    tmp, _, _ = first_run
    uri = f"s3://{s3_env.bucket}/{PREFIX}/{RUN}/checkpoint-00000014"
    exported = export_checkpoint(uri, tmp_path / "ema", ema=True)
    from safetensors.torch import load_file

    body = s3_env.client().get_object(Bucket=s3_env.bucket, Key=f"{PREFIX}/{RUN}/checkpoint-00000014/ema.pt")["Body"]
    (tmp_path / "ema.pt").write_bytes(body.read())
    stored = torch.load(tmp_path / "ema.pt", weights_only=True)
    weights = load_file(str(exported.weights))
    assert weights.keys() == stored.keys() and all(torch.equal(weights[k], stored[k]) for k in stored)

    cfg = _cfg(tmp, mlflow_server, s3_env.bucket, f"model.init_from={uri}", "scaling.num_workers=1",
               "trainer.ema_decay=null", "data.val_split=null")
    trainer = Trainer(cfg, DistContext(), data_root=resolve_data_root(cfg))
    plain = load_file(str(export_checkpoint(uri, tmp_path / "plain").weights))
    got = trainer.strategy.module.state_dict()
    assert all(torch.equal(got[k], plain[k]) for k in plain)

    assert check_resume_from(_cfg(tmp, mlflow_server, s3_env.bucket, f"run.resume_from={uri}")) == uri
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        check_resume_from(_cfg(tmp, mlflow_server, s3_env.bucket, f"run.resume_from={uri}-nothing-here"))


# Refused in the plan, before Ray is joined: it needs no cluster, so it runs beside the cluster group (tests/conftest.py).
@pytest.mark.beside_cluster
def test_unwritable_storage_is_refused_before_any_worker_starts(s3_env, mlflow_server, tmp_path, monkeypatch):
    client = MlflowClient(mlflow_server)
    with pytest.raises(ValueError, match=r"run.storage_path='s3://no-such-bucket/runs' cannot be written: .*does not "
                                         r"exist.*create it"):
        run_job(_cfg(tmp_path, mlflow_server, s3_env.bucket, "run.storage_path=s3://no-such-bucket/runs",
                     *LOCAL_DATA, "tracking.experiment=it-s3-refused"))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(ValueError, match="refused the credentials"):
        run_job(_cfg(tmp_path, mlflow_server, s3_env.bucket, *LOCAL_DATA, "tracking.experiment=it-s3-refused"))
    assert client.get_experiment_by_name("it-s3-refused") is None  # no MLflow run was opened
