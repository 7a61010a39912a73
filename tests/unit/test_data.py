"""The data path: shard writer, manifest, synthetic set, rank/worker splitting, resume, transforms."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from loader_helpers import make_loader
from PIL import Image

from metaformer_platform.data import (
    INFO_NAME,
    DataFaultError,
    batch_schedule,
    build_loader,
    build_mixup,
    build_transforms,
    load_manifest,
    verify_checksums,
)
from metaformer_platform.data.build.synthetic import ensure_synthetic_shards
from metaformer_platform.data.build.writer import Sample, write_dataset, write_shard
from metaformer_platform.data.manifest import manifest_dict, write_manifest
from metaformer_platform.data.reader import RawSample, decode_image, decode_label, iter_shard
from metaformer_platform.data.shardset import ShardSet
from metaformer_platform.storage import open_store

NUM_CLASSES = 4


def _jpeg(label: int, size: int = 8) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (size, size), (60 * label, 255 - 60 * label, 128)).save(out, format="JPEG")
    return out.getvalue()


_IMAGES = {label: _jpeg(label) for label in range(NUM_CLASSES)}


def _samples(prefix: str, count: int) -> list[Sample]:
    return [
        Sample(key=f"{prefix}_{i:03d}", image=_IMAGES[i % NUM_CLASSES], label=i % NUM_CLASSES, meta={"i": i})
        for i in range(count)
    ]


def _write_uneven(root: Path, lengths: dict[str, list[int]]) -> Path:
    """Shards with exactly the given per-shard sample counts; keys are unique across the whole set."""
    root.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, shard_lengths in lengths.items():
        splits[split] = [
            write_shard(root / f"{split}-{s:06d}.tar", _samples(f"{split}{s}", n))
            for s, n in enumerate(shard_lengths)
        ]
    body = manifest_dict("uneven", splits, class_names=[f"c{i}" for i in range(NUM_CLASSES)])
    write_manifest(root, body)
    return root


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> Path:
    return _write_uneven(tmp_path_factory.mktemp("uneven"), {"train": [7, 5, 9, 3], "val": [7, 5, 9, 4]})


def _all_keys(root: Path, split: str) -> list[str]:
    manifest = load_manifest(root)
    info = manifest.split(split)
    return [s.key for name in info.filenames for s in iter_shard(manifest.storage, name)]


def _epoch_keys(loader) -> list[list[str]]:
    return [keys for _, _, keys in loader]


def _loader(root, split="train", **kw):
    return make_loader(root, split, **kw)


# ---------------------------------------------------------------- writer and manifest


def test_writer_manifest_round_trip(tmp_path):
    info_path = write_dataset(
        tmp_path,
        {"train": _samples("t", 23), "val": _samples("v", 6)},
        name="tiny",
        samples_per_shard=10,
        class_names=["a", "b", "c", "d"],
    )
    assert info_path == tmp_path / INFO_NAME
    raw = json.loads(info_path.read_text())
    assert raw["splits"]["train"]["filenames"] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    manifest = load_manifest(tmp_path)
    train = manifest.split("train")
    assert (
        train.shard_lengths == (10, 10, 3)
        and train.num_samples == 23 == raw["splits"]["train"]["num_samples"]
    )
    assert manifest.split("val").shard_lengths == (6,)
    assert manifest.class_names == ("a", "b", "c", "d") and manifest.num_classes == 4
    for name, digest, size in zip(train.filenames, train.shard_sha256, train.shard_bytes, strict=True):
        data = (tmp_path / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == digest and len(data) == size
    assert verify_checksums(manifest) == 4
    # contents come back as written, in order, with the .cls and .json members
    got = [s for name in train.filenames for s in iter_shard(manifest.storage, name)]
    assert [s.key for s in got] == [f"t_{i:03d}" for i in range(23)]
    assert [int(s.files["cls"]) for s in got] == [i % 4 for i in range(23)]
    assert json.loads(got[5].files["json"]) == {"i": 5} and got[5].files["jpg"] == _IMAGES[1]
    with pytest.raises(ValueError, match="label 4 >= the 4 classes"):
        write_dataset(
            tmp_path / "bad",
            {"train": [Sample("k", _IMAGES[0], 4)]},
            name="x",
            samples_per_shard=2,
            class_names=["a", "b", "c", "d"],
        )
    # a flipped byte is caught, naming the shard
    shard = tmp_path / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="train-000001.tar: sha256 .* does not match"):
        verify_checksums(manifest, "train")


def test_shards_are_byte_identical_on_rewrite(tmp_path):
    for name in ("a", "b"):
        write_dataset(tmp_path / name, {"train": _samples("t", 12)}, name="x", samples_per_shard=5)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == ["_info.json", "train-000000.tar", "train-000001.tar", "train-000002.tar"]
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    with tarfile.open(tmp_path / "a" / "train-000000.tar") as tar:
        members = tar.getmembers()
    assert [m.name for m in members[:3]] == ["t_000.jpg", "t_000.cls", "t_000.json"]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.mode) for m in members} == {(946684800, 0, 0, "", 0o444)}
    assert not [p for p in (tmp_path / "a").iterdir() if ".tmp" in p.name]


def test_timm_wds_reader_reads_our_shards(uneven):
    from timm.data import create_dataset

    for split, expected in (("train", 24), ("val", 25)):
        ds = create_dataset("wds/uneven", root=str(uneven), split=split, is_training=False, batch_size=1)
        items = list(ds)
        assert len(items) == expected
        assert all(isinstance(img, Image.Image) and img.size == (8, 8) for img, _ in items)
        assert sorted(t for _, t in items) == sorted(
            int(k.rsplit("_", 1)[1]) % NUM_CLASSES for k in _all_keys(uneven, split)
        )


# ---------------------------------------------------------------- synthetic set


def test_synthetic_set_is_cached_and_keyed_by_parameters(tmp_path):
    params = dict(num_classes=3, train_samples=30, val_samples=9, image_size=16, samples_per_shard=8)
    with ThreadPoolExecutor(2) as pool:  # concurrent first use: one build, both get the same folder
        first, second = pool.map(lambda _: ensure_synthetic_shards(tmp_path, **params), range(2))
    assert first == second and (first / INFO_NAME).is_file()
    assert [p for p in tmp_path.iterdir() if p.is_dir()] == [first]
    manifest = load_manifest(first)
    assert manifest.split("train").shard_lengths == (8, 8, 8, 6) and manifest.split("val").num_samples == 9
    assert manifest.class_names == ("circle", "square", "triangle")
    stamps = {p.name: p.stat().st_mtime_ns for p in first.iterdir()}
    again = ensure_synthetic_shards(tmp_path, **params)
    assert again == first and {p.name: p.stat().st_mtime_ns for p in first.iterdir()} == stamps
    other = ensure_synthetic_shards(tmp_path, **{**params, "seed": 1})
    assert other != first and other.parent == tmp_path
    assert (first / "train-000000.tar").read_bytes() != (other / "train-000000.tar").read_bytes()
    # a broken cached set (a shard gone) is rebuilt, not trusted
    (first / "val-000001.tar").unlink()
    assert ensure_synthetic_shards(tmp_path, **params) == first and (first / "val-000001.tar").is_file()
    images, labels = next(
        iter(
            build_loader(
                first,
                "train",
                batch_size=6,
                rank=0,
                world_size=1,
                num_workers=0,
                transform=None,
                seed=0,
                shuffle=False,
            )
        )
    )
    assert images.shape == (6, 3, 16, 16) and images.dtype == torch.uint8
    assert labels.tolist() == [0, 1, 2, 0, 1, 2]


# ---------------------------------------------------------------- data sources: folder, manifest file, brace pattern


def test_a_manifest_file_is_a_source_too(uneven, tmp_path):
    assert load_manifest(uneven / INFO_NAME).split("val").num_samples == 25
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    for f in uneven.glob("*.tar"):
        (renamed / f.name).symlink_to(f)
    (renamed / "imagenet-subset.json").write_bytes((uneven / INFO_NAME).read_bytes())
    manifest = load_manifest(f"file://{renamed}/imagenet-subset.json")
    assert manifest.info_name == "imagenet-subset.json" and manifest.split("train").num_samples == 24
    with pytest.raises(ValueError, match="no shards found"):
        load_manifest(renamed / "other.json")


def test_a_brace_pattern_selects_shards_of_the_manifest(uneven):
    manifest = load_manifest(f"{uneven}/{{train-{{000001..000002}},val-000003}}.tar")
    assert manifest.split("train").filenames == ("train-000001.tar", "train-000002.tar")
    assert manifest.split("train").shard_lengths == (5, 9)
    assert manifest.split("val").num_samples == 4 and manifest.num_classes == NUM_CLASSES
    # the loader reads exactly the selected shards, each sample once
    loader = _loader(f"{uneven}/val-{{000000..000001}}.tar", "val", batch_size=4, shuffle=False, drop_last=False)
    keys = [k for _, _, batch_keys in loader for k in batch_keys]
    assert sorted(keys) == sorted(_all_keys(uneven, "val")[:12])
    with pytest.raises(ValueError, match=r"6 shard\(s\) are not listed in .*train-000004\.tar, .* and 1 more"):
        load_manifest(f"{uneven}/train-{{000003..000009}}.tar")


def test_a_brace_pattern_without_a_manifest_counts_the_shards(uneven, tmp_path, caplog):
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in uneven.glob("*.tar"):
        (bare / f.name).write_bytes(f.read_bytes())
    manifest = load_manifest(f"file://{bare}/{{train-{{000000..000003}},val-{{000000..000003}}}}.tar")
    assert manifest.split("train").shard_lengths == (7, 5, 9, 3)
    assert manifest.split("val").shard_lengths == (7, 5, 9, 4)
    assert manifest.num_classes is None and "counting the samples of 8 shards" in caplog.text
    with pytest.raises(ValueError, match=r"do not exist .*train-000004\.tar"):
        load_manifest(f"{bare}/train-{{000000..000004}}.tar")
    (bare / "extra.tar").write_bytes((bare / "val-000000.tar").read_bytes())
    with pytest.raises(ValueError, match=r"not named \{split\}-NNNNNN\.tar"):
        load_manifest(f"{bare}/{{extra,val-000000}}.tar")
    with pytest.raises(ValueError, match="after a folder or bucket prefix"):
        load_manifest("{a,b}.tar")


# ---------------------------------------------------------------- splitting over ranks and workers


def test_two_ranks_two_workers_uneven_shards(uneven):
    all_keys = set(_all_keys(uneven, "train"))
    assert len(all_keys) == 24
    per_rank = []
    for rank in range(2):
        loader = _loader(uneven, rank=rank, world_size=2, num_workers=2, batch_size=5)
        assert len(loader) == loader.steps_per_epoch == 2  # floor(floor(24 / 2) / 5)
        batches = _epoch_keys(loader)
        assert [len(b) for b in batches] == [5, 5]
        per_rank.append([k for b in batches for k in b])
    seen = per_rank[0] + per_rank[1]
    assert len(seen) == len(set(seen)) == 20  # distinct across ranks; 24 - 20 = 4 < world_size * batch_size
    assert set(seen) <= all_keys
    # batch 4 divides the per-rank budget: every sample exactly once
    union = []
    for rank in range(2):
        union += [
            k
            for b in _epoch_keys(_loader(uneven, rank=rank, world_size=2, num_workers=2, batch_size=4))
            for k in b
        ]
    assert len(union) == 24 and set(union) == all_keys


def test_batch_schedule_and_plans_cover_each_sample_once():
    for n in range(1, 30):
        for world in range(1, 5):
            for batch in range(1, 7):
                for drop_last in (True, False):
                    try:
                        schedule = batch_schedule(n, world_size=world, batch_size=batch, drop_last=drop_last)
                    except ValueError:
                        assert (drop_last and n // world < batch) or (
                            not drop_last and (n < world or (batch == 1 and n % world))
                        ), (n, world, batch, drop_last)
                        continue
                    assert len({len(s) for s in schedule}) == 1 and min(min(s) for s in schedule) >= 1
                    assert max(max(s) for s in schedule) <= batch
                    total = sum(map(sum, schedule))
                    if drop_last:
                        assert n - world * batch < total <= n and all(x == batch for s in schedule for x in s)
                    else:
                        assert total == n
    shards = ShardSet([f"s{i}.tar" for i in range(5)], [7, 0, 9, 3, 6])
    for world, workers, batch, drop_last in (
        (2, 2, 4, False),
        (3, 2, 2, True),
        (1, 3, 5, False),
        (2, 4, 3, True),
    ):
        covered = []
        for rank in range(world):
            plan = shards.plan(
                rank=rank,
                world_size=world,
                num_workers=workers,
                batch_size=batch,
                drop_last=drop_last,
                seed=3,
                epoch=1,
                shuffle=True,
                window=4,
            )
            for w in plan.workers:
                assert len(w.samples) == w.num_samples
                covered += [(plan.filenames[shard], i) for shard, i in w.samples]
        assert len(covered) == len(set(covered)) == plan.total_samples
        if not drop_last:
            assert plan.total_samples == 25


def test_order_depends_on_seed_and_epoch_only(uneven):
    def keys(epoch, seed=0, workers=2):
        return _epoch_keys(_loader(uneven, epoch=epoch, seed=seed, num_workers=workers, batch_size=4))

    first = keys(0)
    assert keys(0) == first
    assert keys(1) != first and keys(0, seed=1) != first
    assert sorted(sum(keys(1), [])) == sorted(sum(first, []))  # batch 4 divides 24: same samples, new order
    # the shard order itself changes with the epoch, identically for every rank
    shards = ShardSet.from_manifest(load_manifest(uneven), "train")
    orders = {tuple(shards.epoch_order(seed=0, epoch=e, shuffle=True)) for e in range(6)}
    assert len(orders) > 1


def test_val_split_every_sample_exactly_once(uneven):
    all_keys = _all_keys(uneven, "val")
    assert len(all_keys) == 25
    for world, workers, batch in ((2, 2, 4), (3, 2, 8), (4, 0, 3)):
        seen, lengths, counts = [], [], 0
        for rank in range(world):
            loader = _loader(
                uneven,
                "val",
                rank=rank,
                world_size=world,
                num_workers=workers,
                batch_size=batch,
                shuffle=False,
                drop_last=False,
            )
            batches = list(loader)
            lengths += [len(loader), len(batches)]
            assert sum(len(labels) for _, labels, _ in batches) == loader.num_samples
            assert all(1 <= len(labels) <= batch for _, labels, _ in batches)
            seen += [k for _, _, keys in batches for k in keys]
            counts += loader.num_samples
            assert loader.total_samples == 25
        assert len(set(lengths)) == 1, lengths  # same number of batches on every rank
        assert sorted(seen) == sorted(all_keys) and counts == 25, (world, workers, batch)


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
def test_resume_skips_exactly_the_batches_seen(uneven):
    reference = _loader(uneven, num_workers=3, batch_size=3, epoch=2)
    full = _epoch_keys(reference)
    assert len(full) == 8 and reference.state_dict()["epoch"] == 3  # moved on after a whole epoch

    for stop_after in (4, 5):  # resume lands on different workers of the round-robin
        interrupted = _loader(uneven, num_workers=3, batch_size=3, epoch=2)
        head = []
        for _, _, keys in interrupted:
            head.append(keys)
            if len(head) == stop_after:
                break
        state = interrupted.state_dict()
        assert (state["epoch"], state["position"], state["steps_per_epoch"]) == (2, stop_after * 3, 8)

        resumed = _loader(uneven, num_workers=3, batch_size=3)
        resumed.load_state_dict(state)
        tail = _epoch_keys(resumed)
        assert head + tail == full, stop_after
        assert (resumed.epoch, resumed.position) == (3, 0)

    changed = _loader(uneven, num_workers=1, batch_size=3, shuffle_buffer=5)
    with pytest.raises(ValueError, match=r"order changed \(shuffle_buffer: stored 8, now 5\).*strict=False"):
        changed.load_state_dict(state)
    changed.load_state_dict(state, strict=False)
    assert (changed.epoch, changed.position) == (2, 0)


def _keyed_tensors(loader) -> dict[str, torch.Tensor]:
    return {k: img for images, _, keys in loader for k, img in zip(keys, images, strict=True)}


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_augmentation_depends_on_the_sample_not_on_workers_or_resume(uneven):
    """Random crops/flips/RandAugment are seeded by (seed, epoch, key): same tensors for 0 or 2 workers,
    and a loader resumed mid-epoch produces exactly the tensors the uninterrupted one did."""
    tf = build_transforms(16, is_training=True, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25)
    in_process = _keyed_tensors(_loader(uneven, batch_size=3, transform=tf, epoch=1))
    two_workers = _keyed_tensors(_loader(uneven, batch_size=3, transform=tf, epoch=1, num_workers=2))
    assert in_process.keys() == two_workers.keys() and len(in_process) == 24
    assert all(torch.equal(in_process[k], two_workers[k]) for k in in_process)
    other_epoch = _keyed_tensors(_loader(uneven, batch_size=3, transform=tf, epoch=2))
    assert any(not torch.equal(in_process[k], other_epoch[k]) for k in in_process)  # epochs differ

    interrupted = _loader(uneven, batch_size=3, transform=tf, epoch=1)
    for seen, _ in enumerate(interrupted, 1):
        if seen == 3:
            break
    resumed = _loader(uneven, batch_size=3, transform=tf)
    resumed.load_state_dict(interrupted.state_dict())
    tail = _keyed_tensors(resumed)
    assert len(tail) == 24 - 9 and all(torch.equal(in_process[k], v) for k, v in tail.items())

    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    _keyed_tensors(_loader(uneven, batch_size=3, transform=tf))  # in-process loading...
    assert torch.equal(torch.rand(1), expected)  # ...leaves the trainer's RNG stream where it was


# ---------------------------------------------------------------- transforms and mixup


def test_transforms_at_32px_through_the_loader(tmp_path):
    root = ensure_synthetic_shards(
        tmp_path, num_classes=4, train_samples=8, val_samples=4, image_size=48, samples_per_shard=8
    )
    train_tf = build_transforms(32, is_training=True)
    val_tf = build_transforms(32, is_training=False, crop_pct=0.9)
    img = Image.new("RGB", (48, 40), (10, 200, 30))
    for tf in (train_tf, val_tf):
        out = tf(img)
        assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert "RandAugment" in repr(train_tf) and "RandomErasing" in repr(train_tf)
    images, labels = next(
        iter(
            build_loader(
                root,
                "train",
                batch_size=4,
                rank=0,
                world_size=1,
                num_workers=0,
                transform=train_tf,
                seed=0,
                shuffle=True,
                shuffle_buffer=4,
            )
        )
    )
    assert images.shape == (4, 3, 32, 32) and labels.dtype == torch.int64


def test_decode_drafts_large_jpegs_down_to_the_needed_size():
    out = io.BytesIO()
    Image.new("RGB", (320, 256), (90, 10, 200)).save(out, format="JPEG")
    sample = RawSample("k", {"jpg": out.getvalue(), "cls": b"1"}, "x.tar")
    assert decode_image(sample).size == (320, 256)
    assert decode_image(sample, draft_size=64).size == (80, 64)  # DCT-scaled by 1/4, short side still >= 64
    assert decode_image(sample, draft_size=200).size == (320, 256)  # not much larger: full decode
    assert decode_label(sample) == 1


def test_randaugment_posterize_survives_zero_bits():
    from timm.data.auto_augment import AugmentOp

    build_transforms(32, is_training=True)  # applies the Pillow >= 13 shim
    op = AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10)  # 4 - int(10 / 10 * 4) = 0 bits
    out = op(Image.new("RGB", (4, 4), (200, 100, 50)))
    assert out.getextrema() == ((0, 0), (0, 0), (0, 0))


def test_mixup_has_the_paper_values():
    from timm.data import Mixup

    mixup = build_mixup(num_classes=10)
    assert isinstance(mixup, Mixup)
    assert (
        mixup.mixup_alpha,
        mixup.cutmix_alpha,
        mixup.mix_prob,
        mixup.switch_prob,
        mixup.label_smoothing,
    ) == (
        0.8,
        1.0,
        1.0,
        0.5,
        0.1,
    )
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    _, target = mixup(x, y)
    assert target.shape == (4, 10) and torch.allclose(target.sum(1), torch.ones(4))
    assert build_mixup(num_classes=10, mixup_alpha=0.0, cutmix_alpha=0.0) is None


# ---------------------------------------------------------------- bad input


def test_manifest_errors_name_the_file_and_the_fix(tmp_path, uneven):
    with pytest.raises(
        ValueError, match=rf"no shards found in {tmp_path}: expected .*_info.json.*build_shards"
    ):
        load_manifest(tmp_path)
    (tmp_path / INFO_NAME).write_text("{not json")
    with pytest.raises(ValueError, match=rf"{tmp_path}/_info.json: not valid JSON"):
        load_manifest(f"file://{tmp_path}")
    (tmp_path / INFO_NAME).write_text(json.dumps({"name": "x"}))
    with pytest.raises(ValueError, match="has no 'splits' object"):
        load_manifest(tmp_path)

    good = json.loads((uneven / INFO_NAME).read_text())
    bad = json.loads(json.dumps(good))
    bad["splits"]["train"]["num_samples"] = 30
    (tmp_path / INFO_NAME).write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="num_samples is 30 but its shard_lengths sum to 24"):
        load_manifest(tmp_path)
    bad = json.loads(json.dumps(good))
    bad["splits"]["train"]["shard_lengths"] = [7, 5, 9]
    (tmp_path / INFO_NAME).write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="lists 4 filenames but 3 shard_lengths"):
        load_manifest(tmp_path)
    (tmp_path / INFO_NAME).write_text(json.dumps(good))  # shards are not in tmp_path
    with pytest.raises(ValueError, match=r"8 listed shard file\(s\) are missing .*train-000000.tar"):
        load_manifest(tmp_path)
    with pytest.raises(ValueError, match=r"unknown split 'test'; this manifest has \['train', 'val'\]"):
        _loader(uneven, "test")
    with pytest.raises(ValueError, match="unsupported URL scheme 'gs'"):
        open_store("gs://bucket/x")


def test_loader_argument_errors(uneven):
    with pytest.raises(ValueError, match="batch_size=13 is larger than the per-rank sample budget 12"):
        _loader(uneven, batch_size=13, world_size=2)
    for kw, message in (
        ({"batch_size": 0}, "batch_size must be a positive integer, got 0"),
        ({"world_size": 0}, "world_size must be a positive integer"),
        ({"rank": 2, "world_size": 2}, r"rank must be < world_size \(2\), got 2"),
        ({"rank": -1}, "rank must be a non-negative integer"),
        ({"num_workers": -1}, "num_workers must be a non-negative integer"),
        ({"shuffle_buffer": 0}, "shuffle_buffer must be a positive integer"),
        ({"epoch": -1}, "epoch must be a non-negative integer"),
    ):
        with pytest.raises(ValueError, match=message):
            _loader(uneven, **kw)
    with pytest.raises(ValueError, match="fewer samples than ranks"):
        _loader(uneven, "val", world_size=30, rank=0, batch_size=2, drop_last=False, shuffle=False)


def test_truncated_shard_is_reported(tmp_path):
    root = _write_uneven(tmp_path / "t", {"train": [4, 4]})
    body = json.loads((root / INFO_NAME).read_text())
    body["splits"]["train"]["shard_lengths"] = [6, 4]
    body["splits"]["train"]["num_samples"] = 10
    del body["splits"]["train"]["shard_bytes"]
    (root / INFO_NAME).write_text(json.dumps(body))
    # skipped and counted (see test_data_faults.py); with no tolerance, fatal and named
    with pytest.raises(
        DataFaultError,
        match=r"2 of its 10 'train' samples .* bad shards: .*train-000000.tar \(2 short\)",
    ):
        list(_loader(root, batch_size=2, shuffle=False, max_bad_fraction=0.0))


def test_data_package_imports_no_ray_mlflow_boto3_or_config():
    code = (
        "import sys, metaformer_platform.data; "
        "print(sorted(m for m in ('ray', 'mlflow', 'boto3', 'timm', 'metaformer_platform.config') if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "platform")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]"
