"""The data plane on a real S3 server (SeaweedFS checking SigV4) and the session's two Ray nodes: build shards
straight to s3:// with Ray tasks, read them back through the loader under TorchTrainer (one worker per node,
local data split by global rank too) and through timm's wds reader; wrong credentials, a missing bucket and a
missing prefix are refused with a clear message before anything starts. (A whole job streaming its shards from
S3 is the session's S3 checkpoint job, test_checkpoint_storage; the pipeline's stages read S3 shards too.)"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from metaformer_platform.data import load_manifest, verify_checksums
from metaformer_platform.data.build import builder
from metaformer_platform.data.reader import iter_shard
from metaformer_platform.storage import S3AccessError, register_webdataset_s3

REPO = Path(__file__).resolve().parents[2]
WNIDS = ["n00000001", "n00000002", "n00000003", "n00000004"]
TRAIN_PER_CLASS, VAL = 24, 30  # 96 train, 30 val: shards of 10 -> uneven over 2 ranks x 2 workers


def _load_job():
    spec = importlib.util.spec_from_file_location("build_shards_job", REPO / "jobs" / "build_shards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagenet")
    for c, wnid in enumerate(WNIDS):
        for i in range(TRAIN_PER_CLASS):
            path = root / "train" / wnid / f"{wnid}_{i}.JPEG"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (32, 32), (60 * c, 200 - 40 * c, (7 * i) % 256)).save(path, quality=90)
    (root / "val").mkdir()
    lines = []
    for i in range(VAL):
        name = f"ILSVRC2012_val_{i + 1:08d}"
        Image.new("RGB", (32, 32), (60 * (i % 4), 200 - 40 * (i % 4), 0)).save(root / "val" / f"{name}.JPEG")
        lines.append(f"{name}.JPEG {WNIDS[i % 4]}")
    (root / "val.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def s3_shards(source, s3_server, ray_cluster):
    """Shards built straight to s3:// by one Ray task per shard (the job's executor)."""
    url = f"s3://{s3_server.bucket}/imagenet-tiny"
    env = {k: os.environ.get(k) for k in s3_server.env}
    os.environ.update(s3_server.env)  # the driver's S3 settings; the job forwards them to its Ray tasks
    try:
        classes, tasks = builder.prepare_build(
            train=source / "train", val=source / "val", val_labels=source / "val.txt",
            options=builder.BuildOptions(samples_per_shard=10, seed=1),
        )
        lines: list[str] = []
        builder.build_dataset(url, tasks, classes=classes, name="tiny", run=_load_job().run_on_ray, log=lines.append)
        yield url, lines
    finally:
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_build_to_s3_with_ray_tasks_is_complete_and_byte_identical_to_a_local_build(
    s3_shards, source, s3_server, tmp_path, monkeypatch
):
    url, lines = s3_shards
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    manifest = load_manifest(url)
    assert manifest.split("train").shard_lengths == (10,) * 9 + (6,)
    assert manifest.split("val").shard_lengths == (10, 10, 10)
    assert verify_checksums(manifest) == 13
    assert sum("samples/s" in line and "ETA" in line for line in lines) == 13
    # Same input and seed, built locally without Ray: the same bytes.
    classes, tasks = builder.prepare_build(
        train=source / "train", val=source / "val", val_labels=source / "val.txt",
        options=builder.BuildOptions(samples_per_shard=10, seed=1),
    )
    builder.build_dataset(tmp_path / "local", tasks, classes=classes, name="tiny", log=lambda _: None)
    s3 = s3_server.client()
    for name in (*manifest.split("train").filenames, *manifest.split("val").filenames, "_info.json"):
        remote = s3.get_object(Bucket=s3_server.bucket, Key=f"imagenet-tiny/{name}")["Body"].read()
        assert remote == (tmp_path / "local" / name).read_bytes(), name
    # A re-run to S3 skips every shard (checked by the sha256 recorded at upload) and rewrites the manifest.
    again: list[str] = []
    builder.build_dataset(url, tasks, classes=classes, name="tiny", log=again.append)
    assert sum("skipped" in line for line in again) == 13
    # Labels come from the sorted wnids.
    val = {s.key: int(s.files["cls"]) for n in manifest.split("val").filenames for s in iter_shard(manifest.storage, n)}
    assert val == {f"ILSVRC2012_val_{i + 1:08d}": i % 4 for i in range(VAL)}


def test_timm_wds_reader_reads_the_s3_shards(s3_shards, s3_server, monkeypatch):
    from timm.data import create_dataset

    url, _ = s3_shards
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    register_webdataset_s3()
    ds = create_dataset("wds/tiny", root=url, split="val", is_training=False, batch_size=1)
    items = list(ds)
    assert sorted(t for _, t in items) == sorted(i % 4 for i in range(VAL))
    assert all(img.size == (32, 32) for img, _ in items)


def test_brace_patterns_and_manifest_urls_on_s3(s3_shards, s3_server, monkeypatch):
    url, _ = s3_shards
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    assert load_manifest(f"{url}/_info.json").split("train").num_samples == 96
    picked = load_manifest(f"{url}/{{train-{{000008..000009}},val-000002}}.tar")
    assert picked.split("train").shard_lengths == (10, 6) and picked.split("val").num_samples == 10
    assert picked.num_classes == 4
    # Without a manifest beside them (a copy of two shards), the lengths are counted from the tars.
    s3 = s3_server.client()
    for name in ("train-000009.tar", "val-000000.tar"):
        s3.copy_object(Bucket=s3_server.bucket, Key=f"bare-tiny/{name}",
                       CopySource={"Bucket": s3_server.bucket, "Key": f"imagenet-tiny/{name}"})
    bare = load_manifest(f"s3://{s3_server.bucket}/bare-tiny/{{train-000009,val-000000}}.tar")
    assert (bare.split("train").shard_lengths, bare.split("val").shard_lengths) == ((6,), (10,))
    keys = [s.key for s in iter_shard(bare.storage, "val-000000.tar")]
    assert keys == [s.key for s in iter_shard(picked.storage, "val-000000.tar")]


def test_two_workers_run_one_per_node_and_split_local_and_s3_data_by_global_rank(s3_shards, s3_server, tmp_path):
    """One TorchTrainer run of 2 workers on the session's two nodes (one job for both reads):

    - each worker runs on its own node (node ranks 0 and 1, local rank 0 on both, as on a real multi-node
      cluster): the job's own ``DistContext`` (``launch._dist_context``) and the Trainer's own loaders split one
      training epoch and the whole validation split of local data by global rank, not local rank;
    - the loader (2 loader workers per rank) reads the S3 shards: each validation sample exactly once, and
      training keys with no overlap between the ranks.
    """
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from metaformer_platform.config import load_config
    from metaformer_platform.launch.checks import resolve_data_root

    nodes = [n for n in ray.nodes() if n["Alive"]]
    assert len(nodes) == 2 and all(n["Resources"]["CPU"] == 1 for n in nodes)
    url, _ = s3_shards
    cfg = load_config(REPO / "jobs" / "configs" / "default.yaml", [
        "model.name=poolformer_debug", "data.img_size=32", "data.auto_augment=null", "data.num_workers=1",
        "data.synthetic.num_classes=4", "data.synthetic.train_samples=1000", "data.synthetic.val_samples=203",
        "data.synthetic.samples_per_shard=100", f"data.cache_dir={tmp_path / 'cache'}", "trainer.batch_size=16",
        "trainer.precision=fp32", "trainer.torch_threads=1", "scaling.num_workers=2",
    ])
    root = resolve_data_root(cfg)  # generated once here; the workers find it in the cache

    def read(config: dict) -> None:  # nested: Ray pickles it by value (the test module is not importable there)
        import json as _json
        from pathlib import Path as _Path

        import ray as _ray
        import ray.train as _train

        from metaformer_platform.config import JobConfig
        from metaformer_platform.data import build_loader
        from metaformer_platform.launch.checks import resolve_data_root
        from metaformer_platform.launch.workers import _dist_context
        from metaformer_platform.training.trainer import Trainer

        job = JobConfig.model_validate(config["job"])
        dist = _dist_context()
        trainer = Trainer(job, dist, data_root=resolve_data_root(job))
        local = {}
        for split, loader in (("train", trainer.train_loader), ("val", trainer.val_loader)):
            loader.with_keys = True
            local[split] = [key for _, _, batch_keys in loader for key in batch_keys]
        ctx = _train.get_context()
        rank, world = ctx.get_world_rank(), ctx.get_world_size()
        s3 = {}
        for split, shuffle, drop_last in (("val", False, False), ("train", True, True)):
            loader = build_loader(
                config["url"], split, batch_size=4, rank=rank, world_size=world, num_workers=2, transform=None,
                seed=0, shuffle=shuffle, shuffle_buffer=8, drop_last=drop_last, with_keys=True,
            )
            batches = [(keys, labels.tolist(), tuple(images.shape)) for images, labels, keys in loader]
            s3[split] = {"batches": len(batches), "keys": [k for b in batches for k in b[0]],
                         "labels": [lab for b in batches for lab in b[1]], "shapes": sorted({b[2][1:] for b in batches})}
        record = {
            "rank": dist.rank, "world_size": dist.world_size, "node_rank": dist.node_rank, "local_rank": dist.local_rank,
            "node_id": _ray.get_runtime_context().get_node_id(), "steps_per_epoch": trainer.steps_per_epoch,
            "local": local, "s3": s3,
        }
        _Path(config["out"], f"rank{rank}.json").write_text(_json.dumps(record))
        _train.report({"rank": rank})

    out = tmp_path / "out"
    out.mkdir()
    result = TorchTrainer(
        read,
        train_loop_config={"job": cfg.model_dump(mode="json"), "url": url, "out": str(out)},
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(
            name="it-two-nodes", storage_path=str(tmp_path / "runs"),
            # the endpoint only: the credentials are in the nodes' environment (conftest.ray_cluster)
            worker_runtime_env={"env_vars": {"AWS_ENDPOINT_URL": s3_server.endpoint_url}}
        ),
    ).fit()
    assert result.error is None
    ranks = sorted((json.loads(p.read_text()) for p in out.glob("rank*.json")), key=lambda r: r["rank"])

    # one worker per node: node ranks 0 and 1, local rank 0 on both
    assert [(r["rank"], r["world_size"], r["node_rank"], r["local_rank"]) for r in ranks] == [(0, 2, 0, 0), (1, 2, 1, 0)]
    assert ranks[0]["node_id"] != ranks[1]["node_id"]
    assert {r["node_id"] for r in ranks} == {n["NodeID"] for n in nodes}

    # local data, the Trainer's loaders. Training: 1000 samples, 2 ranks x 31 full batches of 16 (8 dropped), no
    # sample on both ranks. Validation: all 203 (an odd count: the ranks' shares differ), each scored once.
    train = [r["local"]["train"] for r in ranks]
    assert [len(t) for t in train] == [31 * 16, 31 * 16] and [r["steps_per_epoch"] for r in ranks] == [31, 31]
    assert len(set(train[0])) == len(train[0]) and len(set(train[1])) == len(train[1])
    assert not set(train[0]) & set(train[1])
    val = ranks[0]["local"]["val"] + ranks[1]["local"]["val"]
    assert load_manifest(root).split("val").num_samples == 203
    assert len(val) == 203 and len(set(val)) == 203 and len(ranks[0]["local"]["val"]) != len(ranks[1]["local"]["val"])

    # S3 shards, the loader with 2 workers per rank
    s3 = [r["s3"] for r in ranks]
    val_keys = s3[0]["val"]["keys"] + s3[1]["val"]["keys"]
    assert sorted(val_keys) == [f"ILSVRC2012_val_{i + 1:08d}" for i in range(VAL)]  # each exactly once
    assert s3[0]["val"]["batches"] == s3[1]["val"]["batches"] == 4  # 15 per rank in batches of 4
    for r in s3:
        assert r["val"]["labels"] == [(int(k[-8:]) - 1) % 4 for k in r["val"]["keys"]]
        assert r["train"]["batches"] == 12 and r["val"]["shapes"] == [[3, 32, 32]]
    train_keys = s3[0]["train"]["keys"] + s3[1]["train"]["keys"]
    assert len(train_keys) == len(set(train_keys)) == 96  # 48 per rank, no overlap


def test_refusals_are_clear_and_come_before_any_work(s3_shards, s3_server, tmp_path, monkeypatch):
    url, _ = s3_shards
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match=rf"no shards found in s3://{s3_server.bucket}/nothing-here: expected "
                                         rf"s3://{s3_server.bucket}/nothing-here/_info.json"):
        load_manifest(f"s3://{s3_server.bucket}/nothing-here")
    with pytest.raises(S3AccessError, match=r"bucket 'no-such-bucket' does not exist at http://127\.0\.0\.1"):
        load_manifest("s3://no-such-bucket/imagenet")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(S3AccessError, match=r"refused the credentials .*AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"):
        load_manifest(url)
    # The job's command line: exit status 2 and the same message, before Ray or MLflow start.
    env = {**os.environ, "PYTHONPATH": str(REPO / "platform")}
    out = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "pretrain.py"), f"data.source={url}", "model.name=poolformer_debug",
         f"run.storage_path={tmp_path / 'runs'}", "tracking.enabled=false"],
        capture_output=True, text=True, env=env, timeout=180,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "refused the credentials" in out.stderr and "AWS_SECRET_ACCESS_KEY" in out.stderr
    assert not (tmp_path / "runs").exists()
