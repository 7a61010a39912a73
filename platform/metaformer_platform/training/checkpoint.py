"""The Trainer's checkpoint state beyond the model (RNG states), and recovery of a run folder.

What a checkpoint folder holds, its marker and how its files are written and read are the checkpoint format's
(``storage/checkpoint_format.py``). ``plan_recovery``/``recover_run_folder`` reconcile a run folder with the
checkpoints Ray has registered (see ``launch/workers.py``: a worker killed right after uploading leaves a folder
Ray never registered).
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NotRequired, TypedDict

import numpy as np
import torch

from metaformer_platform.storage import checkpoint_format as fmt

CHECKPOINT_DIR = re.compile(r"checkpoint-(\d{8})")  # the names the Trainer reports: checkpoint-NNNNNNNN

if TYPE_CHECKING:
    import pyarrow.fs


class NumpyRngState(TypedDict):
    """NumPy's legacy MT19937 state, its key array as a tensor (``weights_only`` loading refuses arrays)."""
    kind: str
    keys: torch.Tensor
    pos: int
    has_gauss: int
    gauss: float


class RngState(TypedDict):
    """Every RNG a rank draws from, as one rank's ``rng-rankNNNNN.pt`` holds it."""
    python: tuple[int, tuple[int, ...], float | None]  # random.getstate()
    numpy: NumpyRngState
    torch: torch.Tensor
    cuda: NotRequired[list[torch.Tensor]]


# -- run folders: what Ray registered vs. what is on storage -------------------------------------------


def checkpoint_step(name: str) -> int | None:
    """The step of a ``checkpoint-NNNNNNNN`` folder name, else None."""
    match = CHECKPOINT_DIR.fullmatch(name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class Recovery:
    """What to do with a run folder before (re)starting: resume from ``resume`` (a folder name, or None for
    whatever Ray hands over), register it with Ray when ``adopt``, and delete ``remove``."""

    resume: str | None
    adopt: bool = False
    remove: tuple[str, ...] = field(default_factory=tuple)


def plan_recovery(complete: Mapping[str, bool], registered: Iterable[str], latest: str | None) -> Recovery:
    """Decide from the run folder's checkpoints (name -> complete) and the names Ray registered.

    A folder Ray never registered was uploaded by a worker that died before the controller collected its
    report (or was left by a prune that was cut short). The newest complete one newer than Ray's ``latest``
    holds the most training: resume from it and register it. Every other unregistered folder (partial
    uploads, older leftovers) can never be resumed from or pruned by Ray: remove it.
    """
    known = set(registered)
    latest_step = checkpoint_step(latest) if latest else None
    floor = -1 if latest_step is None else latest_step
    orphans = {name: step for name in complete if name not in known and (step := checkpoint_step(name)) is not None}
    newer = [name for name, step in orphans.items() if step > floor and complete[name]]
    adopt = max(newer, key=orphans.__getitem__) if newer else None
    remove = tuple(sorted(name for name in orphans if name != adopt))
    return Recovery(resume=adopt or latest, adopt=adopt is not None, remove=remove)


def is_complete_on(fs: pyarrow.fs.FileSystem, path: str) -> bool:
    """``is_complete`` for a folder on the pyarrow filesystem Ray stores checkpoints on."""
    import pyarrow.fs as pafs

    return fmt.is_complete(f"s3://{path}" if isinstance(fs, pafs.S3FileSystem) else path)


def recover_run_folder(
    fs: pyarrow.fs.FileSystem, run_path: str, registered: Iterable[str], latest: str | None
) -> Recovery:
    """``plan_recovery`` over the checkpoint folders in ``run_path``, then delete what it removes."""
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(run_path, allow_not_found=True))
    folders = [i.base_name for i in infos if i.type == pafs.FileType.Directory and checkpoint_step(i.base_name) is not None]
    registered = set(registered)
    # Registered folders are complete by construction (every rank had uploaded); only orphans are read.
    complete = {name: name in registered or is_complete_on(fs, f"{run_path}/{name}") for name in folders}
    plan = plan_recovery(complete, registered, latest)
    for name in plan.remove:
        fs.delete_dir(f"{run_path}/{name}")
    return plan


def rng_state() -> RngState:
    """This process's Python, NumPy and torch RNG states, in a form ``weights_only`` loading accepts."""
    np_state = np.random.get_state(legacy=True)
    assert isinstance(np_state, tuple)  # the global legacy generator is always MT19937: a tuple, never a dict
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np_state
    state: RngState = {
        "python": random.getstate(),
        "numpy": {
            "kind": np_kind,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: RngState) -> None:
    """Restore what ``rng_state`` captured."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["kind"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["gauss"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
