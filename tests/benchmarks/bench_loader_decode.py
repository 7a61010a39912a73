"""Benchmark: the training crop's decode, side by side, in one process (ms of CPU per sample).

For each real photo of ../shared/data/imagenet-sample, the crop box is drawn as the loader draws it
(timm's RandomResizedCrop `get_params` from the JPEG header's size, seeded per sample), and every method
turns the same JPEG bytes into the same 224 px crop (bicubic, as the paper's config):

- "PIL draft (main)": data/augment.py before simplejpeg: PIL decodes at the largest DCT scale 1/2, 1/4,
  1/8 whose box still covers the output, then resizes the (fractional) box;
- "platform": data/augment.py now (DraftRandomResizedCrop): simplejpeg at that power-of-two scale, and at
  full scale the box resized by torch's antialiased uint8 kernel;
- "PIL full": torchvision's ImageFolder way: full decode, crop, resize (timm's RandomResizedCrop);
- "simplejpeg[ fast]": libjpeg-turbo's scaled decode at the smallest k/8 (k = 1..8) whose box still
  covers the output (`min_width`/`min_height`), then the same resize; "fast": fastdct + fastupsample;
- "turbojpeg k/8" / "turbojpeg 2^-n": PyTurboJPEG (ctypes over the system libturbojpeg), at the same k/8
  scale or at PIL's power-of-two scales only; only when PyTurboJPEG and libturbojpeg load (see --turbojpeg).

Methods alternate in rounds over the same samples; printed: medians of the per-round means of thread
CPU time (time.thread_time, so other processes on a shared machine inflate them less), split into decode
and resize, and the pixel difference of each method's crop from the full accurate decode's crop (timm's
RandomResizedCrop on the whole image), mean and max of |difference| in 0..255.

    python tests/benchmarks/bench_loader_decode.py [--samples 1000] [--rounds 5]
        [--turbojpeg /path/to/libturbojpeg.so.0]   # PyTurboJPEG must be importable for it
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import random
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image

SAMPLE = Path(__file__).resolve().parents[3] / "shared" / "data" / "imagenet-sample"
OUT = 224
_clock = time.thread_time


def _k_of_8(w: int, h: int, choices: tuple[int, ...]) -> int:
    """The smallest k in `choices` whose scale k/8 leaves a w x h box at least OUT on both sides."""
    return next((k for k in sorted(choices) if w * k >= 8 * OUT and h * k >= 8 * OUT), 8)


def _reduced(k: int) -> tuple[int, int]:
    f = Fraction(k, 8)
    return f.numerator, f.denominator


def main() -> None:  # noqa: C901 - one method per closure
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--turbojpeg", default=None, help="path of libturbojpeg.so for PyTurboJPEG (optional)")
    args, _ = parser.parse_known_args()
    if not SAMPLE.is_dir():
        raise SystemExit(f"needs the real photos at {SAMPLE}")
    import simplejpeg
    import torch
    from timm.data.transforms import RandomResizedCropAndInterpolation

    from metaformer_platform.data.augment import DraftRandomResizedCrop

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_loader import main_decode

    torch.set_num_threads(1)  # as in a DataLoader worker (torch's resize would spread over the cores)
    files = sorted(SAMPLE.rglob("*.JPEG"))[: args.samples]
    blobs = [f.read_bytes() for f in files]
    rrc = RandomResizedCropAndInterpolation(OUT, interpolation="bicubic")
    draft = DraftRandomResizedCrop(rrc)
    boxes = []
    for n, data in enumerate(blobs):
        random.seed(n)
        boxes.append(draft.box(Image.open(io.BytesIO(data))))

    def resize(img: Image.Image, box: tuple[float, float, float, float], t: dict[str, float]) -> Image.Image:
        t0 = _clock()
        out = img.resize((OUT, OUT), Image.BICUBIC, box=box)
        t["resize"] += _clock() - t0
        return out

    def platform(pil: bool) -> Callable[[int, bytes, dict[str, float]], Image.Image]:
        def run(n: int, data: bytes, t: dict[str, float]) -> Image.Image:
            # pil: main's path (PIL draft decode + PIL resize), what the loader does for JPEGs simplejpeg refuses
            with main_decode() if pil else contextlib.nullcontext():
                t0 = _clock()
                img = Image.open(io.BytesIO(data))
                random.seed(n)
                out = draft(img)  # decode + resize together: the loader's own code
                t["decode"] += _clock() - t0
            return out

        return run

    def pil_full(n: int, data: bytes, t: dict[str, float]) -> Image.Image:
        i, j, h, w = boxes[n]
        t0 = _clock()
        img = Image.open(io.BytesIO(data)).convert("RGB")
        t["decode"] += _clock() - t0
        t0 = _clock()
        out = img.crop((j, i, j + w, i + h)).resize((OUT, OUT), Image.BICUBIC)
        t["resize"] += _clock() - t0
        return out

    def simple(fast: bool) -> Callable[[int, bytes, dict[str, float]], Image.Image]:
        def run(n: int, data: bytes, t: dict[str, float]) -> Image.Image:
            i, j, h, w = boxes[n]
            t0 = _clock()
            height, width, _, _ = simplejpeg.decode_jpeg_header(data)
            k = _k_of_8(w, h, tuple(range(1, 9)))
            arr = simplejpeg.decode_jpeg(
                data, "RGB", fastdct=fast, fastupsample=fast,
                min_width=math.ceil(width * k / 8), min_height=math.ceil(height * k / 8),
            )
            img = Image.fromarray(arr)
            t["decode"] += _clock() - t0
            s = k / 8
            return resize(img, (j * s, i * s, (j + w) * s, (i + h) * s), t)

        return run

    methods: dict[str, Callable[[int, bytes, dict[str, float]], Image.Image]] = {
        "PIL full": pil_full,
        "PIL draft (main)": platform(pil=True),
        "platform: simplejpeg + torch resize": platform(pil=False),
        "simplejpeg": simple(False),
        "simplejpeg fast": simple(True),
    }
    if args.turbojpeg:
        from turbojpeg import TJFLAG_FASTDCT, TJFLAG_FASTUPSAMPLE, TJPF_RGB, TurboJPEG

        tj = TurboJPEG(args.turbojpeg)

        def turbo(choices: tuple[int, ...], flags: int) -> Callable[[int, bytes, dict[str, float]], Image.Image]:
            def run(n: int, data: bytes, t: dict[str, float]) -> Image.Image:
                i, j, h, w = boxes[n]
                t0 = _clock()
                k = _k_of_8(w, h, choices)
                arr = tj.decode(data, pixel_format=TJPF_RGB, scaling_factor=_reduced(k) if k < 8 else None, flags=flags)
                img = Image.fromarray(arr)
                t["decode"] += _clock() - t0
                s = k / 8
                return resize(img, (j * s, i * s, (j + w) * s, (i + h) * s), t)

            return run

        methods["turbojpeg k/8"] = turbo(tuple(range(1, 9)), 0)
        methods["turbojpeg k/8 fast"] = turbo(tuple(range(1, 9)), TJFLAG_FASTDCT | TJFLAG_FASTUPSAMPLE)
        methods["turbojpeg 2^-n"] = turbo((1, 2, 4, 8), 0)

    # pixels: each method's crop against the full accurate decode's (timm's RandomResizedCrop)
    reference = [np.asarray(pil_full(n, d, defaultdict(float)), np.int16) for n, d in enumerate(blobs)]
    diffs: dict[str, tuple[float, int]] = {}
    for name, fn in methods.items():
        d = [np.abs(np.asarray(fn(n, b, defaultdict(float)), np.int16) - reference[n]) for n, b in enumerate(blobs)]
        diffs[name] = (float(np.mean([x.mean() for x in d])), int(max(x.max() for x in d)))
    scales = [_k_of_8(w, h, tuple(range(1, 9))) for (_, _, h, w) in boxes]
    print(f"{len(blobs)} photos; k/8 scale chosen: " + ", ".join(f"{k}/8 {scales.count(k)}" for k in range(1, 9)))

    per_round: dict[str, list[dict[str, float]]] = {name: [] for name in methods}
    for r in range(args.rounds):
        for name, fn in methods.items():
            t: dict[str, float] = defaultdict(float)
            for n, data in enumerate(blobs):
                fn(n, data, t)
            per_round[name].append({k: 1000 * v / len(blobs) for k, v in t.items()})
        print(f"  round {r + 1}: " + ", ".join(f"{m} {sum(v[-1].values()):.2f}" for m, v in per_round.items()), flush=True)

    print(f"ms of thread CPU per sample, median of {args.rounds} alternating rounds of {len(blobs)} photos, one thread")
    print("| method | decode (+resize for platform rows) | resize | total | vs PIL draft | vs PIL full | mean abs diff | max abs diff |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    med = {m: {k: statistics.median(r.get(k, 0.0) for r in rs) for k in ("decode", "resize")} for m, rs in per_round.items()}
    total = {m: sum(v.values()) for m, v in med.items()}
    for m, v in med.items():
        print(f"| {m} | {v['decode']:.3f} | {v['resize']:.3f} | {total[m]:.3f} | {total['PIL draft (main)'] / total[m]:.2f}x "
              f"| {total['PIL full'] / total[m]:.2f}x | {diffs[m][0]:.2f} | {diffs[m][1]} |")


if __name__ == "__main__":
    main()
