"""Suite-wide settings: a hermetic environment, the `integration` mark by folder, `gpu` tests skipped without CUDA."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from pathlib import Path

import pytest

# Set before anything imports MLflow, Ray or boto3, and inherited by every process the tests start
# (servers, Ray workers, job drivers).
_SESSION_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "RAY_USAGE_STATS_ENABLED": "0",
    # Ray turns token auth on when ~/.ray/auth_token happens to exist: the same behaviour on every machine.
    "RAY_AUTH_MODE": "disabled",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",  # no model hub is reachable: fail fast instead of retrying
    "AWS_EC2_METADATA_DISABLED": "true",  # boto3 must never probe the instance-metadata address
    "PYTHONUNBUFFERED": "1",
    # Ray Train's controller polls its workers every 2 s: a job's end (and each change of state) is seen up to
    # 2 s late. The suite runs ~40 short jobs; at 0.5 s the polls cost nothing measurable on 2 cores.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    # Every job starts a PreemptionWatcher actor (one more Python process per job) that polls Ray's node drain
    # state: only tests/integration/test_drain_job.py drains a node, and on 2 cores the process start delays
    # every job's workers. That test turns it on for its own job (Ray passes the driver's value to the job's
    # controller); `make test-slow-faults` runs it, after the suite (Ray's default: on).
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0"),
    # The GCS declares a node dead after `failure_threshold` failed health checks `period_ms` apart: 5 x 3 s by
    # default, 15 s the elastic test waits after it kills a node's raylet. 5 x 1 s here; a slow but live raylet
    # still has each check's 10 s timeout.
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_failure_threshold": "5",
    # The deployment key checkpoint markers are signed with, the same in every process of the session (as a
    # Kubernetes Secret is on every pod): never the developer's own key file.
    "METAFORMER_CHECKPOINT_KEY": secrets.token_hex(32),
}
# A developer's exported local stack (see infra/local) must not leak into the tests: each test that needs a
# server gets its own from a fixture, and the others use local defaults.
_FOREIGN = (
    "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS",
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN", "AWS_PROFILE",
)
os.environ.update(_SESSION_ENV)
for _name in _FOREIGN:
    os.environ.pop(_name, None)
# Weights fetched by the tests go to a folder of this session, not the user's ~/.cache (tests that check the
# cache set their own): an entry there outlives the servers it came from.
_WEIGHTS_CACHE = tempfile.mkdtemp(prefix="pytest-weights-")
os.environ["METAFORMER_WEIGHTS_CACHE"] = _WEIGHTS_CACHE


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(_WEIGHTS_CACHE, ignore_errors=True)

INTEGRATION_DIR = Path(__file__).parent / "integration"


# Ray starts its worker processes at nice 15 (RAY_worker_niceness): a test process at nice 0 beside them takes
# the CPU from the Ray cluster's jobs, the suite's critical path. Under pytest-xdist the other tests run at nice
# 19 and the cluster group at the niceness the session started with (restored, where the OS allows, when one
# process runs both: the cluster's processes inherit the niceness of the process that starts them).
BESIDE_NICENESS = 19
CLUSTER_GROUP = "ray-cluster"
_START_NICENESS = os.getpriority(os.PRIO_PROCESS, 0)


def _in_cluster_group(item: pytest.Item) -> bool:
    return any(m.args[:1] == (CLUSTER_GROUP,) for m in item.iter_markers("xdist_group"))


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Under pytest-xdist: the cluster group at the session's niceness, every other test at nice 19."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    want = _START_NICENESS if _in_cluster_group(item) else max(_START_NICENESS, BESIDE_NICENESS)
    if os.getpriority(os.PRIO_PROCESS, 0) != want:
        with contextlib.suppress(PermissionError):  # only root may lower it again
            os.setpriority(os.PRIO_PROCESS, 0, want)


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's hook, which reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark everything under tests/integration as `integration`; skip `gpu` tests where CUDA is missing; keep
    the tests on the session's Ray cluster in one pytest-xdist group.

    Under ``pytest -n 2 --dist loadgroup`` (``make test``) that group runs, in file order, in one process, which
    starts the one Ray cluster of the session; the other process meanwhile takes the rest a module at a time
    (module fixtures start once): the unit tests, and the integration modules marked ``beside_cluster`` (no
    job on the session's cluster: servers of their own, the local stack) except their tests that ask for it."""
    for item in items:
        integration = INTEGRATION_DIR in item.path.parents
        if integration:
            item.add_marker(pytest.mark.integration)
        on_cluster = "ray_cluster" in getattr(item, "fixturenames", ())
        if on_cluster or (integration and not item.get_closest_marker("beside_cluster")):
            item.add_marker(pytest.mark.xdist_group(CLUSTER_GROUP))
        else:
            item.add_marker(pytest.mark.xdist_group(item.path.stem))
    # The cluster group first (a stable sort: file order within it): pytest-xdist hands it to a process that has
    # run nothing yet, so no server of that process started at the other tests' nice 19 (see BESIDE_NICENESS).
    items.sort(key=lambda item: not _in_cluster_group(item))
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return  # keep collection free of the torch import
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in gpu_items:
            item.add_marker(skip)
