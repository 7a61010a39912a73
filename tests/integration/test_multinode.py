"""Two Ray nodes on one machine (the session's ``ray_cluster``): a 2-worker job runs one worker per node,
and the data is split by global rank (the local rank is 0 on both workers, the node rank differs).

The workers build the job's own ``DistContext`` (``launch._dist_context``) and the Trainer's own loaders,
then read one training epoch and the whole validation split with the sample keys.
"""

from __future__ import annotations

import json
from pathlib import Path

from metaformer_platform.config import load_config

CONFIGS = Path(__file__).resolve().parents[2] / "jobs" / "configs"


def test_a_two_worker_job_runs_one_worker_per_node_and_splits_the_data_by_global_rank(ray_cluster, tmp_path):
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from metaformer_platform.data import load_manifest
    from metaformer_platform.launch import resolve_data_root

    nodes = [n for n in ray.nodes() if n["Alive"]]
    assert len(nodes) == 2 and all(n["Resources"]["CPU"] == 1 for n in nodes)

    cfg = load_config(CONFIGS / "default.yaml", [
        "model.name=poolformer_debug", "data.img_size=32", "data.auto_augment=null", "data.num_workers=1",
        "data.synthetic.num_classes=4", "data.synthetic.train_samples=1000", "data.synthetic.val_samples=203",
        "data.synthetic.samples_per_shard=100", f"data.cache_dir={tmp_path / 'cache'}", "trainer.batch_size=16",
        "trainer.precision=fp32", "trainer.torch_threads=1", "scaling.num_workers=2",
    ])
    root = resolve_data_root(cfg)  # generated once here; the workers find it in the cache

    def read_splits(config: dict) -> None:  # nested: Ray pickles it by value (the test module is not importable there)
        import ray

        from metaformer_platform.config import JobConfig
        from metaformer_platform.launch import _dist_context, resolve_data_root
        from metaformer_platform.training.trainer import Trainer

        cfg = JobConfig.model_validate(config["job"])
        dist = _dist_context()
        trainer = Trainer(cfg, dist, data_root=resolve_data_root(cfg))
        keys = {}
        for split, loader in (("train", trainer.train_loader), ("val", trainer.val_loader)):
            loader.with_keys = True
            keys[split] = [key for _, _, batch_keys in loader for key in batch_keys]
        record = {
            "rank": dist.rank, "world_size": dist.world_size, "node_rank": dist.node_rank, "local_rank": dist.local_rank,
            "node_id": ray.get_runtime_context().get_node_id(), "steps_per_epoch": trainer.steps_per_epoch, **keys,
        }
        Path(config["out"], f"rank{dist.rank}.json").write_text(json.dumps(record))

    out = tmp_path / "out"
    out.mkdir()
    TorchTrainer(
        read_splits,
        train_loop_config={"job": cfg.model_dump(mode="json"), "out": str(out)},
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name="it-multinode", storage_path=str(tmp_path / "runs")),
    ).fit()

    ranks = sorted((json.loads(p.read_text()) for p in out.glob("rank*.json")), key=lambda r: r["rank"])
    assert [(r["rank"], r["world_size"], r["node_rank"], r["local_rank"]) for r in ranks] == [(0, 2, 0, 0), (1, 2, 1, 0)]
    assert ranks[0]["node_id"] != ranks[1]["node_id"]
    assert {r["node_id"] for r in ranks} == {n["NodeID"] for n in nodes}

    # training: 1000 samples, 2 ranks x 31 full batches of 16 (8 dropped); no sample on both ranks
    train = [r["train"] for r in ranks]
    assert [len(t) for t in train] == [31 * 16, 31 * 16] and [r["steps_per_epoch"] for r in ranks] == [31, 31]
    assert len(set(train[0])) == len(train[0]) and len(set(train[1])) == len(train[1])
    assert not set(train[0]) & set(train[1])

    # validation: all 203 samples (an odd count: the ranks' shares differ), each scored by exactly one rank
    val = ranks[0]["val"] + ranks[1]["val"]
    assert load_manifest(root).split("val").num_samples == 203
    assert len(val) == 203 and len(set(val)) == 203 and len(ranks[0]["val"]) != len(ranks[1]["val"])


def test_a_worker_larger_than_any_node_is_refused_before_it_starts(ray_cluster, tmp_path):
    """2 CPUs in the cluster, but 1 per node: a 2-CPU worker would wait for a node forever."""
    import pytest

    from metaformer_platform.launch import run_job

    cfg = load_config(CONFIGS / "default.yaml", [
        "model.name=poolformer_debug", "data.img_size=32", f"data.cache_dir={tmp_path / 'cache'}",
        "data.synthetic.train_samples=64", "data.synthetic.val_samples=16", "trainer.batch_size=16",
        "scaling.num_workers=1", "scaling.cpus_per_worker=2", f"run.storage_path={tmp_path / 'runs'}",
        "tracking.enabled=false",
    ])
    with pytest.raises(ValueError, match=r"a worker needs 2 CPU on one node, and the cluster's 2 nodes \(the largest "
                       r"has 1 CPU\) hold 0 such workers, not scaling.num_workers=1"):
        run_job(cfg)
