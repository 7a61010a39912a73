"""Graceful stop and tracking outages (issue 25), on one run of `python jobs/pretrain.py` started three times, as a
user runs it (joining the session cluster through RAY_ADDRESS) against a private `mlflow server`:

1. The server is SIGKILLed after the job's third logged step and started again on the same port and store 10 s
   or more later. The job trains on through the outage and two checkpoints (each flushes the tracker: it must
   not wait for the server); its workers are held (SIGSTOP) only while the server starts again, so that the job
   is still training when it is back. The console says once that tracking is out and once that it is back.
   After the next checkpoint the driver gets SIGTERM (Kubernetes' eviction, `ray job stop`): the workers finish
   their step and checkpoint it, the driver says where it stopped and how to continue, closes the MLflow run as
   KILLED with the tag metaformer.stopped=sigterm and exits 143. Every metric step is in MLflow exactly once.
2. The same command resumes at exactly that step; after its next checkpoint the whole process group gets SIGINT
   (Ctrl-C): the same stop, exit 130, tag sigint.
3. The same command with the step reached as its length: the run ends FINISHED, the stop tag gone, every step
   once across the three jobs.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import devstack
from cli_job import pretrain_command
from mlflow import MlflowClient

from metaformer_platform.storage import checkpoint_format as fmt
from metaformer_platform.tracking.runs import RUN_NAME_TAG, STOPPED_TAG

REPO = Path(__file__).resolve().parents[2]
RUN = "it-stop"
STEPS = 400  # never reached: the job is stopped long before
OUTAGE_S = 10.0  # at least: the restart itself takes 8 s or more
KEYS = ("train/loss", "train/lr", "train/images_per_s")


def _kill_server(svc: devstack.Service) -> None:
    """SIGKILL to the server's process group (`mlflow server` and its uvicorn worker), by the leader's PID; back
    once nothing listens on its port (a killed process may linger as a zombie a while, holding no socket)."""
    os.killpg(svc.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while True:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(svc.pid, os.WNOHANG)  # the leader is this process's child: reap it
        try:
            socket.create_connection(("127.0.0.1", svc.ports["http"]), timeout=1).close()
        except OSError:
            return
        assert time.monotonic() < deadline, "the MLflow server still listens after SIGKILL"
        time.sleep(0.05)


class Job:
    """`python jobs/pretrain.py` in a session of its own (so that a Ctrl-C can go to its whole group), its output
    read line by line as it comes."""

    def __init__(self, tmp: Path, uri: str, env: dict[str, str], steps: int = STEPS) -> None:
        self.proc = subprocess.Popen(
            pretrain_command(tmp, uri, run=RUN, experiment="it-stop", steps=steps, batch_size=8), cwd=REPO, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def out(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, after: int = 0, timeout: float = 240) -> int:
        """The index of the first line from ``after`` on that matches ``pattern``, waiting for it."""
        deadline = time.monotonic() + timeout
        while True:
            for i in range(after, len(self.lines)):
                if re.search(pattern, self.lines[i]):
                    return i
            assert self.proc.poll() is None and time.monotonic() < deadline, f"{self.out[-4000:]}\nno {pattern!r} above"
            time.sleep(0.05)

    def stop(self, sig: signal.Signals, group: bool = False) -> float:
        """Send ``sig`` (to the process group when ``group``), wait for the exit; seconds it took."""
        sent = time.monotonic()
        os.killpg(self.proc.pid, sig) if group else self.proc.send_signal(sig)
        self.finish()
        return time.monotonic() - sent

    def finish(self, timeout: float = 240) -> int:
        try:
            self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        self.reader.join(timeout=10)
        return self.proc.returncode

    def stopped_at(self, signame: str, run_dir: Path) -> int:
        """The step of the driver's stop line (checked whole), whose checkpoint is complete."""
        match = re.search(rf"pretrain stopped on {signame} at step (\d+): checkpoint (\S+)\. To continue from step "
                          rf"\1, run the same command again \(run.name={RUN} resumes\): python jobs/pretrain.py", self.out)
        assert match, self.out[-4000:]
        step = int(match[1])
        assert match[2] == str(run_dir / f"checkpoint-{step:08d}")
        assert fmt.incomplete_reason(run_dir / f"checkpoint-{step:08d}") is None  # COMPLETE, every rank's part
        assert f"{signame} received" in self.out and "PC: @" not in self.out  # our line, not Ray's crash dump
        return step


def _steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _outage_then_sigterm(job: Job, servers: list[devstack.Service], store: Path, pids: Callable[[], dict[int, int]],
                         run_dir: Path) -> tuple[int, int]:
    """The first job: the server killed after step 3 and back 10 s or more later while the job trains; SIGTERM
    after the checkpoint that follows. Returns (steps trained while the server was out, the step it stopped at)."""
    port = servers[0].ports["http"]
    killed_at = job.wait_for(rf"^step +3/{STEPS} ") + 1
    killed = time.monotonic()
    _kill_server(servers[0])
    workers = pids()
    assert sorted(workers) == [0, 1], workers
    try:
        # Training goes on without the server, through two checkpoints (each flushes the tracker first) ...
        job.wait_for("^checkpoint step", job.wait_for("^checkpoint step", killed_at) + 1)
        trained = len(re.findall(rf"^step +\d+/{STEPS} ", "".join(job.lines[killed_at:]), re.M))
        # ... then the workers are held (SIGSTOP) while the server starts again, so that on a busy machine too the
        # job is still training when it is back (its start takes 8-40 s on 2 shared cores)
        for pid in workers.values():
            os.kill(pid, signal.SIGSTOP)
        time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - killed)))
        servers.append(devstack.start_mlflow(store / "store", port=port, log_dir=store))
    finally:
        for pid in workers.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    back = job.wait_for("^tracking: MLflow at .* is back after", killed_at)
    job.wait_for("^checkpoint step", back)  # a checkpoint after the outage, then a few steps past it
    time.sleep(1.0)
    print(f"server out {time.monotonic() - killed:.1f} s, {trained} steps trained while out; "
          f"SIGTERM to exit: {job.stop(signal.SIGTERM):.1f} s")
    assert job.proc.returncode == 143, job.out[-4000:]
    down = [line for line in job.lines if line.startswith("tracking: MLflow is out")]
    came_back = [line for line in job.lines if line.startswith(f"tracking: MLflow at {servers[0].url} is back after")]
    assert len(down) == 1 and len(came_back) == 1, job.out[-4000:]
    assert f"MLflow at {servers[0].url}: no connection" in down[0]
    assert killed_at <= job.lines.index(down[0]) < job.lines.index(came_back[0])
    assert re.search(rf"^step +\d+/{STEPS} ", "".join(job.lines[job.lines.index(came_back[0]):]), re.M), job.out[-4000:]
    return trained, job.stopped_at("SIGTERM", run_dir)


def test_a_run_through_an_mlflow_outage_sigterm_and_ctrl_c_keeps_every_step_once(ray_cluster, tmp_path,
                                                                                   train_worker_pids):
    store = tmp_path / "mlflow"
    servers = [devstack.start_mlflow(store / "store", log_dir=store)]
    uri = servers[0].url
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address_info["address"], "PYTHONPATH": str(REPO / "platform")}
    run_dir = tmp_path / "runs" / RUN
    client = MlflowClient(uri)
    try:
        since = time.time()
        job = Job(tmp_path, uri, env)
        try:
            trained, step = _outage_then_sigterm(job, servers, store, lambda: train_worker_pids(since), run_dir)
        finally:
            job.finish(timeout=60)
        assert trained >= 5 and 5 < step < STEPS  # between two checkpoints 5 steps apart
        (exp,) = [e.experiment_id for e in client.search_experiments() if e.name == "it-stop"]
        (mlrun,) = client.search_runs([exp], filter_string=f"tags.`{RUN_NAME_TAG}` = '{RUN}'")
        assert mlrun.info.status == "KILLED" and mlrun.data.tags[STOPPED_TAG] == "sigterm"
        for key in KEYS:  # every step once, through the outage: none lost, none doubled
            assert _steps(client, mlrun.info.run_id, key) == list(range(1, step + 1)), key
        stalls = _steps(client, mlrun.info.run_id, "checkpoint/stall_s")
        assert stalls == sorted({*range(5, step + 1, 5), step})  # every 5 steps, and the stop's
        assert "tracking/dropped_values" not in mlrun.data.metrics  # far from the bound

        # The same command resumes at exactly that step; Ctrl-C (SIGINT to its process group) after its next
        # checkpoint stops it the same way.
        job = Job(tmp_path, uri, env)
        try:
            job.wait_for(rf"resuming at step {step}\b")
            job.wait_for("^checkpoint step", job.wait_for(rf"^step +{step + 1}/{STEPS} "))
            print(f"Ctrl-C to exit: {job.stop(signal.SIGINT, group=True):.1f} s")
        finally:
            job.finish(timeout=60)
        assert job.proc.returncode == 130, job.out[-4000:]
        step2 = job.stopped_at("SIGINT", run_dir)
        assert step < step2 < STEPS
        run = client.get_run(mlrun.info.run_id)
        assert run.info.status == "KILLED" and run.data.tags[STOPPED_TAG] == "sigint"
        assert _steps(client, run.info.run_id, "train/loss") == list(range(1, step2 + 1))
        assert client.get_metric_history(run.info.run_id, "run/resumed_from_step")[-1].value == step

        # Once more, as long as the steps reached: the run ends FINISHED, no longer marked stopped.
        again = Job(tmp_path, uri, env, steps=step2)
        assert again.finish(timeout=300) == 0, again.out[-4000:]
        run = client.get_run(mlrun.info.run_id)
        assert run.info.status == "FINISHED" and STOPPED_TAG not in run.data.tags
        for key in KEYS:
            assert _steps(client, run.info.run_id, key) == list(range(1, step2 + 1)), key
    finally:
        for svc in servers:
            if svc.is_running():  # a private server with nothing to save: killed too (a graceful stop takes ~8 s)
                _kill_server(svc)
