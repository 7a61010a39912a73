"""The job dry run, the capacity model and the estimates: figures checked against hand-computed values, on
metadata-only manifests (no shard exists), and the estimate's evidence chosen from a real (sqlite) MLflow."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest

from metaformer_platform.config import load_config
from metaformer_platform.data.manifest import ShardInfo, manifest_dict, write_manifest
from metaformer_platform.launch import capacity, estimate
from metaformer_platform.launch.dryrun import dry_run, text
from metaformer_platform.launch.plan import build_plan

REPO = Path(__file__).resolve().parents[2]


def metadata_only(root: Path, lengths: list[int], shard_bytes: int) -> Path:
    """A manifest of train shards of ``lengths`` (each ``shard_bytes`` long) and one val shard; no shard file."""
    train = [ShardInfo(f"train-{i:06d}.tar", n, f"{i:064x}", shard_bytes) for i, n in enumerate(lengths)]
    val = [ShardInfo("val-000000.tar", 10, "f" * 64, shard_bytes)]
    root.mkdir(parents=True, exist_ok=True)
    write_manifest(root, manifest_dict("meta", {"train": train, "val": val}, num_classes=10))
    return root


def small_config(tmp_path: Path, *extra: str):
    return load_config(None, [
        "model.name=poolformer_debug", "data.img_size=32", f"data.source={tmp_path / 'data'}",
        "data.num_workers=1", "data.shuffle_buffer=40", "data.mixup_alpha=0", "data.cutmix_alpha=0",
        "trainer.batch_size=8", "trainer.grad_accum_steps=2", "trainer.epochs=1",
        "scaling.num_workers=2", "scaling.cpus_per_worker=1", "scaling.use_gpu=false",
        f"run.storage_path={tmp_path / 'runs'}", "run.name=dry", "tracking.enabled=false", *extra])


def test_dry_run_of_a_small_manifest_counts_steps_reads_and_bytes_exactly(tmp_path):
    # 5 shards of 40 = 200 samples, 2 ranks: 100 each, 12 batches of 8 (96 samples), 6 steps of 2 micro-batches.
    # The shuffle window (40) matches the shard length, so each rank reads a contiguous run of the epoch's shard
    # order: rank 0 positions 0-95 (shards 1, 2, 3 of the order), rank 1 96-191 (shards 3, 4, 5): 6 reads.
    metadata_only(tmp_path / "data", [40] * 5, 4096)
    run = dry_run(build_plan(small_config(tmp_path), dry_run=True))
    d = run.data
    assert (d.samples, d.shards, d.steps_per_epoch, d.total_steps) == (200, 5, 6, 6)
    assert d.reads_per_rank == (3, 3)
    assert d.bytes_per_epoch == 6 * 4096
    assert not d.remote
    # fp32 weights + AdamW's 2 moments, no EMA: DDP's rank 0 writes all 12 bytes a parameter; FSDP halves it
    p = run.params
    assert run.checkpoint_bytes["ddp"] == (12 * p, 0)
    assert run.checkpoint_bytes["fsdp"] == (math.ceil(12 * p / 2), math.ceil(12 * p / 2))
    # 6 steps x 8 x 2 x 2 workers = 192 images at the capacity model's CPU rate of 1 CPU per worker
    gmacs = estimate._gmacs_224(run.plan.cfg, 10)
    rate = capacity.cpu_images_per_s("poolformer_debug", cpus=1, img_size=32, gmacs_224=gmacs)
    assert run.estimate.images == 192
    assert run.estimate.wall_s == pytest.approx(192 / (2 * rate))
    assert "capacity model" in run.estimate.source and run.estimate.cost is None
    out = text(run, 0.5)
    assert "6 per epoch, 6 in all" in out and "6 per epoch (1.20x the ideal of 5" in out
    assert "per rank (1 loader worker(s) each): 3, 3" in out and "24,576 bytes per epoch" in out
    assert "ddp                  853,272 bytes / 0 bytes  <- this job" in out  # 71,106 parameters x 12


def test_a_dry_run_needs_no_shard_but_a_real_plan_does(tmp_path):
    metadata_only(tmp_path / "data", [40] * 5, 4096)
    with pytest.raises(ValueError, match="listed shard file"):
        build_plan(small_config(tmp_path))
    assert build_plan(small_config(tmp_path), dry_run=True).data.samples["train"] == 200


def test_a_14000_shard_manifest_plans_in_seconds_at_512_ranks(tmp_path):
    metadata_only(tmp_path / "data", [1000] * 14_000, 115_782_000)
    cfg = load_config(REPO / "jobs/configs/poolformer_s12.yaml", [
        f"data.source={tmp_path / 'data'}", "scaling.num_workers=512", f"run.storage_path={tmp_path / 'runs'}",
        "tracking.enabled=false", "run.name=scale"])
    start = time.perf_counter()
    run = dry_run(build_plan(cfg, dry_run=True))
    seconds = time.perf_counter() - start
    assert seconds < 30, seconds  # about 4 s on the 2-core CI machine; ShardSet.plan per rank took 30 s
    d = run.data
    assert (d.samples, d.steps_per_epoch) == (14_000_000, 14_000_000 // 512 // 128)
    assert len(d.reads_per_rank) == 512 and d.reads >= 14_000  # every shard at least once
    assert d.bytes_per_epoch == d.reads * 115_782_000


def test_the_capacity_model_against_hand_computed_figures():
    h100 = 1234.11 * 3350 / 936  # timm's RTX 3090 rate of s12, scaled by memory bandwidth
    assert capacity.gpu_images_per_s("poolformer_s12") == pytest.approx(h100)
    assert capacity.gpu_images_per_s("poolformer_s12", img_size=448) == pytest.approx(h100 / 4)
    node = capacity.node_needs("poolformer_s12")
    assert node.images_per_s == pytest.approx(8 * h100)
    assert node.cores_cpu_decode == pytest.approx(8 * h100 * 4.6e-3)
    assert node.cores_gpu_decode == pytest.approx(8 * h100 * 1.61e-3)
    assert node.s3_requests_per_s == pytest.approx(8 * h100 / 1000)
    assert node.checkpoint_bytes == 11_915_176 * 16
    wall, gpu_hours = capacity.retrain("poolformer_s12", 8)
    assert wall == pytest.approx(300 * 1_281_167 / (8 * h100))
    assert gpu_hours == pytest.approx(wall * 8 / 3600)
    # 125 img/s for s12 at 64 px on 2 CPUs, as measured; the rate scales with the inverse of the MACs
    assert capacity.cpu_images_per_s("poolformer_s12", cpus=2, img_size=64) == pytest.approx(125)
    assert capacity.cpu_images_per_s("poolformer_s24", cpus=2, img_size=64) == pytest.approx(125 * 1.81 / 3.39)


def test_docs_capacity_holds_the_models_tables():
    doc = (REPO / "docs/capacity.md").read_text()
    assert capacity.markdown() in doc, "regenerate: python -m metaformer_platform.launch.capacity"


@pytest.fixture(scope="module")
def mlflow_db(tmp_path_factory):
    """A sqlite MLflow holding two finished runs: poolformer_debug at 32 px on 2 CPU workers (100 img/s,
    goodput 0.5), and the same on a GPU (which a CPU job must not go by)."""
    import mlflow

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("est")
    runs = {}
    for device, rate in (("cpu (test)", 100.0), ("cuda (NVIDIA H100)", 5000.0)):
        run = client.create_run(experiment, run_name=device)
        for key, value in {"model.name": "poolformer_debug", "data.img_size": "32", "resolved.device": device,
                           "scaling.num_workers": "2", "resolved.precision": "fp32"}.items():
            client.log_param(run.info.run_id, key, value)
        client.log_metric(run.info.run_id, "train/images_per_s", rate)
        client.log_metric(run.info.run_id, "system/ledger_goodput", 0.5)
        client.set_terminated(run.info.run_id)
        runs[device] = run.info.run_id
    return uri, runs


def test_the_estimate_goes_by_an_earlier_run_of_the_same_model_and_hardware(tmp_path, mlflow_db):
    uri, runs = mlflow_db
    cfg = small_config(tmp_path, "tracking.enabled=true", "tracking.experiment=est")
    est = estimate.estimate_job(cfg, workers=4, use_gpu=False, cpus_per_worker=1, images=1000, tracking_uri=uri)
    # 100 img/s on 2 workers = 50 per worker; 4 workers at goodput 0.5: 1000 / 200 / 0.5 = 10 s
    assert est.wall_s == pytest.approx(10.0)
    assert est.worker_hours == pytest.approx(10.0 * 4 / 3600)
    assert runs["cpu (test)"] in est.source and "goodput 0.50" in est.source
    gpu = estimate.estimate_job(cfg, workers=1, use_gpu=True, cpus_per_worker=8, images=5000, tracking_uri=uri)
    assert runs["cuda (NVIDIA H100)"] in gpu.source and gpu.wall_s == pytest.approx(5000 / 2500 / 0.5)
    # another resolution has no earlier run: the capacity model answers, and says so
    other = small_config(tmp_path, "tracking.enabled=true", "tracking.experiment=est", "data.img_size=64")
    assert "capacity model" in estimate.estimate_job(other, workers=1, use_gpu=False, cpus_per_worker=1, images=10,
                                                     tracking_uri=uri, gmacs_224=1.0).source


def test_the_estimate_is_priced_from_the_cost_section(tmp_path, mlflow_db):
    uri, _ = mlflow_db
    cfg = small_config(tmp_path, "tracking.enabled=true", "tracking.experiment=est", "cost.cpu_hour=0.36",
                       "cost.currency=EUR")
    est = estimate.estimate_job(cfg, workers=4, use_gpu=False, cpus_per_worker=1, images=1000, tracking_uri=uri)
    assert est.cost == pytest.approx(10.0 * 4 / 3600 * 0.36)
    assert est.metrics() == {"system/estimate_wall_s": est.wall_s, "system/estimate_worker_hours": est.worker_hours,
                             "system/estimate_cost": est.cost}
    assert "EUR" in est.line()


def test_tracking_down_falls_back_to_the_table_within_the_deadline(tmp_path):
    import socket

    with socket.socket() as sock:  # a port nothing listens on once this closes
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    cfg = small_config(tmp_path, "tracking.enabled=true")
    start = time.perf_counter()
    assert estimate.earlier_rate(cfg, f"http://127.0.0.1:{closed}", use_gpu=False, timeout_s=1.0) is None
    assert time.perf_counter() - start < 5


def test_a_running_job_logs_its_estimate_on_its_mlflow_run(tmp_path, mlflow_db):
    import mlflow

    uri, runs = mlflow_db
    metadata_only(tmp_path / "data", [40] * 5, 4096)
    plan = build_plan(small_config(tmp_path, "tracking.enabled=true", "tracking.experiment=est",
                                   f"tracking.tracking_uri={uri}"), dry_run=True)
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.get_experiment_by_name("est").experiment_id).info.run_id
    estimate.start_logging_estimate(client, run_id, plan).join(30)
    logged = client.get_run(run_id).data
    # 192 images on 2 workers at the earlier CPU run's 50 img/s per worker and goodput 0.5
    assert logged.metrics["system/estimate_wall_s"] == pytest.approx(192 / 100 / 0.5)
    assert logged.metrics["system/estimate_worker_hours"] == pytest.approx(192 / 100 / 0.5 * 2 / 3600)
    assert "system/estimate_cost" not in logged.metrics
    assert runs["cpu (test)"] in logged.tags[estimate.SOURCE_TAG]


def test_the_pipeline_dry_run_prints_each_stages_estimate_and_the_total(tmp_path):
    import yaml

    from metaformer_platform import pipelines

    default = str(REPO / "jobs" / "configs" / "default.yaml")
    tree = {
        "name": "est", "members": ["poolformer_debug"], "experiment": "pipe-est",
        "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "overrides": [f"data.cache_dir={tmp_path / 'cache'}", "data.synthetic.num_classes=4",
                      "data.synthetic.train_samples=32", "data.synthetic.val_samples=16",
                      "data.synthetic.samples_per_shard=16", "trainer.batch_size=8", "scaling.num_workers=1",
                      "scaling.cpus_per_worker=1", "scaling.use_gpu=false", "cost.cpu_hour=3600",
                      f"run.storage_path={tmp_path / 'runs'}"],
        "stages": [{"name": "pretrain", "kind": "pretrain", "config": default},
                   {"name": "evaluate", "kind": "evaluate", "config": default}],
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(tree))
    lines: list[str] = []
    pipelines.run_pipeline(path, dry_run=True, out=lines.append)
    out = "\n".join(lines)
    # pretrain: 3 epochs of 32 samples in batches of 8 on 1 worker = 12 steps, 96 images; evaluate: 16 images at
    # 3x the training rate. No earlier run: the capacity model's CPU rate at 1 CPU.
    planned = pipelines.plan_pipeline(path, out=lambda _: None).plans[0]
    cfg = planned.stage("pretrain").cfg
    rate = capacity.cpu_images_per_s("poolformer_debug", cpus=1, img_size=32, gmacs_224=estimate._gmacs_224(cfg, 4))
    train_s, eval_s = 96 / rate, 16 / (3 * rate)
    assert "estimates at the planned layouts:" in out
    assert f"pretrain   1 worker(s): expected {train_s:.0f} s wall, {train_s / 3600:,.2f} worker-hours, " \
           f"{train_s:,.2f} USD for 96 images; from the capacity model" in out
    assert f"evaluate   1 worker(s): expected {eval_s:.0f} s wall" in out and "for 16 images" in out
    assert f"total: {(train_s + eval_s) / 3600:,.2f} h of stage wall time" in out
    assert f"{train_s + eval_s:,.2f} USD" in out  # 3600 a CPU-hour: the cost is the seconds
