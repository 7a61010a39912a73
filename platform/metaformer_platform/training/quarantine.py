"""``<run folder>/_quarantine/``: where recovery sets aside checkpoint folders it must not resume from.

Two kinds go there, moved (never deleted, never resumed from): folders the run did not write (``ownership``:
another run's, copied in, unsigned) and folders Ray registered that are no longer complete (``checkpoint``: a
file cut short or altered after the folder was written). A registered folder leaves a placeholder behind (only
``QUARANTINED.json``: where it went and why): Ray's run snapshot still lists it, Ray refuses to load a snapshot
that names a folder that is gone (a later job under the same run name could not start), and it deletes the path
when it prunes the entry; so a redone step is written under a name of its own (``checkpoint.checkpoint_dir_name``).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pyarrow.fs

QUARANTINE = "_quarantine"
QUARANTINED_NOTE = "QUARANTINED.json"  # a placeholder's only file


def _move_dir(fs: pyarrow.fs.FileSystem, src: str, dest: str) -> None:
    """Rename a folder locally; on object storage (no folder renames) copy it, then delete the source."""
    from pyarrow import fs as pafs

    if isinstance(fs, pafs.LocalFileSystem):
        fs.move(src, dest)
        return
    pafs.copy_files(src, dest, source_filesystem=fs, destination_filesystem=fs)
    fs.delete_dir(src)


def quarantine_folder(fs: pyarrow.fs.FileSystem, run_path: str, name: str) -> str:
    """Move the folder ``name`` of ``run_path`` to a fresh ``_quarantine/<name>-<time>-<random>`` (a name can be
    quarantined more than once). Returns where it went."""
    dest = f"{run_path}/{QUARANTINE}/{name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    fs.create_dir(f"{run_path}/{QUARANTINE}")
    _move_dir(fs, f"{run_path}/{name}", dest)
    return dest


def quarantine_registered(fs: pyarrow.fs.FileSystem, run_path: str, name: str, why: str) -> str:
    """Move the registered checkpoint folder ``name`` to ``_quarantine/`` and leave a placeholder in its place
    (see the module's docstring). Returns where the folder went."""
    folder = f"{run_path}/{name}"
    dest = quarantine_folder(fs, run_path, name)
    fs.create_dir(folder)
    with fs.open_output_stream(f"{folder}/{QUARANTINED_NOTE}") as out:
        out.write(json.dumps({"moved_to": dest, "why": why}, sort_keys=True).encode())
    return dest


def is_placeholder(fs: pyarrow.fs.FileSystem, folder: str) -> bool:
    """Whether ``folder`` is the placeholder ``quarantine_registered`` left where a bad checkpoint was."""
    import pyarrow.fs as pafs

    return bool(fs.get_file_info(f"{folder}/{QUARANTINED_NOTE}").type == pafs.FileType.File)
