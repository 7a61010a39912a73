"""Elastic jobs: ``scaling.num_workers: [min, max]`` with a global batch that does not change with the world size.

Ray Train v2 resizes the worker group (``ScalingConfig(num_workers=(min, max))``): a lost node fails the group,
which restarts with the workers the cluster can still hold; when capacity returns, Ray stops the group at its
next resize check and starts a larger one. Either way the new group resumes from the newest checkpoint. What
this module adds is that nothing rescales silently:

- the global batch is fixed at ``trainer.batch_size x trainer.grad_accum_steps x max`` (the configured per-worker
  batch at the range's largest size); at a world size ``w`` each worker takes ``G / w`` images per optimizer step,
  as the largest micro-batch no larger than ``trainer.batch_size`` that divides it, times the accumulation steps
  that make up the rest (``split_global_batch``). A range where some size cannot split ``G`` evenly is refused
  when the config is loaded. The learning rate, the schedule and the steps per epoch depend on ``G`` only.
- each resize (step, old and new world size) is logged by the resumed Trainer and recorded in the run's MLflow
  run (``record_world_size``).

The batch arithmetic (``split_global_batch``, ``check_range``) is in ``config.batch``: the config validates
ranges with it when it is loaded.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from metaformer_platform.config.batch import split_global_batch

if TYPE_CHECKING:
    from metaformer_platform.config import ScalingSettings, TrainerConfig

log = logging.getLogger(__name__)

# The MLflow tag that lists a run's resizes (JSON: [{"step": ..., "from": ..., "to": ...}, ...]).
RESIZES_TAG = "metaformer.elastic.resizes"
WORLD_SIZE_METRIC = "elastic/world_size"


@dataclass(frozen=True)
class BatchSplit:
    """How one worker of a group of ``world_size`` steps: its micro-batch and accumulation steps, and the global
    batch (images per optimizer step over the group) that the learning rate and schedule follow."""

    world_size: int
    micro_batch: int
    grad_accum_steps: int
    global_batch: int


def fit_to_world(scaling: ScalingSettings, trainer: TrainerConfig, world_size: int, *, even: bool) -> BatchSplit:
    """The batch split of one worker of a group of ``world_size``: an elastic job's ``trainer.batch_size`` and
    ``grad_accum_steps`` split so that the global batch stays the configured one (``even``: mixup needs an even
    micro-batch); a fixed worker count trains as configured (``auto``: the world it runs in)."""
    batch, accum = trainer.batch_size, trainer.grad_accum_steps
    if not scaling.elastic:
        workers = world_size if scaling.num_workers == "auto" else scaling.max_workers
        return BatchSplit(world_size, batch, accum, batch * accum * workers)
    low, high = scaling.min_workers, scaling.max_workers
    if not low <= world_size <= high:
        raise ValueError(f"a worker group of {world_size} is outside scaling.num_workers=[{low}, {high}]")
    global_batch = batch * accum * high
    micro, steps = split_global_batch(global_batch, world_size, batch, even=even)
    if (micro, steps) != (batch, accum):
        log.warning(
            "elastic: %d of %d workers: %d images x %d micro-steps per worker (configured %d x %d) keep the "
            "global batch at %d", world_size, high, micro, steps, batch, accum, global_batch,
        )
    return BatchSplit(world_size, micro, steps, global_batch)


def note_resume(resizes: list[dict[str, int]], step: int, stored_world_size: int | None, world_size: int) -> bool:
    """On a resume at ``step``: append a resize to ``resizes`` (and log it) when the checkpoint was written by
    another world size. Returns whether it was one."""
    if stored_world_size is None or stored_world_size == world_size:
        return False
    resizes.append({"step": step, "from": int(stored_world_size), "to": world_size})
    log.warning("elastic resize at step %d: world size %d -> %d", step, stored_world_size, world_size)
    return True


def check_resume_world_size(strategy: str, stored_world_size: int | None, world_size: int, where: str) -> None:
    """DeepSpeed partitions its ZeRO state per rank and its loader needs the world size that wrote it: refuse a
    resume at another size with the way out (DDP and FSDP2 reshard, so they pass)."""
    if strategy != "deepspeed" or stored_world_size is None or stored_world_size == world_size:
        return
    raise ValueError(
        f"{where} is a DeepSpeed checkpoint of {stored_world_size} ranks, and this job has {world_size}: its ZeRO "
        f"partitions load only at the world size that wrote them. Resume with scaling.num_workers="
        f"{stored_world_size}, or convert it offline with DeepSpeed's ds_to_universal and start a new run from "
        "the weights (model.init_from); elastic ranges are refused with deepspeed"
    )


class _MetricsTracker(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...


def record_world_size(tracker: _MetricsTracker, step: int, world_size: int, resizes: list[dict[str, int]], *, changed: bool) -> None:
    """In MLflow: ``elastic/world_size`` at ``step`` when a group of another size (or a fresh run) starts
    there (``changed``), and the list of resizes so far as the tag ``metaformer.elastic.resizes``."""
    if changed:
        tracker.log_metrics({WORLD_SIZE_METRIC: float(world_size)}, step=step)
    if resizes and hasattr(tracker, "set_tag"):
        tracker.set_tag(RESIZES_TAG, json.dumps(resizes))
