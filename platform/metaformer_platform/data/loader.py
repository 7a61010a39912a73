"""The batch loader: a ShardSet plan, read by torch DataLoader workers, with a layout-free resumable position.

Per epoch there is one global order of the split's samples, fixed by (seed, epoch, shuffle_buffer) and the
same for every layout (see `shardset`): shards in a seeded order, each window of `shuffle_buffer`
consecutive samples permuted. Each rank reads a contiguous run of it, split among its loader workers; each
worker reads its samples in that order (a shard up to its last sample the worker needs; the worker's
samples met early are held, undecoded: at most about a window), decodes, transforms and collates its
batches, and the DataLoader hands them back round-robin.

What is exact and what is not:

* Same layout, resumed: the remaining batches hold exactly the samples, in exactly the order, with the
  same augmentation (per-sample seeds) and the same stand-ins, as the uninterrupted run's: byte-identical.
  The samples already consumed are not even read.
* Another layout (world size, loader workers, per-rank batch size, even another global batch): the
  samples of the epoch not yet consumed are dealt over the new ranks and workers, each exactly once, in
  the global order. The set of the epoch's samples is the uninterrupted run's (with drop_last, less a
  tail of fewer than one global batch); which samples share a batch after the resize differs.
* The data position: `position` counts the samples of the epoch consumed by all ranks together; what
  they were follows from `state_dict()["passes"]`, one (world_size, num_workers, batch_size, steps) per
  layout the epoch ran at. Why a list and not the count alone: see `shardset` (read cost).

What the Trainer does with it:

* Training: `for images, labels in loader` yields the rest of the current epoch, then moves the loader to
  the next epoch, so a step-counting loop is `while step < max_steps: for batch in loader: ...`.
  `len(loader)` (== `steps_per_epoch`) is the same on every rank; `steps_remaining` is what is left of
  the current epoch (fewer after a resume).
* Resume: store `loader.state_dict()` with the checkpoint (it is identical on every rank, so rank 0's is
  enough) and call `load_state_dict()` before iterating again, at any layout. The state holds
  {"version": 2, "epoch", "position", "passes", the order settings (split, num_samples, seed, shuffle,
  shuffle_buffer), and, informational, the layout that wrote it}. Order settings that differ are
  refused (or with `strict=False` restart the stored epoch from its start).
* Evaluation (`drop_last=False`, `shuffle=False`): every sample is yielded exactly once across ranks, all
  ranks yield `len(loader)` batches, and batches may be smaller than batch_size. Count samples as
  `labels.numel()`, sum (correct, total) per rank, all-reduce both with SUM, then divide; the reduced total
  equals `loader.total_samples`. No padding or de-duplication is needed.
* Faults (`data.faults`): a missing shard, a tar that is truncated or random bytes, an image that does
  not decode or a `.cls` that is not a label is skipped and counted (`fault_stats()`, a warning naming
  each bad shard once). Its place in the batch is taken by a stand-in: the nearest earlier readable
  sample of the same batch, else the nearest later one of the worker's later batches, augmented
  afresh. Batch sizes and counts therefore never change (no DDP hang), and since the choice depends
  only on the plan, a job resumed at the same layout picks the same stand-ins. The cost: a few training samples
  are seen twice in an epoch. In evaluation (drop_last=False) stand-ins carry `IGNORE_LABEL`: count
  `labels != IGNORE_LABEL`, and then evaluated + skipped == the split's size. Past `max_bad_fraction`
  of a rank's samples in one epoch, iterating raises `DataFaultError` naming the bad shards.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from metaformer_platform.data.faults import (
    DEFAULT_MAX_MEMBER_BYTES,
    IGNORE_LABEL,
    DataFaultError,
    FaultStats,
    describe_shards,
)
from metaformer_platform.data.manifest import Manifest, load_manifest
from metaformer_platform.data.shardset import RankPlan, ShardSet
from metaformer_platform.data.stream import EpochStream, Transform

__all__ = ["ShardLoader", "build_loader"]

_log = logging.getLogger(__name__)

# The main process's half of the transform: (uint8 batch, per-sample seeds) -> batch (see data/augment.py).
BatchTransformFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# Loader settings that define the epoch's global order: a position means something only if they match.
# The layout (world_size, num_workers, batch_size) may change: a new pass deals the rest of the epoch over it.
_ORDER_KEYS = ("split", "num_samples", "seed", "shuffle", "shuffle_buffer", "drop_last")
STATE_VERSION = 2


@dataclass(eq=False, repr=False)
class ShardLoader:
    """Batches of one split for one rank, epoch after epoch, with a resumable position.

    Iterating yields `(images, labels)` (plus the list of sample keys with `with_keys=True`) for the
    rest of the current epoch. `len()` is the number of batches per epoch, identical on every rank.
    """

    manifest: Manifest
    split: str
    batch_size: int
    rank: int
    world_size: int
    num_workers: int
    transform: Transform | None
    seed: int
    epoch: int
    shuffle: bool
    shuffle_buffer: int
    drop_last: bool
    decode_size: int | None
    with_keys: bool
    pin_memory: bool
    prefetch_factor: int | None
    multiprocessing_context: str | None
    timeout: float
    prefetch_shards: int = 0
    max_bad_fraction: float | None = None
    batch_transform: BatchTransformFn | None = None
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES

    def __post_init__(self) -> None:
        self._faults = FaultStats()  # since this loader was made
        self._epoch_skipped = 0
        self.shards = ShardSet.from_manifest(self.manifest, self.split)
        # This epoch's earlier passes at other layouts, [world_size, num_workers, batch_size, steps] each (a
        # resumed job with another layout starts a new pass over what they left), and this pass's batches.
        self._history: list[list[int]] = []
        self.batches_yielded = 0
        self._pass: tuple[tuple, RankPlan] | None = None  # the plan of the current pass (cached)
        try:
            self._layout = self.plan(self.epoch)  # raises the ValueErrors (zero batches...) up front
        except ValueError as err:
            raise ValueError(f"{self.manifest.url} split {self.split!r}: {err}") from None

    def plan(self, epoch: int | None = None, history: Sequence[Sequence[int]] = ()) -> RankPlan:
        """This rank's reading plan for `epoch` (default: the current one) after the passes `history`."""
        return self.shards.plan(
            rank=self.rank,
            world_size=self.world_size,
            num_workers=self.num_workers,
            batch_size=self.batch_size,
            drop_last=self.drop_last,
            seed=self.seed,
            epoch=self.epoch if epoch is None else epoch,
            shuffle=self.shuffle,
            window=self.shuffle_buffer if self.shuffle else 1,
            history=history,
        )

    def _current(self) -> RankPlan:
        """The plan of the current pass: what the earlier passes of the current epoch left, at this layout."""
        key = (self.epoch, tuple(map(tuple, self._history)))
        if self._pass is None or self._pass[0] != key:
            self._pass = (key, self.plan(self.epoch, self._history))
        return self._pass[1]

    @property
    def global_batch_size(self) -> int:
        """Samples all ranks together take per step (the last evaluation steps may take fewer)."""
        return self.world_size * self.batch_size

    @property
    def position(self) -> int:
        """Samples of the current epoch's global order consumed so far, by all ranks together."""
        if not self._history and self.batches_yielded == 0:
            return 0
        return self._current().position_after(self.batches_yielded)

    @property
    def steps_remaining(self) -> int:
        """Batches this rank (every rank) still yields in the current epoch."""
        return self._current().num_batches - self.batches_yielded

    @property
    def steps_per_epoch(self) -> int:
        """Batches per epoch; the same on every rank."""
        return self._layout.num_batches

    def __len__(self) -> int:
        return self.steps_per_epoch

    @property
    def num_samples(self) -> int:
        """Samples this rank yields per epoch (for evaluation: this rank's share, may differ by rank)."""
        return self._layout.num_samples

    @property
    def total_samples(self) -> int:
        """Samples all ranks together yield per epoch (== the split's size when drop_last=False)."""
        return self._layout.total_samples

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its first batch on the next iteration."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = epoch
        self._history = []
        self.batches_yielded = 0
        self._epoch_skipped = 0

    def fault_stats(self) -> dict[str, Any]:
        """Samples this loader (this rank) skipped, and per bad shard how many and why:
        {"skipped_samples": n, "bad_shards": {shard: {"skipped": n, "kinds": {kind: n}}}}. Since it was
        made, or since the run began when `load_fault_state` restored the counts of a checkpoint."""
        return self._faults.as_dict()

    def fault_state(self) -> dict[str, Any]:
        """This rank's fault counts, to store per rank with a checkpoint (unlike `state_dict`, they differ
        by rank): a resumed job then keeps counting, and cannot slip under `max_bad_fraction` by restarting."""
        return {
            "epoch": self.epoch,
            "epoch_skipped": self._epoch_skipped,
            "shards": {shard: dict(kinds) for shard, kinds in self._faults.shards.items()},
            "details": dict(self._faults.details),
        }

    def load_fault_state(self, state: dict[str, Any]) -> None:
        """Restore `fault_state()` (after `load_state_dict`, which sets the epoch); shards already known
        to be bad are not warned about again."""
        self._faults = FaultStats(
            shards={shard: dict(kinds) for shard, kinds in state["shards"].items()},
            details=dict(state["details"]),
        )
        self._epoch_skipped = int(state["epoch_skipped"]) if state["epoch"] == self.epoch else 0

    def _count_faults(self, found: list[tuple[str, str, int, str]]) -> None:
        for shard, kind, count, detail in found:
            if self._faults.add(shard, kind, count, detail):
                _log.warning(
                    "rank %d, %s split: skipping unreadable data in %s (%s: %s); bad samples are replaced "
                    "by stand-ins and counted",
                    self.rank,
                    self.split,
                    shard,
                    kind,
                    detail,
                )
            self._epoch_skipped += count
        limit = self.max_bad_fraction
        if limit is not None and self._epoch_skipped > limit * self.num_samples:
            raise DataFaultError(
                f"rank {self.rank}: {self._epoch_skipped} of its {self.num_samples} {self.split!r} samples in "
                f"epoch {self.epoch} were unreadable, more than max_bad_fraction={limit}; bad shards: "
                f"{describe_shards(self._faults.shards)}; rebuild or re-copy them (verify_checksums finds "
                "corrupt ones), or raise data.max_bad_fraction",
                self._faults.bad_shards,
            )

    def __iter__(self) -> Iterator[tuple]:
        if self.steps_remaining <= 0:
            self.set_epoch(self.epoch + 1)
        plan = self._current()
        stream = EpochStream(
            self.manifest.storage,
            plan,
            skip_batches=self.batches_yielded,
            seed=self.seed,
            transform=self.transform,
            decode_size=self.decode_size,
            with_keys=self.with_keys,
            prefetch_shards=self.prefetch_shards,
            # evaluation promises each sample once: stand-ins are there for the shapes, not to be scored
            stand_in_label=None if self.drop_last else IGNORE_LABEL,
            max_member_bytes=self.max_member_bytes,
        )
        loader = self._data_loader(stream)
        for images, labels, seeds, *keys, found in loader:
            if found:
                self._count_faults(found)
            if self.batch_transform is not None:
                images = self.batch_transform(images, seeds)
            self.batches_yielded += 1
            yield (images, labels, *keys)
        if self.batches_yielded != plan.num_batches:
            raise RuntimeError(
                f"rank {self.rank}: epoch {self.epoch} ended after {self.batches_yielded} of "
                f"{plan.num_batches} batches"
            )
        self.set_epoch(self.epoch + 1)

    def _data_loader(self, stream: EpochStream) -> DataLoader[tuple]:
        """The DataLoader over this epoch's stream; its workers seed `random`/numpy/torch from (seed, epoch,
        rank). The generator is passed even without workers: the DataLoader draws its base seed from it, not
        from the trainer's global RNG."""
        base = random.Random(f"workers:{self.seed}:{self.epoch}:{self.rank}").getrandbits(63)
        generator = torch.Generator().manual_seed(base)
        if self.num_workers == 0:
            return DataLoader(stream, batch_size=None, num_workers=0, pin_memory=self.pin_memory, generator=generator)
        return DataLoader(
            stream, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory, generator=generator,
            prefetch_factor=self.prefetch_factor, multiprocessing_context=self.multiprocessing_context,
            timeout=self.timeout,
        )

    def _layout_key(self) -> list[int]:
        return [self.world_size, self.num_workers, self.batch_size]

    def state_dict(self) -> dict[str, Any]:
        """The loader's position in its epoch; the same on every rank (rank 0's is enough to store).

        {"version": 2, "epoch": e, "position": P, "passes": [[world_size, num_workers, batch_size, steps],
        ...], the order settings (`_ORDER_KEYS`), and, informational, the layout that wrote it}: P samples
        of epoch e were consumed by all ranks together, by the passes listed (one per layout the epoch ran
        at, in order; the last one is this loader's unless the epoch just began); the samples they consumed
        follow from the passes alone. Also informational: steps_per_epoch (at this layout), rank, and
        batches_yielded (this rank's batches in the current pass).
        """
        passes = [*self._history, [*self._layout_key(), self.batches_yielded]] if self.batches_yielded else self._history
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "position": self.position,
            "passes": [list(p) for p in passes],
            "batches_yielded": self.batches_yielded,
            "steps_per_epoch": self.steps_per_epoch,
            "rank": self.rank,
            "split": self.split,
            "num_samples": self.shards.num_samples,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "shuffle_buffer": self.shuffle_buffer,
            "drop_last": self.drop_last,
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "batch_size": self.batch_size,
            "global_batch_size": self.global_batch_size,
        }

    def load_state_dict(self, state: dict[str, Any], *, strict: bool = True) -> None:
        """Continue from a stored position, at this loader's layout, whatever the layout that wrote it.

        The same layout (world size, loader workers, per-rank batch size) continues the stored pass: the
        remaining batches are exactly the uninterrupted run's. Another layout (any global batch) starts a
        new pass over the samples of the stored epoch not yet consumed, dealing each exactly once over
        this loader's ranks and workers. The order settings (`_ORDER_KEYS`) must match: otherwise `strict`
        raises ValueError, and strict=False restarts the stored epoch from its first sample (so does a
        state of the old format, version 1, whose position depended on the layout).
        """
        if not isinstance(state, dict) or "epoch" not in state:
            raise ValueError("the loader state is not a dict from ShardLoader.state_dict()")
        epoch = int(state["epoch"])
        if epoch < 0:
            raise ValueError(f"loader state has an invalid epoch {epoch}")
        if state.get("version") != STATE_VERSION:
            problem = (
                f"it was written by an older loader (state version {state.get('version')!r}, now "
                f"{STATE_VERSION}) whose position depended on the layout"
            )
        else:
            missing = [k for k in ("position", "passes", *_ORDER_KEYS) if k not in state]
            if missing:
                raise ValueError(f"loader state lacks {missing}; pass a dict from ShardLoader.state_dict()")
            mine = self.state_dict()
            changed = {k: (state[k], mine[k]) for k in _ORDER_KEYS if state[k] != mine[k]}
            problem = "its sample order changed (" + ", ".join(
                f"{k}: stored {a!r}, now {b!r}" for k, (a, b) in changed.items()
            ) + ")" if changed else ""
        history: list[list[int]] = []
        steps = 0
        if problem:
            if strict:
                raise ValueError(
                    f"cannot resume the {self.split!r} loader mid-epoch: {problem}; restore the original "
                    f"settings, or call load_state_dict(state, strict=False) to restart epoch {epoch} from "
                    "its beginning"
                )
            _log.warning("data loader state: %s; restarting epoch %d from its first sample", problem, epoch)
        else:
            history = self._checked_passes(state, epoch)
            if history and history[-1][:3] == self._layout_key():
                steps = history.pop()[3]  # the same layout: continue its pass
            elif history:
                _log.info(
                    "%s split: continuing epoch %d at sample %d of %d with a new layout (world_size %d, "
                    "num_workers %d, batch_size %d; it was %s): the remaining samples are dealt over it, each once",
                    self.split, epoch, state["position"], self.shards.num_samples, *self._layout_key(),
                    "/".join(map(str, history[-1][:3])),
                )
        self.epoch = epoch
        self._history = history
        self.batches_yielded = steps

    def _checked_passes(self, state: dict[str, Any], epoch: int) -> list[list[int]]:
        """The state's passes, checked against each other and against its position."""
        passes = state["passes"]
        ok = isinstance(passes, list) and all(
            isinstance(p, list | tuple) and len(p) == 4 and all(type(x) is int for x in p)
            and min(p[:3]) >= 0 and p[0] >= 1 and p[2] >= 1 and p[3] >= 0
            for p in passes
        )
        bad = f"loader state has invalid passes {passes!r} (position {state['position']})"
        if not ok:
            raise ValueError(bad)
        history = [list(p) for p in passes if p[3] > 0]
        position = 0
        for i, (world, workers, batch, steps) in enumerate(history):
            try:
                plan = self.shards.plan(
                    rank=0, world_size=world, num_workers=workers, batch_size=batch, drop_last=self.drop_last,
                    seed=self.seed, epoch=epoch, shuffle=self.shuffle, window=self.shuffle_buffer if self.shuffle else 1,
                    history=history[:i],
                )
            except ValueError:
                raise ValueError(bad) from None
            if steps > plan.num_batches:
                raise ValueError(bad)
            position = plan.position_after(steps)
        if position != state["position"]:
            raise ValueError(bad)
        return history


def _positive(name: str, value: object) -> None:
    if type(value) is not int or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _non_negative(name: str, value: object) -> None:
    if type(value) is not int or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")


def _check_arguments(
    *, batch_size: int, rank: int, world_size: int, num_workers: int, seed: int, epoch: int, shuffle: bool,
    shuffle_buffer: int, decode_size: int | None, max_bad_fraction: float | None,
    transform: Transform | None, batch_transform: BatchTransformFn | None,
) -> None:
    """Refuse, with the argument's name and value, what no loader can be built from."""
    _positive("batch_size", batch_size)
    _positive("world_size", world_size)
    _non_negative("rank", rank)
    if rank >= world_size:
        raise ValueError(f"rank must be < world_size ({world_size}), got {rank}")
    _non_negative("num_workers", num_workers)
    _non_negative("seed", seed)
    _non_negative("epoch", epoch)
    if shuffle:
        _positive("shuffle_buffer", shuffle_buffer)
    if decode_size is not None:
        _positive("decode_size", decode_size)
    if transform is not None and not callable(transform):
        raise TypeError(f"transform must be callable (PIL image -> tensor), got {type(transform).__name__}")
    if batch_transform is not None and not callable(batch_transform):
        raise TypeError(f"batch_transform must be callable (images, seeds -> images), got {type(batch_transform).__name__}")
    if max_bad_fraction is not None and not 0 <= max_bad_fraction <= 1:
        raise ValueError(f"max_bad_fraction must be between 0 and 1 (or None), got {max_bad_fraction!r}")


def build_loader(
    source: str | Path | Manifest, split: str, *, batch_size: int, rank: int, world_size: int, num_workers: int,
    transform: Transform | None, seed: int, epoch: int = 0, shuffle: bool, shuffle_buffer: int = 1000,
    drop_last: bool = True, decode_size: int | None = None, with_keys: bool = False, pin_memory: bool = False,
    prefetch_factor: int | None = 2, multiprocessing_context: str | None = None, timeout: float = 0,
    prefetch_shards: int | None = None, max_bad_fraction: float | None = None,
    batch_transform: BatchTransformFn | None = None, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
) -> ShardLoader:
    """A loader over split `split` of the shards under `source` (a folder or file:// URL with `_info.json`).

    Training: shuffle=True, drop_last=True. Evaluation: shuffle=False, drop_last=False (every sample exactly
    once across ranks; see the module docstring for what the Trainer does with the counts).
    `transform` maps a PIL RGB image to a tensor (None: uint8 CHW, all images the same size); one with
    `lazy_decode = True` gets the image undecoded and decodes it itself (data/augment.py).
    `batch_transform(images, seeds)` runs on each batch in the main process (normalize, erase on the
    training device: `augment.BatchTransform`), given the per-sample augmentation seeds.
    `decode_size`: the smallest short side the transform needs; larger JPEGs decode at reduced scale.
    `shuffle_buffer`: the shuffle window, consecutive samples of the epoch's global order permuted together
    (the same for every layout; memory: each worker holds up to about this many undecoded samples).
    `prefetch_shards`: shards each worker downloads ahead in a background thread (memory: that many whole
    shards more per worker); None: 1 for object storage, 0 for local files (the OS reads ahead already).
    `max_bad_fraction`: unreadable samples (see `data.faults`) are replaced and counted (`fault_stats()`);
    when more than this fraction of the rank's samples in one epoch are bad, iterating raises
    DataFaultError naming the bad shards (None: never).
    `max_member_bytes` (`data.max_member_bytes`): the largest tar member a worker holds; a larger one is a bad
    sample ("oversized"), and one larger than what is left of its shard a bad shard, refused from the header
    before anything is allocated for it.
    """
    _check_arguments(
        batch_size=batch_size, rank=rank, world_size=world_size, num_workers=num_workers, seed=seed, epoch=epoch,
        shuffle=shuffle, shuffle_buffer=shuffle_buffer, decode_size=decode_size, max_bad_fraction=max_bad_fraction,
        transform=transform, batch_transform=batch_transform,
    )
    manifest = source if isinstance(source, Manifest) else load_manifest(source)
    if prefetch_shards is None:
        prefetch_shards = 1 if manifest.storage.root.remote else 0
    _non_negative("prefetch_shards", prefetch_shards)
    _positive("max_member_bytes", max_member_bytes)
    return ShardLoader(
        manifest, split, batch_size=batch_size, rank=rank, world_size=world_size, num_workers=num_workers,
        transform=transform, seed=seed, epoch=epoch, shuffle=shuffle, shuffle_buffer=shuffle_buffer,
        drop_last=drop_last, decode_size=decode_size, with_keys=with_keys, pin_memory=pin_memory,
        prefetch_factor=prefetch_factor, multiprocessing_context=multiprocessing_context, timeout=timeout,
        prefetch_shards=prefetch_shards, max_bad_fraction=max_bad_fraction, batch_transform=batch_transform,
        max_member_bytes=max_member_bytes,
    )
