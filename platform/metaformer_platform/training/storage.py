"""How a rank uploads its part of a checkpoint so that ``COMPLETE`` is the last object written.

Every rank uploads its own part of a checkpoint into the same folder; ``upload_checkpoint_part`` makes
``COMPLETE`` the last object written there: each rank writes ``PART-rankNNNNN`` after its files, and rank 0
writes ``COMPLETE`` once every rank's part is in. A reader that sees the marker sees every file.

Where checkpoints live (a local folder or ``s3://``), the S3 settings the filesystem is built from, listing,
completeness and fetching are the storage core's (``metaformer_platform.storage``). Nothing here imports Ray:
the Ray-side glue is in ``launch.py``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from metaformer_platform.training import checkpoint as ckpt

PART_PREFIX = "PART-rank"


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
