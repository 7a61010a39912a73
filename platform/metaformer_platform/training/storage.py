"""Where checkpoints live: a local folder or ``s3://bucket/prefix`` on any S3-compatible server.

Ray Train writes run folders through a ``pyarrow.fs`` filesystem. pyarrow's own ``s3://`` resolution knows
nothing of a custom endpoint, so for S3 we build a ``pyarrow.fs.S3FileSystem`` from the same standard settings
boto3 reads (AWS_ENDPOINT_URL[_S3], AWS_REGION / AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY
/ AWS_SESSION_TOKEN; without static keys, pyarrow's AWS SDK walks the rest of the chain: profiles, roles) and
hand it to ``RunConfig(storage_filesystem=...)``.

A checkpoint folder is complete only when it holds ``COMPLETE``. Every rank uploads its own part of a
checkpoint into the same folder; ``upload_checkpoint_part`` makes ``COMPLETE`` the last object written there:
each rank writes ``PART-rankNNNNN`` after its files, and rank 0 writes ``COMPLETE`` once every rank's part
is in. A reader that sees the marker sees every file.

Nothing here imports Ray: the Ray-side glue is in ``launch.py``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from metaformer_platform.training import checkpoint as ckpt

PART_PREFIX = "PART-rank"


def is_remote(uri: str | os.PathLike[str]) -> bool:
    """True for ``s3://...`` (any URL scheme but ``file://``), False for a local path."""
    text = str(uri)
    return "://" in text and not text.startswith("file://")


def _check_scheme(uri: str) -> None:
    if not uri.startswith("s3://"):
        raise ValueError(f"{uri!r}: checkpoints can be kept in a local folder or under s3://bucket/prefix only")


def s3_filesystem() -> Any:
    """A ``pyarrow.fs.S3FileSystem`` for the endpoint and credentials of this process's environment.

    Static keys found in the environment are put into the filesystem itself: it is pickled into the run
    config, and Ray Train's controller actor does not inherit the job's environment.
    """
    from pyarrow import fs as pafs

    env = os.environ
    kwargs: dict[str, Any] = {
        "region": env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
        # the bucket must exist (the driver checks it); a typo must not create a new one
        "allow_bucket_creation": False,
        "allow_bucket_deletion": False,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=int(env.get("AWS_MAX_ATTEMPTS", "8"))),
    }
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        scheme, sep, rest = endpoint.partition("://")
        kwargs["endpoint_override"] = rest.rstrip("/") if sep else endpoint
        kwargs["scheme"] = scheme if sep else "https"
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        kwargs.update(access_key=env["AWS_ACCESS_KEY_ID"], secret_key=env["AWS_SECRET_ACCESS_KEY"])
        if env.get("AWS_SESSION_TOKEN"):
            kwargs["session_token"] = env["AWS_SESSION_TOKEN"]
    return pafs.S3FileSystem(**kwargs)


def filesystem_and_path(uri: str) -> tuple[Any, str]:
    """``(pyarrow filesystem, path on it)`` for ``s3://bucket/prefix`` (the path is ``bucket/prefix``)."""
    _check_scheme(uri)
    return s3_filesystem(), uri.removeprefix("s3://").strip("/")


def check_writable(uri: str, what: str = "run.storage_path") -> None:
    """Refuse, with the reason and the fix, an ``s3://`` location that cannot be written (a probe object)."""
    from metaformer_platform.data.s3 import S3Storage

    _check_scheme(uri)
    storage = S3Storage(uri)
    probe = f".write-probe-{os.getpid()}-{time.time_ns()}"
    try:
        storage.write_bytes(probe, b"")
        storage.delete(probe)
    except ValueError as err:  # S3AccessError: missing bucket, refused or missing credentials, no endpoint
        raise ValueError(f"{what}={uri!r} cannot be written: {err}") from None


def _download(fs: Any, path: str, dest: Path, names: Iterable[str] | None) -> None:
    from pyarrow import fs as pafs

    if names is None:
        if fs.get_file_info(path).type != pafs.FileType.Directory:
            raise ValueError(f"s3://{path} is not a checkpoint folder (nothing is stored under it)")
        pafs.copy_files(path, str(dest), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        return
    for name in names:
        info = fs.get_file_info(f"{path}/{name}")
        if info.type == pafs.FileType.File:
            with fs.open_input_stream(f"{path}/{name}") as src, open(dest / name, "wb") as out:
                shutil.copyfileobj(src, out, 8 << 20)


@contextlib.contextmanager
def local_copy(uri: str | os.PathLike[str], names: Iterable[str] | None = None) -> Iterator[Path]:
    """A local folder holding the checkpoint or export at ``uri``: the folder itself when local, else a
    temporary download (the whole folder, or only ``names`` where they exist), removed afterwards."""
    if not is_remote(uri):
        yield Path(str(uri).removeprefix("file://")).expanduser().resolve()
        return
    fs, path = filesystem_and_path(str(uri))
    with tempfile.TemporaryDirectory(prefix="metaformer-ckpt-") as tmp:
        try:
            _download(fs, path, Path(tmp), names)
        except OSError as err:  # pyarrow maps S3 errors to OSError with the server's message
            raise ValueError(f"cannot read {uri!r}: {err}; check the URI, AWS_ENDPOINT_URL and the credentials") from None
        yield Path(tmp)


def upload_checkpoint_part(
    local_dir: Path, fs: Any, dest: str, *, rank: int, world_size: int, timeout_s: float = 3600.0
) -> None:
    """Upload this rank's part of a checkpoint into ``dest`` on ``fs``; rank 0's ``COMPLETE`` goes last of all.

    The files are copied as Ray would (pyarrow, threaded, multipart), the marker held back; then this rank's
    ``PART-rankNNNNN``; rank 0 waits until all ranks' parts are there and writes ``COMPLETE``.
    """
    from pyarrow import fs as pafs

    marker = local_dir / ckpt.COMPLETE_MARKER
    held = local_dir.parent / f".{local_dir.name}.{ckpt.COMPLETE_MARKER}"
    if marker.is_file():
        os.replace(marker, held)  # out of the folder while the folder is copied
    try:
        fs.create_dir(dest)
        pafs.copy_files(str(local_dir), dest, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs,
                        use_threads=True)
        with fs.open_output_stream(f"{dest}/{PART_PREFIX}{rank:05d}") as out:
            out.write(b"ok\n")
        if held.is_file():
            parts = [f"{dest}/{PART_PREFIX}{r:05d}" for r in range(world_size)]
            deadline = time.monotonic() + timeout_s
            while any(info.type == pafs.FileType.NotFound for info in fs.get_file_info(parts)):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{dest}: not every rank uploaded its part within {timeout_s:.0f} s")
                time.sleep(0.1)
            with fs.open_output_stream(f"{dest}/{ckpt.COMPLETE_MARKER}") as out:
                out.write(held.read_bytes())
    finally:
        if held.is_file():
            os.replace(held, marker)
