"""A worker SIGKILLed from outside mid-run: Ray Train restarts the worker group, which resumes from the newest
complete checkpoint, and the job finishes as if nothing had happened.

The kill comes right after checkpoint 20 is on storage, before Ray's controller usually has collected its
report (it polls every 2 s): Ray alone would hand the restarted group checkpoint 10. Straight after the kill
the test also leaves what a death in the middle of the next upload leaves: rank 0's part of checkpoint 30,
its marker included, without rank 1's part. The job must resume from 20 (not 10, not the partial 30),
register it, delete the partial folder, keep one MLflow run with every step once, and compute the losses
of an uninterrupted run: the suite's DDP reference run of the same small job (``ddp_reference``), which the
strategy tests compare with too. The job ends at 30, so the partial 30 is removed and then written whole.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
from mlflow import MlflowClient

from metaformer_platform.launch.driver import run_job
from metaformer_platform.storage import checkpoint_format as fmt

KILL_AFTER, STEPS = 20, 30  # the small job runs 30 steps (tests/integration/conftest.py)
JOB = ("strategy.name=ddp", "trainer.checkpoint_every_steps=10", "run.num_to_keep=2", "run.max_failures=1",
       "tracking.experiment=it-faults")


class Killer(threading.Thread):
    """Waits for checkpoint KILL_AFTER to be complete on storage, SIGKILLs rank 0, and leaves a partial upload."""

    def __init__(self, run_dir: Path, worker_pids: Callable[[float], dict[int, int]]) -> None:
        super().__init__(daemon=True)
        self.run_dir, self.worker_pids, self.since = run_dir, worker_pids, time.time()
        self.killed_pid: int | None = None
        self.complete_at_kill: list[str] = []
        self.error: str | None = None

    def run(self) -> None:
        target = self.run_dir / f"checkpoint-{KILL_AFTER:08d}"
        deadline = time.monotonic() + 600  # generous: a loaded 2-core machine starts jobs slowly
        while not (target.is_dir() and fmt.is_complete(target)):
            if time.monotonic() > deadline:
                self.error = f"{target} never became complete"
                return
            time.sleep(0.01)
        pid = self.worker_pids(self.since).get(0)
        if pid is None:
            self.error = "no live rank-0 worker found in Ray's logs"
            return
        os.kill(pid, signal.SIGKILL)
        self.killed_pid = pid
        self.complete_at_kill = sorted(p.name for p in self.run_dir.glob("checkpoint-*") if fmt.is_complete(p))
        # What a death halfway through the next upload leaves: rank 0's part (marker and all), not rank 1's.
        partial = self.run_dir / f"checkpoint-{KILL_AFTER + 10:08d}"
        shutil.copytree(target, partial, ignore=shutil.ignore_patterns("*rank00001*"))
        state = fmt.load_tensors(partial / fmt.TRAINER_FILE)
        fmt.save_tensors({**state, "step": KILL_AFTER + 10}, partial / fmt.TRAINER_FILE)


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_a_worker_killed_mid_run_resumes_from_the_newest_complete_checkpoint(
    ray_cluster, mlflow_server, small_job, ddp_reference, train_worker_pids, capfd
):
    client = MlflowClient(mlflow_server)
    reference = ddp_reference  # the same job, never killed

    logs = Path(ray_cluster.address_info["session_dir"]) / "logs"
    run_dir = small_job.workdir / "runs" / "it-faults"
    killer = Killer(run_dir, train_worker_pids)
    killer.start()
    result = run_job(small_job.config("it-faults", *JOB))
    killer.join(5)
    assert killer.error is None, killer.error
    assert killer.killed_pid is not None and not psutil.pid_exists(killer.killed_pid)
    assert killer.complete_at_kill[-1] == f"checkpoint-{KILL_AFTER:08d}"

    # The job succeeded, at its final step, in one MLflow run.
    assert result.metrics["step"] == STEPS
    experiment = client.get_experiment_by_name("it-faults")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [result.mlflow_run_id]
    assert runs[0].info.status == "FINISHED"

    # It resumed once, from 20: the newest complete checkpoint (not Ray's 10, not the partial 30).
    assert _history(client, result.mlflow_run_id, "run/resumed_from_step") == [(KILL_AFTER, float(KILL_AFTER))]
    worker_logs = "".join(p.read_text(errors="replace") for p in logs.glob("worker-*.err") if p.stat().st_mtime >= killer.since)
    assert f"removed checkpoint folders Ray never registered: checkpoint-{KILL_AFTER + 10:08d}" in worker_logs
    lost = f"resuming from checkpoint-{KILL_AFTER:08d}, newer than the checkpoint-{KILL_AFTER - 10:08d} Ray handed over"
    print("Ray had lost the report of checkpoint 20:", lost in worker_logs)

    # Every step once, on a continuous axis, with the uninterrupted run's losses (DDP on CPU resumes exactly).
    losses = _history(client, result.mlflow_run_id, "train/loss")
    assert [s for s, _ in losses] == list(range(1, STEPS + 1))
    assert losses == _history(client, reference.mlflow_run_id, "train/loss")
    assert [s for s, _ in _history(client, result.mlflow_run_id, "val/top1")] == [STEPS]
    assert _history(client, result.mlflow_run_id, "val/loss") == _history(client, reference.mlflow_run_id, "val/loss")

    # No orphans: exactly the 2 checkpoints Ray keeps, both complete, with both ranks' parts.
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith("checkpoint-")) == [
        "checkpoint-00000020", "checkpoint-00000030"]
    assert all(fmt.is_complete(run_dir / name) for name in ("checkpoint-00000020", "checkpoint-00000030"))
    assert (run_dir / "checkpoint-00000030" / "rng-rank00001.pt").is_file()
    assert result.checkpoint_path == str(run_dir / "checkpoint-00000030")
    _resume_over_a_truncated_checkpoint(small_job, run_dir, client, reference.mlflow_run_id, capfd)


def _resume_over_a_truncated_checkpoint(small_job, run_dir: Path, client: MlflowClient, reference: str, capfd) -> None:
    """Issue 25: the finished run's newest checkpoint (30, registered) has its weights cut short, and the job is
    submitted again by name. Recovery sets 30 aside in _quarantine/ naming it, resumes from 20 once (no restart
    loop), redoes 21-30 into checkpoint-00000030-1 with the same losses; a later submit by name starts (Ray's
    snapshot still names 30: the placeholder keeps it loadable) and resumes from 30-1."""
    bad = run_dir / f"checkpoint-{STEPS:08d}"
    weights = bad / "model.pt"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    capfd.readouterr()
    result = run_job(small_job.config("it-faults", *JOB))
    console = capfd.readouterr().out
    assert console.count(f"checkpoint {bad.name} is not complete (COMPLETE lists files that are missing or short: "
                         "model.pt") == 1, console[-3000:]
    assert f"resuming from checkpoint-{KILL_AFTER:08d} instead" in console
    moved = list((run_dir / "_quarantine").glob(f"{bad.name}-*"))
    assert len(moved) == 1 and (moved[0] / "model.pt").stat().st_size < (run_dir / f"{bad.name}-1" / "model.pt").stat().st_size
    assert result.metrics["step"] == STEPS and result.checkpoint_path == str(run_dir / f"{bad.name}-1")
    assert client.get_run(result.mlflow_run_id).info.status == "FINISHED"
    assert _history(client, result.mlflow_run_id, "train/loss") == _history(client, reference, "train/loss")
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith("checkpoint-")) == [bad.name, f"{bad.name}-1"]
    assert fmt.is_complete(run_dir / f"{bad.name}-1")
    again = run_job(small_job.config("it-faults", *JOB))
    assert again.metrics["step"] == STEPS and again.checkpoint_path == str(run_dir / f"{bad.name}-1")
    assert "is not complete" not in capfd.readouterr().out
