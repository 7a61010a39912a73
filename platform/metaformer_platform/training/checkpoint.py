"""The Trainer's checkpoint state beyond the model (RNG states), and recovery of a run folder.

What a checkpoint folder holds, its marker and how its files are written and read are the checkpoint format's
(``storage/checkpoint_format.py``). ``plan_recovery``/``recover_run_folder`` reconcile a run folder with the
checkpoints Ray has registered (see ``launch/workers.py``: a worker killed right after uploading leaves a folder
Ray never registered).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NotRequired, TypedDict

import numpy as np
import torch

from metaformer_platform.storage import checkpoint_format as fmt
from metaformer_platform.storage.checkpoint_format import checkpoint_step
from metaformer_platform.training.quarantine import is_placeholder, quarantine_registered

if TYPE_CHECKING:
    import pyarrow.fs


class CheckpointNotStored(Exception):
    """What a Trainer's ``report`` raises for a checkpoint it gave up storing (``run.on_upload_failure=continue``:
    an upload that failed after its retries, already warned about): training goes on without it, and the run's
    resume point stays its last stored checkpoint."""


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


def _order(name: str) -> tuple[int, int]:
    """Newest first by this key: the step, then the redo count (a redone step is newer than the folder it redoes)."""
    match = fmt.CHECKPOINT_NAME.fullmatch(name)
    assert match is not None, name
    return int(match.group(1)), int(match.group(2) or 0)


def checkpoint_dir_name(fs: pyarrow.fs.FileSystem, run_path: str, step: int) -> str:
    """The folder name a checkpoint of ``step`` is reported under: ``checkpoint-NNNNNNNN``, or, when that name
    is a quarantined folder's placeholder (see ``quarantine_registered``), ``checkpoint-NNNNNNNN-R``: Ray
    still lists the placeholder and deletes it by its path when it prunes it, so the redone step needs a
    path of its own. Every rank asks the same storage, so every rank uploads its part to the same folder."""
    base, redo = fmt.checkpoint_name(step), 0
    name = base
    while is_placeholder(fs, f"{run_path}/{name}"):
        redo += 1
        name = f"{base}-{redo}"
    return name


@dataclass(frozen=True)
class Recovery:
    """What to do with a run folder before (re)starting: resume from ``resume`` (a folder name, or None for
    whatever Ray hands over), register it with Ray when ``adopt``, delete ``remove``, and move ``quarantine``
    (folders Ray registered that are not complete any more: (name, why)) to ``_quarantine/``."""

    resume: str | None
    adopt: bool = False
    remove: tuple[str, ...] = field(default_factory=tuple)
    quarantine: tuple[tuple[str, str], ...] = field(default_factory=tuple)


def plan_recovery(complete: Mapping[str, bool], registered: Iterable[str], latest: str | None,
                  why: Mapping[str, str] | None = None) -> Recovery:
    """Decide from the run folder's checkpoints (name -> complete) and the names Ray registered.

    A folder Ray never registered was uploaded by a worker that died before the controller collected its
    report (or was left by a prune that was cut short). The newest complete one newer than the newest complete
    folder Ray registered holds the most training: resume from it and register it. Every other unregistered
    folder (partial uploads, older leftovers) can never be resumed from or pruned by Ray: remove it.
    A registered folder that is not complete (a file truncated or altered since: ``why`` says how), newer
    than the one resumed from, is quarantined: resuming from it would fail the same way on every restart.
    A registered name missing from ``complete`` (gone, or a quarantined folder's placeholder) is skipped.
    """
    known = set(registered)
    ours = {name for name in complete if checkpoint_step(name) is not None}
    good = [name for name in ours if name in known and complete[name]]
    base = max(good, key=_order) if good else None
    floor = _order(base) if base else (-1, -1)
    bad = tuple(sorted(((name, (why or {}).get(name, "incomplete")) for name in ours
                        if name in known and not complete[name] and _order(name) > floor), key=lambda b: _order(b[0])))
    newer = [name for name in ours if name not in known and _order(name) > floor and complete[name]]
    adopt = max(newer, key=_order) if newer else None
    remove = tuple(sorted(name for name in ours if name not in known and name != adopt))
    del latest  # Ray's latest is the newest registered: the complete ones' newest is chosen above
    return Recovery(resume=adopt or base, adopt=adopt is not None, remove=remove, quarantine=bad)


def is_complete_on(fs: pyarrow.fs.FileSystem, path: str) -> bool:
    """``is_complete`` for a folder on the pyarrow filesystem Ray stores checkpoints on."""
    return incomplete_reason_on(fs, path) is None


def incomplete_reason_on(fs: pyarrow.fs.FileSystem, path: str) -> str | None:
    """``incomplete_reason`` (the strict marker: listing, marker, sizes; sha256 on a local folder) for a
    folder on the pyarrow filesystem Ray stores checkpoints on."""
    import pyarrow.fs as pafs

    return fmt.incomplete_reason(f"s3://{path}" if isinstance(fs, pafs.S3FileSystem) else path)


def recover_run_folder(
    fs: pyarrow.fs.FileSystem, run_path: str, registered: Iterable[str], latest: str | None
) -> Recovery:
    """``plan_recovery`` over the checkpoint folders in ``run_path``, then delete what it removes and move
    what it quarantines (leaving Ray a placeholder: ``quarantine_registered``).

    Registered folders are checked newest first only until one is complete (the strict marker: its listing and
    sizes, and on a local folder the digests the resume reads): a registered folder was complete when Ray
    registered it, but a file can be cut short or replaced since, and resuming from it would then fail on
    every restart of the worker group. Unregistered folders are all checked (each is adopted or removed)."""
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(run_path, allow_not_found=True))
    folders = [i.base_name for i in infos if i.type == pafs.FileType.Directory and checkpoint_step(i.base_name) is not None
               and not is_placeholder(fs, f"{run_path}/{i.base_name}")]
    registered = set(registered)
    why: dict[str, str] = {}
    for name in sorted((n for n in folders if n not in registered), key=_order):
        why[name] = incomplete_reason_on(fs, f"{run_path}/{name}") or ""
    for name in sorted((n for n in folders if n in registered), key=_order, reverse=True):
        why[name] = incomplete_reason_on(fs, f"{run_path}/{name}") or ""
        if not why[name]:
            break
    complete = {name: not why.get(name, "") for name in folders}
    plan = plan_recovery(complete, registered, latest, why)
    for name in plan.remove:
        fs.delete_dir(f"{run_path}/{name}")
    for name, reason in plan.quarantine:
        quarantine_registered(fs, run_path, name, reason)
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
