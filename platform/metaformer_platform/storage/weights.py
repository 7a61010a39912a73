"""The one weights resolver: ``resolve(uri) -> local folder`` for every place weights can come from.

- a local checkpoint folder (any strategy) or export folder: returned as it is;
- the same on object storage (``s3://bucket/runs/NAME/checkpoint-NNNNNNNN``, ``s3://bucket/exports/x``);
- a registered version (``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``), looked up in MLflow's registry.

Remote weights are fetched once into one cache (``$METAFORMER_WEIGHTS_CACHE``, default
``~/.cache/metaformer-platform/weights``): under a file lock per entry (two processes fetching the same thing
at once download it once), into a temporary folder beside the entry, checked, marked and renamed into place.
A cache entry counts only when complete by the one rule (``completeness``): its ``FETCHED`` marker lists every
file with its size and sha256 (recorded at download), checked each time the entry is used.

A checkpoint's files are checked against the sha256 digests its ``COMPLETE`` marker records (a local folder
where it lies, a remote one in the fetched copy before it enters the cache): a file changed after its run
wrote it is refused. What the resolver hands over is only ever read pickle-free (an export's safetensors, a
checkpoint's ``model.safetensors`` or ``weights_only`` files); see ``training/checkpoint.model_weights``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metaformer_platform.storage import completeness
from metaformer_platform.storage.files import download, fingerprint, list_files
from metaformer_platform.storage.location import Location

__all__ = [
    "CACHE_ENV",
    "EXPORT_META",
    "EXPORT_WEIGHTS",
    "FETCHED_MARKER",
    "TAG_WEIGHTS_SHA256",
    "Weights",
    "default_cache_dir",
    "is_registry_uri",
    "model_version",
    "resolve",
    "resolve_weights",
]

CACHE_ENV = "METAFORMER_WEIGHTS_CACHE"
FETCHED_MARKER = "FETCHED"
EXPORT_WEIGHTS = "model.safetensors"  # what training/export.py writes
EXPORT_META = "model.json"
CHECKPOINT_STATE = "trainer.pt"  # what every strategy's checkpoint holds beside its weights
TAG_WEIGHTS_SHA256 = "metaformer.weights_sha256"  # set on every registered version
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
    if completeness.COMPLETE_MARKER in names and CHECKPOINT_STATE in names:
        return "checkpoint"
    if {EXPORT_WEIGHTS, EXPORT_META} <= names:
        return "export"
    raise ValueError(
        f"{where} is neither an export ({EXPORT_META} + {EXPORT_WEIGHTS}) nor a complete checkpoint folder "
        f"(checkpoint-NNNNNNNN with a {completeness.COMPLETE_MARKER} marker and {CHECKPOINT_STATE}); point it at "
        "one of those, or at a registered model (models:/NAME@ALIAS)"
    )


# -- models:/ lookups --------------------------------------------------------------------------------


def _explain_missing(client: Any, registry: str, uri: str, name: str, alias: str | None, version: str | None) -> str:
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


def model_version(uri: str, tracking_uri: str) -> Any:
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
    return entry.is_dir() and completeness.incomplete_reason(entry, marker=FETCHED_MARKER) is None


def _mark_fetched(folder: Path, source: str) -> None:
    files = {n: s for n, s in list_files(folder).items() if n != FETCHED_MARKER}
    digests = {n: completeness.file_sha256(str(folder / n)) for n in files}
    text = json.loads(completeness.marker_text([files], digests))
    text["source"] = source
    text["fetched_by_pid"] = os.getpid()
    (folder / FETCHED_MARKER).write_text(json.dumps(text, indent=0))


def _fill_entry(entry: Path, source: str, fill: Any) -> bool:
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
        for name in (EXPORT_WEIGHTS, EXPORT_META):  # exactly the two files an export holds: no other name is written
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"{mv.source.rstrip('/')}/{name}", dst_path=str(tmp), tracking_uri=tracking_uri
            )
        if expected is not None and completeness.file_sha256(str(tmp / EXPORT_WEIGHTS)) != expected:
            raise ValueError(
                f"{uri} (v{mv.version}): the downloaded {EXPORT_WEIGHTS} does not match the sha256 recorded at "
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
    if kind == "checkpoint":
        why = completeness.incomplete_reason(loc)
        if why is not None:
            raise ValueError(f"{loc.uri} is not a complete checkpoint ({why}); choose a complete checkpoint folder")
    # Keyed by what is there now, not only by the URI: a folder rewritten since (a run re-created under its name,
    # another server with the same bucket name) gets a new entry instead of the stale copy.
    entry = cache / "s3" / f"{loc.name}-{hashlib.sha256((loc.uri + fingerprint(loc)).encode()).hexdigest()[:16]}"

    def fill(tmp: Path) -> None:
        download(loc, tmp, listing=listing)
        if kind == "checkpoint":  # the bytes fetched are the bytes its run wrote (sha256 in COMPLETE)
            _check_checkpoint(tmp, loc.uri)

    fetched = _fill_entry(entry, loc.uri, fill)
    return Weights(entry, kind, loc.uri, fetched)


def _check_checkpoint(folder: Path, where: str) -> None:
    why = completeness.incomplete_reason(folder)
    if why is not None:
        raise ValueError(f"{where} is not a complete checkpoint ({why}); choose a complete, unaltered checkpoint folder")


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
    if kind == "checkpoint":
        _check_checkpoint(loc.path, repr(source))
    return Weights(loc.path, kind, source)


def resolve(uri: str | os.PathLike[str], *, tracking_uri: str | None = None,
            cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """A local folder with the weights ``uri`` names: a checkpoint folder (any strategy) or an export, local or on
    ``s3://``, or a registered ``models:/NAME@ALIAS|VERSION`` (looked up at ``tracking_uri``). Remote weights are
    downloaded once into the cache. A ValueError names the source and the fix when it holds neither kind,
    the checkpoint is incomplete, or the registry has no such version."""
    return resolve_weights(uri, tracking_uri=tracking_uri, cache_dir=cache_dir).path
