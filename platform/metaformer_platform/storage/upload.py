"""How a rank uploads its part of a checkpoint so that ``COMPLETE`` is the last object written.

This is the one storage path that goes through pyarrow: the folder is written onto Ray Train's own
filesystem (``Location.filesystem()``, built from the same ``S3Settings`` as the boto3 client), as Ray
itself would upload it. Nothing here imports Ray: the Ray-side glue is in ``launch/workers.py``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from metaformer_platform.storage.checkpoint_format import COMPLETE_MARKER, PART_FILE, disk_full

if TYPE_CHECKING:
    import pyarrow.fs

__all__ = ["upload_checkpoint_part", "upload_checkpoint_part_or_warn"]

log = logging.getLogger(__name__)


def upload_checkpoint_part(
    local_dir: Path, fs: pyarrow.fs.FileSystem, dest: str, *, rank: int, world_size: int, timeout_s: float = 3600.0
) -> None:
    """Upload this rank's part of a checkpoint into ``dest`` on Ray Train's filesystem ``fs``, so that
    ``COMPLETE`` is the last object written there: each rank writes ``PART-rankNNNNN`` after its files, and
    rank 0 writes ``COMPLETE`` once every rank's part is in. A reader that sees the marker sees every file.

    The files are copied as Ray would (pyarrow, threaded, multipart), the marker held back out of the folder
    while it is copied. A failure (``run.on_upload_failure=fail``) is an ``OSError`` naming the endpoint.
    """
    with _held_marker(local_dir) as held:
        try:
            _write_part(local_dir, fs, dest, rank=rank)
            if held.is_file():
                _write_marker(fs, dest, world_size=world_size, held=held, timeout_s=timeout_s)
        except OSError as err:
            explained = _explained(err, fs, dest, "AWS_MAX_ATTEMPTS, then Ray's 3 tries", "The folder has no "
                                   f"{COMPLETE_MARKER} marker and is never resumed from; the run's earlier "
                                   "checkpoints are untouched, and the same command resumes from the newest of them "
                                   "once the endpoint answers")
            if explained is err:
                raise
            raise explained from err


def upload_checkpoint_part_or_warn(
    local_dir: Path, fs: pyarrow.fs.FileSystem, dest: str, *, rank: int, world_size: int,
    agree: Callable[[bool], bool], timeout_s: float = 3600.0,
) -> bool:
    """``upload_checkpoint_part`` for ``run.on_upload_failure=continue``: an upload that fails after its retries
    is a warning naming the endpoint, and training goes on without that checkpoint. ``agree(ok)`` (a collective:
    every rank calls it) is True only when every rank's part landed; rank 0 writes ``COMPLETE`` only then, so a
    checkpoint some rank could not upload is never complete. Returns whether it is complete on storage (rank 0:
    whether to report it to Ray)."""
    with _held_marker(local_dir) as held:
        try:
            _write_part(local_dir, fs, dest, rank=rank)
            landed = True
        except OSError as err:
            log.warning("%s", _explained(err, fs, dest, "AWS_MAX_ATTEMPTS", _GOES_ON))
            landed = False
        if not agree(landed):
            return False
        if not held.is_file():
            return True
        try:
            _write_marker(fs, dest, world_size=world_size, held=held, timeout_s=timeout_s)
        except OSError as err:
            log.warning("%s", _explained(err, fs, dest, "AWS_MAX_ATTEMPTS", _GOES_ON))
            return False
        return True


_GOES_ON = (f"run.on_upload_failure=continue: training goes on without this checkpoint (it has no {COMPLETE_MARKER} "
            "marker and is never resumed from); the run's earlier checkpoints are untouched, and a restart resumes "
            "from the newest of them")


@contextmanager
def _held_marker(local_dir: Path) -> Iterator[Path]:
    """Rank 0's ``COMPLETE`` moved out of ``local_dir`` while its files are copied (the path it is held at; put
    back at the end): it is written last, on its own."""
    marker = local_dir / COMPLETE_MARKER
    held = local_dir.parent / f".{local_dir.name}.{COMPLETE_MARKER}"
    if marker.is_file():
        os.replace(marker, held)
    try:
        yield held
    finally:
        if held.is_file():
            os.replace(held, marker)


def _explained(err: OSError, fs: pyarrow.fs.FileSystem, dest: str, retries: str, then: str) -> OSError:
    """The upload's error, saying where it went (the S3 endpoint, or a full disk's free space) and what follows."""
    from pyarrow import fs as pafs

    if isinstance(fs, pafs.S3FileSystem):
        return OSError(f"uploading the checkpoint to s3://{dest} failed: the S3 endpoint {s3_endpoint(fs)} did not "
                       f"take it within its retries ({retries}): {err}. {then}")
    if isinstance(fs, pafs.LocalFileSystem) and (full := disk_full(
            err, Path(dest), "free space there, or set run.storage_path to a larger disk")) is not None:
        return full
    return err


def s3_endpoint(fs: pyarrow.fs.S3FileSystem) -> str:
    """The endpoint a pyarrow S3 filesystem talks to, for messages (AWS's own when it overrides none)."""
    settings = fs.__reduce__()[1][0]  # its constructor's arguments: the only place pyarrow keeps the endpoint
    endpoint = settings.get("endpoint_override")
    return f"{settings.get('scheme', 'https')}://{endpoint}" if endpoint else "AWS's default endpoint"


def _write_part(local_dir: Path, fs: pyarrow.fs.FileSystem, dest: str, *, rank: int) -> None:
    """Copy this rank's files, then its ``PART`` file (the proof that they are all in)."""
    from pyarrow import fs as pafs

    fs.create_dir(dest)
    pafs.copy_files(str(local_dir), dest, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs,
                    use_threads=True)
    with fs.open_output_stream(f"{dest}/{PART_FILE.format(rank)}") as out:
        out.write(b"ok\n")


def _write_marker(fs: pyarrow.fs.FileSystem, dest: str, *, world_size: int, held: Path, timeout_s: float) -> None:
    """Rank 0: wait for every rank's ``PART`` file, then write the marker held at ``held``."""
    from pyarrow import fs as pafs

    parts = [f"{dest}/{PART_FILE.format(r)}" for r in range(world_size)]
    deadline = time.monotonic() + timeout_s
    while any(info.type == pafs.FileType.NotFound for info in fs.get_file_info(parts)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{dest}: not every rank uploaded its part within {timeout_s:.0f} s")
        time.sleep(0.1)
    with fs.open_output_stream(f"{dest}/{COMPLETE_MARKER}") as out:
        out.write(held.read_bytes())
