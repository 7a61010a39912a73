"""Shard prefetching in the loader: the same batches as without it, and the reads really run ahead."""

from __future__ import annotations

import io
import threading

import torch
from PIL import Image

from metaformer_platform.data import build_loader, load_manifest
from metaformer_platform.data.build.writer import Sample, write_dataset
from metaformer_platform.data.stream import _Prefetcher
from metaformer_platform.storage.files import LocalStore


def _jpeg(i: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), ((40 * i) % 256, 90, (7 * i) % 256)).save(out, format="JPEG")
    return out.getvalue()


def _batches(loader):
    return [(keys, images.clone(), labels.clone()) for images, labels, keys in loader]


def test_prefetch_gives_the_same_batches_and_resumes_the_same(tmp_path):
    samples = [Sample(f"k{i:03d}", _jpeg(i), i % 3) for i in range(70)]
    write_dataset(tmp_path, {"train": samples}, name="p", samples_per_shard=9, num_classes=3)
    kw = dict(batch_size=4, rank=1, world_size=2, num_workers=2, transform=None, seed=5, shuffle=True,
              shuffle_buffer=6, with_keys=True)
    plain = _batches(build_loader(tmp_path, "train", prefetch_shards=0, **kw))
    ahead = build_loader(tmp_path, "train", prefetch_shards=2, **kw)
    assert build_loader(tmp_path, "train", **kw).prefetch_shards == 0  # local files: the OS reads ahead
    got = _batches(ahead)
    assert [k for k, _, _ in got] == [k for k, _, _ in plain]
    assert all(torch.equal(a[1], b[1]) and torch.equal(a[2], b[2]) for a, b in zip(got, plain, strict=True))
    resumed = build_loader(tmp_path, "train", prefetch_shards=2, **kw)
    resumed.load_state_dict({**ahead.state_dict(), "epoch": 0, "position": 3 * 2 * 4, "passes": [[2, 2, 4, 3]]})
    assert [k for k, _, _ in _batches(resumed)] == [k for k, _, _ in plain][3:]


class _Slow(LocalStore):
    """Records which shards were read and lets the test hold the reads back."""

    def __init__(self, root):
        super().__init__(root)
        self.reads: list[str] = []
        self.gate = threading.Event()

    def open(self, name):  # the prefetcher reads whole shards through open() (reader.read_shard)
        self.reads.append(name)
        if name != "train-000000.tar":
            self.gate.wait(10)
        return super().open(name)


def test_the_next_shard_is_fetched_while_the_current_one_is_read(tmp_path):
    write_dataset(tmp_path, {"train": [Sample(f"k{i}", _jpeg(i), 0) for i in range(6)]}, name="p",
                  samples_per_shard=2, num_classes=1)
    storage = _Slow(tmp_path)
    names = list(load_manifest(tmp_path).split("train").filenames)
    pre = _Prefetcher(storage, names, depth=1)
    first = pre.open(names[0]).read()  # handing out shard 0 starts the download of shard 1
    for _ in range(100):
        if storage.reads == names[:2]:
            break
        threading.Event().wait(0.01)
    assert storage.reads == names[:2] and first == (tmp_path / names[0]).read_bytes()
    storage.gate.set()
    assert pre.open(names[1]).read() == (tmp_path / names[1]).read_bytes()
    assert pre.open(names[2]).read() == (tmp_path / names[2]).read_bytes()
    pre.close()
