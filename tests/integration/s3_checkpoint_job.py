"""The S3 checkpoint job (the session fixture ``s3_checkpoint_job`` in conftest.py runs it once).

One job for two modules: test_checkpoint_storage checks its checkpoints on S3, that it read every validation
sample of its shards on S3 once, and restarts it; test_secrets checks that neither the S3 secret nor the
tracking password left the driver while it ran.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

S3_CKPT_PREFIX, S3_CKPT_RUN = "ckpt-runs", "it-s3-ckpt"
S3_CKPT_DATA = "ckpt-data"  # its shards: 4 classes, 512 train and 64 val samples in shards of 64
TRACKING_PASSWORD = "tr4ck1ng-pa55w0rd-do-not-log"  # the MLflow server checks none: the URI is the point
CONFIGS = Path(__file__).resolve().parents[2] / "jobs" / "configs"


def s3_checkpoint_config(workdir: Path, mlflow_uri: str, bucket: str, *extra: str) -> Any:
    """The S3 checkpoint job's config: a 2-worker DDP job with an EMA, 14 steps, its shards streamed from
    ``s3://bucket/ckpt-data`` (one loader process per rank), a checkpoint every 7 uploaded asynchronously to
    ``s3://bucket/ckpt-runs/it-s3-ckpt``; ``extra`` overrides come last and win."""
    from metaformer_platform.config import load_config

    return load_config(CONFIGS / "default.yaml", [
        "model.name=poolformer_debug",
        f"data.source=s3://{bucket}/{S3_CKPT_DATA}", f"data.cache_dir={workdir / 'cache'}", "data.num_workers=1",
        "trainer.batch_size=16", "trainer.max_steps=14", "trainer.log_every_steps=7", "trainer.val_every_steps=14",
        "trainer.checkpoint_every_steps=7", "trainer.precision=fp32", "trainer.ema_decay=0.9",
        "optim.lr=3e-3", "optim.warmup_epochs=0", "run.checkpoint_upload=async",
        f"run.storage_path=s3://{bucket}/{S3_CKPT_PREFIX}", f"run.name={S3_CKPT_RUN}", "run.num_to_keep=null",
        f"tracking.tracking_uri={mlflow_uri}", "tracking.experiment=it-s3-ckpt", "tracking.system_metrics=false",
        *extra,
    ])


class CmdlineWatch:
    """Scans every process's command line (psutil) every 50 ms while a job runs, for the given strings."""

    def __init__(self, needles: list[str]) -> None:
        self.needles = [n.encode() for n in needles]
        self.hits: list[str] = []
        self.scanned: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            for proc in psutil.process_iter(["pid", "cmdline"]):
                cmdline = " ".join(proc.info["cmdline"] or []).encode()
                self.scanned.add(proc.info["pid"])
                if any(n in cmdline for n in self.needles):
                    self.hits.append(f"{proc.info['pid']}: {cmdline[:200]!r}")
            self._stop.wait(0.05)

    def __enter__(self) -> CmdlineWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass(frozen=True)
class S3CheckpointJob:
    """The S3 checkpoint job as it ended: its folder, its ``JobResult``, the scratch folders it left in the temp
    dir, what the command-line watch saw while it ran, and the worker function (with its plan) it gave Ray."""

    workdir: Path
    result: Any
    scratch_left: set[str]
    watch: CmdlineWatch
    worker_payloads: list[bytes]  # what Ray was handed to run in the workers, pickled
