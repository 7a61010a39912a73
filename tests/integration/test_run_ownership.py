"""A run is owned (issue 10, item 5): while a job trains under a run name, a second job under that name exits
2 before anything starts; the first job's checkpoints stay byte-identical, its MLflow run is the only one of
that name and the second job never reopens it; every checkpoint folder is stamped with the run's id."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from mlflow import MlflowClient

from metaformer_platform.config import load_config
from metaformer_platform.launch import run_job
from metaformer_platform.tracking import RUN_NAME_TAG
from metaformer_platform.training import ownership

REPO = Path(__file__).resolve().parents[2]
RUN = "it-owned"
# The first job must still be training when the second one (a cold Python driver: seconds, tens on a loaded
# machine) reaches its claim and the test reads the run status: steps with a checkpoint every 4 give it runway after checkpoint 8 on an
# idle 2-core machine (80 were too few on a loaded one: checkpoints no longer stall ~1 s each for MLflow; at 120 a
# fresh clone's run saw the first job FINISHED before the run-status check after the refusal: 200).
STEPS = 200


def _overrides(tmp: Path, mlflow_uri: str) -> list[str]:
    return [
        "model.name=poolformer_debug", "data.synthetic.num_classes=4", "data.synthetic.train_samples=512",
        "data.synthetic.val_samples=32", "data.synthetic.samples_per_shard=64", f"data.cache_dir={tmp / 'cache'}",
        "data.num_workers=0", "trainer.batch_size=16", f"trainer.max_steps={STEPS}", "trainer.checkpoint_every_steps=4",
        "trainer.precision=fp32", "optim.warmup_epochs=0", f"run.storage_path={tmp / 'runs'}", f"run.name={RUN}",
        "run.num_to_keep=null", f"tracking.tracking_uri={mlflow_uri}", "tracking.experiment=it-owned",
        "tracking.system_metrics=false",
    ]


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_second_job_under_a_live_run_name_exits_2_and_touches_nothing(ray_cluster, mlflow_server, tmp_path):
    overrides = _overrides(tmp_path, mlflow_server)
    results: dict[str, object] = {}
    first = threading.Thread(target=lambda: results.update(first=run_job(load_config(REPO / "jobs/configs/default.yaml", overrides))))
    first.start()
    run_dir = tmp_path / "runs" / RUN
    deadline = time.monotonic() + 240
    while not (run_dir / "checkpoint-00000008" / "COMPLETE").is_file():  # the first job is training
        assert first.is_alive() and time.monotonic() < deadline, "the first job did not reach step 8"
        time.sleep(0.2)
    folders = ["checkpoint-00000004", "checkpoint-00000008"]
    before = {name: _tree(run_dir / name) for name in folders}
    client = MlflowClient(mlflow_server)
    (exp_id,) = [e.experiment_id for e in client.search_experiments() if e.name == "it-owned"]
    (mlrun,) = client.search_runs([exp_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{RUN}'")
    assert mlrun.info.status == "RUNNING"

    env = {**os.environ, "PYTHONPATH": str(REPO / "platform")}
    second = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "pretrain.py"), "--config", str(REPO / "jobs/configs/default.yaml"),
         *overrides], capture_output=True, text=True, env=env, timeout=120,
    )
    assert second.returncode == 2, ("the second job was not refused (did the first end before? then give it "
                                    "more steps): " + second.stderr[-3000:])
    assert f"run.name='{RUN}'" in second.stderr and "in use by a live job" in second.stderr
    assert {name: _tree(run_dir / name) for name in folders} == before  # untouched while it was refused
    runs = client.search_runs([exp_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{RUN}'")
    assert [r.info.run_id for r in runs] == [mlrun.info.run_id]
    assert client.get_run(mlrun.info.run_id).info.status == "RUNNING"  # not reopened, not closed by the second

    first.join(timeout=600)
    assert results["first"].metrics["step"] == STEPS  # type: ignore[attr-defined]
    assert client.get_run(mlrun.info.run_id).info.status == "FINISHED"
    owner = json.loads((run_dir / ownership.OWNER_FILE).read_text())
    assert owner["released"] is True
    for folder in sorted(run_dir.glob("checkpoint-*")):  # each rank stamped every folder with the run's id
        stamps = [json.loads(p.read_text()) for p in sorted(folder.glob(f"{ownership.STAMP_PREFIX}*"))]
        assert [s["run_id"] for s in stamps] == [owner["run_id"]] * 2, folder
