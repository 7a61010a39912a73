"""Where a training step's time goes: data wait, forward, backward, optimizer, and the gradient all-reduce.

The Trainer marks the end of each phase; ``StepTimer`` adds the time since the previous mark to that phase.
On the CPU every op has finished when it returns, so ``time.perf_counter`` at the marks is the truth and costs
nothing. On CUDA the host runs ahead of the GPU: marks record CUDA events instead (no sync), and the events are
read only at the log cadence (``window()``), where one sync on the last event settles them all.

The all-reduce of DDP runs on its own stream/thread, overlapped with backward: its busy time is measured by a
DDP communication hook (``watch_allreduce``) and reported as ``system/step_allreduce_s``, a part of backward's time
that the others do not add up to. Training throughput (``train/images_per_s``) counts these phases only, so a
validation or checkpoint inside a log window is not training time.
"""

from __future__ import annotations

import time
from typing import Any

import torch

PHASES = ("data", "forward", "backward", "optimizer")


class StepTimer:
    """Accumulates per-phase seconds over a log window of training steps."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._totals = dict.fromkeys(PHASES, 0.0)
        self._allreduce = 0.0
        self._events: list[tuple[str, Any]] = []  # CUDA: (phase, event) in order, since the last window
        self._last: Any = None

    def start(self) -> None:
        """A step begins (after the previous step's bookkeeping, which is not step time)."""
        self._last = self._now()
        if self.cuda:
            self._events.append(("", self._last))

    def mark(self, phase: str) -> None:
        """``phase`` ended now: the time since the previous mark (or ``start``) is its."""
        now = self._now()
        if self.cuda:
            self._events.append((phase, now))
        else:
            self._totals[phase] += now - self._last
        self._last = now

    def add_allreduce(self, seconds: float) -> None:
        self._allreduce += seconds

    def window(self, steps: int) -> dict[str, float]:
        """Mean seconds per step of each phase since the last call (``time/<phase>_s``), their sum
        (``system/step_s``, training time only), and the all-reduce's busy time; then starts a new window."""
        if self.cuda and self._events:
            self._events[-1][1].synchronize()  # the one sync, at the log cadence
            for (_, begin), (phase, end) in zip(self._events, self._events[1:], strict=False):
                if phase:  # "" opens a step: the gap before it is bookkeeping, not a phase
                    self._totals[phase] += begin.elapsed_time(end) / 1000.0
            self._events.clear()
        n = max(steps, 1)
        out = {f"system/step_{phase}_s": total / n for phase, total in self._totals.items()}
        out["system/step_s"] = sum(self._totals.values()) / n
        if self._allreduce:
            out["system/step_allreduce_s"] = self._allreduce / n
        self._totals = dict.fromkeys(PHASES, 0.0)
        self._allreduce = 0.0
        return out

    def _now(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()


def watch_allreduce(model: Any, timer: StepTimer) -> bool:
    """Time DDP's gradient all-reduce (each bucket from launch to completion) into ``timer``; returns whether
    ``model`` is a DDP model (FSDP and DeepSpeed communicate inside their own calls: not separated)."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(model, DistributedDataParallel):
        return False

    # unannotated on purpose: DDP refuses a hook whose annotations are not exactly GradBucket / Future[Tensor],
    # and this module's postponed annotations are strings
    def timed_allreduce(state, bucket):
        begin = time.perf_counter()
        future = allreduce_hook(state, bucket)

        def done(fut: torch.futures.Future[torch.Tensor]) -> torch.Tensor:
            timer.add_allreduce(time.perf_counter() - begin)
            return fut.value()

        return future.then(done)

    model.register_comm_hook(None, timed_allreduce)
    return True
