"""A run is owned (issue 10, item 5): while a job trains under a run name, a second job under that name exits
2 before anything starts; the first job's checkpoints stay byte-identical, its MLflow run is the only one of
that name and the second job never reopens it; every checkpoint folder is stamped with the run's id.

"While it trains" is made certain, not raced against the machine's speed: once checkpoint 8 is on storage the
first job's two Ray Train workers are frozen (SIGSTOP; its driver, which holds the lease, runs on), the second
job and every check that needs the first one live run, and then the workers go on (SIGCONT) and the first job
finishes. The freeze lasts seconds, far below Ray Train's worker health-check timeout (10 min) and gloo's (30 min).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import devstack
from mlflow import MlflowClient

from metaformer_platform.config import load_config
from metaformer_platform.launch.driver import run_job
from metaformer_platform.storage import checkpoint_format as fmt
from metaformer_platform.tracking.runs import RUN_NAME_TAG

REPO = Path(__file__).resolve().parents[2]
RUN = "it-owned"
STEPS = 20  # a checkpoint every 4: the workers are frozen once 8 is complete; 12, 16 and 20 come after


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


def test_a_second_job_under_a_live_run_name_exits_2_and_touches_nothing(
    ray_cluster, mlflow_server, tmp_path, train_worker_pids
):
    overrides = _overrides(tmp_path, mlflow_server)
    results: dict[str, object] = {}
    since = time.time()
    first = threading.Thread(target=lambda: results.update(first=run_job(load_config(REPO / "jobs/configs/default.yaml", overrides))))
    first.start()
    run_dir = tmp_path / "runs" / RUN
    deadline = time.monotonic() + 240
    while not (run_dir / "checkpoint-00000008" / "COMPLETE").is_file():  # the first job is training
        assert first.is_alive() and time.monotonic() < deadline, "the first job did not reach step 8"
        time.sleep(0.01)
    workers = train_worker_pids(since)
    assert sorted(workers) == [0, 1], f"the first job's 2 workers are not in Ray's logs (or ended): {workers}"
    client = MlflowClient(mlflow_server)
    try:
        for pid in workers.values():
            os.kill(pid, signal.SIGSTOP)
        folders = ["checkpoint-00000004", "checkpoint-00000008"]
        before = {name: _tree(run_dir / name) for name in folders}
        (exp_id,) = [e.experiment_id for e in client.search_experiments() if e.name == "it-owned"]
        (mlrun,) = client.search_runs([exp_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{RUN}'")
        assert first.is_alive() and mlrun.info.status == "RUNNING"

        # A driver of its own, as a second submission would be, given a Ray address where nothing listens: the
        # lease lives on storage and the driver reads it with its other checks, before it joins Ray (joining
        # that address would fail, or hang, instead of the refusal).
        env = {**os.environ, "PYTHONPATH": str(REPO / "platform"), "RAY_ADDRESS": f"{devstack.HOST}:{devstack.Ports().get()}"}
        second = subprocess.run(
            [sys.executable, str(REPO / "jobs" / "pretrain.py"), "--config", str(REPO / "jobs/configs/default.yaml"),
             *overrides], capture_output=True, text=True, env=env, timeout=120,
        )
        assert second.returncode == 2, "the second job was not refused: " + second.stderr[-3000:]
        assert f"run.name='{RUN}'" in second.stderr and "in use by a live job" in second.stderr
        assert {name: _tree(run_dir / name) for name in folders} == before  # untouched while it was refused
        runs = client.search_runs([exp_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{RUN}'")
        assert [r.info.run_id for r in runs] == [mlrun.info.run_id]
        assert client.get_run(mlrun.info.run_id).info.status == "RUNNING"  # not reopened, not closed by the second
    finally:
        for pid in workers.values():  # every one goes on, even if another has gone meanwhile
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    first.join(timeout=600)
    assert results["first"].metrics["step"] == STEPS  # type: ignore[attr-defined]
    assert client.get_run(mlrun.info.run_id).info.status == "FINISHED"
    owner = json.loads((run_dir / fmt.OWNER_FILE).read_text())
    assert owner["released"] is True
    for folder in sorted(run_dir.glob("checkpoint-*")):  # each rank stamped every folder with the run's id
        stamps = [json.loads(p.read_text()) for p in sorted(folder.glob(f"{fmt.STAMP_PREFIX}*"))]
        assert [s["run_id"] for s in stamps] == [owner["run_id"]] * 2, folder
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == [f"checkpoint-{s:08d}" for s in range(4, STEPS + 1, 4)]
