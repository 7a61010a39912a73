"""Checkpoint files: atomic writes, safe loads (no arbitrary unpickling), RNG state, and completeness.

A checkpoint is a folder. Each file is written to a temporary name and renamed, so a process that dies
mid-write never leaves a file that looks complete. ``COMPLETE_MARKER`` is written last by rank 0 and lists
every file of every rank with its size: under Ray each rank uploads its own part into the run folder, in no
set order, so the marker alone may arrive before another rank's files. A folder is complete only when the
marker is there and every file it lists has the listed size; anything else is never resumed from.

``plan_recovery``/``recover_run_folder`` reconcile a run folder with the checkpoints Ray has registered
(see ``launch.py``: a worker killed right after uploading leaves a folder Ray never registered).
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from metaformer_platform import storage

# The marker's name and the completeness rule live in the storage core (one rule, local and S3); re-exported.
from metaformer_platform.storage.completeness import COMPLETE_MARKER, missing_files  # noqa: F401
from metaformer_platform.storage.weights import CHECKPOINT_STATE, EXPORT_WEIGHTS

TRAINER_FILE = CHECKPOINT_STATE  # the weights resolver tells checkpoints by it
WEIGHTS_FILE = EXPORT_WEIGHTS  # model.safetensors: FSDP2/DeepSpeed checkpoints' full weights, pickle-free
DDP_MODEL_FILE = "model.pt"  # DDP's full weights (torch.save, read with weights_only)
NATIVE_ONLY = (
    "{where} holds its weights only in a strategy's native format (FSDP2's torch.distributed.checkpoint, "
    "DeepSpeed's engine files), which can run code when read: such files are read only to resume the run "
    "that wrote them. Export it first (python jobs/export.py CHECKPOINT OUT, on checkpoints written with "
    f"{EXPORT_WEIGHTS}, or --trust-native-checkpoint on your own run's older ones) and use the export"
)
CONFIG_FILE = "config.yaml"
EMA_FILE = "ema.pt"  # the EMA's full fp32 weights (timm names), written by rank 0 for every strategy
CHECKPOINT_DIR = re.compile(r"checkpoint-(\d{8})")  # the names the Trainer reports: checkpoint-NNNNNNNN

if TYPE_CHECKING:
    import pyarrow.fs


def save_tensors(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path`` atomically (temp file + rename in the same folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_tensors(path: Path, map_location: torch.device | str = "cpu") -> Any:
    """Load a file written by ``save_tensors``; only tensors and plain containers are accepted (a file holding
    anything else, e.g. a pickle that would run code, is a ValueError and nothing in it runs)."""
    import pickle

    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {str(path)!r} is missing: the folder is not a complete checkpoint")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{str(path)!r} holds objects other than tensors and plain containers, refused unread (loading them "
            f"could run code): {str(err).splitlines()[0]}"
        ) from None


def save_weights(tensors: Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write a model's full weights as safetensors (a format that cannot run code), atomically."""
    from safetensors.torch import save_file

    # safetensors wants contiguous, unshared CPU tensors (channels_last convolution weights are neither).
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(plain, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a file that is not one is a ValueError (nothing in it is run)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except SafetensorError as err:
        raise ValueError(f"{str(path)!r} is not a readable safetensors file: {err}") from None


def weights_file(directory: Path) -> Path:
    """The checkpoint's file of full model weights in a format that cannot run code (``model.safetensors``, or
    DDP's ``model.pt``, read with ``weights_only``); a ValueError saying to export it when there is none."""
    for name in (WEIGHTS_FILE, DDP_MODEL_FILE):
        if (directory / name).is_file():
            return directory / name
    raise ValueError(NATIVE_ONLY.format(where=repr(str(directory))))


def model_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The full fp32 model weights of a checkpoint of any strategy, read only from files that cannot run code.

    FSDP2 and DeepSpeed checkpoints hold them as ``model.safetensors`` (rank 0 writes it beside the strategy's
    own files); DDP's ``model.pt`` is read with ``weights_only``. The strategies' native formats
    (``torch.distributed.checkpoint``'s pickled ``.metadata``, DeepSpeed's ``torch.load(weights_only=False)``)
    are never read here: a checkpoint whose weights exist only in them is refused."""
    path = weights_file(directory)
    tensors = load_weights(path) if path.name == WEIGHTS_FILE else load_tensors(path)
    return {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in tensors.items()}


def list_files(directory: Path) -> dict[str, int]:
    """Every finished file under ``directory`` (relative POSIX path -> size in bytes), the marker excepted.

    Files another rank is still writing into a shared folder (temporary names) are not part of it."""
    listing: dict[str, int] = {}
    for p in directory.rglob("*"):
        if p.name == COMPLETE_MARKER or storage.is_temporary(p.name):
            continue
        try:
            if p.is_file():
                listing[p.relative_to(directory).as_posix()] = p.stat().st_size
        except FileNotFoundError:  # renamed away by the rank writing it, between the listing and the stat
            continue
    return listing


def describe_files(directory: Path, names: Iterable[str] | None = None) -> dict[str, tuple[int, str]]:
    """``list_files`` (or only ``names`` of it) with each file's sha256: name -> (size, sha256), for the marker."""
    listing = list_files(directory)
    chosen = listing if names is None else {n: listing[n] for n in names}
    described = {}
    for name, size in chosen.items():
        try:
            described[name] = (size, storage.file_sha256(str(directory / name)))
        except FileNotFoundError:
            # gone since the listing: another rank's scratch file in a shared folder, not a checkpoint file (a
            # finished file is never removed during a save); a name asked for by `names` must exist
            if names is not None:
                raise
    return described


def mark_complete(directory: Path, parts: Iterable[Mapping[str, tuple[int, str]]] | None = None) -> None:
    """Write the marker listing ``parts`` (each rank's ``describe_files``; default: this folder's own files) with
    every file's size and sha256. A name two ranks wrote with other bytes keeps no digest (the last upload wins)."""
    parts = list(parts) if parts is not None else [describe_files(directory)]
    digests: dict[str, str | None] = {}
    for part in parts:
        for name, (_, digest) in part.items():
            digests[name] = digest if digests.get(name, digest) == digest else None
    text = storage.marker_text([{n: size for n, (size, _) in part.items()} for part in parts],
                               {n: d for n, d in digests.items() if d is not None})
    with storage.atomic_write(directory / COMPLETE_MARKER, "w") as out:
        out.write(text)


def incomplete_reason(directory: str | Path) -> str | None:
    """Why ``directory`` (a local folder or s3:// URI) is not a complete checkpoint (None when it is); a local
    folder's files are checked against the sha256 digests its marker records."""
    return storage.incomplete_reason(directory)


def is_complete(directory: str | Path) -> bool:
    """The marker is there and every file it lists is there with its size (locally: and its sha256)."""
    return storage.is_complete(directory)


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

    return is_complete(f"s3://{path}" if isinstance(fs, pafs.S3FileSystem) else path)


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


def rng_state() -> dict[str, Any]:
    """This process's Python, NumPy and torch RNG states, in a form ``weights_only`` loading accepts."""
    np_state = np.random.get_state(legacy=True)
    assert isinstance(np_state, tuple)  # the global legacy generator is always MT19937: a tuple, never a dict
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np_state
    state: dict[str, Any] = {
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


def set_rng_state(state: dict[str, Any]) -> None:
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
