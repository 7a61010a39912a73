"""Graceful stop's driver side (launch/stop.py), in-process: SIGTERM and SIGINT ask every running job to stop,
a second signal or the grace running out stops at once with the signal's exit code, and the line printed says
where the job stopped and how to continue."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from metaformer_platform.launch.stop import EXIT_CODES, JobStop, JobStopped, StopRequests


class _Flag:
    """A stand-in for the StopFlag actor's handle: ``flag.set.remote(reason)``."""

    def __init__(self) -> None:
        self.reasons: list[str] = []
        self.set = self
        self.raised = threading.Event()

    def remote(self, reason: str) -> None:
        self.reasons.append(reason)
        self.raised.set()


def _requests() -> tuple[StopRequests, list[str], list[int]]:
    lines: list[str] = []
    codes: list[int] = []

    def exit_(code: int) -> None:
        codes.append(code)

    return StopRequests(out=lines.append, exit=exit_), lines, codes


@pytest.mark.parametrize(("sig", "reason", "code"), [(signal.SIGTERM, "sigterm", 143), (signal.SIGINT, "sigint", 130)])
def test_a_signal_asks_every_running_job_to_stop_and_a_second_stops_at_once(sig, reason, code):
    stops, lines, codes = _requests()
    first, second = JobStop("a", grace_s=30, flag=_Flag()), JobStop("b", grace_s=30, flag=_Flag())
    closed: list[str] = []
    second.on_force.append(closed.append)
    with stops.handling(), stops.job(first), stops.job(second):
        assert signal.getsignal(sig) == stops._on_signal  # Ray's handler (exit at once, or abort) replaced
        os.kill(os.getpid(), sig)  # the real signal, handled in this (the main) thread
        time.sleep(0.05)
        assert first.flag.reasons == [reason] and second.flag.reasons == [reason]
        assert stops.reason == reason and codes == []  # the first signal: the jobs checkpoint, nothing exits
        assert reason.upper() in lines[0] and "next step boundary" in lines[0]
        late = JobStop("c", grace_s=30, flag=_Flag())
        with stops.job(late):  # a job that starts after the signal (a pipeline's next stage) is stopped at once
            assert late.flag.reasons == [reason]
        os.kill(os.getpid(), sig)  # again: at once, with the same exit code; the forced job's run is closed
        time.sleep(0.05)
    assert codes == [code] and EXIT_CODES[reason] == code
    assert closed == [f"{reason}-forced"] and "at once" in lines[-1]
    assert signal.getsignal(sig) != stops._on_signal  # the handler before is back


def test_the_grace_running_out_stops_at_once_and_a_timely_stop_cancels_it():
    stops, lines, codes = _requests()
    slow = JobStop("slow", grace_s=0.2, flag=_Flag())
    with stops.job(slow):
        stops.request("sigterm")
        time.sleep(0.6)
    assert codes == [143] and "no checkpoint within" in lines[-1]

    stops, lines, codes = _requests()
    with stops.job(JobStop("quick", grace_s=0.3, flag=_Flag())):
        stops.request("sigint")
    time.sleep(0.6)  # the job ended within its grace: no forced stop
    assert codes == []


def test_the_stop_message_names_the_step_the_checkpoint_and_the_command_to_continue(monkeypatch):
    monkeypatch.setattr("sys.argv", ["jobs/pretrain.py", "--config", "my config.yaml", "run.name=r1"])
    stopped = JobStopped("sigterm", "r1", 57, "/runs/r1/checkpoint-00000057")
    assert stopped.exit_code == 143
    text = stopped.describe()
    assert "stopped on SIGTERM at step 57: checkpoint /runs/r1/checkpoint-00000057" in text
    assert "To continue from step 57" in text and "run.name=r1 resumes" in text
    assert text.endswith("python jobs/pretrain.py --config 'my config.yaml' run.name=r1")
    assert JobStopped("sigint", "ev", None, None).exit_code == 130
    assert "nothing to save" in JobStopped("sigint", "ev", None, None).describe()


_JOINS_RAY = """
import os, signal, sys, time
import ray
from metaformer_platform.launch.stop import StopRequests
stops = StopRequests(out=print, exit=os._exit)
with stops.handling():
    ray.init(num_cpus=1, include_dashboard=False, configure_logging=False, _temp_dir=sys.argv[2])
    if sys.argv[1] == "reclaim":
        stops.reclaim()
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(1.0)
    print("reason:", stops.reason, flush=True)
ray.shutdown()
"""


@pytest.mark.timeout(180)
def test_joining_ray_takes_sigterm_over_and_reclaim_takes_it_back():
    """What the driver meets between joining Ray and starting its workers (a pod evicted while the job plans or
    opens its MLflow run): ``ray.init`` installs Ray's own SIGTERM handler (a stack dump, then exit 15; seen
    while building this: without ``reclaim`` the process ended so and never printed its reason); after
    ``reclaim`` the signal is a stop request like any other."""
    import shutil
    import subprocess
    import sys
    import tempfile

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local Ray of its own
    temp = tempfile.mkdtemp(prefix="rs-", dir="/tmp")  # Ray's socket paths under it must fit 107 bytes
    try:
        done = subprocess.run([sys.executable, "-c", _JOINS_RAY, "reclaim", temp], capture_output=True, text=True,
                              env=env, timeout=150)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    assert done.returncode == 0 and "reason: sigterm" in done.stdout, done.stderr[-2000:]
    assert "SIGTERM received at time" not in done.stderr  # Ray's handler (its stack dump) never ran
