"""Who owns a run folder: one live job per ``run.name``, and recovery touches only what its run wrote.

``<storage>/<run.name>/_owner.json`` holds the run's id and the lease of the job that holds it now (its attempt id, host, pid and a heartbeat the driver
renews every ``HEARTBEAT_S``). A second job under a live run name is refused (ValueError: exit 2) before
anything starts; a job whose driver died leaves a lease that goes stale after ``LEASE_TTL_S``, and the
next job under that name takes it over (and resumes). A finished job releases its lease.

The run id is never read from storage (anyone who can write the bucket could choose it): it is derived from
the deployment key and the run folder's URI (``checkpoint_format.run_id_for``), so every job under one run name
gets the same id, and ``_owner.json`` records it for people only.

Every rank stamps each checkpoint folder it uploads with ``OWNER-rankNNNNN.json`` (run id and attempt), next
to the completion marker. The stamps are bookkeeping, not trust: their run id is not secret (it is in every
stamp), so they only tell recovery (``launch._recover_checkpoint``) which of the unregistered folders its run
wrote. Recovery deletes or adopts only folders stamped with its run's id AND whose marker is signed with the
deployment key; any other (a copy a person dropped in, a folder of another run, one with forged stamps, one of a
version before signatures) is moved to ``_quarantine/``: moved, never deleted, never resumed from.

What a job may read in a strategy's native format (FSDP2's ``torch.distributed.checkpoint`` unpickles its
metadata; DeepSpeed's loaders use ``torch.load(weights_only=False)``) is decided by the signature alone: a
folder whose ``COMPLETE`` is signed with the deployment key (a key never in the storage) and whose files all
match it (``check_native_checkpoint`` early, ``checkpoint_format.verify_native`` right before the read).

Written by hand because neither Ray Train (which keys runs by name alone) nor pyarrow's filesystems offer
a lease; it is a heartbeat file, not a lock. Taking it is read, check, write: in a local (or mounted) run folder
under an ``flock`` on the folder, so of two jobs claiming one name at once the second reads the first's lease.
Object storage has no lock: two jobs started within ``SETTLE_S`` of each other could both read an empty lease,
so each re-reads it after writing and only the last writer goes on.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from metaformer_platform.storage import checkpoint_format as fmt
from metaformer_platform.training.quarantine import (
    QUARANTINE as QUARANTINE,  # re-exported: where recovery sets folders aside
)
from metaformer_platform.training.quarantine import quarantine_folder

if TYPE_CHECKING:
    import pyarrow.fs

log = logging.getLogger(__name__)

HEARTBEAT_S = 15.0
LEASE_TTL_S = 120.0  # 8 missed heartbeats: a driver that stopped renewing is gone, not slow
SETTLE_S = 0.5


class Lease(fmt.Stamp):
    """A run folder's ``_owner.json``: the run and the job that holds it now, and that job's heartbeat."""
    host: str
    pid: int
    heartbeat: float
    released: bool


def _location(fs: pyarrow.fs.FileSystem, path: str) -> str:
    """The storage API's location of ``path`` on the pyarrow filesystem Ray stores runs on."""
    import pyarrow.fs as pafs

    return f"s3://{path}" if isinstance(fs, pafs.S3FileSystem) else path


def _run_path(storage_path: str, run_name: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """(pyarrow filesystem, path) of a run folder, whose lease is ``<run folder>/_owner.json``, under a run
    storage location (a local folder or s3://bucket/prefix)."""
    from metaformer_platform.storage import Location

    loc = Location.parse(storage_path).join(run_name)
    return loc.filesystem(), loc.fs_path


def _write_json(fs: pyarrow.fs.FileSystem, path: str, body: Lease) -> None:
    """Write ``path`` whole: a temporary name, then a rename (atomic locally; S3 puts are atomic anyway)."""
    tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
    with fs.open_output_stream(tmp) as out:
        out.write(json.dumps(body, sort_keys=True).encode())
    fs.move(tmp, path)


@dataclass
class RunLease:
    """The driver's hold on a run folder while its job runs; ``owner`` goes to the workers."""

    fs: pyarrow.fs.FileSystem
    run_path: str
    run_id: str
    attempt: str
    ttl_s: float = LEASE_TTL_S
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @property
    def owner(self) -> fmt.Stamp:
        """What every checkpoint folder of this job is stamped with."""
        return {"run_id": self.run_id, "attempt": self.attempt}

    def _body(self, live: bool) -> Lease:
        return {**self.owner, "host": socket.gethostname(), "pid": os.getpid(),
                "heartbeat": time.time() if live else 0.0, "released": not live}

    def _renew(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                _write_json(self.fs, f"{self.run_path}/{fmt.OWNER_FILE}", self._body(True))
            except OSError as err:  # storage hiccup: the next beat retries; the TTL is 8 beats long
                log.warning("could not renew the lease on %s: %s", self.run_path, err)

    def start(self) -> RunLease:
        self._thread = threading.Thread(target=self._renew, name="run-lease", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        """Stop renewing and mark the lease released (the run id stays, for the jobs that resume the run)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        current = fmt.read_json(self.fs, f"{self.run_path}/{fmt.OWNER_FILE}") or {}
        if current.get("attempt") == self.attempt:  # never release a lease someone else has since taken
            _write_json(self.fs, f"{self.run_path}/{fmt.OWNER_FILE}", self._body(False))


def check_run_free(storage_path: str, run_name: str, *, ttl_s: float = LEASE_TTL_S) -> None:
    """Raise ``claim_run``'s ValueError if a live job holds ``<storage_path>/<run_name>``, reading only: the
    driver asks this with its other checks, before Ray is joined, so a second job under a live name costs no
    cluster time. ``claim_run`` still decides (a job may take the name in between)."""
    fs, run_path = _run_path(storage_path, run_name)
    _refuse_if_live(fmt.read_json(fs, f"{run_path}/{fmt.OWNER_FILE}"), run_name, storage_path, ttl_s, None)


def claim_run(storage_path: str, run_name: str, *, ttl_s: float = LEASE_TTL_S, now: float | None = None) -> RunLease:
    """Take the lease on ``<storage_path>/<run_name>`` for this job, or raise ValueError naming the live job
    that holds it. The lease is renewed in a thread until ``release()``."""
    fs, run_path = _run_path(storage_path, run_name)
    path = f"{run_path}/{fmt.OWNER_FILE}"
    fs.create_dir(run_path)
    with _exclusive(fs, run_path) as locked:
        current = fmt.read_json(fs, path)
        _refuse_if_live(current, run_name, storage_path, ttl_s, now)
        # never the run_id in _owner.json: whoever can write the bucket could have chosen it
        run_id = fmt.run_id_for(_location(fs, run_path))
        lease = RunLease(fs, run_path, run_id, uuid.uuid4().hex, ttl_s)
        _write_json(fs, path, lease._body(True))
    if locked:
        return lease.start()
    time.sleep(SETTLE_S)  # two jobs that both read an empty lease: the last writer wins, the other refuses
    after = fmt.read_json(fs, path) or {}
    if after.get("attempt") != lease.attempt:
        _refuse_if_live(after, run_name, storage_path, ttl_s, None)
        raise ValueError(f"run {run_name!r} under {storage_path} was claimed by another job at the same moment")
    return lease.start()


@contextmanager
def _exclusive(fs: pyarrow.fs.FileSystem, run_path: str) -> Iterator[bool]:
    """An exclusive ``flock`` on a local run folder while its lease is read, checked and written (yields True);
    on object storage, which has no lock, nothing (yields False: ``claim_run`` settles instead)."""
    import fcntl

    import pyarrow.fs as pafs

    if not isinstance(fs, pafs.LocalFileSystem):
        yield False
        return
    fd = os.open(run_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released with the descriptor
        yield True
    finally:
        os.close(fd)


def _died_here(lease: Mapping[str, object]) -> bool:
    """Whether the lease's driver ran on this host and is gone: its name is free at once (a re-run right after
    a crash or a kill), not only once the heartbeat goes stale."""
    pid = lease.get("pid")
    if lease.get("host") != socket.gethostname() or not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, under another user
        return False
    return False


def _heartbeat(lease: Mapping[str, object]) -> float:
    heartbeat = lease.get("heartbeat")
    return float(heartbeat) if isinstance(heartbeat, int | float) else 0.0


def holder_gone(lease: Mapping[str, object], *, ttl_s: float = LEASE_TTL_S, now: float | None = None) -> str | None:
    """Why the job that holds ``lease`` (an ``_owner.json``) is gone, or None while it may be alive: it released
    the name, its driver's pid is gone (known only on the host it ran on), or its heartbeat is older than
    ``ttl_s`` (the lease expired: the driver stopped renewing it)."""
    if lease.get("released"):
        return "its job released the run name"
    if _died_here(lease):
        return f"its driver (pid {lease.get('pid')} on {lease.get('host')}) is gone"
    age = (time.time() if now is None else now) - _heartbeat(lease)
    if age >= ttl_s:
        return f"its driver's lease expired: last renewed {age:.0f} s ago (expiry {ttl_s:.0f} s)"
    return None


@dataclass(frozen=True)
class LostDriver:
    """A run folder whose lease shows a driver that is gone: why, and when it was last seen (epoch seconds;
    None when its lease says nothing: a released one)."""

    why: str
    last_seen: float | None


def lost_driver(run_dir: str, *, ttl_s: float = LEASE_TTL_S, now: float | None = None) -> LostDriver | None:
    """Whether the job holding the run folder ``run_dir`` (local or s3://) is gone (``holder_gone``), reading
    only its ``_owner.json``. None while the holder may be alive, and when there is no lease to judge by (no
    folder, or one from before leases): only a lease says a driver is gone."""
    from metaformer_platform.storage import Location

    loc = Location.parse(run_dir)
    lease = fmt.read_json(loc.filesystem(), f"{loc.fs_path}/{fmt.OWNER_FILE}")
    if not lease:
        return None
    why = holder_gone(lease, ttl_s=ttl_s, now=now)
    if why is None:
        return None
    return LostDriver(why, _heartbeat(lease) or None)


def _refuse_if_live(current: Mapping[str, object] | None, run_name: str, storage_path: str, ttl_s: float,
                    now: float | None) -> None:
    if not current or holder_gone(current, ttl_s=ttl_s, now=now) is not None:
        return
    age = (time.time() if now is None else now) - _heartbeat(current)
    raise ValueError(
        f"run.name={run_name!r} under {storage_path} is in use by a live job (host {current.get('host')!r}, "
        f"pid {current.get('pid')}, last heartbeat {max(age, 0):.0f} s ago): two jobs under one run name "
        "would overwrite each other's checkpoints and MLflow run. Choose another run.name, or wait for that "
        f"job to end (a job whose driver died releases the name {ttl_s:.0f} s after its last heartbeat)"
    )


def quarantine_foreign(fs: pyarrow.fs.FileSystem, run_path: str, registered: Iterable[str], run_id: str) -> list[str]:
    """Move every checkpoint folder under ``run_path`` that Ray has not registered and this run did not write
    (its stamps name another run, or its marker is not signed with the deployment key) into ``_quarantine/``;
    returns their names. Recovery then sees only its own run's folders."""
    from pyarrow import fs as pafs

    known = set(registered)
    infos = fs.get_file_info(pafs.FileSelector(run_path, allow_not_found=True))
    orphans = sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory
                     and fmt.checkpoint_step(i.base_name) is not None and i.base_name not in known)
    moved = []
    for name in orphans:
        folder = f"{run_path}/{name}"
        # stamps are not secret: a marker that is there must be signed (a partial upload has none yet, and recovery
        # deletes it); the digests are checked where the files are read
        if fmt.written_by(fs, folder, run_id) and fmt.signature_reason(_location(fs, folder)) is None:
            continue
        quarantine_folder(fs, run_path, name)
        moved.append(name)
    return moved


def native_checkpoint_refusal(fs: pyarrow.fs.FileSystem, folder: str) -> str | None:
    """Why the native files of the checkpoint at ``folder`` (a path on ``fs``) may not be read, or None when they
    may: its ``COMPLETE`` is signed with the deployment key and lists every file (their digests are checked
    here on a local folder, and again right before the read: ``checkpoint_format.verify_native``)."""
    return fmt.native_refusal(_location(fs, folder))


def check_native_checkpoint(strategy: str, fs: pyarrow.fs.FileSystem, folder: str, storage_root: str, where: str,
                            *, accept_unsigned: bool = False) -> None:
    """Raise ValueError when ``strategy`` would resume from ``folder`` through a reader that can run code and
    the folder is not signed with this deployment's key (``native_checkpoint_refusal``); where it lies
    (``storage_root``, kept for the callers) no longer matters: a signature cannot be copied onto other files.
    ``accept_unsigned`` (run.accept_unsigned_checkpoints) lets an unsigned but complete folder through, loudly.
    DDP's reads are ``weights_only`` and need no such check."""
    from metaformer_platform.strategies import get_strategy_class

    del storage_root
    if not get_strategy_class(strategy).native_format_runs_code:
        return
    why = native_checkpoint_refusal(fs, folder)
    if why is None:
        return
    if accept_unsigned and why.startswith("its marker is not signed"):
        fmt.verify_native(_location(fs, folder), accept_unsigned=True, what=where)  # says so, loudly
        return
    raise fmt.UnsignedCheckpointError(
        f"{where}: strategy {strategy} resumes through its native checkpoint reader, which can run code from "
        f"the files, so it reads only checkpoints signed with this deployment's key; refused, unread: {why}. To "
        "start from these weights, export them first (python jobs/export.py CHECKPOINT OUT) and set "
        "model.init_from=OUT (the optimizer state starts fresh); for your own run's checkpoints written before "
        "signing, set run.accept_unsigned_checkpoints=true once"
    )
