"""Two Ray nodes on one machine (the session's ``ray_cluster``): a worker no node can hold is refused before it
starts. That a 2-worker job runs one worker per node and splits the data by global rank (the local rank is 0
on both workers, the node rank differs) is checked in test_s3_data.py, in the same TorchTrainer run that
reads the S3 shards (one job for both).
"""

from __future__ import annotations

from pathlib import Path

from metaformer_platform.config import load_config

CONFIGS = Path(__file__).resolve().parents[2] / "jobs" / "configs"


def test_a_worker_larger_than_any_node_is_refused_before_it_starts(ray_cluster, tmp_path):
    """2 CPUs in the cluster, but 1 per node: a 2-CPU worker would wait for a node forever."""
    import pytest

    from metaformer_platform.launch.driver import run_job

    cfg = load_config(CONFIGS / "default.yaml", [
        "model.name=poolformer_debug", "data.img_size=32", f"data.cache_dir={tmp_path / 'cache'}",
        "data.synthetic.train_samples=64", "data.synthetic.val_samples=16", "trainer.batch_size=16",
        "scaling.num_workers=1", "scaling.cpus_per_worker=2", f"run.storage_path={tmp_path / 'runs'}",
        "tracking.enabled=false",
    ])
    with pytest.raises(ValueError, match=r"a worker needs 2 CPU on one node, and the cluster's 2 nodes \(the largest "
                       r"has 1 CPU\) hold 0 such workers, not scaling.num_workers=1"):
        run_job(cfg)
