"""The epoch order does not depend on the layout, and a data position taken at one layout continues at any
other: stop an epoch at several positions, go on with other world sizes, loader worker counts and batch
sizes, and every sample of the split is seen exactly once (issue 13, item 1)."""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import pytest
from loader_helpers import make_loader
from PIL import Image

from metaformer_platform.data.build.writer import Sample, write_dataset

# 157 samples in shards of 7 (the last one shorter): no global batch below divides it
NUM_SAMPLES, PER_SHARD = 157, 7


def _jpeg(i: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (4, 4), ((40 * i) % 256, 90, (7 * i) % 256)).save(out, format="JPEG")
    return out.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("layouts")
    samples = [Sample(f"k{i:03d}", _jpeg(i), i % 3) for i in range(NUM_SAMPLES)]
    write_dataset(root, {"train": samples}, name="layouts", samples_per_shard=PER_SHARD, num_classes=3)
    return root


ALL_KEYS = {f"k{i:03d}" for i in range(NUM_SAMPLES)}


def _segment(root: Path, state: dict | None, *, world: int, workers: int, batch: int, steps: int | None, **kw):
    """Every rank of one layout continues from `state` for `steps` batches (None: to the epoch's end).
    Returns (keys seen, the state all ranks agree on, batches per rank)."""
    keys, states, counts = [], [], []
    for rank in range(world):
        loader = make_loader(
            root, rank=rank, world_size=world, num_workers=workers, batch_size=batch, epoch=3, seed=7, **kw
        )
        if state is not None:
            loader.load_state_dict(state)
        batches = iter(loader)
        got = 0
        for _, labels, batch_keys in batches:
            assert len(labels) == len(batch_keys) <= batch
            keys += batch_keys
            got += 1
            if got == steps:
                break
        batches.close()  # shuts its DataLoader workers down now
        counts.append(got)
        states.append({k: v for k, v in loader.state_dict().items() if k != "rank"})
    assert len(set(counts)) == 1, f"unequal batch counts per rank: {counts}"
    assert all(s == states[0] for s in states), "ranks disagree on the data position"
    return keys, states[0], counts[0]


# Each world size meets each worker count, and every step of a chain changes the world size.
CHAIN = [(1, 0), (2, 1), (3, 2), (4, 0), (1, 1), (2, 2), (3, 0), (4, 1), (1, 2), (2, 0), (3, 1), (4, 2)]
# Fewer loader workers (slow to start), the same layout twice in a row, and a global batch that changes.
SHORT_CHAIN = [(1, 0), (3, 1), (3, 1), (2, 0), (4, 0), (1, 1), (3, 0)]


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize(
    ("chain", "global_batch", "drop_last", "steps"),
    [
        (CHAIN, 12, True, [1, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1]),  # the global batch kept: per-rank 12, 6, 4, 3
        (SHORT_CHAIN, None, False, [2, 1, 3, 1, 2, 1]),  # per-rank batch 2: the global batch changes too
    ],
    ids=["keep-global-batch", "evaluation-any-batch"],
)
def test_an_epoch_stopped_anywhere_continues_at_other_layouts_each_sample_once(
    shards, chain, global_batch, drop_last, steps
):
    seen: list[str] = []
    state = None
    positions = []
    for (world, workers), count in zip(chain, [*steps, None], strict=True):
        batch = global_batch // world if global_batch else 2
        keys, state, batches = _segment(
            shards, state, world=world, workers=workers, batch=batch, steps=count, drop_last=drop_last
        )
        seen += keys
        if count is not None:
            assert batches == count
            assert state["epoch"] == 3 and state["position"] == len(seen), "the position counts samples consumed"
            positions.append(state["position"])
    assert state["epoch"] == 4 and state["position"] == 0  # the last layout finished the epoch
    duplicates = [k for k, n in Counter(seen).items() if n > 1]
    assert not duplicates, f"seen twice: {duplicates}"
    assert set(seen) <= ALL_KEYS
    if drop_last:  # only the tail of the order, fewer than the last layout's global batch, is left out
        assert NUM_SAMPLES - global_batch < len(seen) <= NUM_SAMPLES
    else:
        assert set(seen) == ALL_KEYS
    assert len(set(positions)) == len(positions) > 4  # stopped at several positions


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_every_layout_reads_runs_of_one_global_order(shards):
    """Per (seed, epoch) one order: one rank with one worker yields it as is; under any layout, the batches
    of each loader worker of each rank are a contiguous run of it, and the runs tile it."""
    order = [k for _, _, keys in make_loader(shards, batch_size=1, epoch=3, seed=7) for k in keys]
    assert sorted(order) == sorted(ALL_KEYS) and order != sorted(order)
    assert order != [k for _, _, keys in make_loader(shards, batch_size=1, epoch=4, seed=7) for k in keys]
    for world, workers, batch in ((3, 2, 4), (4, 1, 3)):
        runs = []
        for rank in range(world):
            batches = [keys for _, _, keys in make_loader(
                shards, rank=rank, world_size=world, num_workers=workers, batch_size=batch, epoch=3, seed=7)]
            for w in range(max(workers, 1)):
                run = [k for keys in batches[w :: max(workers, 1)] for k in keys]
                start = order.index(run[0])
                assert order[start : start + len(run)] == run, (world, workers, rank, w)
                runs.append((start, len(run)))
        runs.sort()
        assert runs[0][0] == 0 and all(a + n == b for (a, n), (b, _) in zip(runs, runs[1:], strict=False))


def test_a_state_that_disagrees_with_itself_is_refused(shards):
    loader = make_loader(shards, batch_size=4, world_size=2, epoch=3, seed=7)
    it = iter(loader)
    next(it), next(it)
    it.close()
    state = loader.state_dict()
    assert state["passes"] == [[2, 0, 4, 2]] and state["position"] == 16
    other = make_loader(shards, batch_size=3, epoch=3, seed=7)
    for bad in ({**state, "position": 17}, {**state, "passes": [[2, 0, 4, 99]]}, {**state, "passes": "x"}):
        with pytest.raises(ValueError, match="invalid passes"):
            other.load_state_dict(bad)
    other.load_state_dict(state)
    assert other.position == 16 and other.steps_remaining == (NUM_SAMPLES - 16) // 3
