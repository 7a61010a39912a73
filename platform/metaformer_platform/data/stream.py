"""One rank's epoch as a torch IterableDataset: what each DataLoader worker reads, decodes and batches, with
per-sample seeds and stand-ins for bad samples. The contract, the DataLoader wiring and the resumable position
are in `loader`."""

from __future__ import annotations

import collections
import contextlib
import io
import random
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from metaformer_platform.data.faults import (
    DEFAULT_MAX_MEMBER_BYTES,
    SAMPLE_ERRORS,
    SHARD_ERRORS,
    DataFaultError,
    FaultStats,
    ShortShardError,
    shard_fault_kind,
)
from metaformer_platform.data.reader import (
    RawSample,
    ShardSource,
    decode_image,
    decode_label,
    iter_shard,
    open_image,
    read_shard,
)
from metaformer_platform.data.shardset import RankPlan, WorkerPlan
from metaformer_platform.storage.files import Store

__all__ = ["Transform", "EpochStream"]

# A PIL image -> what the batch holds: a tensor, or (decode_device=cuda) the image's bytes as a tensor.
Transform = Callable[[Image.Image], torch.Tensor]
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


def _slots(
    storage: ShardSource, filenames: Sequence[str], wplan: WorkerPlan, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES
) -> Iterator[Slot]:
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
            readers[shard] = (
                iter_shard(storage, filenames[shard], first, last + 1, max_member_bytes=max_member_bytes), [first]
            )
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

    def __init__(self, storage: ShardSource, names: list[str], depth: int):
        from concurrent.futures import ThreadPoolExecutor

        self.storage = storage
        self.pending = list(names)
        self.depth = depth
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="shard-prefetch")
        self.futures: list[tuple[str, Future[bytes]]] = []
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


class EpochStream(IterableDataset[tuple]):
    """One rank's epoch as a torch IterableDataset; each DataLoader worker reads its own `WorkerPlan`."""

    def __init__(
        self,
        storage: Store,
        plan: RankPlan,
        *,
        skip_batches: int,
        seed: int,
        transform: Transform | None,
        decode_size: int | None,
        with_keys: bool,
        prefetch_shards: int = 0,
        stand_in_label: int | None = None,
        max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
    ):
        super().__init__()
        self.max_member_bytes = max_member_bytes
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
        storage: ShardSource = self.storage
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
        if sample.refused:  # a member over max_member_bytes was read past, not held
            if faults is not None:
                faults.add(self.storage.describe(sample.shard), "oversized", 1, f"{sample.key}: {sample.refused}")
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

    def _stand_in(self, bad: Slot, cursor: _Cursor) -> tuple[RawSample, Image.Image, int]:
        """The sample that fills a bad sample's place: the nearest earlier good sample of the same batch
        (`cursor.recent`), else the nearest later one of this worker's stream. Only the plan decides (a batch's
        samples, and the worker's later batches, are the same in a run resumed at the same layout), so a
        resumed worker picks the same one. Only when nothing later is readable either (a bad end of the
        epoch) does it take one of the worker's `earlier` batches, which a resumed worker may not have."""
        known_bad = cursor.known_bad

        def good(candidate: Slot) -> tuple[Image.Image, int] | None:
            if not isinstance(candidate, RawSample) or candidate is bad or candidate.refused or candidate.key in known_bad:
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

        for candidate in (*reversed(cursor.recent), *cursor.stream.ahead(), *reversed(cursor.earlier)):
            decoded = good(candidate)
            if decoded is not None:
                return candidate, *decoded  # type: ignore[return-value]
        raise DataFaultError(
            f"rank {self.plan.rank}: a loader worker found no readable sample in its share of epoch "
            f"{self.plan.epoch} to stand in for {bad.key}; the shards under {self.storage.url} are unreadable",
            [bad.shard if isinstance(bad, _Lost) else self.storage.describe(bad.shard)],
        )

    def _transform(self, img: Image.Image, seed: int, in_main: bool) -> torch.Tensor:
        if self.transform is None:
            return _to_tensor(img.convert("RGB") if self.lazy_decode else img)
        # Worker processes own their RNGs; in the main process the trainer's RNG streams must not move.
        with _rng_preserved() if in_main else contextlib.nullcontext():
            _seed_sample(seed)
            return self.transform(img)

    def _batches(self, storage: ShardSource, wplan: WorkerPlan, worker: int, in_main: bool) -> Iterator[tuple]:
        """Batches of exactly the planned sizes. A bad sample (see data/faults.py) is counted and its
        place filled by a stand-in (`_stand_in`), so every rank still yields the same batches and a
        resume skips the same positions; stand-ins are augmented afresh (seeded by the bad slot), and in
        evaluation (`stand_in_label`) carry IGNORE_LABEL so they are not scored. Each batch carries the
        faults found since the previous one (a list of (shard, kind, samples, detail))."""
        slots = _slots(storage, self.plan.filenames, wplan, self.max_member_bytes)
        cursor = _Cursor(_Lookahead(slots), self.plan.rank, worker)
        for size in wplan.batch_sizes:
            cursor.next_batch()
            faults = FaultStats()
            items = [self._item(cursor, faults, in_main) for _ in range(size)]
            images = [image for _, image, _, _ in items]
            stacked = images if self.encoded else torch.stack(images)  # encoded: byte strings of any length
            batch = (stacked, torch.tensor([label for *_, label, _ in items], dtype=torch.int64),
                     torch.tensor([seed for *_, seed in items]))
            keys = [key for key, *_ in items]
            found = [
                (shard, kind, n, faults.details[shard])
                for shard, kinds in faults.shards.items()
                for kind, n in kinds.items()
            ]
            yield (*batch, keys, found) if self.with_keys else (*batch, found)

    def _item(self, cursor: _Cursor, faults: FaultStats, in_main: bool) -> tuple[str, torch.Tensor, int, int]:
        """The next planned sample, decoded and augmented, as (key, image, label, seed): a stand-in when it
        is bad (counted in `faults`)."""
        sample = cursor.take()
        decoded = self._decode(sample, faults)
        seed = _sample_seed(self.seed, self.plan.epoch, sample.key)
        if decoded is not None:
            img, label = decoded
            try:
                return sample.key, self._transform(img, seed, in_main), label, seed
            except SAMPLE_ERRORS as err:
                if not self.lazy_decode:
                    raise
                # the lazily decoded image turned out truncated or corrupt: a bad sample after all
                faults.add(self.storage.describe(sample.shard), "bad_image", 1, f"{sample.key}: {err!r}")
        cursor.known_bad.add(sample.key)
        stand_in, img, label = self._stand_in(sample, cursor)
        # fresh augmentation, still reproducible
        seed = _sample_seed(self.seed, self.plan.epoch, f"{stand_in.key}@{sample.key}")
        if self.stand_in_label is not None:
            label = self.stand_in_label
        return stand_in.key, self._transform(img, seed, in_main), label, seed


@dataclass
class _Cursor:
    """One worker's walk through its planned samples, with what a stand-in may be drawn from: this batch's
    readable samples so far (`recent`), a few of its earlier batches' (`earlier`), and what is known bad."""

    stream: _Lookahead
    rank: int
    worker: int
    recent: collections.deque[RawSample] = field(default_factory=collections.deque)
    earlier: collections.deque[RawSample] = field(default_factory=lambda: collections.deque(maxlen=_EARLIER_STAND_INS))
    known_bad: set[str] = field(default_factory=set)

    def next_batch(self) -> None:
        """Start a new batch: this batch's samples become earlier ones."""
        self.earlier.extend(self.recent)
        self.recent.clear()

    def take(self) -> Slot:
        """The next planned slot (a worker never runs out: bad shards are replaced by stand-ins)."""
        try:
            item = next(self.stream)
        except StopIteration:
            raise RuntimeError(
                f"rank {self.rank} worker {self.worker}: ran out of samples mid-epoch (a loader bug: "
                "bad shards are replaced by stand-ins)"
            ) from None
        if isinstance(item, RawSample):
            self.recent.append(item)
        return item
