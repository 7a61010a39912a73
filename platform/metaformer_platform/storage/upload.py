"""How a rank uploads its part of a checkpoint so that ``COMPLETE`` is the last object written.

This is the one storage path that goes through pyarrow: the folder is written onto Ray Train's own
filesystem (``Location.filesystem()``, built from the same ``S3Settings`` as the boto3 client), as Ray
itself would upload it. Nothing here imports Ray: the Ray-side glue is in ``launch/workers.py``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from metaformer_platform.storage.checkpoint_format import COMPLETE_MARKER, PART_FILE, disk_full

if TYPE_CHECKING:
    import pyarrow.fs

__all__ = ["upload_checkpoint_part"]


def upload_checkpoint_part(
    local_dir: Path, fs: pyarrow.fs.FileSystem, dest: str, *, rank: int, world_size: int, timeout_s: float = 3600.0
) -> None:
    """Upload this rank's part of a checkpoint into ``dest`` on Ray Train's filesystem ``fs``, so that
    ``COMPLETE`` is the last object written there: each rank writes ``PART-rankNNNNN`` after its files, and
    rank 0 writes ``COMPLETE`` once every rank's part is in. A reader that sees the marker sees every file.

    The files are copied as Ray would (pyarrow, threaded, multipart), the marker held back out of the folder
    while it is copied.
    """
    from pyarrow import fs as pafs

    marker = local_dir / COMPLETE_MARKER
    held = local_dir.parent / f".{local_dir.name}.{COMPLETE_MARKER}"
    if marker.is_file():
        os.replace(marker, held)
    try:
        _write_part(local_dir, fs, dest, rank=rank, world_size=world_size, held=held, timeout_s=timeout_s)
    except OSError as err:
        if isinstance(fs, pafs.S3FileSystem):
            raise OSError(
                f"uploading the checkpoint to s3://{dest} failed: the S3 endpoint {s3_endpoint(fs)} did not take it "
                f"within its retries (AWS_MAX_ATTEMPTS, then Ray's 3 tries): {err}. The folder has no "
                f"{COMPLETE_MARKER} marker and is never resumed from; the run's earlier checkpoints are untouched, and "
                "the same command resumes from the newest of them once the endpoint answers") from err
        if isinstance(fs, pafs.LocalFileSystem) and (full := disk_full(
                err, Path(dest), "free space there, or set run.storage_path to a larger disk")) is not None:
            raise full from err
        raise
    finally:
        if held.is_file():
            os.replace(held, marker)


def s3_endpoint(fs: pyarrow.fs.S3FileSystem) -> str:
    """The endpoint a pyarrow S3 filesystem talks to, for messages (AWS's own when it overrides none)."""
    settings = fs.__reduce__()[1][0]  # its constructor's arguments: the only place pyarrow keeps the endpoint
    endpoint = settings.get("endpoint_override")
    return f"{settings.get('scheme', 'https')}://{endpoint}" if endpoint else "AWS's default endpoint"


def _write_part(local_dir: Path, fs: pyarrow.fs.FileSystem, dest: str, *, rank: int, world_size: int, held: Path,
                timeout_s: float) -> None:
    """Copy this rank's files, then its ``PART`` file; rank 0 (holding the marker back at ``held``) then waits for
    every rank's part and writes the marker."""
    from pyarrow import fs as pafs

    fs.create_dir(dest)
    pafs.copy_files(str(local_dir), dest, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs,
                    use_threads=True)
    with fs.open_output_stream(f"{dest}/{PART_FILE.format(rank)}") as out:
        out.write(b"ok\n")
    if held.is_file():
        parts = [f"{dest}/{PART_FILE.format(r)}" for r in range(world_size)]
        deadline = time.monotonic() + timeout_s
        while any(info.type == pafs.FileType.NotFound for info in fs.get_file_info(parts)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{dest}: not every rank uploaded its part within {timeout_s:.0f} s")
            time.sleep(0.1)
        with fs.open_output_stream(f"{dest}/{COMPLETE_MARKER}") as out:
            out.write(held.read_bytes())
