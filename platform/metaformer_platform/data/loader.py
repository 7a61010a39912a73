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

import collections
import contextlib
import io
import logging
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from metaformer_platform.data.faults import (
    IGNORE_LABEL,
    SAMPLE_ERRORS,
    SHARD_ERRORS,
    DataFaultError,
    FaultStats,
    ShortShardError,
    describe_shards,
    shard_fault_kind,
)
from metaformer_platform.data.manifest import Manifest, load_manifest
from metaformer_platform.data.reader import (
    RawSample,
    decode_image,
    decode_label,
    iter_shard,
    open_image,
    read_shard,
)
from metaformer_platform.data.shardset import RankPlan, ShardSet, WorkerPlan
from metaformer_platform.data.storage import LocalStorage, Storage

__all__ = ["ShardLoader", "build_loader"]

_log = logging.getLogger(__name__)

Transform = Callable[[Image.Image], Any]
# The main process's half of the transform: (uint8 batch, per-sample seeds) -> batch (see data/augment.py).
BatchTransformFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# Loader settings that define the epoch's global order: a position means something only if they match.
# The layout (world_size, num_workers, batch_size) may change: a new pass deals the rest of the epoch over it.
_ORDER_KEYS = ("split", "num_samples", "seed", "shuffle", "shuffle_buffer", "drop_last")
STATE_VERSION = 2
# Readable samples of its earlier batches each worker remembers (undecoded), the last resort for a stand-in.
_EARLIER_STAND_INS = 16


@dataclass(frozen=True)
class _Lost:
    """A planned sample that could not be read: sample `index` of `shard` (missing, not a tar, cut short)."""

    shard: str  # as the storage describes it
    index: int
    kind: str
    detail: str

    @property
    def key(self) -> str:
        return f"{self.shard}#{self.index}"


Slot = RawSample | _Lost
# What ends a shard's read early: a fault of the shard, or its stream running dry before the planned sample.
_SHARD_ENDS: tuple[type[BaseException], ...] = (*SHARD_ERRORS, StopIteration)


def _slots(storage: Any, filenames: Sequence[str], wplan: WorkerPlan) -> Iterator[Slot]:
    """One item per planned sample of the worker, in plan order: the sample, or a `_Lost` placeholder
    for each sample a bad shard did not deliver, so positions (and with them resume) never shift.

    Each shard is opened when its first sample is due (the prefetcher's order, `WorkerPlan.shard_order`)
    and read up to its last sample this worker needs; the worker's other samples met on the way are held
    (undecoded) until their turn, the rest is read past. What is held is bounded by the shuffle window."""
    need: dict[int, set[int]] = collections.defaultdict(set)
    for shard, index in wplan.samples:
        need[shard].add(index)
    readers: dict[int, tuple[Iterator[RawSample], list[int]]] = {}  # shard -> (samples, [next index])
    held: dict[tuple[int, int], Slot] = {}

    def advance(shard: int, wanted: int) -> None:
        if shard not in readers:
            first, last = min(need[shard]), max(need[shard])
            readers[shard] = (iter_shard(storage, filenames[shard], first, last + 1), [first])
        samples, cursor = readers[shard]
        try:
            while (shard, wanted) not in held:
                sample = next(samples)
                index, cursor[0] = cursor[0], cursor[0] + 1
                if index in need[shard]:
                    held[shard, index] = sample
        except _SHARD_ENDS as err:
            if isinstance(err, StopIteration):  # iter_shard raises ShortShardError first; be safe anyway
                err = ShortShardError(f"{storage.describe(filenames[shard])} ended early")
            where, kind = storage.describe(filenames[shard]), shard_fault_kind(err)
            for index in sorted(need[shard]):
                if index >= cursor[0]:
                    held[shard, index] = _Lost(where, index, kind, str(err))
            cursor[0] = max(need[shard]) + 1
        if cursor[0] > max(need[shard]):
            samples.close()  # type: ignore[attr-defined]  # a generator: closes the shard's stream

    try:
        for shard, index in wplan.samples:
            if (shard, index) not in held:
                advance(shard, index)
            yield held.pop((shard, index))
    finally:
        for samples, _ in readers.values():
            samples.close()  # type: ignore[attr-defined]


class _Lookahead:
    """An iterator that can be searched ahead without consuming (for a stand-in when nothing earlier is good)."""

    def __init__(self, items: Iterator[Slot]):
        self.items = items
        self.peeked: collections.deque[Slot] = collections.deque()

    def __next__(self) -> Slot:
        return self.peeked.popleft() if self.peeked else next(self.items)

    def ahead(self) -> Iterator[Slot]:
        yield from list(self.peeked)
        for item in self.items:
            self.peeked.append(item)
            yield item


def _sample_seed(seed: int, epoch: int, key: str) -> int:
    """The augmentation seed of one sample: a function of (seed, epoch, sample key) only.

    A sample's augmentation then depends on nothing else: not on the worker count, the timing, or where a
    resumed job picked the epoch up, so a resumed job sees exactly the tensors the uninterrupted one saw.
    The loader ships it with the batch, for the augmentation done batched in the main process (erasing).
    """
    return random.Random(f"augment:{seed}:{epoch}:{key}").getrandbits(63)


def _seed_sample(value: int) -> None:
    """Seed the RNGs the worker-side transforms draw from with a sample's seed (`_sample_seed`)."""
    random.seed(value)
    np.random.seed(value % 2**32)
    # The CPU generator only: transforms run on the CPU, and torch.manual_seed (which also seeds every
    # accelerator, through a dynamo wrapper) cost about 0.7 ms per sample, 12% of a 224 px training sample.
    torch.default_generator.manual_seed(value)


@contextlib.contextmanager
def _rng_preserved() -> Iterator[None]:
    """Keep the caller's RNG streams untouched (loading in the main process, num_workers=0)."""
    py, nps, pt = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(nps)
        torch.set_rng_state(pt)


def _to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


class _Prefetcher:
    """A read-only view of a storage that fetches the next shards of a worker's plan in a background
    thread while the current one is parsed and decoded, so the network and the CPU work at once.

    Each fetched shard is held whole in memory: at most `depth` + 1 shards per loader worker.
    """

    def __init__(self, storage: Storage, names: list[str], depth: int):
        from concurrent.futures import ThreadPoolExecutor

        self.storage = storage
        self.url = storage.url
        self.pending = list(names)
        self.depth = depth
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="shard-prefetch")
        self.futures: list[tuple[str, Any]] = []
        self._top_up()

    def _top_up(self) -> None:
        while self.pending and len(self.futures) < self.depth:
            name = self.pending.pop(0)
            self.futures.append((name, self.pool.submit(read_shard, self.storage, name)))

    def open(self, name: str) -> io.BytesIO:
        if not self.futures or self.futures[0][0] != name:  # off the plan: read it directly
            return io.BytesIO(read_shard(self.storage, name))
        _, future = self.futures.pop(0)
        self._top_up()  # start the next download before this shard is parsed
        return io.BytesIO(future.result())

    def describe(self, name: str) -> str:
        return self.storage.describe(name)

    def close(self) -> None:
        for _, future in self.futures:
            future.cancel()
        self.pool.shutdown(wait=False)


class _EpochStream(IterableDataset):
    """One rank's epoch as a torch IterableDataset; each DataLoader worker reads its own `WorkerPlan`."""

    def __init__(
        self,
        storage: Storage,
        plan: RankPlan,
        *,
        skip_batches: int,
        seed: int,
        transform: Transform | None,
        decode_size: int | None,
        with_keys: bool,
        prefetch_shards: int = 0,
        stand_in_label: int | None = None,
    ):
        super().__init__()
        self.prefetch_shards = prefetch_shards
        self.stand_in_label = stand_in_label
        self.storage = storage
        self.plan = plan
        self.skip_batches = skip_batches
        self.seed = seed
        self.transform = transform
        self.decode_size = decode_size
        self.with_keys = with_keys
        # the transform decodes itself (DraftRandomResizedCrop): hand it the image with only its header read
        self.lazy_decode = bool(getattr(transform, "lazy_decode", False))
        # the transform takes the image's bytes and returns them as a tensor (decode_device=cuda): batches
        # are lists of byte tensors, decoded in the main process (data/device_decode.py)
        self.encoded = bool(getattr(transform, "encoded", False))

    def __iter__(self) -> Iterator[tuple]:
        info = get_worker_info()
        loader_worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # The DataLoader asks its workers round-robin starting at worker 0, while after skipping k batches
        # the rank's next batch belongs to plan worker k % num_workers: rotate so the order still holds.
        worker = (loader_worker + self.skip_batches) % num_workers
        assert num_workers == len(self.plan.workers), "the plan was made for another worker count"
        wplan = self.plan.workers[worker]
        done = len(range(worker, self.skip_batches, num_workers))  # this worker's batches already yielded
        skip = wplan.samples_before(self.skip_batches, num_workers)  # not even read
        wplan = WorkerPlan(worker, wplan.samples[skip:], wplan.batch_sizes[done:])
        storage: Any = self.storage
        if self.prefetch_shards > 0 and wplan.samples:
            names = [self.plan.filenames[shard] for shard in wplan.shard_order()]
            storage = _Prefetcher(self.storage, names, self.prefetch_shards)
        try:
            yield from self._batches(storage, wplan, worker, in_main=info is None)
        finally:
            if isinstance(storage, _Prefetcher):
                storage.close()

    def _decode(self, sample: Slot, faults: FaultStats | None) -> tuple[Image.Image, int] | None:
        """(image, label), or None for a bad sample (counted in `faults` when given)."""
        if isinstance(sample, _Lost):
            if faults is not None:
                faults.add(sample.shard, sample.kind, 1, sample.detail)
            return None
        try:
            label = decode_label(sample)
            if label < 0:
                raise ValueError(f"negative label {label}")
        except SAMPLE_ERRORS as err:
            if faults is not None:
                faults.add(self.storage.describe(sample.shard), "bad_label", 1, f"{sample.key}: {err}")
            return None
        try:
            if self.encoded:
                img = open_image(sample)  # the header is read: garbage is a bad sample here, in the worker
                return img.fp.getvalue(), label  # type: ignore[attr-defined]  # the sample's bytes (an ImageFile's)
            return (open_image(sample) if self.lazy_decode else decode_image(sample, self.decode_size)), label
        except SAMPLE_ERRORS as err:
            if faults is not None:
                faults.add(self.storage.describe(sample.shard), "bad_image", 1, f"{sample.key}: {err!r}")
            return None

    def _stand_in(
        self,
        bad: Slot,
        recent: collections.deque[RawSample],
        stream: _Lookahead,
        known_bad: set[str],
        earlier: collections.deque[RawSample],
    ) -> tuple[RawSample, Image.Image, int]:
        """The sample that fills a bad sample's place: the nearest earlier good sample of the same batch
        (`recent`), else the nearest later one of this worker's stream. Only the plan decides (a batch's
        samples, and the worker's later batches, are the same in a run resumed at the same layout), so a
        resumed worker picks the same one. Only when nothing later is readable either (a bad end of the
        epoch) does it take one of the worker's `earlier` batches, which a resumed worker may not have."""

        def good(candidate: Slot) -> tuple[Image.Image, int] | None:
            if not isinstance(candidate, RawSample) or candidate is bad or candidate.key in known_bad:
                return None
            if self.lazy_decode or self.encoded:  # stand-ins are decoded in full here: known to decode
                try:
                    img = decode_image(candidate)
                    return (open_image(candidate).fp.getvalue() if self.encoded else img), decode_label(candidate)  # type: ignore[attr-defined]
                except SAMPLE_ERRORS:
                    known_bad.add(candidate.key)
                    return None
            decoded = self._decode(candidate, None)
            if decoded is None:
                known_bad.add(candidate.key)
            return decoded

        for candidate in (*reversed(recent), *stream.ahead(), *reversed(earlier)):
            decoded = good(candidate)
            if decoded is not None:
                return candidate, *decoded  # type: ignore[return-value]
        raise DataFaultError(
            f"rank {self.plan.rank}: a loader worker found no readable sample in its share of epoch "
            f"{self.plan.epoch} to stand in for {bad.key}; the shards under {self.storage.url} are unreadable",
            [bad.shard if isinstance(bad, _Lost) else self.storage.describe(bad.shard)],
        )

    def _transform(self, img: Any, seed: int, in_main: bool) -> torch.Tensor:
        if self.transform is None:
            return _to_tensor(img.convert("RGB") if self.lazy_decode else img)
        # Worker processes own their RNGs; in the main process the trainer's RNG streams must not move.
        with _rng_preserved() if in_main else contextlib.nullcontext():
            _seed_sample(seed)
            return self.transform(img)

    def _batches(
        self, storage: Any, wplan: WorkerPlan, worker: int, in_main: bool
    ) -> Iterator[tuple]:
        """Batches of exactly the planned sizes. A bad sample (see data/faults.py) is counted and its
        place filled by a stand-in (`_stand_in`), so every rank still yields the same batches and a
        resume skips the same positions; stand-ins are augmented afresh (seeded by the bad slot), and in
        evaluation (`stand_in_label`) carry IGNORE_LABEL so they are not scored. Each batch carries the
        faults found since the previous one (a list of (shard, kind, samples, detail))."""
        stream = _Lookahead(_slots(storage, self.plan.filenames, wplan))
        recent: collections.deque[RawSample] = collections.deque()  # this batch's readable samples so far
        earlier: collections.deque[RawSample] = collections.deque(maxlen=_EARLIER_STAND_INS)
        known_bad: set[str] = set()

        def take() -> Slot:
            try:
                item = next(stream)
            except StopIteration:
                raise RuntimeError(
                    f"rank {self.plan.rank} worker {worker}: ran out of samples mid-epoch (a loader bug: "
                    "bad shards are replaced by stand-ins)"
                ) from None
            if isinstance(item, RawSample):
                recent.append(item)
            return item

        for size in wplan.batch_sizes:
            earlier.extend(recent)
            recent.clear()
            faults = FaultStats()
            images, labels, keys, seeds = [], [], [], []
            for _ in range(size):
                sample = take()
                decoded = self._decode(sample, faults)
                seed = _sample_seed(self.seed, self.plan.epoch, sample.key)
                image = None
                if decoded is not None:
                    img, label = decoded
                    try:
                        image = self._transform(img, seed, in_main)
                    except SAMPLE_ERRORS as err:
                        if not self.lazy_decode:
                            raise
                        # the lazily decoded image turned out truncated or corrupt: a bad sample after all
                        faults.add(self.storage.describe(sample.shard), "bad_image", 1, f"{sample.key}: {err!r}")
                if image is None:
                    known_bad.add(sample.key)
                    stand_in, img, label = self._stand_in(sample, recent, stream, known_bad, earlier)
                    # fresh augmentation, still reproducible
                    seed = _sample_seed(self.seed, self.plan.epoch, f"{stand_in.key}@{sample.key}")
                    sample = stand_in
                    if self.stand_in_label is not None:
                        label = self.stand_in_label
                    image = self._transform(img, seed, in_main)
                images.append(image)
                labels.append(label)
                keys.append(sample.key)
                seeds.append(seed)
            stacked = images if self.encoded else torch.stack(images)  # encoded: byte strings of any length
            batch = (stacked, torch.tensor(labels, dtype=torch.int64), torch.tensor(seeds))
            found = [
                (shard, kind, n, faults.details[shard])
                for shard, kinds in faults.shards.items()
                for kind, n in kinds.items()
            ]
            yield (*batch, keys, found) if self.with_keys else (*batch, found)


class ShardLoader:
    """Batches of one split for one rank, epoch after epoch, with a resumable position.

    Iterating yields `(images, labels)` (plus the list of sample keys with `with_keys=True`) for the
    rest of the current epoch. `len()` is the number of batches per epoch, identical on every rank.
    """

    def __init__(
        self,
        manifest: Manifest,
        split: str,
        *,
        batch_size: int,
        rank: int,
        world_size: int,
        num_workers: int,
        transform: Transform | None,
        seed: int,
        epoch: int,
        shuffle: bool,
        shuffle_buffer: int,
        drop_last: bool,
        decode_size: int | None,
        with_keys: bool,
        pin_memory: bool,
        prefetch_factor: int | None,
        multiprocessing_context: str | None,
        timeout: float,
        prefetch_shards: int = 0,
        max_bad_fraction: float | None = None,
        batch_transform: BatchTransformFn | None = None,
    ):
        self.batch_transform = batch_transform
        self.prefetch_shards = prefetch_shards
        self.max_bad_fraction = max_bad_fraction
        self._faults = FaultStats()  # since this loader was made
        self._epoch_skipped = 0
        self.manifest = manifest
        self.split = split
        self.shards = ShardSet.from_manifest(manifest, split)
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.transform = transform
        self.seed = seed
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer
        self.drop_last = drop_last
        self.decode_size = decode_size
        self.with_keys = with_keys
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor
        self.multiprocessing_context = multiprocessing_context
        self.timeout = timeout
        self.epoch = epoch
        # This epoch's earlier passes at other layouts, [world_size, num_workers, batch_size, steps] each (a
        # resumed job with another layout starts a new pass over what they left), and this pass's batches.
        self._history: list[list[int]] = []
        self.batches_yielded = 0
        self._pass: tuple[tuple, RankPlan] | None = None  # the plan of the current pass (cached)
        try:
            self._layout = self.plan(epoch)  # raises the ValueErrors (zero batches...) up front
        except ValueError as err:
            raise ValueError(f"{manifest.url} split {split!r}: {err}") from None

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
        stream = _EpochStream(
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
        )
        # Seeds each worker's `random`/numpy/torch from (seed, epoch, rank). Passed even without workers:
        # the DataLoader draws its base seed from this generator, not from the trainer's global RNG.
        base = random.Random(f"workers:{self.seed}:{self.epoch}:{self.rank}").getrandbits(63)
        extra: dict[str, Any] = {"generator": torch.Generator().manual_seed(base)}
        if self.num_workers > 0:
            extra.update(
                prefetch_factor=self.prefetch_factor,
                multiprocessing_context=self.multiprocessing_context,
                timeout=self.timeout,
            )
        loader = DataLoader(
            stream, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory, **extra
        )
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


def _positive(name: str, value: Any) -> None:
    if type(value) is not int or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _non_negative(name: str, value: Any) -> None:
    if type(value) is not int or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")


def build_loader(
    source: str | Path | Manifest,
    split: str,
    *,
    batch_size: int,
    rank: int,
    world_size: int,
    num_workers: int,
    transform: Transform | None,
    seed: int,
    epoch: int = 0,
    shuffle: bool,
    shuffle_buffer: int = 1000,
    drop_last: bool = True,
    decode_size: int | None = None,
    with_keys: bool = False,
    pin_memory: bool = False,
    prefetch_factor: int | None = 2,
    multiprocessing_context: str | None = None,
    timeout: float = 0,
    prefetch_shards: int | None = None,
    max_bad_fraction: float | None = None,
    batch_transform: BatchTransformFn | None = None,
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
    """
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
    manifest = source if isinstance(source, Manifest) else load_manifest(source)
    if prefetch_shards is None:
        prefetch_shards = 0 if isinstance(manifest.storage, LocalStorage) else 1
    _non_negative("prefetch_shards", prefetch_shards)
    if max_bad_fraction is not None and not 0 <= max_bad_fraction <= 1:
        raise ValueError(f"max_bad_fraction must be between 0 and 1 (or None), got {max_bad_fraction!r}")
    return ShardLoader(
        manifest,
        split,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
        transform=transform,
        seed=seed,
        epoch=epoch,
        shuffle=shuffle,
        shuffle_buffer=shuffle_buffer,
        drop_last=drop_last,
        decode_size=decode_size,
        with_keys=with_keys,
        pin_memory=pin_memory,
        prefetch_factor=prefetch_factor,
        multiprocessing_context=multiprocessing_context,
        timeout=timeout,
        prefetch_shards=prefetch_shards,
        max_bad_fraction=max_bad_fraction,
        batch_transform=batch_transform,
    )
