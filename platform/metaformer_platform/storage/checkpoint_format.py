"""The checkpoint and export folder format: file names, the completion marker, digests, tensor files, stamps.

Every module names a checkpoint's or an export's files through this one; the folders of a strategy's own
format (FSDP2's DCP folder, DeepSpeed's engine folder) are read only by that strategy and named there.
One completeness rule, local or on S3: a folder is complete when its marker is there and every file it lists is
there with the listed size and, where it records one, the listed sha256 (checked on every local folder, a
fetched copy included), so a file changed after the marker was written is never loaded. Rank 0 writes
``COMPLETE`` last, listing every rank's files (each rank uploads its own part, in no set order); the weights
cache writes ``FETCHED`` in the same format. Tensor files are written under a temporary name and renamed, and
read without running code. ``training/ownership.py`` decides what an ``OWNER-rankNNNNN.json`` stamp allows.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from metaformer_platform.storage.files import atomic_write, is_temporary, list_files, read_bytes
from metaformer_platform.storage.location import Location, LocationLike

if TYPE_CHECKING:
    import pyarrow.fs
    import torch

COMPLETE_MARKER = "COMPLETE"  # written last, by rank 0: the folder's file list with sizes and sha256 digests
TRAINER_FILE = "trainer.pt"  # the Trainer's state; the weights resolver tells checkpoints by it
CONFIG_FILE = "config.yaml"  # the job config the checkpoint was written by
WEIGHTS_FILE = "model.safetensors"  # full weights, pickle-free: an export's, and FSDP2/DeepSpeed checkpoints'
META_FILE = "model.json"  # an export's model name, classes, kwargs and provenance
DDP_MODEL_FILE = "model.pt"  # DDP's full weights (torch.save, read with weights_only)
DDP_OPTIMIZER_FILE = "optimizer.pt"  # DDP's optimizer state, rank 0's (replicas are identical)
EMA_FILE = "ema.pt"  # the EMA's full fp32 weights (timm names), written by rank 0 for every strategy
RNG_FILE = "rng-rank{:05d}.pt"  # per rank (.format(rank)): its Python, NumPy and torch RNG states
DATA_FAULTS_FILE = "data-faults-rank{:05d}.json"  # per rank: the skipped-sample counts
PART_FILE = "PART-rank{:05d}"  # per rank: its part of the folder is uploaded
STAMP_PREFIX = "OWNER-rank"
STAMP_FILE = STAMP_PREFIX + "{:05d}.json"  # per rank: which run and job wrote the folder
OWNER_FILE = "_owner.json"  # in a run folder: the run's id and the lease of the job that holds it


class Stamp(TypedDict):
    """What a rank stamps a checkpoint folder with: the run (kept across the jobs that resume it) and the job."""
    run_id: str
    attempt: str


# -- digests and the marker ----------------------------------------------------------------------------------


def file_sha256(path: str) -> str:
    """sha256 (hex) of a local file, streamed."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def marker_text(parts: Iterable[Mapping[str, int]], sha256: Mapping[str, str] | None = None) -> str:
    """A marker listing the files of ``parts`` (each rank's name -> size) and their ``sha256`` digests. A name
    two parts list with different sizes (two ranks wrote it; the last upload wins) is listed without a size:
    only its presence is certain (callers leave out the digest of such a name too)."""
    files: dict[str, int | None] = {}
    for part in parts:
        for name, size in part.items():
            files[name] = size if files.get(name, size) == size else None
    body: dict[str, object] = {"files": dict(sorted(files.items()))}
    if sha256:
        body["sha256"] = dict(sorted(sha256.items()))
    return json.dumps(body, indent=0)


def missing_files(text: str, present: Mapping[str, int]) -> list[str]:
    """Files the marker ``text`` lists that are absent from ``present`` or of another size (``name (size)``)."""
    try:
        listed = json.loads(text)["files"]
        assert isinstance(listed, dict)
    except (ValueError, KeyError, TypeError, AssertionError):
        return ["the marker (unreadable)"]
    return [
        name if name not in present else f"{name} ({present[name]} of {size} bytes)"
        for name, size in sorted(listed.items())
        if name not in present or (size is not None and present[name] != size)
    ]


def incomplete_reason(location: LocationLike, *, marker: str = COMPLETE_MARKER, verify_sha256: bool = True) -> str | None:
    """Why the folder at ``location`` is not complete by ``marker`` (None when it is). One listing, one read;
    on a local folder (unless ``verify_sha256=False``) every file the marker records a sha256 for is hashed."""
    loc = Location.parse(location)
    present = list_files(loc)
    if marker not in present:
        return f"no {marker} marker"
    present.pop(marker)
    text = read_bytes(loc.join(marker)).decode(errors="replace")
    missing = missing_files(text, present)
    if missing:
        return f"{marker} lists files that are missing or short: {', '.join(missing[:5])}"
    if verify_sha256 and not loc.remote:
        recorded = json.loads(text).get("sha256") or {}
        if not isinstance(recorded, dict):
            return f"{marker} is unreadable (its sha256 entry is not a mapping)"
        # Only names the listing holds are opened: the marker may come from someone else.
        bad = [n for n, digest in sorted(recorded.items())
               if n not in present or file_sha256(str(loc.path / n)) != digest]
        if bad:
            return (
                f"{', '.join(bad[:5])} changed after the folder was written: its sha256 is not the one {marker} "
                "records (a corrupted copy, or a file replaced by someone else); use an intact copy"
            )
    return None


def is_complete(location: LocationLike, *, marker: str = COMPLETE_MARKER) -> bool:
    """The marker is there and every file it lists is there with its size (and, locally, its sha256)."""
    return incomplete_reason(location, marker=marker) is None


def finished_files(directory: Path) -> dict[str, int]:
    """Every finished file under the local ``directory`` (relative POSIX path -> size in bytes), the marker
    excepted. Files another rank is still writing into a shared folder (temporary names) are not part of it."""
    listing: dict[str, int] = {}
    for p in directory.rglob("*"):
        if p.name == COMPLETE_MARKER or is_temporary(p.name):
            continue
        try:
            if p.is_file():
                listing[p.relative_to(directory).as_posix()] = p.stat().st_size
        except FileNotFoundError:  # renamed away by the rank writing it, between the listing and the stat
            continue
    return listing


def describe_files(directory: Path, names: Iterable[str] | None = None) -> dict[str, tuple[int, str]]:
    """``finished_files`` (or only ``names`` of it) with each file's sha256: name -> (size, sha256), for the
    marker."""
    listing = finished_files(directory)
    chosen = listing if names is None else {n: listing[n] for n in names}
    described = {}
    for name, size in chosen.items():
        try:
            described[name] = (size, file_sha256(str(directory / name)))
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
    text = marker_text([{n: size for n, (size, _) in part.items()} for part in parts],
                       {n: d for n, d in digests.items() if d is not None})
    with atomic_write(directory / COMPLETE_MARKER, "w") as out:
        out.write(text)


# -- tensor files --------------------------------------------------------------------------------------------


def save_tensors(obj: object, path: Path) -> None:
    """``torch.save`` to ``path`` atomically (temp file + rename in the same folder)."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_tensors(path: Path, map_location: torch.device | str = "cpu") -> Any:
    """Load a file written by ``save_tensors``; only tensors and plain containers are accepted (a file holding
    anything else, e.g. a pickle that would run code, is a ValueError and nothing in it runs)."""
    import pickle

    import torch

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
    raise ValueError(
        f"{str(directory)!r} holds its weights only in a strategy's native format (FSDP2's torch.distributed."
        "checkpoint, DeepSpeed's engine files), which can run code when read: such files are read only to resume "
        "the run that wrote them. Export it first (python jobs/export.py CHECKPOINT OUT, on checkpoints written "
        f"with {WEIGHTS_FILE}, or --trust-native-checkpoint on your own run's older ones) and use the export"
    )


def model_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The full fp32 model weights of a checkpoint of any strategy, read only from files that cannot run code.

    FSDP2 and DeepSpeed checkpoints hold them as ``model.safetensors`` (rank 0 writes it beside the strategy's
    own files); DDP's ``model.pt`` is read with ``weights_only``. The strategies' native formats
    (``torch.distributed.checkpoint``'s pickled ``.metadata``, DeepSpeed's ``torch.load(weights_only=False)``)
    are never read here: a checkpoint whose weights exist only in them is refused."""
    import torch

    path = weights_file(directory)
    tensors = load_weights(path) if path.name == WEIGHTS_FILE else load_tensors(path)
    return {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in tensors.items()}


# -- ownership stamps ----------------------------------------------------------------------------------------


def read_json(fs: pyarrow.fs.FileSystem, path: str) -> dict[str, object] | None:
    """The JSON object at ``path`` on ``fs`` (a stamp, a run's ``_owner.json``), None when absent; an unreadable
    file reads as ``{}``."""
    from pyarrow import fs as pafs

    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    try:
        with fs.open_input_stream(path) as stream:
            body = json.loads(stream.read())
    except (OSError, ValueError):
        return {}
    return body if isinstance(body, dict) else {}


def stamp(checkpoint_dir: Path, owner: Stamp, rank: int) -> None:
    """Record in a checkpoint folder, before it is uploaded, which run and job wrote this rank's part."""
    (checkpoint_dir / STAMP_FILE.format(rank)).write_text(json.dumps(owner, sort_keys=True))


def written_by(fs: pyarrow.fs.FileSystem, folder: str, run_id: str) -> bool:
    """True when some rank's stamp in ``folder`` names ``run_id`` (and none names another run)."""
    from pyarrow import fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    stamps = [i.path for i in infos if i.base_name.startswith(STAMP_PREFIX)]
    runs = {(read_json(fs, p) or {}).get("run_id") for p in stamps}
    return runs == {run_id}
