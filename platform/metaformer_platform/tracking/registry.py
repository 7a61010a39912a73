"""The MLflow model registry: exports as model versions, lineage in tags, a promotion gate, URI resolution.

A registered version holds exactly the files ``training/export.py`` writes (``model.safetensors`` +
``model.json``), logged as an MLflow 3 LoggedModel of the run that trained it (the runs table's Model
column; the run's metrics at the export's step are linked to it); no MLflow flavour is involved
(``mlflow.pytorch.log_model`` would default to the pt2 format, which fixes the batch size). Anything that reads
a version (``resolve_model_uri``) gets a folder that ``training.export.load_export`` loads strictly.

Alias ``champion`` names the version in service. ``promote`` moves it to a newly evaluated version only when
that version's top-1 is at least the champion's on the same validation data (same eval data hash); any other
version is kept with alias ``candidate``. The decision and its reason are ONE version tag (``metaformer.promotion``:
"champion: ..." or "candidate: ..."), replaced by every re-evaluation; the description stays the user's. The
evaluation (top-1/top-5, data, resolution, params, GMACs) is version tags too, so the registry's lists show it.
Registering and promoting are idempotent, so a pipeline that is re-run registers nothing twice.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

from metaformer_platform.storage import weights
from metaformer_platform.storage.checkpoint_format import META_FILE, WEIGHTS_FILE, file_sha256
from metaformer_platform.storage.weights import TAG_WEIGHTS_SHA256, is_registry_uri  # noqa: F401  (re-exported)

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import LoggedModel
    from mlflow.entities.model_registry import ModelVersion

CHAMPION = "champion"
CANDIDATE = "candidate"

# Version tags. Lineage (set at registration):
TAG_RUN_ID = "metaformer.run_id"
TAG_CHECKPOINT = "metaformer.checkpoint_uri"
TAG_DATA_HASH = "metaformer.data_manifest_hash"
TAG_GIT_COMMIT = "metaformer.git_commit"
TAG_ARCHITECTURE = "metaformer.architecture"
# The LoggedModel the version was made from (MLflow's SQL registry does not keep create_model_version's
# model_id; the model side of the link is its ``mlflow.modelVersions`` tag, as mlflow.register_model sets it).
TAG_MODEL_ID = "metaformer.model_id"
# sha256 of (run id, checkpoint URI): how a second registration of the same export finds the first.
TAG_LINEAGE_KEY = "metaformer.lineage_key"
# Evaluation (set by promote):
TAG_EVAL_DATA_HASH = "metaformer.eval_data_hash"
TAG_EVAL_TOP1 = "metaformer.eval_top1"
TAG_EVAL_TOP5 = "metaformer.eval_top5"
TAG_EVAL_DATA = "metaformer.eval_data"  # the data set's name and resolution, e.g. "imagenet-1k 224px"
TAG_PARAMS_M = "metaformer.params_m"
TAG_GMACS = "metaformer.gmacs"
TAG_PROMOTION = "metaformer.promotion"  # "champion: REASON" or "candidate: REASON"
# On the registered model (the registry's model list shows the model's tags, not its versions'): the champion's
# version and evaluation, replaced at each promotion, so the list answers "which is best" without opening a version.
TAG_CHAMPION_VERSION = "metaformer.champion_version"
TAG_CHAMPION_TOP1 = "metaformer.champion_top1"


@dataclass(frozen=True)
class Promotion:
    """What ``promote`` decided for a version."""

    model_name: str
    version: str
    promoted: bool  # True: the version holds ``champion`` now
    alias: str  # CHAMPION or CANDIDATE
    previous_champion: str | None
    reason: str


def lineage_tags(
    checkpoint_uri: str, data_manifest_hash: str, git_commit: str | None = None, **extra: str
) -> dict[str, str]:
    """The lineage tags ``register_export`` expects; ``git_commit`` defaults to the code being run."""
    from metaformer_platform.tracking.runs import git_commit as current_commit

    tags = {
        TAG_CHECKPOINT: str(checkpoint_uri),
        TAG_DATA_HASH: str(data_manifest_hash),
        TAG_GIT_COMMIT: git_commit or current_commit(),
    }
    tags.update({k: str(v) for k, v in extra.items()})
    return tags


class ExportInfo(TypedDict):
    """What the registry uses of an export's ``model.json`` (``training.export`` writes more)."""

    model_name: str
    step: int | None


@contextmanager
def _scrubbed_errors() -> Iterator[None]:
    """Re-raise a ``ValueError`` (what names nothing, and where it looked: the registry's URI) with its message
    scrubbed: it ends up on a console, in a pipeline's report, in an MLflow tag."""
    from metaformer_platform.storage.redact import redact

    try:
        yield
    except ValueError as err:
        raise ValueError(redact(str(err))) from None


def _client(tracking_uri: str | None) -> MlflowClient:
    import mlflow

    from metaformer_platform.tracking.runs import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    # The registry lives beside the runs: never a different default registry (e.g. a Databricks UC one).
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def _read_export(export_dir: Path) -> ExportInfo:
    missing = [n for n in (WEIGHTS_FILE, META_FILE) if not (export_dir / n).is_file()]
    if missing:
        raise ValueError(
            f"{str(export_dir)!r} is not an export (missing {', '.join(missing)}): register the folder that "
            "`python jobs/export.py CHECKPOINT OUT_DIR` wrote"
        )
    info = json.loads((export_dir / META_FILE).read_text())
    if not isinstance(info, dict) or "model_name" not in info or "num_classes" not in info:
        raise ValueError(f"{str(export_dir / META_FILE)!r} lacks model_name/num_classes: re-export the checkpoint")
    return ExportInfo(model_name=str(info["model_name"]), step=info.get("step"))


def _lineage_key(run_id: str, checkpoint_uri: str) -> str:
    return hashlib.sha256(f"{run_id}\n{checkpoint_uri}".encode()).hexdigest()


def _find_registered(client: MlflowClient, model_name: str, key: str) -> ModelVersion | None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(model_name)
    except MlflowException:
        return None
    found = client.search_model_versions(f"name = '{model_name}' and tags.`{TAG_LINEAGE_KEY}` = '{key}'")
    return min(found, key=lambda mv: int(mv.version)) if found else None


def _checked_tags(model_name: str, lineage_tags: Mapping[str, str]) -> dict[str, str]:
    if not model_name or any(c in model_name for c in "/@'`"):
        raise ValueError(f"registered model name {model_name!r} must be non-empty, without / @ ' or `")
    tags = {str(k): str(v) for k, v in lineage_tags.items()}
    if not tags.get(TAG_CHECKPOINT):
        raise ValueError(
            f"lineage_tags needs {TAG_CHECKPOINT!r} (the checkpoint the export came from); build them with "
            "registry.lineage_tags(checkpoint_uri, data_manifest_hash)"
        )
    return tags


def _ensure_registered_model(client: MlflowClient, model_name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(model_name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def _link_or_drop(client: MlflowClient, mv: ModelVersion, logged: LoggedModel, key: str) -> str:
    """The version that stays registered for this export: ``mv``, linked to its LoggedModel, or an earlier one."""
    # Two processes registering the same export at once both get past the first search: the lowest version
    # wins and the other is deleted (with its logged model), so either way one version remains.
    first = _find_registered(client, mv.name, key)
    if first is not None and int(first.version) < int(mv.version):
        client.delete_model_version(mv.name, mv.version)
        client.delete_logged_model(logged.model_id)
        return str(first.version)
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    client.set_logged_model_tags(
        logged.model_id, {MLFLOW_MODEL_VERSIONS: json.dumps([{"name": mv.name, "version": str(mv.version)}])}
    )
    return str(mv.version)


def register_export(
    export_dir: str | os.PathLike[str],
    model_name: str,
    *,
    tracking_uri: str | None = None,
    run_id: str,
    lineage_tags: Mapping[str, str],
    description: str = "",
) -> str:
    """Register the export in ``export_dir`` as a new version of ``model_name``; returns the version.

    The two export files are logged as a LoggedModel of ``run_id`` (``tracking.log_export_model``) and the
    version's source points at them. ``lineage_tags`` (see ``lineage_tags()``) must hold the checkpoint URI;
    registering the same run and checkpoint again returns the existing version without logging anything.
    Raises ``ValueError`` for a folder that is not an export or missing lineage.
    """
    folder = Path(export_dir).expanduser().resolve()
    info = _read_export(folder)
    tags = _checked_tags(model_name, lineage_tags)
    client = _client(tracking_uri)
    key = _lineage_key(run_id, tags[TAG_CHECKPOINT])
    from metaformer_platform.storage.redact import redact

    tags = {k: redact(v) for k, v in tags.items()}  # stored and shown: a URI's password must not be
    existing = _find_registered(client, model_name, key)
    if existing is not None:
        return str(existing.version)

    from metaformer_platform.tracking.runs import log_export_model

    client.get_run(run_id)  # MlflowException (RESOURCE_DOES_NOT_EXIST) before anything is written
    logged = log_export_model(
        client, run_id, folder, [WEIGHTS_FILE, META_FILE], name=model_name, step=info["step"],
        tags={**tags, TAG_LINEAGE_KEY: key},
    )
    _ensure_registered_model(client, model_name)
    tags.update({
        TAG_RUN_ID: run_id,
        TAG_LINEAGE_KEY: key,
        TAG_ARCHITECTURE: info["model_name"],
        TAG_WEIGHTS_SHA256: file_sha256(str(folder / WEIGHTS_FILE)),
        TAG_MODEL_ID: logged.model_id,
    })
    mv = client.create_model_version(
        model_name, source=logged.artifact_location, run_id=run_id, tags=tags, description=description or None,
        model_id=logged.model_id,
    )
    return _link_or_drop(client, mv, logged, key)


def _champion(client: MlflowClient, model_name: str) -> ModelVersion | None:
    from mlflow.exceptions import MlflowException

    aliases = client.get_registered_model(model_name).aliases
    if CHAMPION not in aliases:
        return None
    try:
        return client.get_model_version(model_name, str(aliases[CHAMPION]))
    except MlflowException:  # the alias points at a deleted version
        return None


def _check_evaluation(top1: float, eval_data_hash: str) -> None:
    if isinstance(top1, bool) or not isinstance(top1, int | float) or not math.isfinite(top1) or not 0 <= top1 <= 100:
        raise ValueError(f"top1 must be a percentage in [0, 100], got {top1!r}")
    if not eval_data_hash:
        raise ValueError("eval_data_hash must name the validation data the top-1 was measured on")


def _decide(
    champion: ModelVersion | None, version: str, top1: float, eval_data_hash: str, blocked: str | None = None
) -> tuple[bool, str]:
    """Whether ``version`` (top-1 ``top1`` on ``eval_data_hash``) takes ``champion``, and why."""
    if blocked:
        kept = f"champion v{champion.version} kept" if champion is not None else "no champion set"
        return False, f"blocked: {blocked}; {kept}; top-1 {top1:.4f} on data {eval_data_hash}"
    if champion is None:
        return True, f"first evaluated version: top-1 {top1:.4f} on data {eval_data_hash}"
    previous = str(champion.version)
    if previous == version:
        return True, f"already champion: top-1 {top1:.4f} on data {eval_data_hash}"
    their_hash = champion.tags.get(TAG_EVAL_DATA_HASH)
    their_top1 = champion.tags.get(TAG_EVAL_TOP1)
    if their_hash is None or their_top1 is None:
        return False, (
            f"champion v{previous} has no recorded evaluation ({TAG_EVAL_DATA_HASH}/{TAG_EVAL_TOP1} tags): "
            f"cannot compare, champion kept; top-1 {top1:.4f} on data {eval_data_hash}"
        )
    if their_hash != eval_data_hash:
        return False, (
            f"champion v{previous} was evaluated on other validation data ({their_hash}, this version on "
            f"{eval_data_hash}): top-1 not comparable, champion kept; evaluate both on the same data"
        )
    if float(top1) >= float(their_top1):
        return True, f"top-1 {top1:.4f} >= champion v{previous}'s {float(their_top1):.4f} on data {eval_data_hash}"
    return False, (
        f"top-1 {top1:.4f} < champion v{previous}'s {float(their_top1):.4f} on data {eval_data_hash}: "
        "champion kept"
    )


def promote(
    model_name: str,
    version: str | int,
    top1: float,
    *,
    eval_data_hash: str,
    tracking_uri: str | None = None,
    evaluation_tags: Mapping[str, str] | None = None,
    blocked: str | None = None,
) -> Promotion:
    """Record the version's evaluation and move ``champion`` to it if it is at least as good as the champion.

    The comparison holds only between evaluations on the same validation data (``eval_data_hash``): a champion
    evaluated on other data, or with no recorded top-1, is kept, and this version becomes ``candidate``. A
    version that does not take ``champion`` gets alias ``candidate``. ``blocked`` (a reason, e.g. a regression
    against the previous retrain) keeps the champion whatever the top-1. The decision and its reason replace the
    version's ``metaformer.promotion`` tag; ``evaluation_tags`` (top-5, data, resolution, size) are set beside it.
    """
    _check_evaluation(top1, eval_data_hash)
    client = _client(tracking_uri)
    version = str(version)
    client.get_model_version(model_name, version)  # MlflowException for a version that does not exist
    for key, value in {**(evaluation_tags or {}), TAG_EVAL_DATA_HASH: eval_data_hash,
                       TAG_EVAL_TOP1: repr(float(top1))}.items():
        client.set_model_version_tag(model_name, version, key, str(value))

    champion = _champion(client, model_name)
    promoted, reason = _decide(champion, version, top1, eval_data_hash, blocked)
    alias = CHAMPION if promoted else CANDIDATE
    client.set_registered_model_alias(model_name, alias, version)
    if promoted:
        aliases = client.get_registered_model(model_name).aliases
        if str(aliases.get(CANDIDATE)) == version:
            client.delete_registered_model_alias(model_name, CANDIDATE)
        # top-1 first: the registry's model list shows a model's tags in the order they were first set, in a
        # narrow column where only the first is read without a click
        champion_tags = {TAG_CHAMPION_TOP1: f"{float(top1):.2f}", TAG_CHAMPION_VERSION: version}
        given = evaluation_tags or {}
        for key in (TAG_EVAL_TOP5, TAG_EVAL_DATA):  # the champion's top-5 and data, where the evaluation gave them
            if key in given:
                champion_tags[key.replace("metaformer.eval_", "metaformer.champion_")] = str(given[key])
        for key, value in champion_tags.items():
            client.set_registered_model_tag(model_name, key, value)
    client.set_model_version_tag(model_name, version, TAG_PROMOTION, f"{alias}: {reason}")
    previous = str(champion.version) if champion is not None else None
    return Promotion(model_name, version, promoted, alias, previous, reason)


def get_model_version(uri: str, *, tracking_uri: str | None = None) -> ModelVersion:
    """The ``ModelVersion`` that ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` names (ValueError if none)."""
    from metaformer_platform.tracking.runs import resolve_tracking_uri

    with _scrubbed_errors():
        return weights.model_version(uri, resolve_tracking_uri(tracking_uri))


def resolve_model_uri(
    uri: str, *, tracking_uri: str | None = None, cache_dir: str | os.PathLike[str] | None = None
) -> Path:
    """A local folder with the export that a registry URI names: the storage core's weights resolver (fetched
    once per version into the weights cache, checked against the sha256 recorded at registration)."""
    from metaformer_platform.tracking.runs import resolve_tracking_uri

    if not is_registry_uri(uri):  # a path or another URL is the resolver's business, not the registry's
        raise ValueError(f"{uri!r} is not a registry URI: use models:/NAME@ALIAS or models:/NAME/VERSION")
    with _scrubbed_errors():
        return weights.resolve(uri, tracking_uri=resolve_tracking_uri(tracking_uri), cache_dir=cache_dir)
