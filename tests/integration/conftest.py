"""Real servers for the integration tests, one of each per session, each stopped by its PID at the end.

- ``s3_server``: SeaweedFS on 127.0.0.1 that checks SigV4 signatures, with an empty bucket made through boto3;
- ``mlflow_server``: the tracking URI of an ``mlflow server`` (sqlite + served artifacts);
- ``ray_cluster``: a local Ray cluster of two 1-CPU nodes whose workers import the installed package.

On a shared host the session runs in a loopback-only network namespace (``make test`` does that), since Ray
binds the machine's own address too.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from metaformer_platform import localstack


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
        return localstack.s3_env(self.endpoint_url, self.access_key, self.secret_key)

    def client(self, access_key: str | None = None, secret_key: str | None = None) -> Any:
        """A boto3 S3 client for this server (other credentials to test refusals)."""
        import boto3

        return boto3.client(
            "s3", endpoint_url=self.endpoint_url, region_name="us-east-1",
            aws_access_key_id=access_key or self.access_key, aws_secret_access_key=secret_key or self.secret_key,
        )


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A SeaweedFS S3 server on a free 127.0.0.1 port, with a fresh bucket; stopped at the end of the session."""
    root = tmp_path_factory.mktemp("s3")
    access_key, secret_key = "test" + secrets.token_hex(6), secrets.token_hex(20)
    svc = localstack.start_s3(root / "data", access_key, secret_key, log_dir=root)
    try:
        server = S3Server(svc.url, access_key, secret_key, bucket="test-bucket")
        server.client().create_bucket(Bucket=server.bucket)
        yield server
    finally:
        localstack.stop_service(svc)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The tracking URI (``http://127.0.0.1:PORT``) of an MLflow server; stopped at the end of the session."""
    root = tmp_path_factory.mktemp("mlflow")
    svc = localstack.start_mlflow(root / "store", log_dir=root)
    try:
        yield svc.url
    finally:
        localstack.stop_service(svc)


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
    from ray.cluster_utils import Cluster

    with pytest.MonkeyPatch.context() as mp:  # the nodes' environment only, not the tests' process
        for key, value in s3_server.env.items():
            mp.setenv(key, value)
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        try:
            # Ray Train tells nodes apart by IP (node_rank, local_rank): the second one gets its own loopback address.
            cluster.add_node(num_cpus=1, node_ip_address="127.0.0.2")
        except BaseException:
            cluster.shutdown()
            raise
    try:
        cluster.wait_for_nodes()
        context = ray.init(address=cluster.address, log_to_driver=True)
        try:
            yield context
        finally:
            ray.shutdown()
    finally:
        cluster.shutdown()
