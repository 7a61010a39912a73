"""The job dry run (``--dry-run`` of jobs/pretrain.py, finetune.py, evaluate.py): the job plan sized without
training. From the plan (``plan.build_plan(cfg, dry_run=True)``: every check, no shard opened or listed), the
manifest's shard lengths and sizes and the data layer's own assignment (``ShardSet.reads``, what every rank's
loader workers read in an epoch), the model's parameter count (built on the meta device) and the estimate
(``launch.estimate``).

What it counts, per epoch of the split the job reads (a training job's first pass; an evaluate job's one pass):

- shard reads: one per (loader worker, shard it needs); the ideal is each shard once;
- bytes: the whole shard per read (on S3 each worker prefetches whole shards; a local read stops at the last
  sample it needs, so this is the upper bound there);
- S3 requests: one GET per shard read (the S3 reader streams the object in one response and re-opens with a
  ranged GET only after a broken connection); none for local shards.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from metaformer_platform.launch.estimate import Estimate, job_steps, plan_estimate
from metaformer_platform.launch.plan import JobPlan
from metaformer_platform.storage import Location

OPTIMIZER_STATES = {"sgd": 1, "momentum": 1, "lamb": 2, "adam": 2, "adamw": 2, "lion": 1}


@dataclass(frozen=True)
class DataFigures:
    """One epoch of the split a job reads, at the planned layout."""

    split: str
    samples: int
    shards: int
    steps_per_epoch: int
    total_steps: int
    reads_per_rank: tuple[int, ...]  # shard reads of each rank (summed over its loader workers)
    bytes_per_epoch: int | None  # None: the manifest records no shard sizes
    remote: bool  # on object storage (each shard read is one S3 GET)

    @property
    def reads(self) -> int:
        return sum(self.reads_per_rank)


@dataclass(frozen=True)
class DryRun:
    """The figures the dry run prints."""

    plan: JobPlan
    workers: int  # the largest size of the group (an elastic job's max)
    data: DataFigures
    params: int
    checkpoint_bytes: dict[str, tuple[int, int]]  # strategy -> (rank 0's bytes, each other rank's)
    estimate: Estimate
    notes: tuple[str, ...]


def dry_run(plan: JobPlan, notes: tuple[str, ...] = ()) -> DryRun:
    """Size ``plan`` (see the module docstring)."""
    import torch

    from metaformer_platform.training.trainer import build_model

    cfg, n = plan.cfg, plan.layout.num_workers
    workers = n[1] if isinstance(n, tuple) else n
    with torch.device("meta"):
        model = build_model(cfg, int(cfg.model.num_classes or plan.data.num_classes or 1000))
    params = sum(p.numel() for p in model.parameters())
    sizes = checkpoint_sizes(cfg.optim.name, params, workers, ema=cfg.trainer.ema_decay is not None)
    return DryRun(plan, workers, data_figures(plan, workers), params, sizes, plan_estimate(plan), notes)


def data_figures(plan: JobPlan, workers: int) -> DataFigures:
    """Steps and reads of one epoch of the job's split over ``workers`` ranks (``ShardSet.reads``)."""
    from metaformer_platform.data import load_manifest
    from metaformer_platform.data.shardset import ShardSet

    cfg = plan.cfg
    training = cfg.stage != "evaluate"
    split = cfg.data.train_split if training else str(cfg.data.val_split)
    info = load_manifest(plan.data.root, check_files=False).split(split)
    shards = ShardSet(info.filenames, info.shard_lengths, name=split)
    t = cfg.trainer
    reads = shards.reads(world_size=workers, num_workers=cfg.data.num_workers, batch_size=t.batch_size,
                         drop_last=training, seed=t.seed, epoch=0, shuffle=training,
                         window=cfg.data.shuffle_buffer if training else 1)
    steps, total = job_steps(cfg, info.num_samples, workers)
    per_rank = tuple(sum(len(w) for w in rank) for rank in reads)
    sizes = info.shard_bytes
    read_bytes = sum(sizes[i] for rank in reads for w in rank for i in w.tolist()) if sizes else None
    remote = Location.parse(str(plan.data.root)).remote
    return DataFigures(split, info.num_samples, info.num_shards, steps, total, per_rank, read_bytes, remote)


def checkpoint_sizes(optimizer: str, params: int, workers: int, *, ema: bool) -> dict[str, tuple[int, int]]:
    """Bytes of one checkpoint written by rank 0 and by each other rank, per strategy: fp32 weights, the
    optimizer's fp32 states, the fp32 EMA (rank 0 writes it whole: ``Strategy.ema_state_dict``). DDP: rank 0
    writes everything; FSDP2 (DCP): every rank its 1/N shard; DeepSpeed ZeRO-1/2: rank 0 the module weights,
    every rank 1/N of the fp32 master weights and states; ZeRO-3: the weights sharded too."""
    states = OPTIMIZER_STATES.get(optimizer.lower().removeprefix("fused"), 2)
    weights, optim, avg = 4 * params, 4 * states * params, 4 * params if ema else 0
    shard = -(-(weights + optim) // workers)  # FSDP2's weights + states; ZeRO's fp32 master copy + states
    sharded_weights = -(-weights // workers)
    return {
        "ddp": (weights + optim + avg, 0),
        "fsdp": (shard + avg, shard),
        "deepspeed zero-1/2": (weights + shard + avg, shard),
        "deepspeed zero-3": (sharded_weights + shard + avg, sharded_weights + shard),
    }


def _gb(value: float) -> str:
    if value >= 1e9:
        return f"{value / 1e9:,.3f} GB"
    return f"{value / 1e6:,.1f} MB" if value >= 1e6 else f"{value:,.0f} bytes"


def text(run: DryRun, seconds: float) -> str:
    """The dry run as printed."""
    plan, d, cfg = run.plan, run.data, run.plan.cfg
    layout, t = plan.layout, cfg.trainer
    gpu = " + 1 GPU" if layout.use_gpu else ""
    lines = [f"dry run of {cfg.stage} {plan.run_name}: {cfg.model.name} ({run.params:,} parameters), "
             f"{cfg.strategy.name}, planned in {seconds:.2f} s (no Ray, nothing trained)",
             f"  layout        {plan.worker_count} worker(s) x {layout.cpus_per_worker:g} CPU{gpu}"]
    lines += [f"  note          {note}" for note in run.notes]
    lines += [
        f"  data          {plan.data.root}: split {d.split!r}, {d.samples:,} samples in {d.shards:,} shards",
        f"  batch         {t.batch_size} per worker x {t.grad_accum_steps} accumulation x {run.workers} workers "
        f"= global batch {t.batch_size * t.grad_accum_steps * run.workers:,}",
        f"  steps         {d.steps_per_epoch:,} per epoch, {d.total_steps:,} in all",
        f"  shard reads   {d.reads:,} per epoch ({d.reads / d.shards:.2f}x the ideal of {d.shards:,}: each shard once); "
        + _per_rank(d.reads_per_rank, cfg.data.num_workers),
        "  bytes         " + ("unknown (the manifest records no shard_bytes)" if d.bytes_per_epoch is None
                              else f"{_gb(d.bytes_per_epoch)} per epoch (whole shards)"),
        f"  S3 requests   {d.reads:,} GET per epoch (one per shard read)"
        + ("" if d.remote else "; none here: the shards are local"),
        f"  checkpoint    {cfg.optim.name}, EMA {'on' if t.ema_decay is not None else 'off'}; rank 0 / each other rank:",
    ]
    for strategy, (first, other) in run.checkpoint_bytes.items():
        mark = "  <- this job" if strategy == _strategy_key(cfg.strategy.name, cfg.strategy.zero_stage) else ""
        lines.append(f"    {strategy:<20} {_gb(first)} / {_gb(other)}{mark}")
    lines.append(f"  estimate      {run.estimate.line()}")
    return "\n".join(lines)


def _strategy_key(name: str, zero_stage: int) -> str:
    if name != "deepspeed":
        return name
    return "deepspeed zero-3" if zero_stage == 3 else "deepspeed zero-1/2"


def _per_rank(reads: tuple[int, ...], loader_workers: int) -> str:
    workers = max(1, loader_workers)
    if len(reads) <= 8:
        return f"per rank ({workers} loader worker(s) each): {', '.join(map(str, reads))}"
    return (f"per rank ({workers} loader worker(s) each): min {min(reads)}, median {statistics.median(reads):g}, "
            f"max {max(reads)}")
