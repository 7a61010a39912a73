"""A real pretrain job: TorchTrainer with 2 CPU workers (DDP, gloo), a real MLflow server, local storage.

The module's one full job runs as a user runs it (``python jobs/pretrain.py``, its console captured): it must
learn (loss falls, validation far above chance), leave complete checkpoints with every rank's part, show its
progress without Ray's noise, and appear in MLflow as the UI reads it. Started again under the same name it
resumes from the latest checkpoint (same MLflow run, step axis continuous); a job that cannot fit the cluster
is refused before any worker starts or any run is opened.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow import MlflowClient

from metaformer_platform.config import load_config
from metaformer_platform.launch.driver import run_job
from metaformer_platform.tracking.runs import RUN_NAME_TAG

CONFIGS = Path(__file__).resolve().parents[2] / "jobs" / "configs"
RUN = "it-console"  # the run name and the experiment of the module's job


def _overrides(tmp: Path, mlflow_uri: str, *extra: str) -> list[str]:
    return [
        "model.name=poolformer_debug",
        "data.synthetic.num_classes=4", "data.synthetic.train_samples=1024", "data.synthetic.val_samples=200",
        "data.synthetic.samples_per_shard=100",  # uneven split of shards over ranks and workers
        f"data.cache_dir={tmp / 'cache'}", "data.num_workers=1",
        "trainer.batch_size=16", "trainer.max_steps=100", "trainer.log_every_steps=5",
        "trainer.val_every_steps=50", "trainer.checkpoint_every_steps=25", "trainer.precision=fp32",
        "optim.lr=3e-3", "optim.warmup_epochs=0",
        f"run.storage_path={tmp / 'runs'}", f"run.name={RUN}", "run.num_to_keep=null",
        f"tracking.tracking_uri={mlflow_uri}", f"tracking.experiment={RUN}", "tracking.system_metrics=false",
        *extra,
    ]


@dataclass(frozen=True)
class CliRun:
    """The module's job: where it wrote, what its console said, and the MLflow run it opened."""

    tmp: Path
    out: str
    err: str
    mlflow_run_id: str

    @property
    def run_dir(self) -> Path:
        return self.tmp / "runs" / RUN


@pytest.fixture(scope="module")
def first_run(ray_cluster, mlflow_server, tmp_path_factory) -> CliRun:
    """The entry point as a user runs it (its own process, joining the session cluster through RAY_ADDRESS):
    100 steps on 2 workers, in an experiment that exists already without the training mark (made by an
    older version, say). It serves the checks of a fresh run, the console's and MLflow's, and is the run
    the later tests resume: each Ray Train job costs ~16 s to start and stop."""
    import os
    import subprocess
    import sys

    client = MlflowClient(mlflow_server)
    experiment_id = client.create_experiment(RUN)
    tmp = tmp_path_factory.mktemp("pretrain")
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address_info["address"]}
    proc = subprocess.run(
        [sys.executable, "jobs/pretrain.py", *_overrides(tmp, mlflow_server)], cwd=CONFIGS.parents[1], env=env,
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (run,) = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{RUN}'")
    return CliRun(tmp, proc.stdout, proc.stderr, run.info.run_id)


def test_job_learns_checkpoints_and_tracks(first_run, mlflow_server):
    out, run_dir = first_run.out, first_run.run_dir
    checkpoints = sorted(p.name for p in run_dir.glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-00000025", "checkpoint-00000050", "checkpoint-00000075", "checkpoint-00000100"]
    latest = run_dir / "checkpoint-00000100"
    # Both ranks' parts were merged into one folder by Ray; rank 0 marked it complete.
    for name in ("COMPLETE", "model.pt", "optimizer.pt", "trainer.pt", "config.yaml",
                 "rng-rank00000.pt", "rng-rank00001.pt", "data-faults-rank00000.json", "data-faults-rank00001.json"):
        assert (latest / name).is_file(), name
    # the job's result, as the entry point prints it: the final step, its validation, the latest checkpoint
    finished = re.search(r"^pretrain finished: step (\d+), validation top-1 ([\d.]+)% top-5 [\d.]+% on (\d+) images$",
                         out, re.MULTILINE)
    assert finished and finished[1] == "100" and finished[3] == "200", out  # each val image once across 2 ranks
    assert f"\nlatest checkpoint: {latest}\n" in out, out
    assert f"\nMLflow run {first_run.mlflow_run_id} (experiment '{RUN}'): open {mlflow_server}/" in out, out

    client = MlflowClient(mlflow_server)
    run = client.get_run(first_run.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.name"] == "poolformer_debug"
    assert run.data.params["trainer.max_steps"] == "100"
    assert run.data.params["scaling.num_workers"] == "2"
    assert run.data.tags["model"] == "poolformer_debug" and run.data.tags["mlflow.source.git.commit"]
    assert run.data.tags["mlflow.source.name"] == "jobs/pretrain.py"
    # the final validation, as MLflow holds it (the run's latest value of each metric)
    assert run.data.metrics["val/samples"] == 200 and run.data.metrics["val/skipped_samples"] == 0
    assert run.data.metrics["val/top1"] > 60.0  # chance is 25%
    assert float(finished[2]) == pytest.approx(run.data.metrics["val/top1"], abs=0.005)
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in sorted(losses, key=lambda m: m.step)] == list(range(5, 101, 5))
    values = [m.value for m in sorted(losses, key=lambda m: m.step)]
    first, last = sum(values[:3]) / 3, sum(values[-3:]) / 3
    # It falls, and ends well below the loss of guessing (ln 4 = 1.386), under random-resized crops.
    assert last < 0.9 * first and last < 0.75 * math.log(4), values
    assert {m.step for m in client.get_metric_history(run.info.run_id, "val/top1")} == {50, 100}
    # the data-fault counters reach MLflow at the log cadence (clean data: nothing skipped)
    skipped = client.get_metric_history(run.info.run_id, "system/data_skipped_samples")
    assert sorted(m.step for m in skipped) == list(range(5, 101, 5)) and {m.value for m in skipped} == {0.0}
    assert "config.yaml" in {a.path for a in client.list_artifacts(run.info.run_id)}


# -- what a user sees: the console of `python jobs/pretrain.py`, and MLflow as its UI reads it ---------------

RAY_NOISE = ("PlacementGroupCleaner", "TrainingReport(", "Token authentication", "(RayTrainWorker", "(TrainController",
             "Failed to query Ray Train Controller")
STEP_LINE = re.compile(
    r"^step +(\d+)/100 \| epoch [\d.]+ \| loss ([\d.]+) \| lr [\d.e+-]+ \| +\d+ img/s \| data +\d+% \| eta (\S+)$"
)


def _seconds(eta: str) -> int:
    """``1h02m`` / ``4m05s`` / ``12s`` (console.format_duration) in seconds."""
    match = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", eta)
    assert match and eta, eta
    hours, minutes, secs = (int(g or 0) for g in match.groups())
    return 3600 * hours + 60 * minutes + secs


def test_the_console_shows_progress_and_no_ray_noise(first_run):
    out, err = first_run.out, first_run.err
    lines = out.splitlines()
    assert lines[:2] == [
        f"run {RUN}: starting 2 Ray Train workers (ddp)",
        "training poolformer_debug (ddp, 2 workers): 100 steps, 32 per epoch, global batch 32, lr 0.003",
    ]
    steps = [m for m in map(STEP_LINE.match, lines) if m]
    # one line per log cadence (trainer.log_every_steps=5), the ETA falling to 0 at the end
    assert [int(m[1]) for m in steps] == list(range(5, 101, 5)), out
    etas = [_seconds(m[3]) for m in steps]
    # whole seconds of a short job: it may tick up by one between two lines, but starts highest (the first
    # window's speed includes the first, slowest step) and ends at 0
    assert etas[0] == max(etas) > 0 and etas[-1] == 0, etas
    vals = [line for line in lines if line.startswith("val ")]
    assert [re.match(r"val +step (\d+) \| top-1 ([\d.]+)% \| top-5 ([\d.]+)% \| loss [\d.]+ \| 200 images$", v)[1]
            for v in vals] == ["50", "100"], vals
    assert float(re.search(r"top-1 ([\d.]+)%", vals[-1])[1]) > 25.0  # above chance (4 classes)
    run_dir = first_run.run_dir
    assert [line.split(" | ")[0] for line in lines if line.startswith("checkpoint ")] == [
        f"checkpoint step {step} -> {run_dir}/checkpoint-{step:08d}" for step in (25, 50, 75, 100)
    ]
    summary = [line for line in lines if line.startswith("done: ")]
    # the run ledger's figures close it: goodput, MFU where the CPU's peak is known, worker-hours (no price set)
    assert len(summary) == 1 and re.match(
        r"done: 100 steps in \S+( \(\+\S+ queued\))? \| \d+ img/s \| data wait \d+% \| val top-1 [\d.]+% top-5 "
        r"[\d.]+% \| 4 checkpoints, stall [\d.]+ s \| goodput \d+% \| (MFU [\d.e+-]+% \| )?[\d.e+-]+ worker-hours$",
        summary[0]), summary
    noise = [line for line in out.splitlines() + err.splitlines() if any(n in line for n in RAY_NOISE)]
    assert not noise, noise


def test_mlflow_shows_a_training_experiment_with_data_source_and_model(first_run, mlflow_server):
    """What the UI reads, through MLflow's REST API: the experiment's kind, the run's dataset inputs and
    source, and (after registering the run's export) the LoggedModel in the run's outputs with its metrics."""
    import hashlib
    import json

    import requests

    from metaformer_platform.tracking import registry
    from metaformer_platform.training.export import export_checkpoint

    tmp = first_run.tmp
    api = f"{mlflow_server}/api/2.0/mlflow"
    experiment = requests.get(f"{api}/experiments/get-by-name", params={"experiment_name": RUN},
                              timeout=30).json()["experiment"]
    tags = {t["key"]: t["value"] for t in experiment["tags"]}
    assert tags["mlflow.experimentKind"] == "custom_model_development"  # set on the existing experiment
    runs = requests.post(f"{api}/runs/search", json={"experiment_ids": [experiment["experiment_id"]]},
                         timeout=30).json()["runs"]
    assert len(runs) == 1
    run = runs[0]
    assert run["info"]["run_id"] == first_run.mlflow_run_id
    run_tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert run_tags["mlflow.source.name"] == "jobs/pretrain.py" and run_tags["mlflow.source.type"] == "LOCAL"
    # the run ledger: its categories sum to the wall time, nothing lost on a run without faults, no price set
    from metaformer_platform.training import ledger as lg

    m = {x["key"]: x["value"] for x in run["data"]["metrics"]}
    assert sum(m[c] for c in lg.CATEGORIES) == pytest.approx(m[lg.WALL], rel=0.02)
    assert m[lg.LOST_WORK] == m[lg.RECOVERY_GAP] == m[lg.RESIZE_GAP] == 0
    assert 0 < m[lg.GOODPUT] < 1 and lg.COST not in m
    assert m[lg.TIME_TO_FINAL_TOP1] <= m[lg.TRAIN]
    from mlflow import MlflowClient

    assert "ledger.json" in {a.path for a in MlflowClient(mlflow_server).list_artifacts(run["info"]["run_id"])}

    data_root = tmp / "cache" / "synthetic"
    roots = list(data_root.glob("*/_info.json")) or list(data_root.glob("_info.json"))
    assert len(roots) == 1, roots
    manifest_sha = hashlib.sha256(roots[0].read_bytes()).hexdigest()
    inputs = {
        next(t["value"] for t in i["tags"] if t["key"] == "mlflow.data.context"): i["dataset"]
        for i in run["inputs"]["dataset_inputs"]
    }
    assert sorted(inputs) == ["train", "validation"]
    for context, split in (("train", "train"), ("validation", "val")):
        dataset = inputs[context]
        assert dataset["digest"] == manifest_sha[:36] and json.loads(dataset["profile"])["manifest_sha256"] == manifest_sha
        assert json.loads(dataset["source"]) == {"uri": str(roots[0].parent), "split": split}
        assert dataset["name"].endswith(f"/{split}")

    # the run's export, registered: an MLflow 3 LoggedModel of the run, with the run's step-100 metrics
    export = export_checkpoint(first_run.run_dir / "checkpoint-00000100", tmp / "export")
    version = registry.register_export(
        export.weights.parent, "it-console-model", tracking_uri=mlflow_server, run_id=run["info"]["run_id"],
        lineage_tags=registry.lineage_tags("checkpoint-00000100", manifest_sha),
    )
    mv = MlflowClient(mlflow_server, registry_uri=mlflow_server).get_model_version("it-console-model", version)
    model_id = mv.tags[registry.TAG_MODEL_ID]
    model = requests.get(f"{api}/logged-models/{model_id}", timeout=30).json()["model"]
    assert model["info"]["source_run_id"] == run["info"]["run_id"]
    assert model["info"]["status"] == "LOGGED_MODEL_READY"
    metrics = {m["key"]: m for m in model["data"]["metrics"]}
    assert int(metrics["val/top1"]["step"]) == 100 and metrics["val/top1"]["run_id"] == run["info"]["run_id"]
    outputs = requests.get(f"{api}/runs/get", params={"run_id": run["info"]["run_id"]},
                           timeout=30).json()["run"]["outputs"]["model_outputs"]
    assert [(o["model_id"], int(o["step"])) for o in outputs] == [(model_id, 100)]


def _cleaner_logs(logs: Path) -> list[str]:
    """Ray's log files of PlacementGroupCleaner actors under a Ray session's ``logs`` folder."""
    return [p.name for p in logs.glob("worker-*.err") if ":actor_name:PlacementGroupCleaner" in p.read_text(errors="replace")[:300]]


def test_no_placement_group_cleaner_where_no_state_api_is_served(first_run, ray_cluster):
    """The session's cluster has no dashboard, so no State API: the jobs left Ray Train's placement-group
    cleaner out (launch.build_trainer), and no such actor started (test_local_stack sees one where the head
    serves the API)."""
    from metaformer_platform.launch.driver import state_api_served

    assert state_api_served() is False
    assert _cleaner_logs(Path(ray_cluster.address_info["session_dir"]) / "logs") == []


# -- the same run name again: resumed; too big for the cluster: refused; failing in its workers: FAILED -------

def test_restart_with_the_same_name_resumes_the_latest_checkpoint(first_run, mlflow_server):
    cfg = load_config(CONFIGS / "default.yaml", _overrides(first_run.tmp, mlflow_server, "trainer.max_steps=120"))
    result = run_job(cfg)
    assert result.mlflow_run_id == first_run.mlflow_run_id  # the same MLflow run continues
    assert result.metrics["step"] == 120

    client = MlflowClient(mlflow_server)
    steps = sorted(m.step for m in client.get_metric_history(result.mlflow_run_id, "train/loss"))
    # Resumed at 100: steps 105..120 were added once; had it started over, 5..100 would appear twice.
    assert steps == list(range(5, 121, 5))
    assert client.get_run(result.mlflow_run_id).info.status == "FINISHED"
    assert (first_run.run_dir / "checkpoint-00000120" / "COMPLETE").is_file()


def test_a_job_larger_than_the_cluster_is_refused_before_it_starts(first_run, mlflow_server):
    tmp = first_run.tmp
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name(RUN)
    before = len(client.search_runs([experiment.experiment_id]))
    cfg = load_config(
        CONFIGS / "default.yaml",
        _overrides(tmp, mlflow_server, "scaling.num_workers=3", "run.name=it-too-big"),
    )
    with pytest.raises(ValueError, match=r"needs 3 CPU .* but the Ray cluster has 2"):
        run_job(cfg)
    assert len(client.search_runs([experiment.experiment_id])) == before  # no run left behind
    assert not (tmp / "runs" / "it-too-big").exists()  # nothing written


def test_a_job_that_fails_in_its_workers_ends_its_run_failed(first_run, mlflow_server):
    """Resuming the 4-class run as a 7-class model fails inside the workers: the job raises, the MLflow
    run it continued is closed FAILED (not left RUNNING), and the checkpoints already there are intact."""
    import ray.train

    run_dir = first_run.run_dir
    before = {p.name: (p / "model.pt").read_bytes() for p in run_dir.glob("checkpoint-*")}
    cfg = load_config(
        CONFIGS / "default.yaml",
        _overrides(first_run.tmp, mlflow_server, "model.num_classes=7", "run.max_failures=0", "trainer.max_steps=140"),
    )
    with pytest.raises(ray.train.TrainingFailedError, match="holds poolformer_debug with 4 classes"):
        run_job(cfg)
    assert MlflowClient(mlflow_server).get_run(first_run.mlflow_run_id).info.status == "FAILED"
    assert {p.name: (p / "model.pt").read_bytes() for p in run_dir.glob("checkpoint-*")} == before


def test_a_job_on_shards_gone_bad_counts_them_in_mlflow(ray_cluster, mlflow_server, tmp_path):
    """One train and one val shard overwritten with random bytes (same size, so the manifest check passes):
    the 2-rank job trains its whole epoch with full batches, MLflow gets the summed counts, and validation
    scores the 150 readable samples and reports the 50 skipped."""
    import os

    from metaformer_platform.data.build.synthetic import ensure_synthetic_shards

    root = ensure_synthetic_shards(
        tmp_path / "data", num_classes=4, train_samples=1024, val_samples=200, image_size=32, samples_per_shard=50
    )
    for name in ("train-000003.tar", "val-000001.tar"):
        path = root / name
        path.write_bytes(os.urandom(path.stat().st_size))
    cfg = load_config(
        CONFIGS / "default.yaml",
        _overrides(
            tmp_path, mlflow_server, f"data.source={root}", "data.max_bad_fraction=0.6", "trainer.max_steps=32",
            "trainer.val_every_steps=32", "trainer.checkpoint_every_steps=32", "run.name=it-bad-shards",
            "tracking.experiment=it-bad-shards", "run.max_failures=0",
        ),
    )
    result = run_job(cfg)
    assert result.metrics["step"] == 32  # 1024 = 2 ranks x 32 batches x 16: the whole epoch
    client = MlflowClient(mlflow_server)
    skipped = {m.step: m.value for m in client.get_metric_history(result.mlflow_run_id, "system/data_skipped_samples")}
    assert skipped[32] == 50.0 and sorted(skipped) == list(range(5, 31, 5)) + [32]
    assert {m.step: m.value for m in client.get_metric_history(result.mlflow_run_id, "system/data_bad_shards")}[32] == 1.0
    assert result.metrics["val/samples"] == 150 and result.metrics["val/skipped_samples"] == 50
