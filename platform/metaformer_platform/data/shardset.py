"""ShardSet: one global sample order per epoch, and which samples each rank and loader worker reads.

The epoch's order does not depend on the layout (world size, loader workers, batch size). Per (seed, epoch):

1. the shards are ordered (shuffled by (seed, epoch) when shuffling) and their samples concatenated;
2. the concatenation is cut into windows of `window` samples (the `shuffle_buffer` setting) and each
   window is permuted by a seeded generator (`sample_order`). That is the epoch's global order.

A pass at one layout deals the part of the order it covers as today's plans did: each rank a contiguous
run, cut at sample granularity (a shard on a boundary is read partly by two ranks), split among its loader
workers the same way; a rank's batch j is built by its worker j % num_workers (the order torch's
DataLoader, in_order=True, returns batches in). Every rank computes the plan from the shard lengths, so
all ranks yield the same number of batches without any communication:

* drop_last=True (training): each rank gets floor(floor(M / world_size) / batch_size) full batches of the
  M samples the pass covers; the rest (fewer than world_size * batch_size) is the tail of the order.
* drop_last=False (evaluation): every sample exactly once. Ranks get M // world_size or one more, all
  ranks yield the same number of batches, and batches near the end may be smaller than batch_size (never
  empty), so sharded models (FSDP, ZeRO-3), whose forward is collective, stay in step.

An epoch is one pass, or several when a job resumes at another layout: after k steps of a pass, what it
consumed is a function of (its layout, k) alone (each worker's first batches of its run), so the passes
so far, [(world_size, num_workers, batch_size, steps), ...], determine the samples left, and the next pass
deals exactly those, in the global order, over the new layout (`remaining`, `plan(history=...)`).

The trade-off: a rank reads a contiguous run of the order, so each shard is read by about one loader worker
per epoch (two at a run's boundary), as before. The price is that the data position is the list of passes,
not one count (the count is derived), and that after a resize the samples sharing a batch differ from an
uninterrupted run's; the set of the epoch's samples does not. The alternative, one global step taking the
next world_size x batch_size samples of the order split over all ranks, makes the position one count but
has every rank read nearly every shard (measured: 288 of 1000 ImageNet-sized shards per loader worker at 8
ranks x 8 workers, about 18 times the data).
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from metaformer_platform.data.manifest import Manifest

__all__ = ["RankPlan", "ShardSet", "WorkerPlan", "batch_schedule"]


@dataclass(frozen=True)
class WorkerPlan:
    """What one loader worker of one rank reads in one pass and how it batches it."""

    worker: int
    # (shard index, sample index within the shard) of each sample, in the order the batches take them
    samples: tuple[tuple[int, int], ...]
    batch_sizes: tuple[int, ...]

    @property
    def num_samples(self) -> int:
        return sum(self.batch_sizes)

    def samples_before(self, rank_batches: int, num_workers: int) -> int:
        """How many of this worker's samples the rank's first `rank_batches` batches consumed."""
        return sum(self.batch_sizes[: len(range(self.worker, rank_batches, max(1, num_workers)))])

    def shard_order(self) -> list[int]:
        """The shards this worker reads, in the order it first needs them (the prefetcher's order)."""
        return list(dict.fromkeys(shard for shard, _ in self.samples))


@dataclass(frozen=True)
class RankPlan:
    """One rank's share of one pass through an epoch: from global position `start` to the epoch's end."""

    rank: int
    world_size: int
    epoch: int
    start: int  # samples of the epoch's order consumed before this plan
    filenames: tuple[str, ...]  # the split's shards (WorkerPlan.samples index them)
    batch_sizes: tuple[int, ...]  # in the order the rank yields them
    step_sizes: tuple[int, ...]  # samples all ranks together consume at each step
    workers: tuple[WorkerPlan, ...]

    @property
    def num_batches(self) -> int:
        return len(self.batch_sizes)

    @property
    def num_samples(self) -> int:
        return sum(self.batch_sizes)

    @property
    def total_samples(self) -> int:
        """Samples all ranks together yield from `start` to the epoch's end."""
        return sum(self.step_sizes)

    def position_after(self, steps: int) -> int:
        """The global position once `steps` batches of this plan have been yielded (on every rank)."""
        return self.start + sum(self.step_sizes[:steps])


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


def _remaining_schedule(remaining: int, *, world_size: int, batch_size: int, drop_last: bool) -> list[list[int]]:
    """`batch_schedule` for the rest of an epoch: no batches (rather than an error) once too few samples
    remain for a full global batch in training."""
    if remaining <= 0 or (drop_last and remaining < world_size * batch_size):
        return [[] for _ in range(world_size)]
    return batch_schedule(remaining, world_size=world_size, batch_size=batch_size, drop_last=drop_last)


class ShardSet:
    """The shards of one split, with their sample counts, the epoch's global order and per-rank plans."""

    def __init__(self, filenames: Sequence[str], shard_lengths: Sequence[int], *, name: str = ""):
        if len(filenames) != len(shard_lengths):
            raise ValueError(f"{len(filenames)} filenames but {len(shard_lengths)} shard lengths")
        if any(n < 0 for n in shard_lengths):
            raise ValueError("shard lengths must be non-negative")
        self.filenames = tuple(filenames)
        self.shard_lengths = tuple(int(n) for n in shard_lengths)
        self.name = name
        # the first flat sample id of each shard (flat ids count samples in manifest order)
        self._offsets = np.concatenate([[0], np.cumsum(self.shard_lengths, dtype=np.int64)])
        self._order_cache: tuple[tuple[int, int, bool, int], np.ndarray] | None = None

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

    def sample_order(self, *, seed: int, epoch: int, shuffle: bool, window: int) -> np.ndarray:
        """The epoch's global order: flat sample ids (manifest order), the same for every layout.

        The shards in `epoch_order`, concatenated; with `shuffle`, each run of `window` consecutive
        samples is permuted by a generator seeded from (seed, epoch).
        """
        key = (seed, epoch, shuffle, window)
        if self._order_cache is not None and self._order_cache[0] == key:
            return self._order_cache[1]
        shards = self.epoch_order(seed=seed, epoch=epoch, shuffle=shuffle)
        order = np.concatenate(
            [np.arange(self._offsets[s], self._offsets[s + 1], dtype=np.int64) for s in shards] or [np.zeros(0, np.int64)]
        )
        if shuffle and window > 1 and len(order):
            digest = hashlib.sha256(f"samples:{seed}:{epoch}".encode()).digest()
            rng = np.random.default_rng(int.from_bytes(digest[:16], "little"))
            full = len(order) // window * window
            order = np.concatenate(
                [rng.permuted(order[:full].reshape(-1, window), axis=1).ravel(), rng.permutation(order[full:])]
            )
        self._order_cache = (key, order)
        return order

    def locate(self, flat: np.ndarray) -> list[tuple[int, int]]:
        """(shard index, sample index within the shard) of each flat sample id."""
        shards = np.searchsorted(self._offsets, flat, side="right") - 1
        return list(zip(shards.tolist(), (flat - self._offsets[shards]).tolist(), strict=True))

    def remaining(self, history: Sequence[Sequence[int]], *, drop_last: bool) -> np.ndarray:
        """Positions in the epoch's order not consumed by the earlier passes `history`
        ((world_size, num_workers, batch_size, steps) each, in the order they ran), ascending."""
        left = np.arange(self.num_samples, dtype=np.int64)
        for world_size, num_workers, batch_size, steps in history:
            deal = _deal(len(left), world_size, num_workers, batch_size, drop_last)
            taken = [
                left[offset : offset + sum(sizes[: len(range(w, steps, len(ranks)))])]
                for ranks in deal
                for w, (offset, sizes) in enumerate(ranks)
            ]
            left = np.setdiff1d(left, np.concatenate([np.zeros(0, np.int64), *taken]), assume_unique=True)
        return left

    def reads(
        self, *, world_size: int, num_workers: int, batch_size: int, drop_last: bool, seed: int, epoch: int,
        shuffle: bool, window: int = 1,
    ) -> list[list[np.ndarray]]:
        """The shards each loader worker of each rank reads in a whole pass of `epoch` ([rank][worker]: shard
        indices, ascending): what `plan` deals, for every rank at once. The driver sizes a job with it; `plan`
        per rank would cost O(ranks x steps) there (each call builds every rank's schedule)."""
        batch_schedule(self.num_samples, world_size=world_size, batch_size=batch_size, drop_last=drop_last)
        order = self.sample_order(seed=seed, epoch=epoch, shuffle=shuffle, window=window)
        shard_of = np.searchsorted(self._offsets, order, side="right") - 1
        return [
            [np.unique(shard_of[offset : offset + sum(sizes)]) for offset, sizes in ranks]
            for ranks in _deal(self.num_samples, world_size, num_workers, batch_size, drop_last)
        ]

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
        window: int = 1,
        history: Sequence[Sequence[int]] = (),
    ) -> RankPlan:
        """What `rank` reads in `epoch` after the earlier passes `history` (see `remaining`; none: the whole
        epoch): its batches, split over `num_workers` loader workers (0 = 1)."""
        if not history:  # the whole epoch must yield at least one batch (raises the clear ValueError)
            batch_schedule(self.num_samples, world_size=world_size, batch_size=batch_size, drop_last=drop_last)
        left = self.remaining(history, drop_last=drop_last)
        order = self.sample_order(seed=seed, epoch=epoch, shuffle=shuffle, window=window)
        schedule = _remaining_schedule(len(left), world_size=world_size, batch_size=batch_size, drop_last=drop_last)
        deal = _deal(len(left), world_size, num_workers, batch_size, drop_last)[rank]
        workers = [
            WorkerPlan(w, tuple(self.locate(order[left[offset : offset + sum(sizes)]])), sizes)
            for w, (offset, sizes) in enumerate(deal)
        ]
        return RankPlan(
            rank=rank,
            world_size=world_size,
            epoch=epoch,
            start=self.num_samples - len(left),
            filenames=self.filenames,
            batch_sizes=tuple(schedule[rank]),
            step_sizes=tuple(sum(step) for step in zip(*schedule, strict=True)),
            workers=tuple(workers),
        )


def _deal(remaining: int, world_size: int, num_workers: int, batch_size: int, drop_last: bool) -> list[list[tuple[int, tuple[int, ...]]]]:
    """How a pass deals `remaining` samples (positions 0.. of what is left, in order): per rank, per loader
    worker, (offset of its contiguous run, its batch sizes). Rank r's batch j is worker j % num_workers's."""
    schedule = _remaining_schedule(remaining, world_size=world_size, batch_size=batch_size, drop_last=drop_last)
    workers, offset, deal = max(1, num_workers), 0, []
    for sizes in schedule:
        ranks = []
        for w in range(workers):
            mine = tuple(sizes[w::workers])
            ranks.append((offset, mine))
            offset += sum(mine)
        deal.append(ranks)
    return deal
