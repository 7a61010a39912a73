"""Graceful stop: SIGTERM (Kubernetes' eviction, spot preemption, ``ray job stop``) and SIGINT (Ctrl-C).

The driver's main thread catches the signal (``StopRequests``: one per process, ``STOPS``) and tells every
running job (``JobStop``, registered for the length of its ``fit()``): a training job through its ``StopFlag``
actor, which rank 0's watcher thread waits on (``watch_stop``); rank 0 calls ``Trainer.request_stop()`` and
the ranks agree on the flag at each step, so every rank checkpoints the same step and ``train()`` returns.
An evaluation has nothing to save: its Ray Train controller is aborted (Ray's own Ctrl-C path).

The job's driver then closes its MLflow run as KILLED with the tag ``metaformer.stopped`` (``sigterm`` or
``sigint``: MLflow has no "stopped" status, and KILLED is what its UI shows for a run ended from outside),
prints the step and how to continue, and the entry point exits 143 (SIGTERM) or 130 (SIGINT). A re-run under
the same run name resumes from that checkpoint, as after any other interruption.

A second signal, or the grace (``run.stop_grace_s``) running out, stops at once: each job's MLflow run is
closed (tag ``<reason>-forced``) and its run name released, as far as that takes a few seconds, and the
process exits with the same code; the Ray Train controller and workers go with their driver.

Ray's own handlers are replaced while a job runs: ``ray.init`` installs a SIGTERM handler that exits at once,
and ``TorchTrainer.fit()`` a SIGINT handler that aborts the run without a checkpoint
(``driver._trainer_class`` turns that one off).
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from metaformer_platform.training.trainer import Trainer

log = logging.getLogger(__name__)

REASONS = {signal.SIGTERM: "sigterm", signal.SIGINT: "sigint"}
EXIT_CODES = {"sigterm": 128 + signal.SIGTERM, "sigint": 128 + signal.SIGINT}  # what a shell reports: 143, 130

FORCE_CLEANUP_S = 5.0  # what a forced stop waits for closing MLflow runs and releasing run names


def resubmit_command() -> str:
    """The command this process was started with, to run again (the same run name resumes)."""
    return shlex.join(["python", *sys.argv])


class JobStopped(Exception):
    """A job stopped on a signal, at a checkpoint (training) or with nothing to save (evaluation)."""

    def __init__(self, reason: str, run_name: str, step: int | None, checkpoint: str | None,
                 mlflow_hint: str | None = None) -> None:
        self.reason, self.run_name, self.step, self.checkpoint = reason, run_name, step, checkpoint
        self.mlflow_hint = mlflow_hint
        super().__init__(self.describe())

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.reason]

    def describe(self) -> str:
        """Where it stopped and how to continue."""
        signame = self.reason.upper()
        if self.step is None:
            return (f"stopped on {signame} (run {self.run_name}) before this attempt trained a step: nothing to "
                    f"save. Run the same command again to continue: {resubmit_command()}")
        where = f": checkpoint {self.checkpoint}" if self.checkpoint else ""
        return (f"stopped on {signame} at step {self.step}{where}. To continue from step {self.step}, run the "
                f"same command again (run.name={self.run_name} resumes): {resubmit_command()}")


class StopFlag:
    """The flag a driver raises for its job's workers (a Ray actor: ``make_flag``)."""

    def __init__(self) -> None:
        self._reason: str | None = None
        self._raised = threading.Event()

    def set(self, reason: str) -> None:
        self._reason = reason
        self._raised.set()

    def wait(self, timeout_s: float) -> str | None:
        """The reason once raised (at most ``timeout_s`` from now), else None."""
        self._raised.wait(timeout_s)
        return self._reason


def make_flag() -> Any:
    """A ``StopFlag`` actor (no CPU: it must never take one a worker waits for; threaded: waits block), on the
    driver's own node (``on_the_driver_node``: a drained node would otherwise never finish its drain, and Ray
    Train would keep retrying the old size on it)."""
    import ray

    from metaformer_platform.tracking.console import on_the_driver_node

    return ray.remote(StopFlag).options(num_cpus=0, max_concurrency=16,
                                        scheduling_strategy=on_the_driver_node()).remote()


def watch_stop(flag: Any, trainer: Trainer, poll_s: float = 10.0) -> threading.Event:
    """In a worker: a thread that calls ``trainer.request_stop()`` once the driver raises ``flag``. Set the
    returned event when training is over (the thread then ends within ``poll_s``)."""
    import ray

    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            try:
                reason = ray.get(flag.wait.remote(poll_s))
            except Exception as err:  # the driver (which owns the flag) is gone: Ray ends this worker anyway
                log.debug("stop flag unreachable: %s", err)
                return
            if reason and not done.is_set():
                log.info("%s on the driver: checkpointing at the next step boundary", reason.upper())
                trainer.request_stop()
                return

    threading.Thread(target=watch, name="stop-watch", daemon=True).start()
    return done


@dataclass
class JobStop:
    """A running job's end of a stop: how to ask it to stop, and what a forced stop closes."""

    run_name: str
    grace_s: float
    flag: Any = None  # a StopFlag actor (training jobs)
    controller: Any = None  # its Ray Train controller (when fit() runs in the main thread)
    on_force: list[Callable[[str], None]] = field(default_factory=list)  # close the MLflow run, release the name

    def request(self, reason: str) -> None:
        if self.flag is not None:
            self.flag.set.remote(reason)
        elif self.controller is not None:  # nothing to save: Ray Train's own abort
            self.controller.abort.remote()


class StopRequests:
    """The process's SIGTERM/SIGINT handlers (main thread only) and the jobs they stop."""

    def __init__(self, out: Callable[[str], None] | None = None, exit: Callable[[int], object] = os._exit) -> None:
        self.reason: str | None = None
        self._jobs: list[JobStop] = []
        self._lock = threading.Lock()
        self._out = out or (lambda line: print(line, file=sys.stderr, flush=True))
        self._exit = exit
        self._timer: threading.Timer | None = None
        self._handling = 0  # how many ``handling`` blocks are open (in the main thread)

    @contextmanager
    def handling(self) -> Iterator[None]:
        """Catch SIGTERM and SIGINT for as long as this lasts (from the main thread; elsewhere a no-op)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.getsignal(sig) for sig in REASONS}
        for sig in REASONS:
            signal.signal(sig, self._on_signal)
        self._handling += 1
        try:
            yield
        finally:
            self._handling -= 1
            for sig, handler in previous.items():
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

    def reclaim(self) -> None:
        """The handlers again, while ``handling``, over any installed since: ``ray.init`` installs Ray's own for
        SIGTERM (``sys.exit(15)``, after its core worker's stack dump), so a signal between joining Ray and the
        job's start ended the driver with no stop line and its MLflow run left RUNNING. Called once Ray is joined."""
        if self._handling and threading.current_thread() is threading.main_thread():
            for sig in REASONS:
                signal.signal(sig, self._on_signal)

    def check(self, run_name: str) -> None:
        """Raise ``JobStopped`` (nothing to save) when a signal came before the job's workers started."""
        if self.reason is not None:
            raise JobStopped(self.reason, run_name, None, None)

    @contextmanager
    def job(self, stop: JobStop) -> Iterator[JobStop]:
        """``stop`` is stopped with the others while this lasts (at once if a stop was asked already)."""
        with self._lock:
            self._jobs.append(stop)
            reason = self.reason
        if reason is not None:
            stop.request(reason)
        try:
            yield stop
        finally:
            with self._lock:
                self._jobs.remove(stop)
                if not self._jobs and self._timer is not None:  # every job stopped within the grace
                    self._timer.cancel()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        reason = REASONS[signal.Signals(signum)]
        if self.reason is None:
            self.request(reason)
        else:
            self.force(f"{reason.upper()} again")

    def request(self, reason: str) -> None:
        """Ask every running job to stop: checkpoint at the next step boundary, within the grace."""
        with self._lock:
            self.reason = reason
            jobs = list(self._jobs)
        grace = max((job.grace_s for job in jobs), default=0.0)
        again = "Ctrl-C again" if reason == "sigint" else "a second signal"
        if jobs:
            self._out(f"{reason.upper()} received: stopping at the next step boundary with a checkpoint (up to "
                      f"{grace:.0f} s; {again} stops at once)")
        else:  # planning, joining Ray, opening the run: no worker has started, none will
            self._out(f"{reason.upper()} received: stopping before the workers start ({again} stops at once)")
        for job in jobs:
            job.request(reason)
        if grace > 0:
            self._timer = threading.Timer(grace, self.force, args=(f"no checkpoint within {grace:.0f} s",))
            self._timer.daemon = True
            self._timer.start()

    def force(self, why: str) -> None:
        """Stop at once: close what each job holds (a few seconds at most), then exit with the stop's code."""
        reason = self.reason or "sigterm"
        self._out(f"stopping at once ({why}): steps since each job's last checkpoint are lost")
        with self._lock:
            cleanups = [fn for job in self._jobs for fn in job.on_force]

        def cleanup() -> None:
            for fn in cleanups:
                try:
                    fn(f"{reason}-forced")
                except Exception as err:  # on the way out: say it, and go on with the others
                    log.warning("while stopping at once: %s", err)

        worker = threading.Thread(target=cleanup, name="stop-cleanup", daemon=True)
        worker.start()
        worker.join(FORCE_CLEANUP_S)
        sys.stdout.flush()
        sys.stderr.flush()
        self._exit(EXIT_CODES[reason])


STOPS = StopRequests()
