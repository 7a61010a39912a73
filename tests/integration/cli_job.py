"""The small `python jobs/pretrain.py` command the fault tests start as a child process and signal or starve: the
debug model on generated data, a checkpoint every 5 steps, a metric every step."""

from __future__ import annotations

import sys
from pathlib import Path


def pretrain_command(tmp: Path, mlflow_uri: str, *extra: str, run: str, experiment: str, steps: int,
                     batch_size: int) -> list[str]:
    """The command line of a small pretrain job under ``tmp`` logging to ``mlflow_uri`` (``extra`` overrides last)."""
    return [
        sys.executable, "jobs/pretrain.py", "model.name=poolformer_debug", "data.synthetic.num_classes=4",
        "data.synthetic.train_samples=512", "data.synthetic.val_samples=32", "data.synthetic.samples_per_shard=64",
        f"data.cache_dir={tmp / 'cache'}", "data.num_workers=0", "data.val_split=null", f"trainer.batch_size={batch_size}",
        f"trainer.max_steps={steps}", "trainer.checkpoint_every_steps=5", "trainer.log_every_steps=1",
        "trainer.precision=fp32", "optim.warmup_epochs=0", f"run.storage_path={tmp / 'runs'}", f"run.name={run}",
        "run.num_to_keep=null", "run.max_failures=0", f"tracking.tracking_uri={mlflow_uri}",
        f"tracking.experiment={experiment}", "tracking.system_metrics=false", *extra,
    ]
