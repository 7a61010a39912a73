"""Real servers for the integration tests, one of each per session, each stopped by its PID at the end.

- ``s3_server``: SeaweedFS on 127.0.0.1 that checks SigV4 signatures, with an empty bucket made through boto3;
- ``mlflow_server``: the tracking URI of an ``mlflow server`` (sqlite + served artifacts);
- ``ray_cluster``: a local Ray cluster of two 1-CPU nodes whose workers import the installed package;
- ``small_job`` and ``ddp_reference``: the suite's small 2-worker job and its one uninterrupted DDP run, which
  the strategy tests and the fault-tolerance test both compare their losses with (one reference job, not two);
- ``s3_checkpoint_job``: a 2-worker job reading its shards from and checkpointing to the S3 server, with a
  password in its tracking URI,
  which test_checkpoint_storage (the checkpoints, a restart) and test_secrets (no secret leaked) both read;
- ``train_worker_pids``: the PIDs of a running job's Ray Train workers, to kill or freeze them from outside.

On a shared host the session runs in a loopback-only network namespace (``make test`` does that), since Ray
binds the machine's own address too.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import devstack
import pytest


@dataclass(frozen=True)
class S3Server:
    """How to reach the session's S3 server."""

    endpoint_url: str
    access_key: str
    secret_key: str
    bucket: str

    @property
    def env(self) -> dict[str, str]:
        """boto3's environment variables for this server (for ``monkeypatch.setenv`` or a subprocess)."""
        return devstack.s3_env(self.endpoint_url, self.access_key, self.secret_key)

    def client(self, access_key: str | None = None, secret_key: str | None = None) -> Any:
        """A boto3 S3 client for this server (other credentials to test refusals)."""
        import boto3

        return boto3.client(
            "s3", endpoint_url=self.endpoint_url, region_name="us-east-1",
            aws_access_key_id=access_key or self.access_key, aws_secret_access_key=secret_key or self.secret_key,
        )

    def upload(self, folder: Path, prefix: str) -> str:
        """Every file under ``folder`` to ``s3://bucket/prefix/...`` (same relative keys); the prefix's URL."""
        client = self.client()
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            client.upload_file(str(path), self.bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")
        return f"s3://{self.bucket}/{prefix}"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A SeaweedFS S3 server on a free 127.0.0.1 port, with a fresh bucket; stopped at the end of the session."""
    root = tmp_path_factory.mktemp("s3")
    access_key, secret_key = "test" + secrets.token_hex(6), secrets.token_hex(20)
    svc = devstack.start_s3(root / "data", access_key, secret_key, log_dir=root)
    try:
        server = S3Server(svc.url, access_key, secret_key, bucket="test-bucket")
        server.client().create_bucket(Bucket=server.bucket)
        yield server
    finally:
        devstack.stop_service(svc)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The tracking URI (``http://127.0.0.1:PORT``) of an MLflow server; stopped at the end of the session."""
    root = tmp_path_factory.mktemp("mlflow")
    svc = devstack.start_mlflow(root / "store", log_dir=root)
    try:
        yield svc.url
    finally:
        devstack.stop_service(svc)


def local_cluster(env: dict[str, str], extra_node_ips: tuple[str, ...] = ("127.0.0.2",)) -> Any:
    """A ``ray.cluster_utils.Cluster`` on this machine: a 1-CPU head on 127.0.0.1 and one 1-CPU node per
    address in ``extra_node_ips`` (Ray Train tells nodes apart by IP: node_rank, local_rank), whose processes
    get ``env`` on top of this process's environment (this process's own environment is left as it was).
    The caller connects (``ray.init(address=cluster.address)``) and shuts it down."""
    from ray.cluster_utils import Cluster

    gcs_port = devstack.Ports().get()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        # Ray's own actors find "the" cluster through RAY_ADDRESS, else through /tmp/ray/ray_current_cluster,
        # which the Ray head started last on the host wrote: test_local_stack's, stopped by PID, leaves its dead
        # address there (on a shared host, so does any other session's). Ray Train's PlacementGroupCleaner asks
        # that address about the job's controller every second; at a dead one the call hangs, and every job's
        # shutdown waits the cleaner's 12 s stop timeout for it (measured: 14 s instead of 2.5 s per job).
        mp.setenv("RAY_ADDRESS", f"{devstack.HOST}:{gcs_port}")
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "include_dashboard": False, "gcs_server_port": gcs_port})
        try:
            assert cluster.address == f"{devstack.HOST}:{gcs_port}", (cluster.address, gcs_port)
            for ip in extra_node_ips:
                cluster.add_node(num_cpus=1, node_ip_address=ip)
        except BaseException:
            cluster.shutdown()
            raise
    return cluster


def node_env(s3_server: S3Server) -> dict[str, str]:
    """The environment of the session cluster's nodes: the S3 server's credentials, and Ray's workers at the
    session's own priority (Ray's default is nice 15: under make test, the test process beside the cluster runs
    at nice 19, and the jobs on the cluster are the suite's critical path)."""
    return {**s3_server.env, "RAY_worker_niceness": "0"}


@pytest.fixture(scope="session")
def ray_node_env(s3_server: S3Server) -> dict[str, str]:
    """``node_env``: for a node a test adds to the session cluster."""
    return node_env(s3_server)


@pytest.fixture(scope="session")
def ray_cluster(s3_server: S3Server) -> Iterator[Any]:
    """A Ray cluster of two nodes with 1 CPU each, on this machine, for the whole session.

    Every 2-worker job of the suite thus runs one worker per node (node ranks 0 and 1, local rank 0 on
    both), as on a real multi-node cluster: a split of the data by local instead of global rank would
    show. Each node is its own raylet with its own object store. Workers run this interpreter, where the
    package is installed (editable), so they import it without a runtime_env. The nodes start with the S3
    server's credentials in their environment, as a real cluster's nodes have theirs: jobs never send
    credentials through Ray's runtime_env (it lands in files, command lines and `ray list actors`).
    """
    import ray

    cluster = local_cluster(node_env(s3_server))
    try:
        cluster.wait_for_nodes()
        context = ray.init(address=cluster.address, log_to_driver=True)
        try:
            yield context
        finally:
            ray.shutdown()
    finally:
        cluster.shutdown()


@pytest.fixture(scope="session")
def train_worker_pids(ray_cluster: Any) -> Callable[[float], dict[int, int]]:
    """``pids(since)``: {rank: pid} of the live Ray Train workers of the job started after ``since`` (a
    ``time.time()``), from the line each worker logs at start (workers.py: ``rank R of W on node N (local
    rank L), pid P``) in the session cluster's logs."""
    import re

    import psutil

    logs = Path(ray_cluster.address_info["session_dir"]) / "logs"
    line = re.compile(r"rank (\d+) of \d+ on node \d+ \(local rank \d+\), pid (\d+)")

    def pids(since: float) -> dict[int, int]:
        found = {}
        for path in logs.glob("worker-*.err"):
            if path.stat().st_mtime < since:
                continue
            for match in line.finditer(path.read_text(errors="replace")):
                rank, pid = int(match[1]), int(match[2])
                try:
                    if "RayTrainWorker" in " ".join(psutil.Process(pid).cmdline()):
                        found[rank] = pid
                except psutil.Error:  # gone (an earlier job's worker), or gone while being read
                    continue
        return found

    return pids


# The small job: poolformer_debug at 32 px on synthetic data, fp32, no augmentation, 2 micro-batches of 8 per
# step (accumulation is compared too), a loss logged every step. DDP, FSDP2 and ZeRO compute the same losses
# from it, and so does a run that was killed and resumed. Its 150 validation samples lie in uneven shards of
# 40/40/40/30, split mid-shard between the 2 ranks: test_finetune_evaluate evaluates its DDP run's checkpoint.
SMALL_JOB_STEPS = 30


@dataclass(frozen=True)
class SmallJob:
    """Runs the small job (``run_job`` with 2 workers) under ``workdir`` against the session's MLflow server."""

    workdir: Path
    mlflow_uri: str

    def overrides(self, name: str, *extra: str) -> list[str]:
        """The job's dotted overrides for run ``name``; ``extra`` ones come last and win."""
        return [
            "model.name=poolformer_debug",
            "data.synthetic.num_classes=4", "data.synthetic.train_samples=1024", "data.synthetic.val_samples=150",
            "data.synthetic.samples_per_shard=40", f"data.cache_dir={self.workdir / 'cache'}", "data.num_workers=0",
            "data.img_size=32", "data.auto_augment=null", "data.re_prob=0", "data.mixup_alpha=0",
            "data.cutmix_alpha=0", "data.label_smoothing=0",
            f"trainer.max_steps={SMALL_JOB_STEPS}", "trainer.batch_size=8", "trainer.grad_accum_steps=2",
            "trainer.log_every_steps=1", f"trainer.val_every_steps={SMALL_JOB_STEPS}",
            f"trainer.checkpoint_every_steps={SMALL_JOB_STEPS // 2}", "trainer.precision=fp32",
            "optim.lr=3e-3", "optim.warmup_epochs=0",
            f"run.storage_path={self.workdir / 'runs'}", f"run.name={name}", "run.num_to_keep=null",
            "run.max_failures=0",
            f"tracking.tracking_uri={self.mlflow_uri}", "tracking.experiment=it-strategies",
            "tracking.system_metrics=false",
            *extra,
        ]

    def data_overrides(self) -> list[str]:
        """The small job's data set (``data.*``), without its image size (an evaluate job takes the weights')."""
        return [o for o in self.overrides("-") if o.startswith("data.") and not o.startswith("data.img_size=")]

    def config(self, name: str, *extra: str) -> Any:
        from metaformer_platform.config import load_config

        return load_config(None, self.overrides(name, *extra))

    def run(self, name: str, *extra: str) -> Any:
        from metaformer_platform.launch.driver import run_job

        start = time.perf_counter()
        result = run_job(self.config(name, *extra))
        print(f"job {name}: {time.perf_counter() - start:.1f} s")
        return result

    def history(self, run_id: str, key: str = "train/loss") -> dict[int, float]:
        """{step: value} of one metric of an MLflow run."""
        from mlflow import MlflowClient

        return {m.step: m.value for m in MlflowClient(self.mlflow_uri).get_metric_history(run_id, key)}


@pytest.fixture(scope="session")
def small_job(ray_cluster: Any, mlflow_server: str, tmp_path_factory: pytest.TempPathFactory) -> SmallJob:
    return SmallJob(tmp_path_factory.mktemp("small-job"), mlflow_server)


@pytest.fixture(scope="session")
def ddp_reference(small_job: SmallJob) -> Any:
    """The small job's uninterrupted DDP run (its ``JobResult``), run once per session."""
    return small_job.run("it-ddp", "strategy.name=ddp")


@pytest.fixture(scope="session")
def s3_checkpoint_job(ray_cluster: Any, mlflow_server: str, s3_server: S3Server,
                      tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The job run once, with the S3 credentials in the driver's environment (as in a user's shell; the nodes
    have their own) and a tracking URI that carries a password."""
    import glob
    import os
    import tempfile

    import cloudpickle
    from s3_checkpoint_job import (
        S3_CKPT_DATA,
        S3_CKPT_RUN,
        TRACKING_PASSWORD,
        CmdlineWatch,
        S3CheckpointJob,
        s3_checkpoint_config,
    )

    from metaformer_platform.data.build.synthetic import ensure_synthetic_shards
    from metaformer_platform.launch import driver
    from metaformer_platform.launch.driver import run_job

    workdir = tmp_path_factory.mktemp("s3ckpt")
    payloads: list[bytes] = []  # the worker function Ray is handed, pickled as Ray pickles it (with its plan)

    def recording(plan: Any, worker: Any, **kwargs: Any) -> Any:
        payloads.append(cloudpickle.dumps(worker))
        return build_trainer(plan, worker, **kwargs)

    build_trainer = driver.build_trainer
    shards = ensure_synthetic_shards(workdir / "data", num_classes=4, train_samples=512, val_samples=64,
                                     image_size=32, samples_per_shard=64)
    s3_server.upload(shards, S3_CKPT_DATA)

    run_scratch = Path(tempfile.gettempdir()) / f"metaformer-checkpoints-{os.getuid()}" / S3_CKPT_RUN

    def scratch() -> set[str]:  # each rank's local checkpoint folders before Ray uploads them (launch.workers)
        return {p for step in (7, 14) for p in glob.glob(str(run_scratch / "rank-*" / f"ckpt-{step:08d}-*"))}

    before = scratch()
    tracking = f"http://metaformer:{TRACKING_PASSWORD}@{mlflow_server.removeprefix('http://')}"
    with pytest.MonkeyPatch.context() as mp:
        for key, value in s3_server.env.items():
            mp.setenv(key, value)
        mp.setattr(driver, "build_trainer", recording)
        with CmdlineWatch([s3_server.secret_key, TRACKING_PASSWORD]) as watch:
            result = run_job(s3_checkpoint_config(workdir, tracking, s3_server.bucket))
    assert sorted(p.name for p in run_scratch.iterdir()) == ["rank-00000", "rank-00001"]  # where the ranks saved
    return S3CheckpointJob(workdir, result, scratch() - before, watch, payloads)
