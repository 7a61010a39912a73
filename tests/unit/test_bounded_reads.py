"""Bounded reads (issue 24, finding 4): a size a shard's header or a manifest declares is never trusted for an
allocation. A 1 KiB shard that declares a 2 GiB member is a counted bad shard, through the loader a job uses,
while the worker's peak memory stays put; a member over data.max_member_bytes is a counted bad sample; a
manifest over MAX_MANIFEST_BYTES is refused before it is parsed."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from metaformer_platform.config.schema import DataConfig
from metaformer_platform.data import manifest as manifest_module
from metaformer_platform.data.build.writer import Sample, write_shard
from metaformer_platform.data.faults import DEFAULT_MAX_MEMBER_BYTES
from metaformer_platform.data.manifest import (
    ManifestError,
    ShardInfo,
    load_manifest,
    manifest_dict,
    write_manifest,
)

PER_SHARD = 6
DECLARED = 2 << 30  # what the forged header claims: 2 GiB


def _jpeg(i: int, side: int = 8) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (side, side), (i * 5 % 256, 90, 200)).save(out, format="JPEG")
    return out.getvalue()


def _bomb_shard(path: Path) -> ShardInfo:
    """1,024 bytes: one ustar header declaring a 2 GiB `bomb.jpg`, then one block of its 'data'."""
    info = tarfile.TarInfo("bomb.jpg")
    info.size = DECLARED
    data = info.tobuf(tarfile.USTAR_FORMAT) + b"\xff" * 512
    assert len(data) == 1024
    path.write_bytes(data)
    return ShardInfo(path.name, 1, hashlib.sha256(data).hexdigest(), len(data))


def _dataset(root: Path, extra: dict[str, bytes] | None = None) -> None:
    """Two good shards of PER_SHARD samples (`extra` replaces some images) and the 1 KiB bomb shard."""
    extra = extra or {}
    infos = [
        write_shard(root / f"train-{s:06d}.tar", [
            Sample(key, extra.get(key, _jpeg(s * PER_SHARD + i)), i % 3)
            for i in range(PER_SHARD) for key in [f"s{s}_{i}"]
        ])
        for s in range(2)
    ]
    infos.append(_bomb_shard(root / "train-000002.tar"))
    write_manifest(root, manifest_dict("bounded", {"train": infos}, num_classes=3))


CHILD = """
import json, resource, sys
from metaformer_platform.data import build_loader
loader = build_loader(sys.argv[1], "train", batch_size=2, rank=0, world_size=1, num_workers=0, transform=None,
                      seed=0, shuffle=False, drop_last=False, with_keys=True)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
keys = [k for _, _, batch in loader for k in batch]
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"grew_kib": after - before, "keys": keys, "stats": loader.fault_stats()}))
"""


def test_a_1kib_shard_declaring_2gib_is_a_counted_bad_shard_in_bounded_memory(tmp_path):
    _dataset(tmp_path)
    # a fresh process, so its peak RSS is this loader's alone (the suite's own peak would hide a rise)
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    bomb = str(tmp_path / "train-000002.tar")
    assert out["stats"]["bad_shards"] == {bomb: {"skipped": 1, "kinds": {"not_a_tar": 1}}}
    assert out["stats"]["skipped_samples"] == 1
    assert sorted(set(out["keys"])) == sorted(f"s{s}_{i}" for s in range(2) for i in range(PER_SHARD))
    # the read of the shard allocated nothing near its declared size (main: +2 GiB here)
    assert out["grew_kib"] < 64 << 10, f"peak RSS grew {out['grew_kib']} KiB while reading a 1 KiB shard"


def test_a_member_over_max_member_bytes_is_an_oversized_bad_sample_and_the_rest_is_read(tmp_path):
    from loader_helpers import make_loader

    big = _jpeg(7) + b"\0" * (300 << 10)  # a JPEG with 300 KiB of trailing bytes: decodes, but too big
    _dataset(tmp_path, extra={"s1_2": big})
    loader = make_loader(tmp_path, "train", batch_size=2, shuffle=False, drop_last=False,
                         max_member_bytes=256 << 10, max_bad_fraction=None)
    keys = [k for _, _, batch in loader for k in batch]
    stats = loader.fault_stats()["bad_shards"]
    assert stats[str(tmp_path / "train-000001.tar")] == {"skipped": 1, "kinds": {"oversized": 1}}
    assert stats[str(tmp_path / "train-000002.tar")] == {"skipped": 1, "kinds": {"not_a_tar": 1}}
    # the samples after the oversized one in its shard were read: only that sample is lost
    good = {f"s{s}_{i}" for s in range(2) for i in range(PER_SHARD)} - {"s1_2"}
    assert set(keys) == good and len(keys) == 2 * PER_SHARD + 1
    # the same shard with the default cap reads the sample whole
    whole = make_loader(tmp_path, "train", batch_size=2, shuffle=False, drop_last=False, max_bad_fraction=None)
    assert "s1_2" in {k for _, _, batch in whole for k in batch}


def test_max_member_bytes_is_a_data_config_key_with_the_loader_default():
    assert DataConfig().max_member_bytes == DEFAULT_MAX_MEMBER_BYTES == 64 << 20
    with pytest.raises(ValueError, match="max_member_bytes"):
        DataConfig(max_member_bytes=0)


def test_a_manifest_over_the_cap_is_refused_before_it_is_parsed(tmp_path, monkeypatch):
    _dataset(tmp_path)
    size = (tmp_path / "_info.json").stat().st_size
    load_manifest(tmp_path)  # under the cap: fine
    monkeypatch.setattr(manifest_module, "MAX_MANIFEST_BYTES", size - 1)
    parsed = []
    monkeypatch.setattr(manifest_module.json, "loads", lambda *a, **k: parsed.append(a) or {})
    with pytest.raises(ManifestError, match=rf"_info\.json: the manifest is larger than {size - 1} bytes"):
        load_manifest(tmp_path)
    assert parsed == []  # refused from the bounded read, never handed to the parser


@pytest.mark.parametrize("body", [b"[" * 200_000, b'{"splits": ' * 100_000, b'{"n": 1' + b"1" * 5000 + b"}"])
def test_deep_or_huge_json_is_a_manifest_error(tmp_path, body):
    (tmp_path / "_info.json").write_bytes(body)
    with pytest.raises(ManifestError, match=r"_info\.json: not valid JSON"):
        load_manifest(tmp_path)


def test_the_job_configs_cap_reaches_the_loader_the_trainer_builds(tmp_path):
    from metaformer_platform.config import load_config
    from metaformer_platform.strategies.base import DistContext
    from metaformer_platform.training.trainer import build_split_loader

    _dataset(tmp_path, extra={"s1_2": _jpeg(7) + b"\0" * (300 << 10)})
    cfg = load_config(None, ["model.name=poolformer_debug", "data.img_size=32", "data.num_workers=0",
                             f"data.max_member_bytes={256 << 10}", "data.max_bad_fraction=0.5"])
    loader = build_split_loader(cfg, tmp_path, DistContext(), "train", training=False, channels_last=False,
                                batch_size=2)
    from metaformer_platform.data import IGNORE_LABEL

    scored = sum(int((targets != IGNORE_LABEL).sum()) for _, targets in loader)  # stand-ins carry IGNORE_LABEL
    assert scored == 2 * PER_SHARD - 1
    assert loader.fault_stats()["bad_shards"][str(tmp_path / "train-000001.tar")]["kinds"] == {"oversized": 1}
