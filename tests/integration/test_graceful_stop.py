"""Graceful stop (issue 25, the first two rows): SIGTERM to the driver of `python jobs/pretrain.py` while it
trains, once a checkpoint exists; then Ctrl-C to the same command run again. Each time the workers finish their
step and checkpoint it; the driver says where it stopped and how to continue, closes the MLflow run as KILLED with
the tag metaformer.stopped (sigterm, then sigint) and exits 143, then 130. The re-run resumes at exactly the
SIGTERM's step, and the metric history has every step once.

SIGTERM goes to the driver process, as Kubernetes' eviction and `ray job stop` send it; SIGINT goes to the
re-run's whole process group, as a terminal's Ctrl-C does. The job joins the session cluster through
RAY_ADDRESS, as a submitted job does. The re-run also uploads with run.on_upload_failure=continue (in the
training loop, reported to Ray only once every rank's part landed): its stop checkpoint takes that path.
A second Ctrl-C stopping at once is tests/unit/test_stop.py's (the real signal, twice, to the real handler); a
stopped run that is continued ending FINISHED without the tag is tests/integration/test_pipeline.py's.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from cli_job import pretrain_command
from mlflow import MlflowClient

from metaformer_platform.storage import checkpoint_format as fmt
from metaformer_platform.tracking.runs import RUN_NAME_TAG, STOPPED_TAG

REPO = Path(__file__).resolve().parents[2]
RUN = "it-stop"
STEPS = 400  # never reached: the job is stopped long before
EVERY = 5  # cli_job's checkpoint interval


def _stop(command: list[str], env: dict[str, str], ready: Callable[[str], bool], sig: signal.Signals) -> tuple[int, str]:
    """Run ``command`` until ``ready(output so far)``, then send ``sig`` (SIGINT: to its process group, as Ctrl-C
    does); its exit code and output."""
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    started = time.monotonic()
    try:
        while not ready("".join(lines)):
            assert proc.poll() is None, "".join(lines)[-4000:]
            assert time.monotonic() - started < 240, "the job was not ready within 240 s: " + "".join(lines)[-4000:]
            time.sleep(0.05)
        sent = time.monotonic()
        if sig == signal.SIGINT:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        proc.wait(timeout=60)
        reader.join(10)
        print(f"{sig.name} after {sent - started:.1f} s, exit {time.monotonic() - sent:.1f} s later")
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, "".join(lines)


def _trained_past(step: int) -> Callable[[str], bool]:
    """Whether the console shows a training step after ``step`` (its progress line: ``step N/400 | ...``)."""
    return lambda out: any(int(n) > step for n in re.findall(rf"^step +(\d+)/{STEPS} \|", out, re.MULTILINE))


def _stopped_at(out: str, signame: str, run_dir: Path) -> int:
    """The step of the driver's stop line, whose checkpoint must be complete (every rank's part)."""
    match = re.search(rf"pretrain stopped on {signame} at step (\d+): checkpoint (\S+)\. To continue from step \1, "
                      rf"run the same command again \(run.name={RUN} resumes\): python jobs/pretrain.py", out)
    assert match, out[-4000:]
    step = int(match[1])
    assert match[2] == str(run_dir / f"checkpoint-{step:08d}")
    assert fmt.incomplete_reason(run_dir / f"checkpoint-{step:08d}") is None
    assert f"{signame} received" in out and "PC: @" not in out  # our line, not Ray's crash dump
    return step


def test_sigterm_then_ctrl_c_checkpoint_the_next_step_close_the_run_as_stopped_and_the_rerun_resumes_there(
    ray_cluster, mlflow_server, tmp_path
):
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address_info["address"], "PYTHONPATH": str(REPO / "platform")}
    run_dir = tmp_path / "runs" / RUN
    command = pretrain_command(tmp_path, mlflow_server, run=RUN, experiment="it-stop", steps=STEPS, batch_size=16)
    first = run_dir / f"checkpoint-{EVERY:08d}" / fmt.COMPLETE_MARKER  # mid-interval, after a checkpoint
    code, out = _stop(command, env, lambda out: first.is_file() and _trained_past(EVERY + 1)(out), signal.SIGTERM)
    assert code == 143, out[-4000:]
    step = _stopped_at(out, "SIGTERM", run_dir)
    assert EVERY < step < STEPS

    client = MlflowClient(mlflow_server)
    (exp,) = [e.experiment_id for e in client.search_experiments() if e.name == "it-stop"]
    (mlrun,) = client.search_runs([exp], filter_string=f"tags.`{RUN_NAME_TAG}` = '{RUN}'")
    assert mlrun.info.status == "KILLED" and mlrun.data.tags[STOPPED_TAG] == "sigterm"
    assert sorted(m.step for m in client.get_metric_history(mlrun.info.run_id, "train/loss")) == list(range(1, step + 1))

    # The same command resumes at exactly that step; Ctrl-C once it has trained a step stops it the same way.
    again = [*command, "run.on_upload_failure=continue", "run.checkpoint_upload=sync"]
    code, out = _stop(again, env, _trained_past(step), signal.SIGINT)
    assert code == 130, out[-4000:]
    assert f"resuming at step {step}" in out and "Ctrl-C again stops at once" in out
    last = _stopped_at(out, "SIGINT", run_dir)
    assert step < last < STEPS
    run = client.get_run(mlrun.info.run_id)  # the same MLflow run, continued and stopped again
    assert run.info.status == "KILLED" and run.data.tags[STOPPED_TAG] == "sigint"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(steps) == list(range(1, last + 1))  # no step lost or doubled
    assert client.get_metric_history(run.info.run_id, "run/resumed_from_step")[-1].value == step
