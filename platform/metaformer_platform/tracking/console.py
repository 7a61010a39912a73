"""What a job prints: progress lines from rank 0, shown by the driver (so ``ray job logs`` has them too).

Rank 0 does not print: its output would reach the driver only through Ray's log streaming, which the
quiet default switches off (see ``ray_logs``), and would carry a ``(RayTrainWorker pid=...)`` prefix. It
sends small events instead through a ``ray.util.queue.Queue`` that the driver created; a driver thread
formats them (``Console``) and prints them on the driver's own stdout. Like timm's ``train.py`` and
torchtitan, one line per log cadence; a line per validation and checkpoint; a summary at the end::

    run poolformer_s12-demo: starting 1 Ray Train worker (ddp)
    training poolformer_s12 (ddp, 1 worker): 186 steps, 62 per epoch, global batch 64, lr 0.002
    step  10/186 | epoch 0.16 | loss 2.1074 | lr 6.46e-04 |   287 img/s | data  9% | eta 39s
    val    step 62 | top-1 52.40% | top-5 86.00% | loss 1.5198 | 500 images
    checkpoint step 100 -> /home/me/metaformer-runs/poolformer_s12-demo/checkpoint-00000100 | stall 0.27 s
    done: 186 steps in 1m16s | 256 img/s | data wait 4% | val top-1 72.60% top-5 90.40% | 2 checkpoints, stall 0.6 s
        | goodput 64% | MFU 8.3% | 0.0172 worker-hours

(one line; the last figures are the run ledger's, ``training.ledger``; a queue wait shows as ``in 2m39s (+41s
queued)``, a graceful stop as ``stopped at step 40 in ...``).

A progress bar (tqdm) is added below the lines only when the driver's stdout is a terminal; redirected
output (files, ``ray job logs``) gets the plain lines only. Workers' own warnings (``metaformer_platform``
loggers, WARNING and up) travel the same way, so a quiet console still shows bad shards or a resume.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TextIO, TypedDict, cast

if TYPE_CHECKING:
    from ray.train import UserCallback
    from ray.util.queue import Queue
    from tqdm import tqdm

    from metaformer_platform.strategies.base import DistContext
    from metaformer_platform.training.ledger import GroupMeter, GroupSnapshot, RunLedger
    from metaformer_platform.training.trainer import RunTracker, Trainer

log = logging.getLogger(__name__)

PLATFORM_LOGGER = "metaformer_platform"


def format_duration(seconds: float) -> str:
    """``3h02m``, ``4m05s``, ``12s``: compact, like the ETA of timm's and torchtitan's logs."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


class EventQueue(Protocol):
    """Where a worker puts its events: the driver's ``ray.util.queue.Queue`` (a list in tests)."""

    def put_nowait(self, item: Mapping[str, object]) -> None: ...


# The events, as ``ProgressSender`` sends them and ``Console`` reads them; each has ``kind`` and ``time``.
class _Event(TypedDict):
    kind: str
    time: float


class StartEvent(_Event):
    model: str
    strategy: str
    workers: int
    total_steps: int
    steps_per_epoch: int
    global_batch: int
    lr: float
    step: int


class _LedgerEvent(_Event, total=False):
    ledger: GroupSnapshot  # rank 0's run-ledger counters, with every event after the first step


class MetricsEvent(_LedgerEvent):
    """A training window (kind ``step``) or a validation (``val``)."""

    step: int
    metrics: dict[str, float]


class CheckpointEvent(_LedgerEvent):
    step: int
    where: str
    stall_s: float
    dropped: bool  # not stored: its upload failed and run.on_upload_failure=continue gave up on it


class LogEvent(_Event):
    rank: int
    level: str
    message: str


class FinishEvent(_LedgerEvent):
    step: int
    stopped: bool  # training returned early, on a stop request (launch/stop.py)


class ControllerEvent(_Event, total=False):
    """Ray Train's controller (``ledger_events``): started (``what`` start), changed state (``state``: its name),
    or placed a worker group (``placed``: when it asked, when its placement group was ready, how many workers)."""

    what: str
    state: str
    scheduled_at: float
    placed_at: float
    workers: int
    gpu: bool


class TrackingEvent(_Event):
    """The tracking server went out, or is back (``runs.Outbox``): one line each, not one per failed call."""

    message: str


Event = StartEvent | MetricsEvent | CheckpointEvent | LogEvent | FinishEvent | TrackingEvent | ControllerEvent


# -- worker side -----------------------------------------------------------------------------------


class ProgressSender:
    """A worker's end of the channel. On rank 0 it is also the Trainer's ``Tracker``: it passes every metric
    on to ``inner`` (MLflow) and sends step, validation and checkpoint events to the driver, plus ``start``
    and ``finish``; the other ranks only forward their warnings (``ForwardHandler``).

    A lost channel (driver gone) never stops training: the first failure is logged and sending stops.
    """

    def __init__(
        self, queue: EventQueue | None, checkpoint_root: str, inner: RunTracker | None = None, *, main: bool = True
    ) -> None:
        self.queue = queue
        self.checkpoint_root = checkpoint_root.rstrip("/")
        self.inner = inner
        self.main = main
        self._broken = False
        self._meter: GroupMeter | None = None  # rank 0's run-ledger counters (the Trainer's), once started

    def send(self, kind: str, **payload: object) -> None:
        """Put one event on the queue (a round trip to the queue actor; events come at the log cadence)."""
        if self._broken or self.queue is None:
            return
        if self._meter is not None and kind in ("step", "val", "checkpoint", "finish"):
            if (snapshot := self._meter.snapshot()) is not None:
                payload["ledger"] = snapshot
        try:
            self.queue.put_nowait({"kind": kind, "time": time.time(), **payload})
        except Exception as err:  # the queue actor died with its driver: training goes on, unseen
            self._broken = True
            log.warning("progress lines stop: the driver's queue is gone (%s)", err)

    def start(self, trainer: Trainer) -> None:
        """The job's shape, from the built Trainer: model, strategy, workers, steps, batch, lr, first step."""
        if not self.main:
            return
        cfg = trainer.cfg
        self._meter = trainer.meter
        self.send(
            "start", model=cfg.model.name, strategy=cfg.strategy.name, workers=trainer.dist.world_size,
            total_steps=trainer.total_steps, steps_per_epoch=trainer.steps_per_epoch,
            global_batch=cfg.global_batch, lr=trainer.lr, step=trainer.step,
        )

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """The Trainer's metrics, by what they describe: a training window, a validation, a checkpoint."""
        if self.inner is not None:
            self.inner.log_metrics(metrics, step)
        if not self.main:
            return
        if "train/loss" in metrics:
            self.send("step", step=step, metrics=dict(metrics))
        elif "val/top1" in metrics:
            self.send("val", step=step, metrics=dict(metrics))
        elif "system/checkpoint_stall_s" in metrics:
            from metaformer_platform.storage.checkpoint_format import checkpoint_name

            where = f"{self.checkpoint_root}/{checkpoint_name(step)}"  # launch.checkpoint_reporter's names
            self.send("checkpoint", step=step, where=where, stall_s=float(metrics["system/checkpoint_stall_s"]),
                      dropped=bool(metrics.get("system/checkpoint_dropped")))

    def log_params(self, params: Mapping[str, object]) -> None:
        """The inner tracker's params (the settings a worker resolved for its device)."""
        if self.inner is not None:
            self.inner.log_params(dict(params))

    def finish(self, step: int, *, stopped: bool = False) -> None:
        """Training ended at ``step``, or ``stopped`` there on request (the driver prints the summary)."""
        if self.main:
            self.send("finish", step=step, stopped=stopped)

    def flush(self) -> None:
        """The inner tracker's flush (metrics stored before a checkpoint is reported)."""
        if self.inner is not None:
            self.inner.flush()

    def close(self) -> None:
        """The inner tracker's close."""
        if self.inner is not None:
            self.inner.close()


def worker_progress(
    queue: EventQueue | None, run_dir: str, dist: DistContext, tracker: RunTracker, *, forward_warnings: bool
) -> tuple[ProgressSender, RunTracker]:
    """In a Ray Train worker: ``(progress, tracker)``, where rank 0's tracker also feeds the driver's console
    (through ``queue``, the driver's; None: no console) and, when ``forward_warnings`` (Ray's log streaming is
    off), every rank's platform warnings go there too."""
    from metaformer_platform.tracking.runs import MlflowTracker

    sender = ProgressSender(queue, run_dir, tracker, main=dist.is_main)
    if isinstance(tracker, MlflowTracker):  # its outbox says when the tracking server goes out and is back
        tracker.outbox.on_change = lambda line: sender.send("tracking", message=line)
    if forward_warnings and sender.queue is not None:
        logging.getLogger(PLATFORM_LOGGER).addHandler(ForwardHandler(sender, dist.rank))
    return sender, sender if dist.is_main else tracker


class ForwardHandler(logging.Handler):
    """Sends this worker's platform warnings (and worse) to the driver's console, naming the rank."""

    def __init__(self, sender: ProgressSender, rank: int) -> None:
        super().__init__(level=logging.WARNING)
        self.sender = sender
        self.rank = rank
        self.pid = os.getpid()

    def emit(self, record: logging.LogRecord) -> None:
        # Not from the channel itself (it would loop), nor from a forked DataLoader worker, where Ray's
        # client is not usable (that worker's warnings reach its rank's log file only).
        if record.name == __name__ or os.getpid() != self.pid:
            return
        from metaformer_platform.storage.redact import redact

        # scrubbed here, before the queue actor holds it, and again where the driver prints it
        self.sender.send("log", rank=self.rank, level=record.levelname, message=redact(self.format(record)))


def failure_notice(queue: EventQueue) -> UserCallback:
    """A Ray Train ``UserCallback`` (it runs in the controller) that puts each worker failure on the console:
    with Ray's log streaming off, a restart from the latest checkpoint would otherwise go unseen."""
    from ray.train import UserCallback

    class FailureNotice(UserCallback):
        def after_exception(self, run_context: object, worker_exceptions: dict[int, Exception]) -> None:
            from metaformer_platform.storage.redact import redact

            sender = ProgressSender(queue, "")
            for rank, err in sorted(worker_exceptions.items()):
                first = redact(str(err)).strip().splitlines()[-1:] or [""]
                sender.send("log", rank=rank, level="ERROR", message=f"worker failed: {type(err).__name__}: "
                            f"{first[0]} (Ray Train restarts the workers from the latest checkpoint up to "
                            "run.max_failures times)")

    return FailureNotice()


def ledger_events(queue: EventQueue) -> object:
    """A Ray Train controller callback (it runs in the controller) that puts on the console's queue what the run
    ledger needs from the controller: its start, its state changes, and when each worker group was asked for and
    when its placement group was ready (Ray's own measure of the wait, ``end_to_end_creation_latency_ms``)."""
    from ray.train.v2._internal.execution.callback import ControllerCallback, WorkerGroupCallback

    def state_name(state: object) -> str:
        return str(getattr(getattr(state, "_state_type", None), "name", type(state).__name__))

    class LedgerEvents(ControllerCallback, WorkerGroupCallback):
        asked: float | None = None
        gpu = False

        def _send(self, **payload: object) -> None:
            ProgressSender(queue, "").send("controller", **payload)

        def after_controller_start(self, train_run_context: object) -> None:
            self._send(what="start")

        def after_controller_state_update(self, previous_state: object, current_state: object) -> None:
            if state_name(current_state) != state_name(previous_state):
                self._send(what="state", state=state_name(current_state))

        def before_worker_group_start(self, worker_group_context: object) -> None:
            self.asked = time.time()
            resources = getattr(worker_group_context, "resources_per_worker", {}) or {}
            self.gpu = float(resources.get("GPU", 0)) > 0

        def after_worker_group_start(self, worker_group: object) -> None:
            from ray.util import placement_group_table

            now = time.time()
            asked = self.asked if self.asked is not None else now
            handle = worker_group.get_worker_group_state().placement_group_handle  # type: ignore[attr-defined]
            stats = placement_group_table(handle.placement_group).get("stats") or {}
            wait_s = float(stats.get("end_to_end_creation_latency_ms", 1000 * (now - asked))) / 1000
            self._send(what="placed", scheduled_at=asked, placed_at=min(now, asked + wait_s),
                       workers=len(worker_group.get_workers()), gpu=self.gpu)  # type: ignore[attr-defined]

    return LedgerEvents()


# -- driver side -----------------------------------------------------------------------------------


@dataclass
class _Stats:
    """What the summary needs, gathered from the events."""

    total_steps: int = 0
    global_batch: int = 0
    first_step: int | None = None  # step of the first training window seen (its time includes start-up)
    first_time: float = 0.0
    last_step: int = 0
    last_time: float = 0.0
    started: float = field(default_factory=time.time)
    images_per_s: list[float] = field(default_factory=list)
    data_wait: list[float] = field(default_factory=list)
    last_val: dict[str, float] = field(default_factory=dict)
    checkpoints: int = 0
    stall_s: float = 0.0
    stopped: bool = False  # training stopped on request (a graceful stop), not at its last step

    def add_window(self, step: int, now: float, images_per_s: float, data_wait: float | None) -> None:
        """A training window's step, time and speed."""
        if self.first_step is None:
            self.first_step, self.first_time = step, now
        self.last_step, self.last_time = step, now
        self.images_per_s.append(images_per_s)
        if data_wait is not None:
            self.data_wait.append(data_wait)


# A prefix for every line of the consoles made in this context: a pipeline running members at once sets
# "[MODEL/STAGE] " in each member's thread, so interleaved lines say whose they are.
LINE_PREFIX: contextvars.ContextVar[str] = contextvars.ContextVar("LINE_PREFIX", default="")


class Console:
    """Formats events into lines on ``out``; with a terminal, a tqdm bar stays below them."""

    def __init__(self, out: TextIO | None = None, *, bar: bool | None = None, prefix: str | None = None,
                 ledger: RunLedger | None = None) -> None:
        self.prefix = LINE_PREFIX.get() if prefix is None else prefix
        self.out = out or sys.stdout
        self.use_bar = bar if bar is not None else self.out.isatty()
        self.stats = _Stats()
        self.ledger = ledger  # the driver's run ledger, fed from the events (None: a console without one)
        self._bar: tqdm | None = None

    def print_line(self, line: str) -> None:
        """A line of the driver's own (above the bar, if there is one)."""
        self._print(line)

    def _print(self, line: str) -> None:
        line = self.prefix + line
        if self._bar is not None:
            self._bar.write(line, file=self.out)
        else:
            self.out.write(line + "\n")
            self.out.flush()

    def handle(self, event: Event) -> None:
        """Print what ``event`` (from ``ProgressSender``) says; feed the run ledger what it measures."""
        if self.ledger is not None:
            self._to_ledger(cast("Mapping[str, object]", event))
        handler = getattr(self, f"_on_{event['kind']}", None)
        if handler is not None:
            handler(event)

    def _to_ledger(self, e: Mapping[str, object]) -> None:
        ledger, kind, at = self.ledger, e["kind"], float(cast(float, e["time"]))
        assert ledger is not None
        if (snapshot := e.get("ledger")) is not None:
            ledger.progress(cast("GroupSnapshot", snapshot))
        if kind == "val" and "val/top1" in (metrics := cast("dict[str, float]", e["metrics"])):
            ledger.validated(int(cast(int, e["step"])), metrics["val/top1"], at)
        elif kind == "controller":
            c = cast(ControllerEvent, e)
            if c["what"] == "start":
                ledger.controller_started(at)
            elif c["what"] == "state":
                ledger.state(c["state"], at)
            elif c["what"] == "placed":
                ledger.placed(c["scheduled_at"], c["placed_at"], c["workers"], c["gpu"])

    def _on_start(self, e: StartEvent) -> None:
        s = self.stats
        s.first_step = None  # a restarted worker group: the ETA starts over
        s.total_steps, s.last_step, s.global_batch = int(e["total_steps"]), int(e["step"]), int(e["global_batch"])
        resumed = f", resuming at step {e['step']}" if e["step"] else ""
        self._print(
            f"training {e['model']} ({e['strategy']}, {e['workers']} worker{'' if e['workers'] == 1 else 's'}): "
            f"{s.total_steps} steps, "
            f"{e['steps_per_epoch']} per epoch, global batch {e['global_batch']}, lr {e['lr']:.3g}{resumed}"
        )
        if self.use_bar and self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=s.total_steps, initial=s.last_step, unit="step", file=self.out, dynamic_ncols=True)

    def eta_s(self, step: int, now: float, images_per_s: float) -> float:
        """Seconds left: the wall time per step since the first window (validations and checkpoints
        included, as the user waits for them too); the first window's own speed before that."""
        s = self.stats
        left = max(s.total_steps - step, 0)
        if s.first_step is not None and step > s.first_step and now > s.first_time:
            return left * (now - s.first_time) / (step - s.first_step)
        return left * s.global_batch / images_per_s if images_per_s > 0 else 0.0

    def _on_step(self, e: MetricsEvent) -> None:
        s, m, step = self.stats, e["metrics"], int(e["step"])
        ips = float(m.get("train/images_per_s", 0.0))
        eta = self.eta_s(step, e["time"], ips)
        wait = m.get("system/data_wait_frac")
        s.add_window(step, e["time"], ips, None if wait is None else float(wait))
        width = len(str(s.total_steps))
        parts = [
            f"step {step:>{width}}/{s.total_steps}",
            f"epoch {m.get('train/epoch', 0.0):.2f}",
            f"loss {m['train/loss']:.4f}",
            f"lr {m.get('train/lr', 0.0):.2e}",
            f"{ips:>5.0f} img/s",
        ]
        if wait is not None:
            parts.append(f"data {100 * wait:>2.0f}%")
        parts.append(f"eta {format_duration(eta)}")
        self._print(" | ".join(parts))
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix_str(f"loss {m['train/loss']:.3f}")

    def _on_val(self, e: MetricsEvent) -> None:
        m = e["metrics"]
        self.stats.last_val = dict(m)
        line = (
            f"val    step {e['step']} | top-1 {m['val/top1']:.2f}% | top-5 {m.get('val/top5', 0.0):.2f}% | "
            f"loss {m.get('val/loss', 0.0):.4f} | {int(m.get('val/samples', 0))} images"
        )
        if "val/ema_top1" in m:
            line += f" | ema top-1 {m['val/ema_top1']:.2f}%"
        self._print(line)

    def _on_checkpoint(self, e: CheckpointEvent) -> None:
        self.stats.stall_s += e["stall_s"]
        if e.get("dropped"):
            self._print(f"checkpoint step {e['step']} NOT stored (its upload failed; run.on_upload_failure=continue): "
                        f"training goes on, and a restart resumes from the last stored checkpoint | stall "
                        f"{e['stall_s']:.2f} s")
            return
        self.stats.checkpoints += 1
        self._print(f"checkpoint step {e['step']} -> {e['where']} | stall {e['stall_s']:.2f} s")

    def _on_log(self, e: LogEvent) -> None:
        from metaformer_platform.storage.redact import redact

        self._print(redact(f"[rank {e['rank']}] {e['level']}: {e['message']}"))

    def _on_tracking(self, e: TrackingEvent) -> None:
        self._print(e["message"])

    def _on_finish(self, e: FinishEvent) -> None:
        self.stats.last_step = int(e["step"])
        self.stats.stopped = bool(e.get("stopped", False))

    def summary(self) -> str:
        """One line: steps (or where it stopped), wall time (queue time apart), mean speed and data wait, last
        validation, checkpoints; with a ledger, goodput, MFU, worker-hours and, when priced, cost."""
        s = self.stats
        head = f"stopped at step {s.last_step}" if s.stopped else f"done: {s.last_step} steps"
        ledger_parts: list[str] = []
        if self.ledger is None:
            parts = [f"{head} in {format_duration(time.time() - s.started)}"]
        else:
            self.ledger.finish(stopped=s.stopped)
            head, ledger_parts = _ledger_parts(head, self.ledger)
            parts = [head]
        if s.images_per_s:
            parts.append(f"{sum(s.images_per_s) / len(s.images_per_s):.0f} img/s")
        if s.data_wait:
            parts.append(f"data wait {100 * sum(s.data_wait) / len(s.data_wait):.0f}%")
        if "val/top1" in s.last_val:
            parts.append(f"val top-1 {s.last_val['val/top1']:.2f}% top-5 {s.last_val.get('val/top5', 0.0):.2f}%")
        parts.append(f"{s.checkpoints} checkpoint{'s' * (s.checkpoints != 1)}, stall {s.stall_s:.1f} s")
        return " | ".join(parts + ledger_parts)

    def close(self, *, succeeded: bool) -> None:
        """Remove the bar; print the summary when training got anywhere."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if succeeded and self.stats.total_steps:
            self._print(self.summary())


def _ledger_parts(head: str, ledger: RunLedger) -> tuple[str, list[str]]:
    """This attempt's time (its queue time apart) after ``head``, and the ledger's figures for the ``done:`` line."""
    from metaformer_platform.training import ledger as lg

    m = lg.summarize([ledger.attempt])["metrics"]
    queued = m[lg.QUEUED]
    head = f"{head} in {format_duration(m[lg.WALL] - queued)}"
    if queued >= 1:
        head += f" (+{format_duration(queued)} queued)"
    summary = ledger.summary()  # the run's, over every attempt: what MLflow gets
    total = summary["metrics"]
    parts = [f"goodput {100 * total[lg.GOODPUT]:.0f}%"]
    if lg.MFU in total:
        parts.append(f"MFU {100 * total[lg.MFU]:.2g}%")  # two digits: a debug model's is hundredths of a percent
    parts.append(f"{total[lg.WORKER_HOURS]:.3g} {'accelerator' if summary['gpu'] else 'worker'}-hours")
    if lg.COST in total:
        parts.append(f"cost {total[lg.COST]:.2f} {ledger.currency}")
    return head, parts


def on_the_driver_node() -> Any:
    """Ray's placement (hard) on this driver's node, for the job's helper actors (the console's queue, the stop
    flag). On a worker's node, where Ray may put a 0-CPU actor, one dies with that node, and every later line or
    stop with it (seen: the elastic job's lost node took the queue along), and it keeps a drained node busy, so
    the node never finishes its drain (seen: tests/integration/test_drain_job.py hung on the stop flag)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)


_WAKE = None  # what ProgressPrinter puts in its own queue to end the pump's wait: no event is None


class ProgressPrinter:
    """The driver's end: a queue actor for the workers to send to, and a thread printing what arrives.

    Made after ``ray.init``: ``printer.queue`` goes into the worker payload; then ``with printer:`` around
    ``fit()`` prints while training runs, and ends the queue actor.
    """

    def __init__(self, greeting: str | None = None, console: Console | None = None) -> None:
        from ray.util.queue import Queue

        self.greeting = greeting  # printed as training starts up: workers can take a while to come up
        self.console = console or Console()
        # num_cpus=0: the queue must never take a CPU a worker is waiting for
        self.queue: Queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": on_the_driver_node()})
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> ProgressPrinter:
        if self.greeting:
            self.console.print_line(self.greeting)
        self._thread = threading.Thread(target=self._pump, name="progress-printer", daemon=True)
        self._thread.start()
        return self

    def _pump(self) -> None:
        from ray.util.queue import Empty

        while not self._stop.is_set():
            try:
                event = self.queue.get(timeout=0.5)
            except Empty:
                continue
            except Exception as err:  # the queue actor is gone (cluster shutting down)
                log.warning("progress lines stop: %s", err)
                return
            if event is not _WAKE:
                self.console.handle(event)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            # The pump waits in a get when fit() returns (the workers' last events came just before): without
            # this it would time out first, half a second of every job's end
            with contextlib.suppress(Exception):
                self.queue.put_nowait(_WAKE)
            self._thread.join(timeout=5)
        try:  # what arrived after the last poll
            for event in self.queue.get_nowait_batch(self.queue.qsize()):
                if event is not _WAKE:
                    self.console.handle(event)
        except Exception as err:
            log.warning("the last progress lines were lost: %s", err)
        self.console.close(succeeded=exc[0] is None)
        self.queue.shutdown(force=True)
