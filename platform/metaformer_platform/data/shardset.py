"""ShardSet: which samples each rank and loader worker reads in an epoch, computed from the manifest alone.

The epoch's shards are ordered (shuffled by (seed, epoch) when shuffling, identically on every rank) and
concatenated into one sample sequence 0..N-1. Each rank takes a contiguous range of it, cut at sample
granularity (a shard on a boundary is read partly by two ranks), and splits its range among its loader
workers the same way. Because every rank computes the plan from the same shard lengths, the number of
batches is identical on every rank without any communication:

* drop_last=True (training): each rank gets floor(floor(N / world_size) / batch_size) full batches; the
  samples left over (fewer than world_size * batch_size) are the tail of this epoch's order, so a
  different set is left out every epoch.
* drop_last=False (evaluation): every sample exactly once. Ranks get N // world_size or one more sample,
  all ranks yield the same number of batches, and batches near the end may be smaller than batch_size
  (never empty), so sharded models (FSDP, ZeRO-3), whose forward is collective, stay in step.

Batch i of a rank comes from worker i % num_workers: the order torch's DataLoader (in_order=True)
returns batches in, which makes a rank's batch sequence a pure function of (seed, epoch, layout).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from .manifest import Manifest

__all__ = ["RankPlan", "ShardSet", "ShardSlice", "WorkerPlan", "batch_schedule"]


@dataclass(frozen=True)
class ShardSlice:
    """Samples [start, stop) of one shard, counted in the shard's own order."""

    filename: str
    start: int
    stop: int

    @property
    def num_samples(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class WorkerPlan:
    """What one loader worker of one rank reads and how it batches it, for one epoch."""

    worker: int
    slices: tuple[ShardSlice, ...]
    batch_sizes: tuple[int, ...]

    @property
    def num_samples(self) -> int:
        return sum(self.batch_sizes)

    def samples_before(self, rank_batches: int, num_workers: int) -> int:
        """How many of this worker's samples the rank's first `rank_batches` batches consumed."""
        mine = len(range(self.worker, rank_batches, num_workers))
        return sum(self.batch_sizes[:mine])


@dataclass(frozen=True)
class RankPlan:
    """One rank's share of one epoch."""

    rank: int
    world_size: int
    epoch: int
    batch_sizes: tuple[int, ...]  # in the order the rank yields them
    workers: tuple[WorkerPlan, ...]
    total_samples: int  # over all ranks this epoch

    @property
    def num_batches(self) -> int:
        return len(self.batch_sizes)

    @property
    def num_samples(self) -> int:
        return sum(self.batch_sizes)


def batch_schedule(num_samples: int, *, world_size: int, batch_size: int, drop_last: bool) -> list[list[int]]:
    """Per-rank batch sizes for one epoch; every rank gets the same number of batches.

    Raises ValueError when that would be zero batches (or, without drop_last, when the samples cannot
    be spread so that every rank has the same number of non-empty batches).
    """
    if num_samples <= 0:
        raise ValueError("the split has no samples")
    per_rank = num_samples // world_size
    if drop_last:
        num_batches = per_rank // batch_size
        if num_batches == 0:
            raise ValueError(
                f"batch_size={batch_size} is larger than the per-rank sample budget {per_rank} "
                f"({num_samples} samples / world_size {world_size}): every rank would yield zero batches; "
                f"use batch_size <= {max(per_rank, 1)}, fewer ranks, or more data"
            )
        return [[batch_size] * num_batches for _ in range(world_size)]
    extra = num_samples % world_size
    counts = [per_rank + (1 if r < extra else 0) for r in range(world_size)]
    num_batches = math.ceil(counts[0] / batch_size)
    if counts[-1] < num_batches:
        raise ValueError(
            f"{num_samples} samples cannot be split over world_size={world_size} with batch_size="
            f"{batch_size} so that every rank yields {num_batches} non-empty batches; "
            + (
                "the split has fewer samples than ranks: use fewer ranks"
                if counts[-1] == 0
                else "use batch_size >= 2 or a world size that divides the sample count"
            )
        )
    schedule = []
    for count in counts:
        sizes, remaining = [], count
        for i in range(num_batches):
            # full batches first, but leave at least one sample for each batch still to come
            size = min(batch_size, remaining - (num_batches - 1 - i))
            sizes.append(size)
            remaining -= size
        assert remaining == 0 and min(sizes) >= 1, (count, sizes)
        schedule.append(sizes)
    return schedule


class ShardSet:
    """The shards of one split, with their sample counts, and the per-epoch, per-rank reading plan."""

    def __init__(self, filenames: Sequence[str], shard_lengths: Sequence[int], *, name: str = ""):
        if len(filenames) != len(shard_lengths):
            raise ValueError(f"{len(filenames)} filenames but {len(shard_lengths)} shard lengths")
        if any(n < 0 for n in shard_lengths):
            raise ValueError("shard lengths must be non-negative")
        self.filenames = tuple(filenames)
        self.shard_lengths = tuple(int(n) for n in shard_lengths)
        self.name = name

    @classmethod
    def from_manifest(cls, manifest: Manifest, split: str) -> ShardSet:
        info = manifest.split(split)
        return cls(info.filenames, info.shard_lengths, name=split)

    @property
    def num_samples(self) -> int:
        return sum(self.shard_lengths)

    @property
    def num_shards(self) -> int:
        return len(self.filenames)

    def epoch_order(self, *, seed: int, epoch: int, shuffle: bool) -> list[int]:
        """Shard indices in this epoch's reading order (the same on every rank)."""
        order = list(range(self.num_shards))
        if shuffle:
            # str seeds hash with sha512, so every process (and Python version) gets the same order
            random.Random(f"shards:{seed}:{epoch}").shuffle(order)
        return order

    def _slices(self, order: Sequence[int], start: int, stop: int) -> tuple[ShardSlice, ...]:
        """The shard slices covering samples [start, stop) of the concatenated `order`."""
        slices, offset = [], 0
        for index in order:
            length = self.shard_lengths[index]
            lo, hi = max(start, offset), min(stop, offset + length)
            if lo < hi:
                slices.append(ShardSlice(self.filenames[index], lo - offset, hi - offset))
            offset += length
            if offset >= stop:
                break
        return tuple(slices)

    def plan(
        self,
        *,
        rank: int,
        world_size: int,
        num_workers: int,
        batch_size: int,
        drop_last: bool,
        seed: int,
        epoch: int,
        shuffle: bool,
    ) -> RankPlan:
        """What `rank` reads in `epoch`: its batches, split over `num_workers` loader workers (0 = 1)."""
        schedule = batch_schedule(
            self.num_samples, world_size=world_size, batch_size=batch_size, drop_last=drop_last
        )
        order = self.epoch_order(seed=seed, epoch=epoch, shuffle=shuffle)
        start = sum(sum(sizes) for sizes in schedule[:rank])
        sizes = schedule[rank]
        workers = max(1, num_workers)
        plans = []
        for worker in range(workers):
            worker_sizes = tuple(sizes[worker::workers])
            stop = start + sum(worker_sizes)
            plans.append(WorkerPlan(worker, self._slices(order, start, stop), worker_sizes))
            start = stop
        return RankPlan(
            rank=rank,
            world_size=world_size,
            epoch=epoch,
            batch_sizes=tuple(sizes),
            workers=tuple(plans),
            total_samples=sum(sum(s) for s in schedule),
        )
