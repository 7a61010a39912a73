"""`data.decode_device=cuda` on a GPU: nvjpeg batch decode + crop/flip/resize/normalize/erase on the device.

Marked ``gpu`` (tests/conftest.py skips them without CUDA). The same code runs on the CPU in
tests/unit/test_augment.py; here it must give the CPU path's tensors (to decoder tolerance: nvjpeg and
libjpeg-turbo may differ by a level here and there) and keep exact resume on the device.

    python -m pytest tests/gpu/test_gpu_decode.py -q
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metaformer_platform.data import BatchTransform, build_split_transforms
from metaformer_platform.data.build.writer import Sample, write_dataset
from metaformer_platform.data.device_decode import DeviceDecodeTransform, EncodedJpeg

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from loader_helpers import keyed_images, make_loader, resumed_after  # noqa: E402

pytestmark = pytest.mark.gpu


def _photo(w: int, h: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(xx / (7 + 3 * c) + c) * np.cos(yy / (11 + c)) for c in range(3)], -1) * 90 + 128
    out = io.BytesIO()
    Image.fromarray(np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)).save(out, format="JPEG")
    return out.getvalue()


def test_cuda_decode_matches_the_cpu_decode():
    encoded = [EncodedJpeg()(_photo(120 + 7 * i, 90 + 5 * i, i)) for i in range(16)]
    seeds = torch.arange(16) * 1009
    cpu = DeviceDecodeTransform(64, is_training=True, batch=BatchTransform(re_prob=0.25))
    cuda = DeviceDecodeTransform(64, is_training=True, batch=BatchTransform(device="cuda", re_prob=0.25,
                                                                             memory_format=torch.channels_last))
    got = cuda(encoded, seeds)
    assert got.device.type == "cuda" and got.is_contiguous(memory_format=torch.channels_last)
    expected = cpu(encoded, seeds)
    # same boxes, flips and erased regions; erasing noise comes from the device's generator, so compare
    # where neither side erased
    same = (got.cpu() - expected).abs()
    assert same.median() < 0.02 and (same < 0.1).float().mean() > 0.7


def test_cuda_decode_through_the_loader_resumes_exactly(tmp_path):
    samples = [Sample(f"k{i:03d}", _photo(60 + i, 50 + i, i), i % 3) for i in range(24)]
    write_dataset(tmp_path, {"train": samples}, name="g", samples_per_shard=7, num_classes=3)
    worker, batch = build_split_transforms(32, is_training=True, auto_augment=None, decode_device="cuda",
                                           device="cuda", memory_format=torch.channels_last)
    kw = dict(batch_size=4, transform=worker, batch_transform=batch, epoch=1, num_workers=2)

    whole = keyed_images(make_loader(tmp_path, **kw))
    assert len(whole) == 24 and all(v.device.type == "cuda" for v in whole.values())
    tail = keyed_images(resumed_after(lambda: make_loader(tmp_path, **kw), 2))
    assert len(tail) == 16 and all(torch.equal(whole[k], v) for k, v in tail.items())
