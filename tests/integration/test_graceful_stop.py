"""Graceful stop (issue 25, first row): SIGTERM to the driver of `python jobs/pretrain.py` while it trains,
once a checkpoint exists. The workers finish their step and checkpoint it; the driver says where it stopped and
how to continue, closes the MLflow run as KILLED with the tag metaformer.stopped=sigterm and exits 143. The
same command again resumes at exactly that step: the metric history has every step once.

The signal goes to the driver process, as Kubernetes' eviction and `ray job stop` send it; the job joins the
session cluster through RAY_ADDRESS, as a submitted job does. (SIGINT's path differs only in its name and exit
code, 130: tests/unit/test_stop.py sends both signals to a real handler.)
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

from cli_job import pretrain_command
from mlflow import MlflowClient

from metaformer_platform.storage import checkpoint_format as fmt
from metaformer_platform.tracking.runs import RUN_NAME_TAG, STOPPED_TAG

REPO = Path(__file__).resolve().parents[2]
RUN = "it-stop"
STEPS = 400  # never reached: the job is stopped long before


def _command(tmp: Path, mlflow_uri: str, steps: int = STEPS) -> list[str]:
    return pretrain_command(tmp, mlflow_uri, run=RUN, experiment="it-stop", steps=steps, batch_size=16)


def test_sigterm_checkpoints_the_next_step_closes_the_run_as_stopped_and_the_rerun_resumes_there(
    ray_cluster, mlflow_server, tmp_path
):
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address_info["address"], "PYTHONPATH": str(REPO / "platform")}
    run_dir = tmp_path / "runs" / RUN
    proc = subprocess.Popen(_command(tmp_path, mlflow_server), cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (run_dir / "checkpoint-00000005" / fmt.COMPLETE_MARKER).is_file():  # training, a checkpoint out
            assert proc.poll() is None and time.monotonic() < deadline, "the job did not reach step 5"
            time.sleep(0.05)
        time.sleep(1.0)  # a few steps past it, mid-interval
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    print(f"SIGTERM to exit: {took:.1f} s")
    assert proc.returncode == 143, out[-4000:]
    match = re.search(r"pretrain stopped on SIGTERM at step (\d+): checkpoint (\S+)\. To continue from step \1, "
                      rf"run the same command again \(run.name={RUN} resumes\): python jobs/pretrain.py", out)
    assert match, out[-4000:]
    step = int(match[1])
    assert 5 < step < STEPS
    assert match[2] == str(run_dir / f"checkpoint-{step:08d}")
    assert fmt.incomplete_reason(run_dir / f"checkpoint-{step:08d}") is None  # COMPLETE, every rank's part
    assert "SIGTERM received" in out and "PC: @" not in out  # our line, not Ray's crash dump

    client = MlflowClient(mlflow_server)
    (exp,) = [e.experiment_id for e in client.search_experiments() if e.name == "it-stop"]
    (mlrun,) = client.search_runs([exp], filter_string=f"tags.`{RUN_NAME_TAG}` = '{RUN}'")
    assert mlrun.info.status == "KILLED" and mlrun.data.tags[STOPPED_TAG] == "sigterm"
    assert sorted(m.step for m in client.get_metric_history(mlrun.info.run_id, "train/loss")) == list(range(1, step + 1))

    # The same command resumes at exactly that step (4 steps more, to keep it short).
    again = subprocess.run(_command(tmp_path, mlflow_server, steps=step + 4), cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"resuming at step {step}" in again.stdout
    run = client.get_run(mlrun.info.run_id)
    assert run.info.status == "FINISHED" and STOPPED_TAG not in run.data.tags
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(steps) == list(range(1, step + 5))  # no step lost or doubled
    assert client.get_metric_history(run.info.run_id, "run/resumed_from_step")[-1].value == step
