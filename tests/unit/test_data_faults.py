"""Bad shards and samples: skipped, counted per shard, replaced so batch counts and resume hold, fatal past
a threshold; a manifest that disagrees with its shards is refused before any reading."""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from pathlib import Path

import pytest
import torch
from loader_helpers import make_loader
from PIL import Image

from metaformer_platform.data import (
    IGNORE_LABEL,
    INFO_NAME,
    DataFaultError,
    build_transforms,
    load_manifest,
)
from metaformer_platform.data.build.writer import Sample, write_shard
from metaformer_platform.data.manifest import manifest_dict, write_manifest

PER_SHARD = 8


def _jpeg(i: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (i * 5 % 256, 90, 200)).save(out, format="JPEG")
    return out.getvalue()


def _write(root: Path, split: str, num_shards: int, corrupt: dict[str, bytes] | None = None) -> list[str]:
    """`num_shards` shards of PER_SHARD samples; `corrupt` maps a key to the image bytes it gets instead."""
    root.mkdir(parents=True, exist_ok=True)
    corrupt = corrupt or {}
    infos = []
    for s in range(num_shards):
        samples = [
            Sample(key, corrupt.get(key, _jpeg(s * PER_SHARD + i)), (s + i) % 4)
            for i in range(PER_SHARD)
            for key in [f"{split}{s}_{i}"]
        ]
        infos.append(write_shard(root / f"{split}-{s:06d}.tar", samples))
    body = manifest_dict("f", {split: infos}, num_classes=4)
    write_manifest(root, body)
    return [f"{split}{s}_{i}" for s in range(num_shards) for i in range(PER_SHARD)]


def _set_cls(path: Path, key: str, data: bytes) -> None:
    """Rewrite one sample's .cls member (keeps the other members byte for byte)."""
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for member, payload in members:
            if member.name == f"{key}.cls":
                payload = data
            member.size = len(payload)
            tar.addfile(member, io.BytesIO(payload))


def _loader(source, split="train", **kw):
    return make_loader(source, split, **{**dict(batch_size=4, shuffle_buffer=6), **kw})


def _kinds(loader) -> dict[str, dict[str, int]]:
    return {Path(k).name: v["kinds"] for k, v in loader.fault_stats()["bad_shards"].items()}


def test_each_corrupt_input_kind_is_skipped_counted_and_named(tmp_path, caplog):
    good_jpeg = _jpeg(0)
    keys = _write(tmp_path, "train", 6, corrupt={"train4_2": good_jpeg[: len(good_jpeg) // 2]})
    _set_cls(tmp_path / "train-000004.tar", "train4_5", b"not-a-label")
    body = json.loads((tmp_path / INFO_NAME).read_text())
    del body["splits"]["train"]["shard_bytes"]  # the .cls rewrite above may change a shard's size
    write_manifest(tmp_path, body)
    manifest = load_manifest(tmp_path)  # the checks pass; the shards go bad afterwards
    shard = {i: tmp_path / f"train-{i:06d}.tar" for i in range(6)}
    data = shard[1].read_bytes()
    shard[1].write_bytes(data[: len(data) // 2])  # truncated mid-way
    shard[2].write_bytes(os.urandom(len(shard[2].read_bytes())))  # random bytes of the right size
    shard[3].unlink()  # gone
    with tarfile.open(shard[5]) as tar:
        cut_member = tar.getmembers()[7]  # train5_3.cls (each sample is a .jpg and a .cls)
    shard[5].write_bytes(shard[5].read_bytes()[: cut_member.offset_data + 5])  # cut inside its data block
    cut_sample = 3  # train5_0..2 were read whole
    assert cut_member.name == "train5_3.cls"

    loader = _loader(manifest, max_bad_fraction=None)
    with caplog.at_level(logging.WARNING, logger="metaformer_platform.data.loader"):
        batches = list(loader)
    assert len(batches) == len(loader) == 12 and all(len(k) == 4 for _, _, k in batches)
    kinds = _kinds(loader)
    # cut inside a member: not_a_tar (unexpected end of data); on a header boundary: short (fewer samples)
    ((truncated_kind, truncated_skipped),) = kinds["train-000001.tar"].items()
    assert truncated_kind in ("not_a_tar", "short")
    assert 1 <= truncated_skipped < PER_SHARD  # the samples before the cut were read
    assert kinds == {
        "train-000001.tar": {truncated_kind: truncated_skipped},
        "train-000002.tar": {"not_a_tar": PER_SHARD},
        "train-000003.tar": {"missing": PER_SHARD},
        "train-000004.tar": {"bad_image": 1, "bad_label": 1},
        "train-000005.tar": {"not_a_tar": PER_SHARD - cut_sample},  # "unexpected end of data"
    }
    stats = loader.fault_stats()
    assert stats["skipped_samples"] == truncated_skipped + 2 * PER_SHARD + 2 + PER_SHARD - cut_sample
    assert str(shard[3]) in stats["bad_shards"]  # named by their full location
    # every readable sample was yielded; stand-ins (repeats of readable samples) fill the rest
    seen = [k for _, _, batch_keys in batches for k in batch_keys]
    bad = {"train4_2", "train4_5"} | {f"train{s}_{i}" for s in (2, 3) for i in range(PER_SHARD)}
    readable = set(keys) - bad - {f"train1_{i}" for i in range(PER_SHARD - truncated_skipped, PER_SHARD)}
    readable -= {f"train5_{i}" for i in range(cut_sample, PER_SHARD)}
    assert set(seen) == readable and len(seen) == 48
    # one log line per bad shard, naming it
    lines = [r.getMessage() for r in caplog.records if "skipping unreadable data" in r.getMessage()]
    assert len(lines) == 5
    for i in (1, 2, 3, 4, 5):
        assert sum(str(shard[i]) in line for line in lines) == 1


def test_two_ranks_two_workers_equal_batches_and_exact_resume_with_a_bad_shard(tmp_path):
    _write(tmp_path, "train", 6)
    bad = tmp_path / "train-000004.tar"
    bad.write_bytes(os.urandom(bad.stat().st_size))
    tf = build_transforms(8, is_training=True, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25)
    skipped = 0
    for rank in range(2):
        kw = dict(rank=rank, world_size=2, num_workers=2, batch_size=4, transform=tf, epoch=1)
        loader = _loader(tmp_path, **kw)
        full = list(loader)
        assert len(full) == len(loader) == 6 and all(len(labels) == 4 for _, labels, _ in full)
        skipped += loader.fault_stats()["skipped_samples"]

        interrupted = _loader(tmp_path, **kw)
        head = []
        for batch in interrupted:
            head.append(batch)
            if len(head) == 3:
                break
        resumed = _loader(tmp_path, **kw)
        resumed.load_state_dict(interrupted.state_dict())
        tail = list(resumed)
        assert len(head) + len(tail) == len(full)
        for (a_img, a_lab, a_keys), (b_img, b_lab, b_keys) in zip(full, head + tail, strict=True):
            assert a_keys == b_keys and torch.equal(a_lab, b_lab) and torch.equal(a_img, b_img)
    assert skipped == PER_SHARD  # the bad shard's samples, over both ranks (48 = 2 x 6 x 4: all read)


def test_val_total_plus_skipped_is_the_manifest_count(tmp_path):
    keys = _write(tmp_path, "val", 5)
    (tmp_path / "val-000001.tar").unlink()
    manifest = load_manifest(tmp_path, check_files=False)
    assert manifest.split("val").num_samples == 40
    evaluated, skipped, seen, lengths = 0, 0, [], set()
    for rank in range(2):
        loader = _loader(
            manifest,
            "val",
            rank=rank,
            world_size=2,
            num_workers=2,
            batch_size=3,
            shuffle=False,
            drop_last=False,
        )
        batches = list(loader)
        lengths.add(len(batches))
        for _, labels, batch_keys in batches:
            real = labels != IGNORE_LABEL
            evaluated += int(real.sum())
            seen += [k for k, r in zip(batch_keys, real.tolist(), strict=True) if r]
        skipped += loader.fault_stats()["skipped_samples"]
    assert len(lengths) == 1  # same number of batches on both ranks
    assert skipped == PER_SHARD and evaluated + skipped == 40
    assert sorted(seen) == sorted(k for k in keys if not k.startswith("val1_"))  # each good one once


def test_above_the_threshold_the_loader_raises_naming_the_shards(tmp_path):
    _write(tmp_path, "train", 6)
    manifest = load_manifest(tmp_path)
    (tmp_path / "train-000002.tar").unlink()
    # 8 of 48 samples bad: 0.2 tolerates it, 0.1 does not
    assert len(list(_loader(manifest, max_bad_fraction=0.2))) == 12
    with pytest.raises(
        DataFaultError, match=r"more than max_bad_fraction=0.1; bad shards: .*train-000002.tar"
    ) as err:
        list(_loader(manifest, max_bad_fraction=0.1))
    assert err.value.bad_shards == (str(tmp_path / "train-000002.tar"),)
    assert isinstance(err.value, ValueError)
    with pytest.raises(ValueError, match="max_bad_fraction must be between 0 and 1"):
        _loader(manifest, max_bad_fraction=1.5)


def test_a_share_with_nothing_readable_fails_clearly(tmp_path):
    _write(tmp_path, "train", 1)
    manifest = load_manifest(tmp_path)
    (tmp_path / "train-000000.tar").unlink()
    with pytest.raises(DataFaultError, match="no readable sample"):
        list(_loader(manifest))


def test_a_manifest_that_disagrees_with_its_shards_is_refused_before_reading(tmp_path):
    _write(tmp_path, "train", 3)
    shard = tmp_path / "train-000001.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[:-1024])
    with pytest.raises(
        ValueError, match=rf"shard size differs from the manifest: {shard} \({len(data) - 1024} bytes"
    ):
        load_manifest(tmp_path)
    with pytest.raises(ValueError, match="shard size differs"):
        _loader(tmp_path)


def _png_bomb(side: int) -> bytes:
    """A PNG of side x side pixels (1 bit, all black) that compresses to a few KB: a decompression bomb."""
    out = io.BytesIO()
    Image.new("1", (side, side)).save(out, format="PNG")
    return out.getvalue()


def test_decompression_bombs_are_bad_samples_not_a_job_abort(tmp_path):
    # 20000^2 = 400 M pixels: PIL raises DecompressionBombError (> 2 x MAX_IMAGE_PIXELS); 10000^2 = 100 M
    # pixels: PIL only warns, then decodes 300 MB of RGB per sample: both must be skipped and counted.
    assert 10000**2 > Image.MAX_IMAGE_PIXELS and 20000**2 > 2 * Image.MAX_IMAGE_PIXELS
    keys = _write(tmp_path, "train", 2, corrupt={"train0_1": _png_bomb(20000), "train1_6": _png_bomb(10000)})
    loader = _loader(tmp_path, max_bad_fraction=None)
    batches = list(loader)
    assert len(batches) == 4 and all(len(k) == 4 for _, _, k in batches)
    assert _kinds(loader) == {"train-000000.tar": {"bad_image": 1}, "train-000001.tar": {"bad_image": 1}}
    seen = {k for _, _, batch_keys in batches for k in batch_keys}
    assert seen == set(keys) - {"train0_1", "train1_6"}
