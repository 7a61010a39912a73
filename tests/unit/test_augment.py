"""The split transform (data/augment.py): uint8 workers + batched normalize/erase equal the float path,
crops drawn from the JPEG header follow timm's RandomResizedCrop, and erasing is seeded per sample."""

from __future__ import annotations

import io
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from loader_helpers import keyed_images, make_loader, resumed_after
from PIL import Image
from scipy import stats
from timm.data.transforms import RandomResizedCropAndInterpolation

from metaformer_platform.data import augment, build_transforms
from metaformer_platform.data.augment import BatchTransform, DraftRandomResizedCrop, build_split_transforms
from metaformer_platform.data.build.writer import Sample, write_dataset
from metaformer_platform.data.stream import _sample_seed, _seed_sample
from metaformer_platform.data.transforms import IMAGENET_STD


def _photo(w: int, h: int, seed: int) -> bytes:
    """A JPEG with structure at several scales (smooth gradients plus noise), like a photo to a resampler."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(xx / (7 + 3 * c) + c) * np.cos(yy / (11 + c)) for c in range(3)], -1) * 90 + 128
    pixels = np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    return out.getvalue()


def _jpeg_of_size(w: int, h: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (w, h), (20, 140, 70)).save(out, format="JPEG")
    return out.getvalue()


def _seeded(fn, img, value: int):
    _seed_sample(value)
    return fn(img)


def _pixel_levels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| of two normalized CHW images in levels of 0..255 (the normalization undone)."""
    return (a - b).abs() * torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255


def _assert_rounding_close(got: torch.Tensor, expected: torch.Tensor) -> None:
    """The JPEG path's augmented crop against timm's: torch's antialiased uint8 resize computes PIL's filter
    with its own fixed-point rounding (on real photos at 224 px: 2.7% of pixels off by one level of 255,
    0.15% by more, at hard edges), and RandAugment's thresholds and histograms turn some of those levels
    into a few more (on these noisy test photos up to ~1 level on average, 12% of pixels off by more than
    one); a wrong box, flip or scale would be off by tens of levels nearly everywhere."""
    levels = _pixel_levels(got, expected)
    within = (levels < 1.01).float().mean()
    assert within > 0.8 and levels.mean() < 2.0, (within, levels.mean())


@pytest.mark.parametrize("training, lazy", [(True, False), (True, True), (False, False)])
def test_uint8_path_equals_the_float_path_after_normalization(training, lazy):
    """Same RNG draws: build_transforms(img) == BatchTransform(WorkerTransform(img)), to float tolerance
    (random erasing off: it draws from another RNG on purpose, see the erasing tests). Given the decoded
    image the worker runs timm's own crop, then RandAugment: equal to float tolerance. Given the undecoded
    JPEG (as the loader gives it in training) the crop is simplejpeg's decode + torch's resize: equal to
    rounding (`_assert_rounding_close`)."""
    kw = dict(is_training=training, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.0)
    float_tf = build_transforms(64, **kw)
    worker, batch = build_split_transforms(64, **kw)
    for i, (w, h) in enumerate([(120, 90), (90, 130), (100, 100), (127, 64)]):
        data = _photo(w, h, i)
        for value in (3, 99, 12345):
            expected = _seeded(float_tf, Image.open(io.BytesIO(data)).convert("RGB"), value)
            img = Image.open(io.BytesIO(data)) if lazy else Image.open(io.BytesIO(data)).convert("RGB")
            shipped = _seeded(worker, img, value)
            assert shipped.dtype == torch.uint8 and shipped.shape == (64, 64, 3)
            got = batch(shipped[None], torch.tensor([value]))[0]
            assert got.shape == expected.shape == (3, 64, 64)
            if lazy:
                _assert_rounding_close(got, expected)
            else:
                torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_crop_boxes_are_timms_draws_from_the_header_size():
    """With the same seed the box is timm's, from the header alone (nothing decoded); across seeds the box
    parameters (area fraction, log aspect, centre) follow timm's distribution (two-sample KS tests)."""
    timm_rrc = RandomResizedCropAndInterpolation(224, interpolation="bicubic")
    draft = DraftRandomResizedCrop(timm_rrc)
    sizes = [(500, 375), (1200, 900), (640, 1280), (2048, 1536)]
    headers = {s: Image.open(io.BytesIO(_jpeg_of_size(*s))) for s in sizes}
    ours, theirs = [], []
    for n in range(1500):
        size = sizes[n % len(sizes)]
        img = headers[size]
        random.seed(n)
        box = draft.box(img)
        assert img.tile  # still undecoded: the box came from the header
        random.seed(n)
        assert box == timm_rrc.get_params(Image.new("RGB", size), timm_rrc.scale, timm_rrc.ratio)
        ours.append((size, box))
        random.seed(10_000 + n)  # an independent stream for the distribution comparison
        theirs.append((size, timm_rrc.get_params(Image.new("RGB", size), timm_rrc.scale, timm_rrc.ratio)))

    def features(draws):
        out = []
        for (w, h), (i, j, bh, bw) in draws:
            out.append((bw * bh / (w * h), math.log(bw / bh), (j + bw / 2) / w, (i + bh / 2) / h))
        return np.array(out)

    a, b = features(ours), features(theirs)
    for col, name in enumerate(["area", "log_aspect", "centre_x", "centre_y"]):
        p = stats.ks_2samp(a[:, col], b[:, col]).pvalue
        assert p > 0.01, f"{name}: KS p={p:.4f}"


def _decoded_widths(monkeypatch) -> list[int]:
    """The widths simplejpeg decodes at, recorded around the real decoder."""
    widths: list[int] = []
    real = augment.simplejpeg.decode_jpeg

    def recording(*args, **kwargs):
        pixels = real(*args, **kwargs)
        widths.append(pixels.shape[1])
        return pixels

    monkeypatch.setattr(augment.simplejpeg, "decode_jpeg", recording)
    return widths


def test_draft_decode_decodes_less_and_gives_nearly_the_full_decode(monkeypatch):
    """A box at least twice the output on both sides is decoded at 1/2 (or less) and matches the full
    decode's crop closely; a small box is timm's crop-then-resize to rounding (torch's resize)."""
    timm_rrc = RandomResizedCropAndInterpolation(64, scale=(0.5, 1.0), interpolation="bicubic")
    draft = DraftRandomResizedCrop(timm_rrc)
    widths = _decoded_widths(monkeypatch)
    data = _photo(640, 480, seed=3)
    for value in range(20):
        lazy = Image.open(io.BytesIO(data))
        random.seed(value)
        i, j, h, w = draft.box(lazy)
        full = Image.open(io.BytesIO(data)).convert("RGB").crop((j, i, j + w, i + h)).resize((64, 64), Image.BICUBIC)
        random.seed(value)
        got = draft(lazy)
        assert got.size == (64, 64) and got.mode == "RGB"
        scale = 640 // widths[-1]
        assert scale == next(s for s in (8, 4, 2, 1) if w >= 64 * s and h >= 64 * s)
        diff = np.abs(np.asarray(got, np.float32) - np.asarray(full, np.float32)).mean()
        assert diff < 4.0, (value, scale, diff)  # of 255: the DCT-domain downscale is a good resampler
    assert max(640 // x for x in widths) > 1 and len(widths) == 20
    small = Image.open(io.BytesIO(_photo(100, 80, seed=4)))
    random.seed(5)
    expected = timm_rrc(Image.open(io.BytesIO(_photo(100, 80, seed=4))).convert("RGB"))
    random.seed(5)
    levels = np.abs(np.asarray(draft(small), np.int16) - np.asarray(expected, np.int16))
    assert levels.mean() < 0.1 and (levels > 1).mean() < 0.01 and widths[-1] == 100


def _jpeg(img: Image.Image, **save) -> bytes:
    out = io.BytesIO()
    img.save(out, format="JPEG", **save)
    return out.getvalue()


def test_what_libjpeg_turbo_refuses_takes_the_pil_path(monkeypatch):
    """CMYK JPEGs, PNGs and already decoded images are cropped by PIL exactly as timm's crop; a JPEG cut
    short is refused by simplejpeg and then by PIL, with PIL's error (a bad sample to the loader)."""
    timm_rrc = RandomResizedCropAndInterpolation(32, interpolation="bicubic")
    draft = DraftRandomResizedCrop(timm_rrc)
    widths = _decoded_widths(monkeypatch)
    rgb = Image.open(io.BytesIO(_photo(90, 70, seed=8))).convert("RGB")
    png = io.BytesIO()
    rgb.save(png, format="PNG")
    for opened in (Image.open(io.BytesIO(_jpeg(rgb.convert("CMYK")))), Image.open(io.BytesIO(png.getvalue())), rgb):
        random.seed(11)
        expected = timm_rrc(opened.copy().convert("RGB"))
        random.seed(11)
        assert np.array_equal(np.asarray(draft(opened)), np.asarray(expected))
    assert widths == []  # none of them went to simplejpeg
    gray = Image.open(io.BytesIO(_jpeg(rgb.convert("L"))))
    random.seed(12)
    expected = timm_rrc(Image.open(io.BytesIO(_jpeg(rgb.convert("L")))).convert("RGB"))
    random.seed(12)
    levels = np.abs(np.asarray(draft(gray), np.int16) - np.asarray(expected, np.int16))
    assert levels.mean() < 0.1 and (levels > 1).mean() < 0.01 and widths == [90]
    data = _photo(90, 70, seed=9)
    with pytest.raises(OSError, match="truncated"):
        draft(Image.open(io.BytesIO(data[: len(data) // 2])))


SAMPLE = Path(__file__).resolve().parents[3] / "shared" / "data" / "imagenet-sample"


@pytest.mark.skipif(not SAMPLE.is_dir(), reason="needs ../shared/data/imagenet-sample (real photos), absent here")
def test_the_jpeg_path_gives_timms_crops_on_real_photos():
    """On 120 real ImageNet photos at 224 px: the same box as timm's RandomResizedCrop for the same seed,
    and its pixels to rounding (mean under 0.1 level of 255; the few drafted boxes, 1/2 to 1/8 DCT
    scale, are a resampling of their own and stay within a few levels on average)."""
    timm_rrc = RandomResizedCropAndInterpolation(224, interpolation="bicubic")
    draft = DraftRandomResizedCrop(timm_rrc)
    means = []
    for n, path in enumerate(sorted(SAMPLE.rglob("*.JPEG"))[:120]):
        data = path.read_bytes()
        random.seed(n)
        got = np.asarray(draft(Image.open(io.BytesIO(data))), np.int16)
        random.seed(n)
        expected = np.asarray(timm_rrc(Image.open(io.BytesIO(data)).convert("RGB")), np.int16)
        means.append(np.abs(got - expected).mean())
        assert means[-1] < 3.0, (path.name, means[-1])
    assert np.mean(means) < 0.1, np.mean(means)


def test_erasing_is_seeded_per_sample_at_timms_rate():
    batch = BatchTransform(re_prob=0.25, re_mode="pixel")
    images = torch.full((400, 8, 8, 3), 128, dtype=torch.uint8)
    seeds = torch.arange(400, dtype=torch.int64) * 7919
    out = batch(images, seeds)
    clean = batch.__class__(re_prob=0.0)(images[:1])[0]
    erased = [not torch.equal(img, clean) for img in out]
    assert 70 <= sum(erased) <= 130  # p = 0.25 of 400 (binomial sd about 8.7)
    again = batch(images, seeds)
    assert torch.equal(out, again)  # same seeds, same erasing
    perm = torch.randperm(400)
    assert torch.equal(batch(images[perm], seeds[perm]), out[perm])  # independent of batch order
    with pytest.raises(ValueError, match="one augmentation seed per image"):
        batch(images)
    with pytest.raises(TypeError, match="uint8"):
        batch(images.float())


def _textured_set(root, n=24):
    # under twice the 32 px output on a side: never drafted, so the float path's crop is the same
    samples = [Sample(f"k{i:03d}", _photo(40 + i, 36 + i, i), i % 3) for i in range(n)]
    write_dataset(root, {"train": samples}, name="t", samples_per_shard=7, num_classes=3)
    return root


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_split_transforms_through_the_loader_resume_exactly(tmp_path):
    """The loader ships uint8 + seeds and runs the batch half in the main process: 0 and 2 workers give
    the same tensors, a resumed loader gives exactly the rest, and without erasing the result equals the
    float path's tensors."""
    root = _textured_set(tmp_path)
    worker, batch = build_split_transforms(32, is_training=True, re_prob=0.5,
                                           memory_format=torch.channels_last)

    run = keyed_images
    kw = dict(batch_size=4, transform=worker, batch_transform=batch, epoch=1)
    whole = run(make_loader(root, **kw))
    assert len(whole) == 24 and next(iter(whole.values())).dtype == torch.float32
    images, _, _ = next(iter(make_loader(root, **kw)))
    assert images.is_contiguous(memory_format=torch.channels_last) and images.shape == (4, 3, 32, 32)
    two = run(make_loader(root, num_workers=2, **kw))
    assert two.keys() == whole.keys() and all(torch.equal(whole[k], v) for k, v in two.items())
    tail = run(resumed_after(lambda: make_loader(root, **kw), 2))
    assert len(tail) == 24 - 8 and all(torch.equal(whole[k], v) for k, v in tail.items())

    worker0, batch0 = build_split_transforms(32, is_training=True, re_prob=0.0)
    float_tf = build_transforms(32, is_training=True, re_prob=0.0)
    split = run(make_loader(root, batch_size=4, transform=worker0, batch_transform=batch0))
    plain = run(make_loader(root, batch_size=4, transform=float_tf))
    assert split.keys() == plain.keys()
    for k in plain:  # the loader hands the worker undecoded JPEGs: simplejpeg + torch's resize, to rounding
        _assert_rounding_close(split[k], plain[k])


def test_sample_seed_is_a_function_of_seed_epoch_and_key():
    assert _sample_seed(1, 2, "a") == _sample_seed(1, 2, "a")
    assert len({_sample_seed(1, 2, "a"), _sample_seed(1, 3, "a"), _sample_seed(2, 2, "a"), _sample_seed(1, 2, "b")}) == 4


# ---------------------------------------------------------------- decode_device=cuda, run on the CPU here


def test_device_decode_path_on_cpu_is_seeded_per_sample_and_resumes_exactly(tmp_path):
    """The GPU path's code with torchvision decoding on the CPU: workers ship JPEG bytes (a list, not a
    stack), the main process decodes, crops, flips and erases; crops are timm's boxes from the sample's
    seed, so 0 and 2 workers and a resumed loader give the same tensors."""
    from metaformer_platform.data.device_decode import DeviceDecodeTransform, EncodedJpeg

    root = _textured_set(tmp_path)
    batch = BatchTransform(re_prob=0.5, memory_format=torch.channels_last)
    device_tf = DeviceDecodeTransform(32, is_training=True, batch=batch)
    kw = dict(batch_size=4, transform=EncodedJpeg(), batch_transform=device_tf, epoch=1)

    run = keyed_images
    whole = run(make_loader(root, **kw))
    assert len(whole) == 24 and next(iter(whole.values())).shape == (3, 32, 32)
    two = run(make_loader(root, num_workers=2, **kw))
    assert two.keys() == whole.keys() and all(torch.equal(whole[k], two[k]) for k in whole)
    tail = run(resumed_after(lambda: make_loader(root, **kw), 3))
    assert len(tail) == 24 - 12 and all(torch.equal(whole[k], v) for k, v in tail.items())

    # the crop is timm's box for the sample's seed: crop the CPU-decoded photo the same way and compare
    from torchvision.transforms.v2 import functional as F

    plain = DeviceDecodeTransform(32, is_training=True, batch=BatchTransform(), hflip=0.0)
    data = _photo(60, 50, seed=7)
    encoded = EncodedJpeg()(data)
    got = plain([encoded], torch.tensor([42]))[0]
    (i, j, h, w), _ = plain._box(50, 60, 42)
    from torchvision.io import decode_jpeg

    ref = F.resized_crop(decode_jpeg(encoded), i, j, h, w, [32, 32], F.InterpolationMode.BICUBIC, antialias=True)
    torch.testing.assert_close(got, BatchTransform()(ref[None])[0], rtol=0, atol=1e-5)
    boxes = {plain._box(500, 375, s)[0] for s in range(50)}
    assert len(boxes) == 50  # seeds give different boxes


def test_device_decode_replaces_an_image_cut_short_with_a_good_one_of_its_batch():
    """A JPEG whose body is cut short passes the worker's header check and fails only in the batch decode:
    the batch is decoded image by image, the bad one takes its nearest good neighbour's pixels (with its own
    crop), it is counted, and the same bytes give the same batch again (exact resume)."""
    from metaformer_platform.data.device_decode import DeviceDecodeTransform, EncodedJpeg

    tf = DeviceDecodeTransform(32, is_training=False, batch=BatchTransform())
    good = [EncodedJpeg()(_photo(60, 50, seed=s)) for s in (1, 2, 3)]
    cut = good[1][: len(good[1]) // 2].clone()
    seeds = torch.tensor([5, 6, 7])
    out = tf([good[0], cut, good[2]], seeds)
    assert out.shape == (3, 3, 32, 32) and tf.bad_images == 1
    reference = DeviceDecodeTransform(32, is_training=False, batch=BatchTransform())(good, seeds)
    torch.testing.assert_close(out[0], reference[0], rtol=0, atol=0)
    torch.testing.assert_close(out[1], reference[0], rtol=0, atol=0)  # the earlier neighbour stands in
    torch.testing.assert_close(out[2], reference[2], rtol=0, atol=0)
    assert torch.equal(tf([good[0], cut, good[2]], seeds), out) and tf.bad_images == 2
    with pytest.raises(RuntimeError, match="no image of a batch of 1 decodes"):
        tf([cut], seeds[:1])


def test_device_decode_is_refused_without_cuda_or_with_randaugment():
    from metaformer_platform.config import load_config

    with pytest.raises(ValueError, match="decode_device=cuda has no RandAugment"):
        load_config(None, ["data.decode_device=cuda"])
    assert load_config(None, ["data.decode_device=cuda", "data.auto_augment=null"]).data.decode_device == "cuda"
    with pytest.raises(ValueError, match="use data.decode_device=cpu without a GPU"):
        build_split_transforms(32, is_training=True, auto_augment=None, decode_device="cuda", device="cpu")
