"""Run inside a fresh mount namespace on a small tmpfs (``test_checkpoint_recovery``'s disk-full test): a Trainer
checkpoints step 2 through the real upload into a run folder on the tmpfs, then the disk is filled so that the
upload of step 4 and then the scratch write of step 6 find it full; prints what happened as JSON."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pyarrow.fs as pafs

from metaformer_platform.config import load_config
from metaformer_platform.data.build.synthetic import ensure_synthetic_shards
from metaformer_platform.storage import checkpoint_format as fmt
from metaformer_platform.storage.upload import upload_checkpoint_part
from metaformer_platform.strategies.base import DistContext
from metaformer_platform.training import checkpoint as ckpt
from metaformer_platform.training.trainer import Trainer


class Losses:
    def __init__(self) -> None:
        self.loss: dict[int, float] = {}

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if "train/loss" in metrics:
            self.loss[step] = metrics["train/loss"]


def fill(disk: Path, leave: int) -> None:
    """Take the disk's free space down to about ``leave`` bytes."""
    ballast = disk / "ballast"
    ballast.unlink(missing_ok=True)
    with open(ballast, "wb") as out:
        out.write(b"\0" * max(shutil.disk_usage(disk).free - leave, 0))


def main(disk: Path, shards: Path) -> None:
    run = disk / "runs" / "r"
    scratch = disk / "scratch"
    scratch.mkdir()
    fs = pafs.LocalFileSystem()

    def report(metrics: dict[str, float], folder: Path | None) -> bool:
        if folder is not None:
            name = f"checkpoint-{int(metrics['step']):08d}"
            upload_checkpoint_part(folder, fs, str(run / name), rank=0, world_size=1)
        return False

    cfg = load_config(None, ["model.name=poolformer_debug", "data.img_size=32", "data.num_workers=0",
                             "trainer.batch_size=16", "trainer.precision=fp32", "trainer.log_every_steps=1",
                             "trainer.torch_threads=1", "trainer.checkpoint_every_steps=2", "trainer.max_steps=2",
                             "optim.warmup_epochs=0", "scaling.num_workers=1", "data.val_split=null"])
    first = Losses()
    trainer = Trainer(cfg, DistContext(), data_root=shards, tracker=first, report=report, checkpoint_scratch=scratch)
    trainer.train()
    size = sum(p.stat().st_size for p in (run / "checkpoint-00000002").rglob("*") if p.is_file())
    out: dict[str, object] = {"size": size}
    fill(disk, size * 3 // 2)  # room for the scratch copy, not for the upload too
    trainer.total_steps = 4
    try:
        trainer.train()
    except OSError as err:
        out["upload_error"] = str(err)
    out["scratch_after_upload"] = sorted(os.listdir(scratch))
    fill(disk, size // 2)  # no room for the scratch copy either
    trainer.total_steps = 6
    try:
        trainer.train()
    except OSError as err:
        out["scratch_error"] = str(err)
    out["scratch_after_save"] = sorted(os.listdir(scratch))
    out["partial_4"] = fmt.incomplete_reason(run / "checkpoint-00000004")
    (disk / "ballast").unlink()
    plan = ckpt.recover_run_folder(fs, str(run), ["checkpoint-00000002"], "checkpoint-00000002")
    out["recovery"] = {"resume": plan.resume, "remove": list(plan.remove)}
    out["left"] = sorted(os.listdir(run))
    again = Losses()  # a restarted job: resumes the last good checkpoint and trains steps 3-4 again
    resumed = Trainer(cfg.model_copy(update={"trainer": cfg.trainer.model_copy(update={"max_steps": 4})}),
                      DistContext(), data_root=shards, tracker=again, report=report, checkpoint_scratch=scratch,
                      resume_from=run / "checkpoint-00000002")
    resumed.train()
    out["losses"] = {"first": first.loss, "resumed": again.loss}
    out["complete_4"] = fmt.incomplete_reason(run / "checkpoint-00000004")
    print(json.dumps(out))


if __name__ == "__main__":
    disk = Path(sys.argv[1])
    main(disk, ensure_synthetic_shards(Path(sys.argv[2]), num_classes=4, train_samples=64, val_samples=16,
                                       image_size=32, samples_per_shard=32, seed=0))
