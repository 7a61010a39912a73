"""The local stack as a user runs it: S3 + MLflow + Ray head from `devstack` (infra/local/devstack.py), and a real `ray job submit`."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import devstack
import pytest

pytestmark = pytest.mark.beside_cluster  # no job on the session's Ray cluster (tests/conftest.py)

REPO = Path(__file__).resolve().parents[2]
# The embedded default, shrunk to a few steps of the debug model on a small generated data set.
TINY_JOB = [
    "--config", "jobs/configs/default.yaml",
    "model.name=poolformer_debug", "trainer.max_steps=6", "trainer.batch_size=16", "trainer.log_every_steps=2",
    "trainer.checkpoint_every_steps=6", "data.synthetic.train_samples=256", "data.synthetic.val_samples=64",
    "data.synthetic.samples_per_shard=64", "tracking.system_metrics=false",
]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):
    """The whole stack (S3, MLflow, Ray head) in a fresh state dir, brought down after the module."""
    from ray._common.utils import get_ray_address_file

    state_dir = tmp_path_factory.mktemp("stack") / "state"  # created by the stack, as `.stack` is for a user
    address_file = Path(get_ray_address_file(None))
    try:
        stack = devstack.up(state_dir, ray=True, num_cpus=2)
        # Ray's job supervisor hands each job driver the address in <its temp dir>/ray_current_cluster: the
        # stack's own temp dir names the stack's head, whatever other Ray the host (or this session) starts.
        head = f"{devstack.HOST}:{stack.services['ray'].ports['gcs']}"
        own = Path(get_ray_address_file(str(devstack.ray_temp_dir(state_dir))))
        assert own.read_text().strip() == head
        yield stack
    finally:
        devstack.down(state_dir)
        shutil.rmtree(devstack.ray_temp_dir(state_dir), ignore_errors=True)  # Ray's session files of this test
    # and the shared default (/tmp/ray) never names the stack's head: every other Ray user on the host keeps its own
    assert not (address_file.is_file() and address_file.read_text().strip() == head)


def test_s3_round_trip_with_right_credentials_and_refusal_with_wrong_ones(stack) -> None:
    import boto3
    from botocore.exceptions import ClientError

    def client(access_key: str, secret_key: str):
        return boto3.client("s3", endpoint_url=stack.services["s3"].url, region_name="us-east-1",
                            aws_access_key_id=access_key, aws_secret_access_key=secret_key)

    good = client(stack.access_key, stack.secret_key)
    body = bytes(range(256)) * 1000
    good.put_object(Bucket=stack.bucket, Key="probe/blob.bin", Body=body)
    assert good.get_object(Bucket=stack.bucket, Key="probe/blob.bin")["Body"].read() == body

    for access_key, secret_key, code in [
        (stack.access_key, "not-the-secret", "SignatureDoesNotMatch"),
        ("unknown-key", stack.secret_key, "InvalidAccessKeyId"),
    ]:
        with pytest.raises(ClientError) as refused:
            client(access_key, secret_key).get_object(Bucket=stack.bucket, Key="probe/blob.bin")
        assert refused.value.response["Error"]["Code"] == code
        assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    with pytest.raises(urllib.error.HTTPError) as anonymous:
        urllib.request.urlopen(f"{stack.services['s3'].url}/{stack.bucket}/probe/blob.bin", timeout=10)
    assert anonymous.value.code == 403


def test_s3_and_mlflow_listen_on_loopback_only(stack) -> None:
    assert stack.services["mlflow"].url.startswith("http://127.0.0.1:")
    with urllib.request.urlopen(f"{stack.services['mlflow'].url}/health", timeout=10) as resp:
        assert resp.read().decode().strip() == "OK"
    # S3 and MLflow only: Ray binds the machine's address whatever it is told (hence the namespace).
    listening = _listening_addresses({svc.pid for name, svc in stack.running().items() if name != "ray"})
    assert len(listening) >= 9, listening  # weed's S3, master, volume, filer, admin and their gRPC; MLflow
    assert all(addr in {"127.0.0.1", "::ffff:127.0.0.1"} for addr, _ in listening), listening


@pytest.mark.timeout(900)
def test_ray_job_submit_runs_pretrain_and_logs_to_the_stack_mlflow(stack, tmp_path: Path, monkeypatch) -> None:
    import mlflow

    # this test's own MLflow client authenticates as `eval "$(stack.sh env)"` would make it (the job gets the
    # same variables from the Ray head's environment)
    for key, value in stack.env().items():
        if key.startswith("MLFLOW_TRACKING_"):
            monkeypatch.setenv(key, value)

    mlflow_uri, dashboard = stack.services["mlflow"].url, stack.services["ray"].url
    experiment, submission_id = f"stack-test-{uuid.uuid4().hex[:8]}", f"stack-test-{uuid.uuid4().hex[:8]}"
    # The README's command, literally: `infra/local/stack.sh exec ray job submit --working-dir . -- python ...`
    # from the repo's root, with no address, token or MLflow URI given: `exec` exports the stack's own (the
    # head's dashboard, the token file, MLflow's URI and login) and finds the venv's `ray` with no venv active.
    # No namespace here (STACK_NETNS=none): the test session already runs in a loopback-only one.
    cmd = [
        "bash", "infra/local/stack.sh", "exec", "ray", "job", "submit", "--working-dir", ".",
        "--submission-id", submission_id, "--",
        "python", "jobs/pretrain.py", *TINY_JOB,
        f"tracking.experiment={experiment}", "run.name=stack-test",
        f"run.storage_path={tmp_path / 'runs'}", f"data.cache_dir={tmp_path / 'cache'}",
    ]
    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", str(tmp_path)), "STACK_NETNS": "none",
           "STACK_STATE_DIR": str(stack.state_dir), "PYTHON": sys.executable}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=840, cwd=REPO, env=env)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    assert f"Job '{submission_id}' succeeded" in output, output[-6000:]
    assert "MLflow run" in output and f"{mlflow_uri}/#/experiments/" in output  # the URI came from the stack

    from ray.job_submission import JobStatus, JobSubmissionClient

    jobs = JobSubmissionClient(dashboard, headers=_bearer(stack))
    assert jobs.get_job_status(submission_id) == JobStatus.SUCCEEDED
    # The uploaded working dir, as the head unpacked it: .gitignore keeps .venv, caches and outputs out.
    package = jobs.get_job_info(submission_id).runtime_env["working_dir"]  # gcs://_ray_pkg_<hash>.zip
    with urllib.request.urlopen(urllib.request.Request(f"{dashboard}/api/version", headers=_bearer(stack)),
                                timeout=10) as resp:
        session = json.loads(resp.read())["session_name"]
    unpacked = (devstack.ray_temp_dir(stack.state_dir) / session / "runtime_resources" / "working_dir_files"
                / package.removeprefix("gcs://").removesuffix(".zip"))
    files = [p for p in unpacked.rglob("*") if p.is_file()]
    assert (unpacked / "jobs" / "pretrain.py").is_file()
    assert not (unpacked / ".venv").exists() and not (unpacked / ".git").exists()
    upload_mib = sum(p.stat().st_size for p in files) / 2**20
    assert upload_mib < 5, f"the working dir upload holds {upload_mib:.1f} MiB in {len(files)} files"
    # The stack's head serves Ray's State API (its dashboard): the job kept Ray Train's placement-group cleaner.
    cleaners = [p for p in (devstack.ray_temp_dir(stack.state_dir) / session / "logs").glob("worker-*.err")
                if ":actor_name:PlacementGroupCleaner" in p.read_text(errors="replace")[:300]]
    assert cleaners, "no PlacementGroupCleaner ran on the stack's cluster"

    client = mlflow.MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"experiment {experiment} is missing from {mlflow_uri}"
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, runs
    run = runs[0]
    assert run.info.status == "FINISHED"
    losses = client.get_metric_history(run.info.run_id, _loss_key(run.data.metrics))
    assert len(losses) >= 2 and all(m.value == m.value for m in losses)  # logged during training, no NaN


def test_cli_down_stops_everything_and_up_restores_ports_and_data(tmp_path: Path) -> None:
    state = tmp_path / "st"

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "devstack", *args, "--state-dir", str(state)],
                              capture_output=True, text=True, timeout=300, cwd=REPO / "infra" / "local")

    first = cli("up", "--no-ray")
    assert first.returncode == 0, first.stdout + first.stderr
    try:
        env = dict(re.findall(r"^export (\w+)=(\S+)$", first.stdout, flags=re.M))
        assert set(env) >= {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_URI"}
        assert "RAY_ADDRESS" not in env
        assert env["MLFLOW_TRACKING_USERNAME"] == devstack.MLFLOW_ADMIN and len(env["MLFLOW_TRACKING_PASSWORD"]) >= 24
        _assert_private_tree(state)  # as the command line leaves it
        state_before = json.loads((state / "stack.json").read_text())
        _s3(env).put_object(Bucket="metaformer", Key="kept.txt", Body=b"still here")

        down = cli("down")
        assert down.returncode == 0 and "s3" in down.stdout and "mlflow" in down.stdout, down.stdout
        status = cli("status")
        assert status.returncode == 3 and "running" not in status.stdout, status.stdout
        for svc in state_before["services"].values():
            assert not devstack.Service(**svc).is_running()

        again = cli("up", "--no-ray")
        assert again.returncode == 0, again.stdout + again.stderr
        assert dict(re.findall(r"^export (\w+)=(\S+)$", again.stdout, flags=re.M)) == env
        assert _s3(env).get_object(Bucket="metaformer", Key="kept.txt")["Body"].read() == b"still here"
    finally:
        cli("down")
    assert cli("status").returncode == 3


def _bearer(stack: devstack.Stack, token: str | None = None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token or stack.ray_token_path.read_text().strip()}"}


def _submit_over_http(dashboard: str, headers: dict[str, str]) -> int:
    """POST a job to the Ray head's job API; the HTTP status it answers."""
    body = json.dumps({"entrypoint": "python -c 'open(\"/tmp/pwned-by-anyone\", \"w\")'"}).encode()
    request = urllib.request.Request(f"{dashboard}/api/jobs/", data=body, method="POST",
                                     headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


def test_ray_refuses_a_job_submission_without_the_token(stack) -> None:
    """Token authentication is on: the job API refuses anonymous and wrong-token clients, and so does
    `ray job submit` without the token; nothing is submitted. With the token it answers."""
    dashboard = stack.services["ray"].url
    assert _submit_over_http(dashboard, {}) in (401, 403)
    assert _submit_over_http(dashboard, _bearer(stack, "0" * 64)) in (401, 403)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    proc = subprocess.run(
        [sys.executable, "-m", "ray.scripts.scripts", "job", "submit", "--address", dashboard, "--no-wait",
         "--", "python", "-c", "print(1)"], capture_output=True, text=True, timeout=120, env=env,
    )
    assert proc.returncode != 0, proc.stdout + proc.stderr
    request = urllib.request.Request(f"{dashboard}/api/jobs/", headers=_bearer(stack))
    with urllib.request.urlopen(request, timeout=30) as resp:
        listed = json.loads(resp.read())
    assert not [job for job in listed if "pwned" in job.get("entrypoint", "") or job.get("entrypoint") == "python -c print(1)"]


def test_state_files_are_private_from_creation(stack) -> None:
    """stack.json (S3 keys), the Ray token and SeaweedFS's JWT keys: owner-only, in an owner-only folder."""
    state = stack.state_dir
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    for path in (state / devstack.STATE_FILE, state / devstack.RAY_TOKEN_FILE,
                 state / "s3" / devstack.WEED_SECURITY_FILE):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stack.ray_token_path.read_text().strip() not in stack.exports()  # exports name the file, not the token


def test_seaweedfs_filer_and_volume_ports_refuse_unauthenticated_requests(stack) -> None:
    """Below the S3 gateway (which checks SigV4), the filer and volume servers' HTTP ports refuse anyone
    without a JWT signed by the stack's own keys: no bypass of the S3 credentials."""
    ports = stack.services["s3"].ports
    for port, path in ((ports["filer"], f"/buckets/{stack.bucket}/bypass.txt"), (ports["volume"], "/3,01637037d6")):
        for data in (None, b"written without credentials"):
            request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                             method="POST" if data else "GET")
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=10)
            assert refused.value.code == 401, (port, path, data)


def _assert_private_tree(root: Path) -> list[Path]:
    """Every folder under ``root`` (itself included) is 0700 and nothing in it has a group or other bit (but
    SeaweedFS's .vif files, see below); the regular files among them. Ray's own session files live in its temp
    dir, not here."""
    files, problems = [], []
    for folder, _dirs, names in os.walk(root):
        mode = stat.S_IMODE(os.stat(folder).st_mode)
        if mode != 0o700:
            problems.append(f"{folder}/ {mode:o}")
        for name in names:
            path = Path(folder) / name
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode):
                continue
            # SeaweedFS chmods its volume info files (N.vif) to 0644 itself, whatever its umask: they are
            # covered by their 0700 folder (checked above), and hold volume metadata, not objects or keys
            if stat.S_IMODE(info.st_mode) & 0o077 and not (path.suffix == ".vif" and mode == 0o700):
                problems.append(f"{path} {stat.S_IMODE(info.st_mode):o}")
            if stat.S_ISREG(info.st_mode):
                files.append(path)
    assert not problems, f"readable by others: {problems}"
    return files


def test_every_file_and_folder_the_stack_creates_is_private(stack) -> None:
    """Finding 5 of issue 24: folders, logs and mlflow.db were 0755/0644. Now 0700 folders and 0600 files,
    from creation: what devstack writes and what its servers (umask 077) write alike."""
    state = stack.state_dir
    files = _assert_private_tree(state)
    for name in (devstack.STATE_FILE, devstack.RAY_TOKEN_FILE, f"s3/{devstack.WEED_SECURITY_FILE}",
                 "mlflow/mlflow.db", "mlflow/basic_auth.db", f"mlflow/{devstack.MLFLOW_AUTH_FILE}",
                 "logs/s3.log", "logs/mlflow.log", "logs/ray.log"):
        assert state / name in files, f"{name} missing from {sorted(str(f) for f in files)}"
        assert stat.S_IMODE((state / name).stat().st_mode) == 0o600, name
    assert len(files) > 20  # weed's objects and indexes, MLflow's artifacts folder: checked too, not skipped


def _mlflow_post(url: str, path: str, body: dict, auth: tuple[str, str] | None) -> int:
    import base64

    headers = {"Content-Type": "application/json"}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    request = urllib.request.Request(f"{url}{path}", data=json.dumps(body).encode(), method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


def test_mlflow_refuses_registry_writes_without_the_stack_credentials(stack, monkeypatch) -> None:
    """The stack's MLflow runs its basic-auth app: a registry write (or any API call) without credentials,
    or with a wrong password, is refused; the exported user and password are accepted."""
    import mlflow
    from mlflow.exceptions import MlflowException

    url, name = stack.services["mlflow"].url, f"stack-auth-{uuid.uuid4().hex[:8]}"
    create = "/api/2.0/mlflow/registered-models/create"
    assert _mlflow_post(url, create, {"name": name}, None) == 401
    assert _mlflow_post(url, create, {"name": name}, (devstack.MLFLOW_ADMIN, "not-the-password")) == 401
    assert _mlflow_post(url, "/api/2.0/mlflow/experiments/create", {"name": name}, None) == 401
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(MlflowException, match="401|[Uu]nauthori[sz]ed|credentials"):
        mlflow.MlflowClient(url).create_registered_model(name)
    # nothing was written by the refused calls; the stack's exports (what jobs get) write
    for key, value in stack.env().items():
        if key.startswith("MLFLOW_TRACKING_"):
            monkeypatch.setenv(key, value)
    client = mlflow.MlflowClient(url)
    assert client.search_registered_models(f"name = '{name}'") == []
    client.create_registered_model(name)
    assert [m.name for m in client.search_registered_models(f"name = '{name}'")] == [name]


def _s3(env: dict[str, str]):
    import boto3

    return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                        aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])


def _loss_key(metrics: dict[str, float]) -> str:
    keys = sorted(k for k in metrics if "loss" in k and "val" not in k)
    assert keys, f"no training loss among the run's metrics: {sorted(metrics)}"
    return keys[0]


def _listening_addresses(session_ids: set[int]) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket listened on by processes of the given sessions (Linux /proc)."""
    inodes: set[str] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            sid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[3])
            if sid not in session_ids:
                continue
            for fd in (proc / "fd").iterdir():
                target = str(fd.readlink())
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue  # the process ended while we looked
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inodes:  # 0A: LISTEN
                continue
            hex_addr, hex_port = local.split(":")
            found.add((_decode_addr(hex_addr, width), int(hex_port, 16)))
    return found


def _decode_addr(hex_addr: str, width: int) -> str:
    import ipaddress

    raw = bytes.fromhex(hex_addr)
    # /proc stores each 32-bit word in host (little-endian) order.
    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    addr = ipaddress.ip_address(raw)
    return str(addr.ipv4_mapped) if width == 32 and addr.ipv4_mapped else str(addr)


def test_session_fixtures_give_working_s3_mlflow_and_ray(s3_server, mlflow_server, ray_cluster) -> None:
    import mlflow
    import ray
    from botocore.exceptions import ClientError

    s3 = s3_server.client()
    s3.put_object(Bucket=s3_server.bucket, Key="fixture/probe", Body=b"probe")
    assert s3.get_object(Bucket=s3_server.bucket, Key="fixture/probe")["Body"].read() == b"probe"
    with pytest.raises(ClientError) as refused:
        s3_server.client(secret_key="wrong").list_objects_v2(Bucket=s3_server.bucket)
    assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403

    client = mlflow.MlflowClient(mlflow_server)
    run = client.create_run(client.create_experiment(f"fixture-{uuid.uuid4().hex[:8]}"))
    for step, value in enumerate([3.0, 2.0, 1.0]):
        client.log_metric(run.info.run_id, "loss", value, step=step)
    assert [m.value for m in client.get_metric_history(run.info.run_id, "loss")] == [3.0, 2.0, 1.0]

    @ray.remote
    def where() -> tuple[str, str]:
        import metaformer_platform

        return metaformer_platform.__file__, sys.executable

    package_file, python = ray.get(where.remote())
    assert Path(package_file).resolve().is_relative_to(REPO / "platform")
    assert Path(python).resolve() == Path(sys.executable).resolve()
    assert ray.cluster_resources()["CPU"] == 2


def test_a_server_that_loses_a_port_race_is_started_again_on_fresh_ports(tmp_path: Path) -> None:
    """`Ports` can only see that a port is free now: another process (a Ray worker, the other test process) may
    bind it before `weed` does. Here the volume port is taken between the choice and the start."""

    class VolumePortTaken(devstack.Ports):
        def __init__(self, port: int) -> None:
            super().__init__()
            self.port, self.calls = port, 0

        def get(self, preferred: int | None = None) -> int:
            self.calls += 1
            return self.port if self.calls == 5 else super().get(preferred)  # 5th: the volume port

    with socket.socket() as held:
        held.bind((devstack.HOST, 0))
        held.listen()
        ports = VolumePortTaken(held.getsockname()[1])
        svc = devstack.start_s3(tmp_path / "s3", "AKIDRACE", "race-secret-key", ports=ports)
        try:
            log = Path(svc.log).read_text()
            assert f"port {ports.port} for Volume" in log and "is not available" in log  # the first start lost
            assert ports.port not in svc.ports.values() and ports.calls > 10  # the second drew new ports
            assert devstack._http_ok(svc.url + "/healthz")
        finally:
            devstack.stop_service(svc)
