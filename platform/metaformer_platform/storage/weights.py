"""The one weights resolver: ``resolve(uri) -> local folder`` for every place weights can come from.

- a local checkpoint folder (any strategy) or export folder: returned as it is;
- the same on object storage (``s3://bucket/runs/NAME/checkpoint-NNNNNNNN``, ``s3://bucket/exports/x``);
- a registered version (``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``), looked up in MLflow's registry.

Remote weights are fetched once into one cache (``$METAFORMER_WEIGHTS_CACHE``, default
``~/.cache/metaformer-platform/weights``): under a file lock per entry (two processes fetching the same thing
at once download it once), into a temporary folder beside the entry, checked, marked and renamed into place.
A cache entry counts only when complete by the one rule (``checkpoint_format``): its ``FETCHED`` marker lists
every file with its size and sha256 (recorded at download), checked each time the entry is used.

A checkpoint's files are checked against the sha256 digests its ``COMPLETE`` marker records (a local folder
where it lies, a remote one in the fetched copy before it enters the cache): a file changed after its run
wrote it is refused. What the resolver hands over is only ever read pickle-free (an export's safetensors, a
checkpoint's ``model.safetensors`` or ``weights_only`` files); see ``checkpoint_format.model_weights``.
``read_weights_info`` says what a resolved folder holds (model, classes, resolution) without loading weights.
Weights carry weights, not instructions: the model kwargs an export's ``model.json`` (or a checkpoint's
``config.yaml``) sets are only the architecture's (``ALLOWED_MODEL_KWARGS``, plain values): no ``pretrained*``,
no URL, no path (``check_model_kwargs``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from metaformer_platform.storage import checkpoint_format as fmt
from metaformer_platform.storage.files import download, fingerprint, list_files
from metaformer_platform.storage.location import Location

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

CACHE_ENV = "METAFORMER_WEIGHTS_CACHE"
FETCHED_MARKER = fmt.FETCHED_MARKER  # a cache entry's marker, in the checkpoint marker's format
TAG_WEIGHTS_SHA256 = "metaformer.weights_sha256"  # set on every registered version
# The model kwargs weights may carry: the architecture's named parts (models.builder.MetaFormerSpec) and timm
# MetaFormer's own. Nothing that fetches (pretrained, pretrained_cfg*, URLs), reads files (checkpoint_path) or
# picks code (classes, callables): weights from storage must not choose what the reader does.
ALLOWED_MODEL_KWARGS = frozenset({
    "depths", "dims", "token_mixers", "pool_size", "norm", "act", "drop_path_rate", "drop_rate", "img_size",
    "in_chans", "mlp_bias", "layer_scale_init_value", "res_scale_init_values", "downsample_norm", "head_norm",
    "head", "head_dim", "global_pool", "proj_drop_rate", "layer_scale_init_values", "use_mlp_head",
})
_PLAIN_STRING = re.compile(r"[A-Za-z0-9_.-]{0,64}")
_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))/?$")


@dataclass(frozen=True)
class Weights:
    """A resolved source: the local folder, what it holds, and whether this call downloaded it."""

    path: Path
    kind: str  # "checkpoint" or "export"
    source: str
    fetched: bool = False


def default_cache_dir() -> Path:
    """The weights cache: ``$METAFORMER_WEIGHTS_CACHE`` or ``~/.cache/metaformer-platform/weights``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache/metaformer-platform/weights").expanduser()


def is_registry_uri(value: object) -> bool:
    """Whether ``value`` names a registered model (``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``)."""
    return isinstance(value, str) and value.startswith("models:/")


def _kind(names: set[str], where: str) -> str:
    if fmt.COMPLETE_MARKER in names and fmt.TRAINER_FILE in names:
        return "checkpoint"
    if {fmt.WEIGHTS_FILE, fmt.META_FILE} <= names:
        return "export"
    raise ValueError(
        f"{where} is neither an export ({fmt.META_FILE} + {fmt.WEIGHTS_FILE}) nor a complete checkpoint folder "
        f"(checkpoint-NNNNNNNN with a {fmt.COMPLETE_MARKER} marker and {fmt.TRAINER_FILE}); point it at "
        "one of those, or at a registered model (models:/NAME@ALIAS)"
    )


def _plain(value: object, depth: int = 0) -> bool:
    if value is None or isinstance(value, bool | int):
        return True
    if isinstance(value, float):
        return value == value and abs(value) != float("inf")
    if isinstance(value, str):
        return _PLAIN_STRING.fullmatch(value) is not None
    if isinstance(value, list | tuple) and depth == 0:
        return len(value) <= 64 and all(_plain(v, 1) for v in value)
    return False


def check_model_kwargs(kwargs: object, where: str) -> dict[str, Any]:
    """``kwargs`` (from a model.json or a checkpoint's config.yaml) when they set only ``ALLOWED_MODEL_KWARGS``
    to plain values (numbers, booleans, short names, flat lists of them); else a ValueError naming them."""
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict):
        raise ValueError(f"{where}: model kwargs must be a mapping, got {type(kwargs).__name__}")
    refused = sorted(str(k) for k in kwargs if k not in ALLOWED_MODEL_KWARGS)
    odd = sorted(str(k) for k, v in kwargs.items() if k in ALLOWED_MODEL_KWARGS and not _plain(v))
    if refused or odd:
        raise ValueError(
            f"{where} sets model kwargs that weights may not set: {', '.join(refused + odd)} (weights carry "
            f"architecture settings only: {', '.join(sorted(ALLOWED_MODEL_KWARGS))}, as plain values; never "
            "pretrained*, URLs or paths). Re-export the checkpoint, or set such options in your job's config"
        )
    return dict(kwargs)


def check_folder(folder: Path, where: str) -> None:
    """A local weights folder's own check: no symbolic links, and, when it has a ``COMPLETE`` marker (every
    checkpoint, and exports written since exports have one), the strict completeness rule. An export without a
    marker (an older one, or a registered version's two files) is read pickle-free only."""
    if (folder / fmt.COMPLETE_MARKER).exists():
        if (why := fmt.incomplete_reason(folder)) is not None:
            raise ValueError(f"{where} is not a complete checkpoint or export ({why}); choose a complete, unaltered "
                             "folder")
        return
    for name in os.listdir(folder):
        if (folder / name).is_symlink():
            raise ValueError(f"{where}: {name} is a symbolic link, refused (a folder's weights are its own files)")


# -- models:/ lookups --------------------------------------------------------------------------------


def _explain_missing(client: MlflowClient, registry: str, uri: str, name: str, alias: str | None,
                     version: str | None) -> str:
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException:
        names = sorted(m.name for m in client.search_registered_models(max_results=50))
        return (
            f"{uri}: no registered model {name!r} in the registry at {registry}; "
            f"registered models: {', '.join(names) or 'none'}"
        )
    aliases = ", ".join(f"@{a} -> v{v}" for a, v in sorted(model.aliases.items())) or "none"
    versions = sorted(int(mv.version) for mv in client.search_model_versions(f"name = '{name}'"))
    what = f"alias @{alias}" if alias else f"version {version}"
    return (
        f"{uri}: registered model {name!r} has no {what}; its aliases: {aliases}; "
        f"its versions: {', '.join(map(str, versions)) or 'none'}"
    )


def model_version(uri: str, tracking_uri: str) -> ModelVersion:
    """The MLflow ``ModelVersion`` that ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` names in the registry
    at ``tracking_uri``; a ValueError listing what the registry has when it names nothing."""
    import mlflow
    from mlflow.exceptions import MlflowException

    match = _MODELS_URI.match(uri or "")
    if not match:
        raise ValueError(f"{uri!r} is not a registry URI: use models:/NAME@ALIAS or models:/NAME/VERSION")
    name, alias, version = match["name"], match["alias"], match["version"]
    # The registry lives beside the runs: never a different default registry (e.g. a Databricks UC one).
    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        if alias:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, version)
    except MlflowException as err:
        if err.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        raise ValueError(_explain_missing(client, tracking_uri, uri, name, alias, version)) from None


# -- the cache ---------------------------------------------------------------------------------------


def _cached(entry: Path) -> bool:
    return entry.is_dir() and fmt.incomplete_reason(entry, marker=FETCHED_MARKER) is None


def _mark_fetched(folder: Path, source: str) -> None:
    files = {n: s for n, s in list_files(folder).items() if n != FETCHED_MARKER}
    digests = {n: fmt.file_sha256(str(folder / n)) for n in files}
    text = json.loads(fmt.marker_text([files], digests))
    text["source"] = source
    text["fetched_by_pid"] = os.getpid()
    (folder / FETCHED_MARKER).write_text(json.dumps(text, indent=0))


def _fill_entry(entry: Path, source: str, fill: Callable[[Path], None]) -> bool:
    """Make ``entry`` a complete copy (``fill(tmp_folder)`` downloads into a fresh folder); True when this call
    downloaded it, False when it was (or meanwhile became) cached. One process downloads; the others wait."""
    from filelock import FileLock

    if _cached(entry):
        return False
    entry.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(entry) + ".lock"):
        if _cached(entry):  # another process finished it while this one waited for the lock
            return False
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=entry.parent))
        try:
            fill(tmp)
            _mark_fetched(tmp, source)
            if entry.exists():  # an incomplete leftover (a fetch killed before the marker was written)
                shutil.rmtree(entry)
            os.replace(tmp, entry)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return True


def _resolve_registered(uri: str, tracking_uri: str, cache: Path) -> Weights:
    import mlflow.artifacts

    mv = model_version(uri, tracking_uri)
    expected = mv.tags.get(TAG_WEIGHTS_SHA256)
    # a name and version can mean other weights on another tracking server (or a re-created registry)
    identity = hashlib.sha256(f"{mv.source}|{expected}".encode()).hexdigest()[:16]
    entry = cache / "models" / mv.name / f"v{mv.version}-{identity}"

    def fill(tmp: Path) -> None:
        for name in (fmt.WEIGHTS_FILE, fmt.META_FILE):  # exactly the two files an export holds: no other name is written
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"{str(mv.source).rstrip('/')}/{name}", dst_path=str(tmp), tracking_uri=tracking_uri
            )
        if expected is not None and fmt.file_sha256(str(tmp / fmt.WEIGHTS_FILE)) != expected:
            raise ValueError(
                f"{uri} (v{mv.version}): the downloaded {fmt.WEIGHTS_FILE} does not match the sha256 recorded at "
                f"registration ({expected}); the artifacts at {mv.source} were changed"
            )
        _kind(set(os.listdir(tmp)), f"{uri} (v{mv.version}, {mv.source})")

    fetched = _fill_entry(entry, f"{uri} -> {mv.name}/v{mv.version}", fill)
    return Weights(entry, "export", uri, fetched)


def _resolve_remote(loc: Location, cache: Path) -> Weights:
    listing = list_files(loc)  # one listing: the kind, the completeness check and the download all use it
    if not listing:
        raise ValueError(f"{loc.uri}: nothing is stored there; point it at a checkpoint-NNNNNNNN folder or an export")
    kind = _kind(set(listing), loc.uri)
    if kind == "checkpoint" or fmt.COMPLETE_MARKER in listing:
        why = fmt.incomplete_reason(loc)
        if why is not None:
            raise ValueError(f"{loc.uri} is not a complete checkpoint ({why}); choose a complete checkpoint folder")
    # Keyed by what is there now, not only by the URI: a folder rewritten since (a run re-created under its name,
    # another server with the same bucket name) gets a new entry instead of the stale copy.
    entry = cache / "s3" / f"{loc.name}-{hashlib.sha256((loc.uri + fingerprint(loc)).encode()).hexdigest()[:16]}"

    def fill(tmp: Path) -> None:
        download(loc, tmp, listing=listing)
        check_folder(tmp, loc.uri)  # the bytes fetched are the bytes its run wrote (sha256 in COMPLETE)

    fetched = _fill_entry(entry, loc.uri, fill)
    return Weights(entry, kind, loc.uri, fetched)


def resolve_weights(uri: str | os.PathLike[str], *, tracking_uri: str | None = None,
                    cache_dir: str | os.PathLike[str] | None = None) -> Weights:
    """``resolve`` with what was resolved (kind, whether this call downloaded it)."""
    source = os.fspath(uri)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if is_registry_uri(source):
        if tracking_uri is None:
            import mlflow

            tracking_uri = mlflow.get_tracking_uri()
        return _resolve_registered(source, tracking_uri, cache)
    loc = Location.parse(source)
    if loc.remote:
        return _resolve_remote(loc, cache)
    if not loc.path.is_dir():
        raise ValueError(f"{source!r}: no such folder; point it at a checkpoint-NNNNNNNN folder or an export folder")
    kind = _kind(set(os.listdir(loc.path)), repr(source))
    check_folder(loc.path, repr(source))
    return Weights(loc.path, kind, source)


def resolve(uri: str | os.PathLike[str], *, tracking_uri: str | None = None,
            cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """A local folder with the weights ``uri`` names: a checkpoint folder (any strategy) or an export, local or on
    ``s3://``, or a registered ``models:/NAME@ALIAS|VERSION`` (looked up at ``tracking_uri``). Remote weights are
    downloaded once into the cache. A ValueError names the source and the fix when it holds neither kind,
    the checkpoint is incomplete, or the registry has no such version."""
    return resolve_weights(uri, tracking_uri=tracking_uri, cache_dir=cache_dir).path


# -- what the weights are ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightsInfo:
    """What an export or checkpoint folder says about the model in it (read without loading weights)."""

    kind: str  # "export" or "checkpoint"
    path: Path
    model_name: str
    num_classes: int
    model_kwargs: dict[str, Any]
    class_names: tuple[str, ...]  # empty when the weights do not record them
    img_size: int | None
    crop_pct: float | None
    step: int | None


def read_weights_info(source: str | Path) -> WeightsInfo:
    """Read ``model.json`` of an export, or ``trainer.pt`` + ``config.yaml`` of a complete checkpoint.

    Raises ``ValueError`` for a folder that is neither.
    """
    folder = Path(str(source).removeprefix("file://")).expanduser().resolve()
    where = f"model.init_from={str(source)!r}"
    if folder.is_dir():
        check_folder(folder, where)  # strict marker first: a file added to a checkpoint never changes its kind
    if (folder / fmt.COMPLETE_MARKER).is_file() and (folder / fmt.TRAINER_FILE).is_file():
        fmt.weights_file(folder)  # weights readable without running code, or "export it first"
        state, config = fmt.read_checkpoint_info(folder)
        data, model = config.get("data") or {}, config.get("model") or {}
        return WeightsInfo(
            "checkpoint", folder, state["model_name"], int(state["num_classes"]),
            check_model_kwargs(model.get("kwargs"), f"{where} (its {fmt.CONFIG_FILE})"),
            tuple(state.get("class_names") or ()), data.get("img_size"), data.get("crop_pct"), int(state["step"]),
        )
    if (folder / fmt.META_FILE).is_file() and (folder / fmt.WEIGHTS_FILE).is_file():
        info = json.loads((folder / fmt.META_FILE).read_text())
        pcfg = info.get("pretrained_cfg") or {}
        return WeightsInfo(
            "export", folder, info["model_name"], int(info["num_classes"]),
            check_model_kwargs(info.get("model_kwargs"), f"{where} (its {fmt.META_FILE})"),
            tuple(info.get("class_names") or ()), info.get("img_size"), info.get("crop_pct", pcfg.get("crop_pct")),
            info.get("step"),
        )
    raise ValueError(
        f"model.init_from={str(source)!r} is neither an export ({fmt.META_FILE} + {fmt.WEIGHTS_FILE}) nor a "
        f"complete checkpoint folder (checkpoint-NNNNNNNN with a {fmt.COMPLETE_MARKER} marker); point it at one "
        "of those, or at a registered model (models:/NAME@ALIAS)"
    )
