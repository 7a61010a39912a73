"""The checkpoint and export folder format: file names, the completion marker, digests, tensor files, stamps.

Every module names a checkpoint's or an export's files through this one; the folders of a strategy's own
format (FSDP2's DCP folder, DeepSpeed's engine folder) are read only by that strategy and named there.
One completeness rule, local or on S3, and a strict one: a folder is complete when its marker is there and lists
every file of the folder with its size and sha256, each file is there with that size (and, on every local
folder, a fetched copy included, that sha256), no file is unlisted and none is a symbolic link. Only the
bookkeeping files written after the marker (``OWNER-rankNNNNN.json`` stamps, ``PART-rankNNNNN``, the other
marker) are left out of it, and nothing reads them as weights. Rank 0 writes ``COMPLETE`` last, listing every
rank's files (each rank uploads its own part, in no set order); the weights cache writes ``FETCHED`` in the
same format. A marker is parsed only below ``MAX_MARKER_BYTES``; a bad one is a ``MarkerError``.

Rank 0 signs ``COMPLETE`` with HMAC-SHA256 under the deployment's key (``deployment_key``: the
``METAFORMER_CHECKPOINT_KEY`` secret every node holds, else a generated 0600 key file of this user), which is
never in the storage: a verified signature over the marker, with every file matching the marker's sha256,
authenticates the whole folder. Files that can run code when read (FSDP2's DCP ``.metadata``, DeepSpeed's
``torch.load(weights_only=False)`` files) are read only after ``verify_native``. Tensor files are written under
a temporary name and renamed, and read without running code.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
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
FETCHED_MARKER = "FETCHED"  # a weights-cache entry's marker, in the same format
MAX_MARKER_BYTES = 8 << 20  # a marker above this is refused unparsed (100k files' names and digests fit)
# written after the marker (stamps, upload parts) or beside it (the other marker): never read as weights
CHECKPOINT_NAME = re.compile(r"checkpoint-(\d{8})(?:-(\d+))?")  # a run's checkpoint folder: checkpoint-NNNNNNNN[-R]
_BOOKKEEPING = re.compile(r"(OWNER-rank\d{5}\.json|PART-rank\d{5}|COMPLETE|FETCHED)")
_SHA256 = re.compile(r"[0-9a-f]{64}")
KEY_ENV = "METAFORMER_CHECKPOINT_KEY"  # the deployment's secret (a Kubernetes Secret on every pod)
KEY_FILE_ENV = "METAFORMER_CHECKPOINT_KEY_FILE"  # where the generated key lives when KEY_ENV is unset
_SIGNATURE_ALG = "hmac-sha256"
_MAC_CONTEXT = b"metaformer-platform checkpoint marker v1\n"
_RUN_ID_CONTEXT = b"metaformer-platform run id v1\n"

log = logging.getLogger(__name__)


class Stamp(TypedDict):
    """What a rank stamps a checkpoint folder with: the run (kept across the jobs that resume it) and the job."""
    run_id: str
    attempt: str


# -- a run's checkpoint folders ------------------------------------------------------------------------------


def checkpoint_name(step: int) -> str:
    """The folder name a checkpoint of ``step`` is reported under, ``checkpoint-NNNNNNNN`` (a step redone after
    its folder was quarantined gets ``-R`` appended: ``training.checkpoint.checkpoint_dir_name``)."""
    return f"checkpoint-{step:08d}"


def checkpoint_step(name: str) -> int | None:
    """The step of a ``checkpoint-NNNNNNNN`` folder name (``checkpoint-NNNNNNNN-R``: a step redone), else None."""
    match = CHECKPOINT_NAME.fullmatch(name)
    return int(match.group(1)) if match else None


def read_checkpoint_info(directory: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(trainer state, job config as a dict: ``{}`` without ``config.yaml``) of a local checkpoint folder,
    read without running code. The caller has judged the folder (its marker, the files it needs)."""
    import yaml

    state = load_tensors(directory / TRAINER_FILE)
    config_file = directory / CONFIG_FILE
    return state, yaml.safe_load(config_file.read_text()) if config_file.is_file() else {}


# -- the deployment key and signatures -------------------------------------------------------------------------


class MarkerError(ValueError):
    """A completion marker that is not one: unreadable, too large, or not strict (a file without size or sha256)."""


class UnsignedCheckpointError(ValueError):
    """A folder whose files can run code when read, not signed with this deployment's key."""


def default_key_file() -> Path:
    """``$METAFORMER_CHECKPOINT_KEY_FILE``, else ``checkpoint.key`` in this user's config folder for the platform."""
    configured = os.environ.get(KEY_FILE_ENV)
    if configured:
        return Path(configured).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base).expanduser() / "metaformer-platform" / "checkpoint.key"


def _generated_key(path: Path) -> bytes:
    """The key in ``path``, created (32 random bytes, hex, 0600 in a 0700 folder) when absent; whole or not at all
    (a temporary file linked into place: two processes creating it at once end with one key)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as out:
                out.write(secrets.token_hex(32) + "\n")
            try:
                os.link(tmp, path)
            except FileExistsError:  # another process made it first: use theirs
                pass
        finally:
            tmp.unlink(missing_ok=True)
    mode = path.stat().st_mode
    if mode & 0o077:
        raise ValueError(
            f"the checkpoint key file {str(path)!r} is readable by other users (mode {mode & 0o777:o}): anyone who "
            f"reads it can forge checkpoints this platform will unpickle; run chmod 600 {path}"
        )
    return path.read_text().strip().encode()


def deployment_key() -> bytes:
    """The key checkpoint markers are signed with: ``$METAFORMER_CHECKPOINT_KEY`` (a per-deployment secret, the
    same on every node: a Kubernetes Secret on a cluster), else the generated key file (``default_key_file``),
    which every process of this user on this machine shares. Never stored with the checkpoints, never sent in a
    job's payload or runtime env."""
    secret = os.environ.get(KEY_ENV)
    if secret is not None:
        if len(secret.strip()) < 16:
            raise ValueError(
                f"{KEY_ENV} is set but shorter than 16 characters; set it to a long random secret (e.g. "
                "python -c 'import secrets; print(secrets.token_hex(32))'), the same on every node"
            )
        return secret.strip().encode()
    return _generated_key(default_key_file())


def key_id(key: bytes) -> str:
    """A short name of a key for messages (which key signed a marker), from which the key cannot be recovered."""
    return hashlib.sha256(b"metaformer key id\n" + key).hexdigest()[:12]


def run_id_for(run_uri: str) -> str:
    """The id of the run whose folder is ``run_uri``: derived from the deployment key, never read from storage,
    so a job resubmitted under its name gets the same id and nothing in the storage can choose it."""
    return hmac.new(deployment_key(), _RUN_ID_CONTEXT + run_uri.rstrip("/").encode(), hashlib.sha256).hexdigest()[:32]


def _canonical(body: Mapping[str, object]) -> bytes:
    unsigned = {k: v for k, v in body.items() if k != "signature"}
    return _MAC_CONTEXT + json.dumps(unsigned, sort_keys=True, separators=(",", ":")).encode()


def _mac(key: bytes, body: Mapping[str, object]) -> str:
    return hmac.new(key, _canonical(body), hashlib.sha256).hexdigest()


# -- digests and the marker ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Marker:
    """A parsed, strict marker: every listed file's size and sha256, and the signature when it has one."""

    files: dict[str, int]
    sha256: dict[str, str]
    body: dict[str, object]

    @property
    def signature(self) -> object:
        return self.body.get("signature")


def file_sha256(path: str) -> str:
    """sha256 (hex) of a local file, streamed."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def marker_text(parts: Iterable[Mapping[str, int]], sha256: Mapping[str, str] | None = None) -> str:
    """A marker listing the files of ``parts`` (each rank's name -> size) and their ``sha256`` digests. A name
    two parts list with different sizes is listed without a size (and such a marker is refused when read: two
    ranks wrote one name, and which bytes arrived is unknown)."""
    files: dict[str, int | None] = {}
    for part in parts:
        for name, size in part.items():
            files[name] = size if files.get(name, size) == size else None
    body: dict[str, object] = {"files": dict(sorted(files.items()))}
    if sha256:
        body["sha256"] = dict(sorted(sha256.items()))
    return json.dumps(body, indent=0)


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name:
        raise MarkerError(f"lists a file name that is not a relative path: {name!r}")
    parts = PurePosixPath(name).parts
    if name.startswith("/") or any(p in ("..", ".", "") for p in parts) or PurePosixPath(name).as_posix() != name:
        raise MarkerError(f"lists a file name that is not a plain relative path inside the folder: {name!r}")
    return name


def parse_marker(data: bytes) -> Marker:
    """A marker's bytes, parsed strictly: at most ``MAX_MARKER_BYTES``, a JSON object whose ``files`` maps every
    file (a plain relative name) to its size (an int >= 0) and whose ``sha256`` gives every one of them a
    digest. Anything else is a ``MarkerError`` (a ValueError) that says what is wrong."""
    if len(data) > MAX_MARKER_BYTES:
        raise MarkerError(f"is {len(data)} bytes, over the {MAX_MARKER_BYTES}-byte cap for a marker")
    try:
        body = json.loads(data)
    except (ValueError, RecursionError) as err:  # RecursionError: deeply nested brackets
        raise MarkerError(f"is unreadable (not JSON: {type(err).__name__})") from None
    if not isinstance(body, dict) or not isinstance(body.get("files"), dict):
        raise MarkerError("is unreadable (not a JSON object with a 'files' mapping)")
    digests = body.get("sha256")
    if not isinstance(digests, dict):
        raise MarkerError("records no sha256 digests (written by an older version, or altered)")
    files: dict[str, int] = {}
    sha256: dict[str, str] = {}
    for name, size in body["files"].items():
        _check_name(name)
        if type(size) is not int or size < 0:
            raise MarkerError(f"lists {name} without a size (got {size!r})")
        digest = digests.get(name)
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise MarkerError(f"lists {name} without a sha256 digest")
        files[name], sha256[name] = size, digest
    if extra := sorted(set(digests) - set(files), key=str)[:3]:
        raise MarkerError(f"records digests of files it does not list: {extra}")
    return Marker(files, sha256, body)


def signature_refusal(marker: Marker, key: bytes | None = None) -> str | None:
    """Why ``marker`` is not signed with this deployment's key (None when it is)."""
    sig = marker.signature
    if sig is None:
        return "its marker is not signed (written before signing, or by someone without this deployment's key)"
    if not isinstance(sig, dict) or sig.get("alg") != _SIGNATURE_ALG or not isinstance(sig.get("mac"), str):
        return "its marker's signature is malformed"
    key = deployment_key() if key is None else key
    if not hmac.compare_digest(sig["mac"], _mac(key, marker.body)):
        if sig.get("key_id") != key_id(key):
            return (f"its marker is signed with another key (key id {str(sig.get('key_id'))[:16]!r}; this node's is "
                    f"{key_id(key)!r}): set the same {KEY_ENV} on every node and job")
        return "its marker's signature does not match its contents (the marker was altered)"
    return None


def _symlinks(folder: Path) -> list[str]:
    """Every symbolic link under the local ``folder`` (relative names), not followed."""
    found = []
    for root, dirs, names in os.walk(folder, followlinks=False):
        for name in [*dirs, *names]:
            if os.path.islink(os.path.join(root, name)):
                found.append(Path(root, name).relative_to(folder).as_posix())
    return sorted(found)


def _read_marker(loc: Location, marker: str, present: Mapping[str, int]) -> Marker:
    if present[marker] > MAX_MARKER_BYTES:
        raise MarkerError(f"is {present[marker]} bytes, over the {MAX_MARKER_BYTES}-byte cap for a marker")
    return parse_marker(read_bytes(loc.join(marker)))


_FIX = "use an intact copy of the folder (or, for a folder you made by hand, write it again: files are never added to one)"


def _folder_reason(loc: Location, marker: str, verify_sha256: bool) -> tuple[str | None, Marker | None]:
    """(why the folder is not complete and strict by ``marker``, or None; the parsed marker when readable)."""
    if not loc.remote and loc.path.is_dir() and (links := _symlinks(loc.path)):
        return f"{', '.join(links[:5])} is a symbolic link, refused (a folder's files are its own); {_FIX}", None
    present = list_files(loc)
    if marker not in present:
        return f"no {marker} marker", None
    try:
        parsed = _read_marker(loc, marker, present)
    except MarkerError as err:
        return f"{marker} {err}; {_FIX}", None
    unlisted = sorted(n for n in present if n not in parsed.files and not _BOOKKEEPING.fullmatch(n))
    if unlisted:
        return f"{', '.join(unlisted[:5])} is not listed in {marker} (added after the folder was written); {_FIX}", parsed
    missing = [n if n not in present else f"{n} ({present[n]} of {size} bytes)"
               for n, size in sorted(parsed.files.items()) if present.get(n) != size]
    if missing:
        return f"{marker} lists files that are missing or short: {', '.join(missing[:5])}", parsed
    if verify_sha256 and not loc.remote:
        bad = [n for n, digest in sorted(parsed.sha256.items()) if file_sha256(str(loc.path / n)) != digest]
        if bad:
            return (
                f"{', '.join(bad[:5])} changed after the folder was written: its sha256 is not the one {marker} "
                "records (a corrupted copy, or a file replaced by someone else); use an intact copy"
            ), parsed
    return None, parsed


def incomplete_reason(location: LocationLike, *, marker: str = COMPLETE_MARKER, verify_sha256: bool = True) -> str | None:
    """Why the folder at ``location`` is not complete by ``marker`` (None when it is): the strict rule of this
    module's docstring. One listing, one read; on a local folder (unless ``verify_sha256=False``) every file is
    hashed."""
    return _folder_reason(Location.parse(location), marker, verify_sha256)[0]


def is_complete(location: LocationLike, *, marker: str = COMPLETE_MARKER) -> bool:
    """The marker is there and every file it lists is there with its size (and, locally, its sha256)."""
    return incomplete_reason(location, marker=marker) is None


def native_refusal(location: LocationLike, *, verify_sha256: bool = True) -> str | None:
    """Why the folder's native files (which can run code when read) may not be read (None when they may): it is
    complete and strict, and its ``COMPLETE`` is signed with this deployment's key."""
    why, parsed = _folder_reason(Location.parse(location), COMPLETE_MARKER, verify_sha256)
    if why is not None or parsed is None:
        return why
    return signature_refusal(parsed)


def signature_reason(location: LocationLike) -> str | None:
    """Why the folder's ``COMPLETE`` is not a strict marker signed with the deployment key; None when it is, or
    when there is no marker yet (a part still uploading, or one a killed worker left: never read natively)."""
    loc = Location.parse(location)
    present = list_files(loc)
    if COMPLETE_MARKER not in present:
        return None
    try:
        parsed = _read_marker(loc, COMPLETE_MARKER, present)
    except MarkerError as err:
        return f"{COMPLETE_MARKER} {err}"
    return signature_refusal(parsed)


def verify_native(directory: LocationLike, *, accept_unsigned: bool = False, what: str = "reading") -> None:
    """Raise before anything reads the folder's native files unless ``native_refusal`` allows it. An unsigned
    folder that is otherwise complete passes with ``accept_unsigned`` (run.accept_unsigned_checkpoints, for
    checkpoints written before signing), loudly, every time."""
    loc = Location.parse(directory)
    why = native_refusal(loc)
    if why is None:
        return
    unsigned_only = why.startswith("its marker is not signed")
    if accept_unsigned and unsigned_only:
        warning = (f"SECURITY WARNING: {what}: reading the native files of the UNSIGNED checkpoint {loc.uri} "
                   "because run.accept_unsigned_checkpoints is set; they can run code when read. Export it "
                   "(python jobs/export.py) and turn the setting off as soon as you can")
        log.warning(warning)
        print(warning, flush=True)
        return
    fix = ("if your own run wrote it before checkpoints were signed, set run.accept_unsigned_checkpoints=true "
           "once (jobs/export.py: --trust-native-checkpoint), or export it and start from the export"
           if unsigned_only else f"use an intact copy; every node needs the same {KEY_ENV}")
    raise UnsignedCheckpointError(
        f"{what}: refused to read the native files of {loc.uri}, which can run code when read: {why}; {fix}"
    )


def finished_files(directory: Path) -> dict[str, int]:
    """Every finished file under the local ``directory`` (relative POSIX path -> size in bytes), the marker
    excepted. Files another rank is still writing into a shared folder (temporary names) are not part of it."""
    listing: dict[str, int] = {}
    for p in directory.rglob("*"):
        rel = p.relative_to(directory).as_posix()
        if _BOOKKEEPING.fullmatch(rel) or is_temporary(p.name):
            continue
        try:
            if p.is_file():
                listing[rel] = p.stat().st_size
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


def mark_complete(directory: Path, parts: Iterable[Mapping[str, tuple[int, str]]] | None = None, *,
                  sign: bool = True) -> None:
    """Write the marker listing ``parts`` (each rank's ``describe_files``; default: this folder's own files) with
    every file's size and sha256, signed with the deployment key (``sign=False``: unsigned, as a folder made
    without the key is). A name two ranks wrote with other bytes cannot be listed: a RuntimeError (each rank
    writes into its own scratch folder, under names of its own)."""
    parts = list(parts) if parts is not None else [describe_files(directory)]
    files: dict[str, tuple[int, str]] = {}
    for part in parts:
        for name, entry in part.items():
            if files.setdefault(name, entry) != entry:
                raise RuntimeError(f"two ranks wrote {name} into one checkpoint with other bytes")
    body: dict[str, object] = json.loads(marker_text([{n: size for n, (size, _) in files.items()}],
                                                     {n: digest for n, (_, digest) in files.items()}))
    body.setdefault("sha256", {})  # a folder with no files still records (no) digests
    if sign:
        key = deployment_key()
        body["signature"] = {"alg": _SIGNATURE_ALG, "key_id": key_id(key), "mac": _mac(key, body)}
    with atomic_write(directory / COMPLETE_MARKER, "w") as out:
        out.write(json.dumps(body, indent=0))


# -- a full disk ----------------------------------------------------------------------------------------------

LOW_SPACE_BYTES = 1 << 20  # under this free after a failed write, the disk counts as full


def disk_full(err: BaseException, folder: Path, fix: str) -> OSError | None:
    """An error naming ``folder`` and the free space on its disk when ``err``, raised while a checkpoint was written
    into it, is a full disk; else None. ``torch.save`` reports a full disk only as a short write (a RuntimeError,
    "unexpected pos"): a disk left with under ``LOW_SPACE_BYTES`` free counts as full. Called before the partial
    folder is deleted, so the space it took is counted as used."""
    import errno
    import shutil

    where = folder
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        usage = shutil.disk_usage(where)
    except OSError:
        return None
    if getattr(err, "errno", None) != errno.ENOSPC and "No space left" not in str(err) and usage.free >= LOW_SPACE_BYTES:
        return None
    return OSError(errno.ENOSPC, (
        f"no space left on the disk of {folder} while writing a checkpoint there ({usage.free:,} of {usage.total:,} "
        f"bytes free): {fix}. The partial folder is deleted or left without its {COMPLETE_MARKER} marker (never "
        f"resumed from); the run's earlier checkpoints are untouched ({type(err).__name__}: {err})"))


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
        if (directory / name).is_symlink():
            raise ValueError(f"{str(directory / name)!r} is a symbolic link, refused (a folder's weights are its own "
                             "files); use an intact copy of the folder")
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
