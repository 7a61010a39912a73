"""Tracking never stops training (issue 25, fourth row): the MLflow server a job logs to is SIGKILLed after the
job's third logged step and started again on the same port and store 10 s or more later, while the job trains.

`python jobs/pretrain.py` runs as a user runs it (joining the session cluster through RAY_ADDRESS) against a
private `mlflow server`. The job trains on through the outage and two checkpoints (each flushes the tracker: it
must not wait for the server); its workers are then held (SIGSTOP) only while the server starts again, so that
the job is still training when it is back. The driver's console says once that tracking is out and once that it
is back, every metric step is in MLflow exactly once afterwards, and the run ends FINISHED.
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

from metaformer_platform.tracking.runs import RUN_NAME_TAG

REPO = Path(__file__).resolve().parents[2]
RUN = "it-tracking-outage"
STEPS = 40
OUTAGE_S = 10.0  # at least: the restart itself takes 8 s or more


def _command(tmp: Path, mlflow_uri: str) -> list[str]:
    return pretrain_command(tmp, mlflow_uri, run=RUN, experiment="it-outage", steps=STEPS, batch_size=8)


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


def test_an_mlflow_outage_mid_run_costs_no_training_and_no_metric(ray_cluster, tmp_path, train_worker_pids):
    store = tmp_path / "mlflow"
    servers = [devstack.start_mlflow(store / "store", log_dir=store)]
    uri, port = servers[0].url, servers[0].ports["http"]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address_info["address"], "PYTHONPATH": str(REPO / "platform")}
    since = time.time()
    proc = subprocess.Popen(_command(tmp_path, uri), cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    step_3 = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if re.match(rf"step +3/{STEPS} ", line):
                step_3.set()

    def wait_for(pred: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + 120
        while not pred():
            assert proc.poll() is None and time.monotonic() < deadline, what + ":\n" + "".join(lines)[-4000:]
            time.sleep(0.05)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    workers: dict[int, int] = {}
    started = time.monotonic()
    try:
        assert step_3.wait(240), "".join(lines)[-4000:]
        killed, killed_at = time.monotonic(), len(lines)
        _kill_server(servers[0])
        workers = train_worker_pids(since)
        assert sorted(workers) == [0, 1], workers
        # Training goes on without the server, through two checkpoints (each flushes the tracker first) ...
        wait_for(lambda: sum(line.startswith("checkpoint step") for line in lines[killed_at:]) >= 2,
                 "no two checkpoints while the server was out")
        trained = len(re.findall(rf"^step +\d+/{STEPS} ", "".join(lines[killed_at:]), re.M))
        # ... then the workers are held (SIGSTOP) while the server starts again, so that on a busy machine too the
        # job is still training when it is back (its start takes 8-40 s on 2 shared cores)
        for pid in workers.values():
            os.kill(pid, signal.SIGSTOP)
        time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - killed)))
        servers.append(devstack.start_mlflow(store / "store", port=port, log_dir=store))
        outage = time.monotonic() - killed
        back_at = len(lines)
    finally:
        for pid in workers.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    try:
        proc.wait(timeout=240)
        reader.join(timeout=10)
        print(f"job: {time.monotonic() - started:.1f} s; server out {outage:.1f} s; {trained} steps trained while out")
        out = "".join(lines)
        assert proc.returncode == 0, out[-4000:]
        assert trained >= 5, out[-4000:]  # between two checkpoints 5 steps apart
        # the console: one line when tracking went out, one when it was back, and steps trained after it
        down = [line for line in lines if line.startswith("tracking: MLflow is out")]
        back = [line for line in lines if line.startswith(f"tracking: MLflow at {uri} is back after")]
        assert len(down) == 1 and len(back) == 1, out[-4000:]
        assert f"MLflow at {uri}: no connection" in down[0]
        assert killed_at <= lines.index(down[0]) < back_at <= lines.index(back[0])
        assert re.search(rf"^step +\d+/{STEPS} ", "".join(lines[lines.index(back[0]):]), re.M), out[-4000:]

        client = MlflowClient(uri)
        (exp,) = [e.experiment_id for e in client.search_experiments() if e.name == "it-outage"]
        (run,) = client.search_runs([exp], filter_string=f"tags.`{RUN_NAME_TAG}` = '{RUN}'")
        assert run.info.status == "FINISHED"
        for key in ("train/loss", "train/lr", "train/images_per_s"):
            steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
            assert steps == list(range(1, STEPS + 1)), (key, steps)  # every step once: none lost, none doubled
        stalls = sorted(m.step for m in client.get_metric_history(run.info.run_id, "system/checkpoint_stall_s"))
        assert stalls == list(range(5, STEPS + 1, 5))
        assert "tracking/dropped_values" not in run.data.metrics  # far from the bound
    finally:
        if proc.poll() is None:
            proc.kill()
        for svc in servers:
            if svc.is_running():  # a private server with nothing to save: killed too (a graceful stop takes ~8 s)
                _kill_server(svc)
