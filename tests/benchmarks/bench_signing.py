"""Benchmark: what signing checkpoint markers (issue 24) costs per checkpoint, side by side in one run.

For each model, a full-state checkpoint folder like the Trainer's (model.pt, optimizer.pt with AdamW state,
ema.pt, model.safetensors, trainer.pt) is written once, then, rounds alternating:

- save: the marker as before this change (sizes + sha256, unsigned) vs. signed (HMAC-SHA256 over the marker);
- load: the completeness check before a resume as before (sizes + sha256 of every file) vs. after (the same,
  then ``verify_native`` right before the native read: the signature and every file's sha256 again).

    python tests/benchmarks/bench_signing.py [--models poolformer_debug poolformer_s12] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("METAFORMER_CHECKPOINT_KEY", secrets.token_hex(32))

from metaformer_platform.storage import checkpoint_format as fmt  # noqa: E402


def write_checkpoint(name: str, folder: Path) -> tuple[float, int]:
    """The folder's files (no marker); returns (seconds to write them, bytes)."""
    import timm

    import metaformer_platform.models  # noqa: F401

    model = timm.create_model(name, num_classes=1000)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(1, 3, 32, 32)).sum().backward()
    opt.step()
    start = time.perf_counter()
    fmt.save_tensors(model.state_dict(), folder / fmt.DDP_MODEL_FILE)
    fmt.save_tensors(opt.state_dict(), folder / fmt.DDP_OPTIMIZER_FILE)
    fmt.save_tensors(model.state_dict(), folder / fmt.EMA_FILE)
    fmt.save_weights(model.state_dict(), folder / fmt.WEIGHTS_FILE)
    fmt.save_tensors({"step": 1, "model_name": name, "num_classes": 1000}, folder / fmt.TRAINER_FILE)
    return time.perf_counter() - start, sum(p.stat().st_size for p in folder.iterdir())


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench(name: str, rounds: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_s, size = write_checkpoint(name, folder)
        rows: dict[str, list[float]] = {"save_before": [], "save_after": [], "load_before": [], "load_after": []}
        for _ in range(rounds):
            rows["save_before"].append(timed(lambda: fmt.mark_complete(folder, sign=False)))
            rows["save_after"].append(timed(lambda: fmt.mark_complete(folder, sign=True)))
            rows["load_before"].append(timed(lambda: fmt.incomplete_reason(folder)))
            rows["load_after"].append(timed(lambda: (fmt.incomplete_reason(folder), fmt.verify_native(folder))))
        med = {k: statistics.median(v) for k, v in rows.items()}
        print(f"{name}: {size / 2**20:.1f} MiB checkpoint, files written in {write_s:.2f} s; "
              f"marker: before {med['save_before'] * 1e3:.1f} ms, signed {med['save_after'] * 1e3:.1f} ms "
              f"(+{(med['save_after'] - med['save_before']) * 1e3:.1f} ms); "
              f"pre-resume check: before {med['load_before'] * 1e3:.1f} ms, after {med['load_after'] * 1e3:.1f} ms "
              f"(+{(med['load_after'] - med['load_before']) * 1e3:.1f} ms, "
              f"{med['load_after'] / med['load_before']:.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["poolformer_debug", "poolformer_s12"])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    for name in args.models:
        bench(name, args.rounds)


if __name__ == "__main__":
    main()
