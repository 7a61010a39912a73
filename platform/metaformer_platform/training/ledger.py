"""The run ledger: where every second of a run's wall time went, across worker-group restarts, failures,
elastic resizes and driver restarts; its goodput, worker-hours, cost, MFU and time to accuracy.

Two ends, both cheap:

- ``GroupMeter``, on rank 0 of each worker group: counters the Trainer adds to at its log cadence, around a
  validation and a checkpoint (nothing per step). A snapshot of it rides on every progress event rank 0 sends
  to the driver's console anyway (``tracking.console``).
- ``RunLedger``, on the driver: the driver's own start and end, the Ray Train controller's state changes and
  worker-group placements (a controller callback, ``tracking.console.ledger_events``), and rank 0's snapshots,
  laid on one timeline (``time.time()`` of each process: nodes' clocks are assumed in sync to well under a
  second). ``summarize`` turns one or more driver attempts into the categories below, which add up to the
  attempts' wall time by construction: each second falls in exactly one.

Categories: ``queued`` (the first worker group's wait for its placement group, from the controller's first
SCHEDULING state), ``starting`` (the driver's planning, the controller's start, worker start and imports up to
the first step), ``train`` (productive step
time: ``data_wait`` + ``compute``, compute including the few between-step bookkeeping calls), ``validation``,
``checkpoint_stall``, ``lost_work`` (the step time of steps trained again after a restore: steps redone x that
group's mean step time), ``recovery_gap`` (from a failed group's last progress to the next group's first step),
``resize_gap`` (the same around an elastic resize) and ``shutdown`` (the last progress to the driver's end).
Steps a failed group took after its last progress event reached the driver are in the gap, not in lost work.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import TypedDict

# Operational metrics (the ledger's, the checkpoint's, the data's, the estimate's) go under MLflow's `system/`
# namespace: MLflow's run page shows `system/` keys on its System metrics tab, beside its own CPU/GPU monitor's,
# and keeps its Model metrics tab for the curves (train/loss, train/lr, val/top1, train/images_per_s). Every
# operational key the platform logs starts with one of these; any other `system/` key is the monitor's.
OPERATIONAL_PREFIXES = tuple(f"system/{area}_"
                             for area in ("checkpoint", "data", "ledger", "estimate", "train", "step"))


def monitor_metric(key: str) -> bool:
    """Whether ``key`` is MLflow's system metrics monitor's (its own step axis, not training steps)."""
    return key.startswith("system/") and not key.startswith(OPERATIONAL_PREFIXES)


# The MLflow names, read by the family report and the week-over-week comparison (runs logged before the
# `system/` rename carry `ledger/*`: the comparison shows no previous figure for them).
WALL = "system/ledger_wall_s"
QUEUED = "system/ledger_queued_s"
STARTING = "system/ledger_starting_s"
TRAIN = "system/ledger_train_s"
DATA_WAIT = "system/ledger_data_wait_s"
COMPUTE = "system/ledger_compute_s"
VALIDATION = "system/ledger_validation_s"
CHECKPOINT_STALL = "system/ledger_checkpoint_stall_s"
LOST_WORK = "system/ledger_lost_work_s"
RECOVERY_GAP = "system/ledger_recovery_gap_s"
RESIZE_GAP = "system/ledger_resize_gap_s"
SHUTDOWN = "system/ledger_shutdown_s"
GOODPUT = "system/ledger_goodput"
WORKER_HOURS = "system/ledger_worker_hours"
COST = "system/ledger_cost"
MFU = "system/ledger_mfu"
TIME_TO_FINAL_TOP1 = "system/ledger_time_to_final_top1_s"
WORKER_HOURS_TO_FINAL_TOP1 = "system/ledger_worker_hours_to_final_top1"
CURRENCY_TAG = "metaformer.ledger.currency"
ARTIFACT = "ledger.json"  # in the run folder (every attempt appends) and as the MLflow run's artifact

# The categories that add up to the wall time, by the MLflow name of each.
CATEGORIES = (QUEUED, STARTING, DATA_WAIT, COMPUTE, VALIDATION, CHECKPOINT_STALL, LOST_WORK, RECOVERY_GAP,
              RESIZE_GAP, SHUTDOWN)
# The controller states that end a worker group (it is shut down on the way to the next)
_RELEASING = ("RESTARTING", "RESIZING", "SHUTTING_DOWN", "ERRORED", "ABORTED", "FINISHED")


class GroupSnapshot(TypedDict):
    """What rank 0 of a worker group has measured so far (cumulative since the group started)."""

    group: str
    workers: int
    gpu: bool
    global_batch: int
    from_step: int  # the step the group started (resumed) at
    step: int  # the last step it finished
    began: float  # time.time() as its first step began
    time: float  # time.time() of this snapshot
    data_s: float
    phases: dict[str, float]  # the step timer's forward, backward, optimizer (and allreduce) seconds
    validation_s: float
    checkpoint_s: float
    flops_per_sample: float | None  # training FLOPs (forward + backward) of one sample
    peak_flops: float | None  # one worker's device peak at the run's precision


@dataclass
class GroupMeter:
    """Rank 0's account of its worker group; the Trainer adds to it at its log cadence, validations and
    checkpoints (no per-step cost), the progress channel sends ``snapshot()`` with its events."""

    workers: int
    gpu: bool
    global_batch: int
    flops_per_sample: float | None = None
    peak_flops: float | None = None
    group: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    from_step: int = 0
    step: int = 0
    began: float | None = None
    data_s: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)
    validation_s: float = 0.0
    checkpoint_s: float = 0.0

    def begin(self, step: int) -> None:
        """The group's first step begins now, at ``step`` (its resume step)."""
        self.from_step = self.step = step
        self.began = time.time()

    def add_window(self, times: dict[str, float], steps: int, step: int) -> None:
        """A log window of ``steps`` steps ending at ``step``: the step timer's mean seconds per step (``window()``)."""
        self.step = step
        for key, mean in times.items():
            if key == "system/step_data_s":
                self.data_s += mean * steps
            elif key != "system/step_s":
                phase = key.removeprefix("system/step_").removesuffix("_s")
                self.phases[phase] = self.phases.get(phase, 0.0) + mean * steps

    def snapshot(self) -> GroupSnapshot | None:
        """The counters now (None before the first step)."""
        if self.began is None:
            return None
        return GroupSnapshot(
            group=self.group, workers=self.workers, gpu=self.gpu, global_batch=self.global_batch,
            from_step=self.from_step, step=self.step, began=self.began, time=time.time(), data_s=self.data_s,
            phases=dict(self.phases), validation_s=self.validation_s, checkpoint_s=self.checkpoint_s,
            flops_per_sample=self.flops_per_sample, peak_flops=self.peak_flops,
        )


def mfu(flops_per_sample: float | None, samples_per_s: float, peak_flops: float | None, workers: int) -> float | None:
    """Model FLOPs utilisation: model FLOPs per second over the workers' summed peak (None: a figure unknown)."""
    if not flops_per_sample or not peak_flops or workers <= 0:
        return None
    return flops_per_sample * samples_per_s / (peak_flops * workers)


@dataclass
class Group:
    """A worker group of one driver attempt, as the driver saw it."""

    scheduled_at: float | None = None  # the controller began to start it (its placement group requested)
    placed_at: float | None = None  # its placement group was ready
    released_at: float | None = None  # the controller moved on from it (failure, resize, the end)
    workers: int = 0
    gpu: bool = False
    cause: str = "start"  # why it was started: start, recovery or resize
    progress: GroupSnapshot | None = None


@dataclass
class Attempt:
    """One driver's run of the job (a re-run of the same run name appends another)."""

    started: float
    ended: float | None = None
    stopped: bool = False
    controller_started: float | None = None
    groups: list[Group] = field(default_factory=list)
    states: list[tuple[str, float]] = field(default_factory=list)
    vals: list[tuple[int, float, float]] = field(default_factory=list)  # (step, top-1, time)

    @classmethod
    def from_dict(cls, raw: dict[str, object]) -> Attempt:
        data = dict(raw)
        groups = [Group(**g) for g in data.pop("groups", [])]  # type: ignore[attr-defined]
        states = [(str(s), float(t)) for s, t in data.pop("states", [])]  # type: ignore[attr-defined]
        vals = [(int(s), float(v), float(t)) for s, v, t in data.pop("vals", [])]  # type: ignore[attr-defined]
        return cls(**data, groups=groups, states=states, vals=vals)  # type: ignore[arg-type]


class RunLedger:
    """The driver's ledger of the current attempt, fed from the console's events; ``attempts`` holds the earlier
    attempts of the same run name (loaded from the run folder) so that the summary covers them all."""

    def __init__(self, started: float | None = None, earlier: list[Attempt] | None = None, *,
                 accelerator_hour: float | None = None, cpu_hour: float | None = None, currency: str = "USD") -> None:
        """``started``: the driver's start (``time.time()``); the prices: ``cost.*`` (None: hours only)."""
        self.attempt = Attempt(started=time.time() if started is None else started)
        self.earlier = list(earlier or [])
        self.prices = (accelerator_hour, cpu_hour)
        self.currency = currency
        self._cause: str | None = None

    @property
    def attempts(self) -> list[Attempt]:
        return [*self.earlier, self.attempt]

    def controller_started(self, at: float) -> None:
        self.attempt.controller_started = at

    def state(self, name: str, at: float) -> None:
        """A Ray Train controller state change (its name: RUNNING, RESTARTING, RESIZING, ...)."""
        a = self.attempt
        a.states.append((name, at))
        if name in ("RESTARTING", "RESIZING") and self._cause is None:
            self._cause = "recovery" if name == "RESTARTING" else "resize"
        if name in _RELEASING and a.groups and a.groups[-1].released_at is None:
            a.groups[-1].released_at = at

    def placed(self, scheduled_at: float, placed_at: float, workers: int, gpu: bool) -> None:
        """A worker group's placement group is ready (its actors start next)."""
        cause = self._cause or ("start" if not self.attempt.groups else "recovery")
        self.attempt.groups.append(Group(scheduled_at, placed_at, None, workers, gpu, cause))
        self._cause = None

    def progress(self, snap: GroupSnapshot) -> None:
        """Rank 0's counters: the group they belong to is the newest one placed (or a new one)."""
        groups = self.attempt.groups
        for g in reversed(groups):
            if g.progress is not None and g.progress["group"] == snap["group"]:
                g.progress = snap
                return
        if not groups or groups[-1].progress is not None:  # no placement seen (no controller events)
            groups.append(Group(workers=snap["workers"], gpu=snap["gpu"],
                                cause="start" if not groups else "recovery"))
        groups[-1].progress = snap
        groups[-1].workers = snap["workers"]

    def validated(self, step: int, top1: float, at: float) -> None:
        self.attempt.vals.append((step, top1, at))

    def finish(self, *, stopped: bool = False, at: float | None = None) -> None:
        self.attempt.ended = time.time() if at is None else at
        self.attempt.stopped = stopped

    def summary(self) -> Summary:
        """``summarize`` over every attempt, with ``system/ledger_cost`` when the workers' kind is priced."""
        summary = summarize(self.attempts)
        if (cost := priced(summary, *self.prices)) is not None:
            summary["metrics"][COST] = cost
        return summary

    def to_json(self) -> str:
        """Every attempt's raw record and the summary over them (the ``ledger.json`` artifact)."""
        return json.dumps({"attempts": [asdict(a) for a in self.attempts], "summary": self.summary(),
                           "currency": self.currency}, indent=1)


def load_attempts(text: str) -> list[Attempt]:
    """The attempts of an earlier ``ledger.json``."""
    return [Attempt.from_dict(raw) for raw in json.loads(text).get("attempts", [])]


@dataclass
class _Account:
    """One worker group's steps, accounted: its span split into its categories."""

    attempt: int
    group: Group
    snap: GroupSnapshot
    train_s: float = 0.0  # productive: its step time less the lost work
    lost_s: float = 0.0
    redone: int = 0  # its steps trained again by the next group

    @property
    def steps(self) -> int:
        return self.snap["step"] - self.snap["from_step"]

    @property
    def step_time_s(self) -> float:
        """All its step time (productive and lost): its span less validation and checkpoints."""
        s = self.snap
        return max(0.0, s["time"] - s["began"] - s["validation_s"] - s["checkpoint_s"])

    def train_until(self, at: float) -> float:
        """Its productive step time up to ``at``, in proportion to its span."""
        s = self.snap
        span = s["time"] - s["began"]
        return self.train_s * (min(max((at - s["began"]) / span, 0.0), 1.0) if span > 0 else float(at >= s["time"]))


def _accounts(attempts: list[Attempt]) -> list[_Account]:
    """Every group that took a step, in order over all attempts, with the steps the next group redid (it resumed
    from an earlier checkpoint than the step this one reached) and their time: steps redone x mean step time."""
    accounts = [_Account(i, g, g.progress) for i, a in enumerate(attempts) for g in a.groups if g.progress is not None]
    for acc, nxt in zip(accounts, [*accounts[1:], None], strict=False):
        total = acc.step_time_s
        if nxt is not None and acc.steps > 0:
            acc.redone = min(max(acc.snap["step"] - max(nxt.snap["from_step"], acc.snap["from_step"]), 0), acc.steps)
            acc.lost_s = min(acc.redone * total / acc.steps, total)
        acc.train_s = total - acc.lost_s
    return accounts


def _interval(out: list[dict[str, object]], attempt: int, category: str, start: float, seconds: float,
              **extra: object) -> None:
    out.append({"attempt": attempt, "category": category.removeprefix("system/ledger_").removesuffix("_s"),
                "start": round(start, 3), "seconds": round(seconds, 3), **extra})


def _account_attempt(i: int, a: Attempt, accounts: list[_Account], cats: dict[str, float],
                     intervals: list[dict[str, object]]) -> None:
    """Adds attempt ``i``'s seconds to ``cats``: before each group's first step, its steps, after the last."""
    def add(category: str, start: float, seconds: float, **extra: object) -> None:
        cats[category] += seconds
        _interval(intervals, i, category, start, seconds, **extra)

    mine = [acc for acc in accounts if acc.attempt == i]
    prev = a.started
    for n, acc in enumerate(mine):
        g, s = acc.group, acc.snap
        gap = max(0.0, s["began"] - prev)
        if n == 0:
            queued = _queued(a, g, gap)
            add(QUEUED, prev, queued, workers=g.workers)
            add(STARTING, prev + queued, gap - queued)
        else:
            add(RESIZE_GAP if g.cause == "resize" else RECOVERY_GAP, prev, gap, workers=g.workers)
        keep = acc.train_s / acc.step_time_s if acc.step_time_s else 1.0
        data = min(s["data_s"], acc.step_time_s) * keep
        cats[DATA_WAIT] += data
        cats[COMPUTE] += acc.train_s - data
        cats[VALIDATION] += s["validation_s"]
        cats[CHECKPOINT_STALL] += s["checkpoint_s"]
        cats[LOST_WORK] += acc.lost_s
        _interval(intervals, i, "steps", s["began"], s["time"] - s["began"], workers=g.workers,
                  from_step=s["from_step"], to_step=s["step"], train_s=round(acc.train_s, 3),
                  data_wait_s=round(data, 3), validation_s=round(s["validation_s"], 3),
                  checkpoint_stall_s=round(s["checkpoint_s"], 3), lost_work_s=round(acc.lost_s, 3),
                  steps_redone=acc.redone, phases={k: round(v, 3) for k, v in s["phases"].items()})
        prev = max(prev, s["time"])
    end = a.ended if a.ended is not None else prev
    if not mine:  # no step taken: waiting and starting only
        queued = _queued(a, a.groups[0], end - prev) if a.groups else 0.0
        add(QUEUED, prev, queued)
        add(STARTING, prev + queued, max(0.0, end - prev - queued))
    else:
        add(SHUTDOWN, prev, max(0.0, end - prev))


def _queued(a: Attempt, g: Group, gap: float) -> float:
    """The first group's wait for its placement group: from the controller's first SCHEDULING state (a placement
    group that timed out is asked for again: RESCHEDULING, SCHEDULING) until it was ready, or from the request of
    the group's own placement group when no state was seen; at most ``gap``."""
    if g.placed_at is None:
        return 0.0
    scheduling = [t for name, t in a.states if name == "SCHEDULING" and t <= g.placed_at]
    since = min(scheduling) if scheduling else g.scheduled_at
    return 0.0 if since is None else min(gap, max(0.0, g.placed_at - since))


def _worker_hours(attempts: list[Attempt], until: float | None = None) -> float:
    """Sum over the groups of workers x the time they held their workers (placement to release), to ``until``."""
    seconds = 0.0
    for a in attempts:
        for g, nxt in zip(a.groups, [*a.groups[1:], None], strict=False):
            start = g.placed_at or (g.progress["began"] if g.progress else None)
            end = g.released_at or (nxt.scheduled_at if nxt else None) or a.ended
            if start is None or end is None:
                continue
            if until is not None:
                end = min(end, until)
            seconds += g.workers * max(0.0, end - start)
    return seconds / 3600.0


def _time_to_accuracy(attempts: list[Attempt], accounts: list[_Account]) -> list[dict[str, float]]:
    """For each val top-1 first reached (each new best), the productive training time and worker-hours then."""
    table: list[dict[str, float]] = []
    for step, top1, at in sorted((v for a in attempts for v in a.vals), key=lambda v: v[2]):
        if table and top1 <= table[-1]["top1"]:
            continue
        table.append({"top1": top1, "step": float(step), "train_s": sum(acc.train_until(at) for acc in accounts),
                      "worker_hours": _worker_hours(attempts, until=at)})
    return table


def _run_mfu(accounts: list[_Account]) -> float | None:
    """The model FLOPs of every step taken over the summed peak of the workers during that step time."""
    flops = capacity = 0.0
    for acc in accounts:
        s = acc.snap
        if not s["flops_per_sample"] or not s["peak_flops"]:
            return None
        flops += acc.steps * s["global_batch"] * s["flops_per_sample"]
        capacity += acc.step_time_s * s["peak_flops"] * s["workers"]
    return flops / capacity if capacity > 0 else None


class Summary(TypedDict):
    metrics: dict[str, float]  # by their MLflow names (cost added by ``priced``)
    gpu: bool  # whether the workers had GPUs (their hours are accelerator-hours)
    stopped: bool  # the last attempt stopped on request
    intervals: list[dict[str, object]]
    time_to_accuracy: list[dict[str, float]]


def summarize(attempts: list[Attempt]) -> Summary:
    """The ledger over ``attempts``: the categories (adding up to the summed wall time of the attempts), goodput,
    worker-hours, MFU and time to accuracy."""
    accounts = _accounts(attempts)
    cats = dict.fromkeys(CATEGORIES, 0.0)
    intervals: list[dict[str, object]] = []
    for i, a in enumerate(attempts):
        _account_attempt(i, a, accounts, cats, intervals)
    wall = sum((a.ended or a.started) - a.started for a in attempts)
    train = cats[DATA_WAIT] + cats[COMPUTE]
    metrics = {WALL: wall, **cats, TRAIN: train, GOODPUT: train / wall if wall > 0 else 0.0,
               WORKER_HOURS: _worker_hours(attempts)}
    if (run_mfu := _run_mfu(accounts)) is not None:
        metrics[MFU] = run_mfu
    table = _time_to_accuracy(attempts, accounts)
    final = [top1 for a in attempts for _, top1, _ in a.vals][-1:]
    if final:
        reached = next(row for row in table if row["top1"] >= final[0])
        metrics[TIME_TO_FINAL_TOP1] = reached["train_s"]
        metrics[WORKER_HOURS_TO_FINAL_TOP1] = reached["worker_hours"]
    gpu = any(g.gpu for a in attempts for g in a.groups)
    return Summary(metrics=metrics, gpu=gpu, stopped=attempts[-1].stopped if attempts else False,
                   intervals=intervals, time_to_accuracy=table)


def priced(summary: Summary, accelerator_hour: float | None, cpu_hour: float | None) -> float | None:
    """The cost of the summary's worker-hours at the price for its kind of worker (None: not priced)."""
    price = accelerator_hour if summary["gpu"] else cpu_hour
    return None if price is None else summary["metrics"][WORKER_HOURS] * price
