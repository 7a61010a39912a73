"""Driver-side checks of a job: everything that can fail on bad input runs here, before the MLflow run is opened
and before any Ray worker starts, so a bad job costs no cluster time and writes nothing.

Locations (data, weights, run storage) are judged through the storage core: a missing bucket, a refused key,
an endpoint that does not answer or a folder that is not a checkpoint is a ValueError naming the location and
the fix (the entry points exit 2 on it).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from metaformer_platform import storage
from metaformer_platform.config import JobConfig
from metaformer_platform.storage import Location
from metaformer_platform.storage.weights import WeightsInfo, read_weights_info
from metaformer_platform.training import hardware

if TYPE_CHECKING:
    from metaformer_platform.data import Manifest


def resolve_data_root(cfg: JobConfig) -> str | Path:
    """Where the job's shards are: a local folder (the synthetic set is generated there on first use), or
    the URL itself for object storage (s3://...), which the loader and `load_manifest` read directly."""
    from metaformer_platform.data.build.synthetic import ensure_synthetic_shards

    if cfg.data.source == "synthetic":
        s = cfg.data.synthetic
        return ensure_synthetic_shards(
            Path(cfg.data.cache_dir).expanduser() / "synthetic",
            num_classes=s.num_classes,
            train_samples=s.train_samples,
            val_samples=s.val_samples,
            image_size=s.image_size,
            samples_per_shard=s.samples_per_shard,
            seed=s.seed,
        )
    loc = Location.parse(cfg.data.source)
    return loc.uri if loc.remote else loc.path


def check_data(cfg: JobConfig, manifest: Manifest, data_root: str | Path) -> None:
    """The manifest has the splits the job uses and says (or the config sets) how many classes there are."""
    if cfg.data.val_split:
        manifest.split(cfg.data.val_split)  # raises, naming the splits there are
    manifest.split(cfg.data.train_split)
    if cfg.model.num_classes is None and manifest.num_classes is None:
        raise ValueError(f"{str(data_root)!r}/_info.json does not say num_classes: set model.num_classes")
    if cfg.model.num_classes is not None and manifest.num_classes and cfg.model.num_classes < manifest.num_classes:
        raise ValueError(
            f"model.num_classes={cfg.model.num_classes} but the data has {manifest.num_classes} classes; "
            "set model.num_classes=null to take it from the data"
        )


def check_rank_batches(cfg: JobConfig, manifest: Manifest, data_root: str | Path, workers: int) -> None:
    """Each of ``workers`` ranks gets at least one optimizer step of the training split."""
    train = manifest.split(cfg.data.train_split)
    per_rank = train.num_samples // workers
    if per_rank < cfg.trainer.batch_size * cfg.trainer.grad_accum_steps:
        raise ValueError(
            f"the {cfg.data.train_split!r} split of {str(data_root)!r} has {train.num_samples} samples, "
            f"{per_rank} per worker: fewer than one step of trainer.batch_size={cfg.trainer.batch_size} x "
            f"grad_accum_steps={cfg.trainer.grad_accum_steps}; lower the batch size or scaling.num_workers"
        )


def check_model(cfg: JobConfig, num_classes: int | None) -> None:
    """The model builds with the configured kwargs (on the meta device: no memory, no time)."""
    import torch

    from metaformer_platform.strategies import get_strategy_class
    from metaformer_platform.training.trainer import build_model

    if num_classes is None:
        raise ValueError(
            f"model {cfg.model.name!r}: the number of classes is unknown (the data manifest names none): "
            "set model.num_classes"
        )
    try:
        with torch.device("meta"):
            model = build_model(cfg, num_classes)
    except TypeError as err:
        raise ValueError(f"model {cfg.model.name!r} does not build with model.kwargs={cfg.model.kwargs}: {err}") from None
    get_strategy_class(cfg.strategy.name).check_model(model)


def registry_uri(cfg: JobConfig) -> str:
    """Where ``models:/`` URIs are looked up: the driver's tracking URI (an absolute default)."""
    from metaformer_platform.tracking.runs import resolve_tracking_uri

    return resolve_tracking_uri(cfg.tracking.tracking_uri)


def check_tracking_servers(cfg: JobConfig) -> None:
    """Every tracking server the job will talk to answers and lets it in, in seconds (one request each, no
    retry): the tracking URI when tracking is on, and the registry URI when ``model.init_from`` is a
    ``models:/`` URI. An sqlite or local URI needs no server. Runs first: MLflow's own client would retry
    for minutes, and only after Ray was joined and the run name claimed."""
    from metaformer_platform.storage.redact import redact
    from metaformer_platform.tracking.runs import check_server, resolve_tracking_uri, served

    uses: dict[str, str] = {}
    if cfg.tracking.enabled:
        uses[resolve_tracking_uri(cfg.tracking.tracking_uri)] = "tracking.tracking_uri"
    if storage.weights.is_registry_uri(cfg.model.init_from):
        uses.setdefault(registry_uri(cfg), f"the registry of model.init_from={cfg.model.init_from}")
    for uri, key in uses.items():
        if not served(uri) or (err := check_server(uri)) is None:
            continue
        where = f"{key} = {redact(uri)}"
        if err.status in (401, 403):
            raise ValueError(
                f"the MLflow server at {where} refuses this client (HTTP {err.status}): set MLFLOW_TRACKING_USERNAME "
                "and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) to an account it accepts"
                + ("" if key.startswith("the registry") else ", or run without tracking: tracking.enabled=false"))
        fix = "start the server (or name the one that runs)"
        if key == "tracking.tracking_uri":
            fix += ", or run without tracking: tracking.enabled=false"
        raise ValueError(f"the MLflow server at {where} cannot be used ({err.detail}): {fix}")


_SQLITE_CLAIMS: dict[Path, int] = {}  # this process's locks on sqlite stores (a pipeline's members share them)


def claim_sqlite_store(cfg: JobConfig) -> None:
    """One job at a time on an sqlite MLflow store: a lock (``<db>.lock``, held until this process exits) that a
    second job's driver finds taken, refused before Ray is joined or a name is claimed. Each job writes the store
    from two processes (its driver and rank 0), and sqlite serialises every writer of a file: two jobs at once
    end in "database is locked" (or a schema created twice) mid-run. Jobs of one process (a pipeline's members,
    one thread each) share the claim."""
    import fcntl

    from metaformer_platform.tracking.runs import resolve_tracking_uri

    uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
    if not cfg.tracking.enabled or not uri.startswith("sqlite:///"):
        return
    db = Path(uri.removeprefix("sqlite:///")).expanduser().resolve()
    lock = db.with_name(db.name + ".lock")
    if lock in _SQLITE_CLAIMS:
        return
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ValueError(
            f"tracking.tracking_uri = {uri} is an sqlite store another job is writing now (it holds {lock}): sqlite "
            "serves one job at a time. Run both against an MLflow server: `mlflow server --backend-store-uri "
            f"{uri} --host 127.0.0.1 --port 5000 --workers 1` (or the local stack: infra/local/stack.sh up, "
            "which prints its tracking URI), and set tracking.tracking_uri to the server's URL; or wait for the other job to end"
        ) from None
    _SQLITE_CLAIMS[lock] = fd


def resolve_init_from(cfg: JobConfig) -> Path | None:
    """``model.init_from`` as a local folder on the driver (None when unset), through the one weights resolver:
    a ``models:/`` URI or an s3:// folder is fetched once into the weights cache; a source that names nothing,
    or neither a checkpoint nor an export, is a ValueError naming it."""
    source = cfg.model.init_from
    if source is None:
        return None
    tracking = registry_uri(cfg) if storage.weights.is_registry_uri(source) else None
    if not storage.weights.is_registry_uri(source):
        storage.check_access(source, what=f"model.init_from={source!r}")
    return storage.weights.resolve(source, tracking_uri=tracking)


def check_init_from(cfg: JobConfig, folder: Path | None = None) -> WeightsInfo | None:
    """``model.init_from`` (resolved to ``folder``) is an export or a complete checkpoint of the same model
    (read cheaply, on the driver); a fine-tune needs one. Returns what the weights say (None without any)."""
    if cfg.model.init_from is None:
        if cfg.stage == "finetune":
            raise ValueError(
                "a finetune job starts from trained weights: set model.init_from to a checkpoint folder, an "
                "export folder or a registered model (models:/NAME@ALIAS)"
            )
        return None
    return check_weights_model(cfg.model.init_from, folder or cfg.model.init_from, cfg.model.name)


def check_weights_model(source: str, folder: str | Path, model_name: str) -> WeightsInfo:
    """The weights of ``source`` (read from ``folder``) are of ``model_name``; returns what they say."""
    info = read_weights_info(folder)
    if info.model_name != model_name:
        raise ValueError(
            f"model.init_from={source!r} holds {info.model_name}, but this job trains {model_name}: "
            f"set model.name={info.model_name} or choose weights of {model_name}"
        )
    return info


def check_resume_from(cfg: JobConfig) -> Path | str | None:
    """``run.resume_from`` as a local folder (or its s3:// URI: each worker reads it there), refused unless it is
    a complete checkpoint of this model (judged where the files are, by the marker's file list)."""
    if cfg.run.resume_from is None:
        return None
    from metaformer_platform.storage.checkpoint_format import (
        TRAINER_FILE,
        incomplete_reason,
        read_checkpoint_info,
    )
    from metaformer_platform.training.ownership import check_native_checkpoint

    where = f"run.resume_from={cfg.run.resume_from!r}"
    loc = storage.check_access(cfg.run.resume_from, what=where)
    why = incomplete_reason(loc)  # reads the listing and the marker (JSON) only
    if why is not None:
        raise ValueError(f"{where} is not a complete checkpoint folder ({why}); point it at a run's checkpoint-NNNNNNNN folder")
    check_native_checkpoint(cfg.strategy.name, loc.filesystem(), loc.fs_path,
                            Location.parse(cfg.run.storage_path).fs_path, where,
                            accept_unsigned=cfg.run.accept_unsigned_checkpoints)
    with storage.local_folder(loc, [TRAINER_FILE]) as folder:
        state, _ = read_checkpoint_info(folder)
    if state["model_name"] != cfg.model.name:
        raise ValueError(
            f"{where} holds {state['model_name']}, but this job trains "
            f"{cfg.model.name}: set model.name={state['model_name']} or choose another checkpoint"
        )
    return loc.uri if loc.remote else loc.path


def resolve_storage_path(storage_path: str) -> str:
    """An absolute local path (created) or an s3:// URI, checked writable (a probe file, removed again)."""
    return storage.check_writable(storage_path, what="run.storage_path").uri


def check_cluster(cfg: JobConfig, layout: hardware.Layout) -> None:
    """The cluster has room for the worker group of ``layout`` (Ray would otherwise wait for it forever); an
    elastic job's for its smallest size."""
    import ray

    resources = ray.cluster_resources()
    s = cfg.scaling
    workers = layout.num_workers[0] if isinstance(layout.num_workers, tuple) else layout.num_workers
    need = {"CPU": workers * layout.cpus_per_worker}
    if layout.use_gpu:
        need["GPU"] = workers * s.resources_per_worker.get("GPU", 1.0)
    for name, amount in s.resources_per_worker.items():
        if name not in {"CPU", "GPU"}:
            need[name] = workers * amount
    for name, amount in need.items():
        have = resources.get(name, 0.0)
        if have < amount:
            raise ValueError(
                f"the job needs {amount:g} {name} (scaling.num_workers={workers} x "
                f"{amount / workers:g} per worker) but the Ray cluster has {have:g}: lower "
                "scaling.num_workers or scaling.cpus_per_worker, or add nodes"
            )
    # A worker runs on one node: the total may suffice while no node (or too few) can hold a worker.
    per_worker = {name: amount / workers for name, amount in need.items() if amount > 0}
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    fits = sum(
        min((int(node.get(name, 0.0) // amount) for name, amount in per_worker.items()), default=workers)
        for node in nodes
    )
    if fits < workers:
        largest = max((node.get("CPU", 0.0) for node in nodes), default=0.0)
        wants = ", ".join(f"{amount:g} {name}" for name, amount in per_worker.items())
        raise ValueError(
            f"a worker needs {wants} on one node, and the cluster's {len(nodes)} nodes (the largest has "
            f"{largest:g} CPU) hold {fits} such workers, not scaling.num_workers={workers}: lower "
            "scaling.cpus_per_worker or add larger nodes"
        )


def connect_ray(cfg: JobConfig) -> None:
    """Join the configured cluster (``run.ray_address`` or RAY_ADDRESS), or start a local one."""
    import ray

    if ray.is_initialized():
        return
    from metaformer_platform.launch.ray_logs import ray_init_options

    address = cfg.run.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **ray_init_options(cfg.run.verbose))
    else:
        # "local" starts a private cluster instead of attaching to whatever `ray start` left in /tmp/ray.
        ray.init(address="local", include_dashboard=False, **ray_init_options(cfg.run.verbose))




# -- the evaluate job ----------------------------------------------------------------------------------------

NO_WEIGHTS = (
    "an evaluate job scores trained weights: set model.init_from to a checkpoint folder, an export folder or a "
    "registered model (models:/NAME@ALIAS)"
)


def prepare_evaluation(cfg: JobConfig, weights_folder: Path | None, data_root: str | Path, *,
                       check_files: bool = True) -> tuple[WeightsInfo, Manifest]:
    """Check an evaluate job on the driver; returns (the weights, the manifest). The job plan then sets the
    config to the weights' model (``evaluation_updates``).

    Raises ``ValueError`` for no ``model.init_from``, weights of another model than a configured ``model.name``,
    no validation split, or shards of another label set than the weights'. ``check_files``: whether the
    manifest's shards must exist (a dry run reads the manifest only).
    """
    from metaformer_platform.data import INFO_NAME, load_manifest

    if weights_folder is None:
        raise ValueError(NO_WEIGHTS)
    weights = read_weights_info(weights_folder)
    m, d = cfg.model, cfg.data
    if "name" in m.model_fields_set and m.name != weights.model_name:
        raise ValueError(
            f"model.init_from={m.init_from!r} holds {weights.model_name}, but model.name={m.name}: drop "
            f"model.name (the weights decide it) or set model.name={weights.model_name}"
        )
    if m.num_classes is not None and m.num_classes != weights.num_classes:
        raise ValueError(
            f"model.num_classes={m.num_classes} but the weights in {m.init_from!r} have {weights.num_classes} "
            "classes: set model.num_classes=null"
        )
    if d.val_split is None:
        raise ValueError("an evaluate job scores data.val_split: set it to a split of the data (e.g. data.val_split=val)")
    manifest = load_manifest(data_root, check_files=check_files)
    check_label_set(weights, manifest.num_classes, manifest.class_names, manifest.storage.describe(INFO_NAME))
    check_eval_batches(cfg, manifest)
    return weights, manifest


def evaluation_updates(cfg: JobConfig, weights: WeightsInfo) -> dict[str, dict[str, object]]:
    """What the weights decide in an evaluate job's config, by section: the model (name, classes, kwargs) and,
    unless the config sets them, the resolution and crop they were trained at."""
    d = cfg.data
    data: dict[str, object] = {}
    if "img_size" not in d.model_fields_set and weights.img_size:
        data["img_size"] = int(weights.img_size)
    if "crop_pct" not in d.model_fields_set and weights.crop_pct:
        data["crop_pct"] = float(weights.crop_pct)
    model = {"name": weights.model_name, "num_classes": weights.num_classes, "kwargs": weights.model_kwargs}
    return {"model": model, "data": data}


def check_label_set(weights: WeightsInfo, num_classes: int | None, class_names: tuple[str, ...], where: str) -> None:
    """The data's classes are the weights' classes (count, and names where both record them)."""
    if num_classes is not None and num_classes != weights.num_classes:
        raise ValueError(
            f"{where} has {num_classes} classes but {weights.model_name} in {str(weights.path)!r} was trained "
            f"with {weights.num_classes}: evaluate on shards of the label set the weights were trained on (or "
            "fine-tune them on this data first: jobs/finetune.py)"
        )
    if class_names and weights.class_names and tuple(class_names) != tuple(weights.class_names):
        first = next(
            i for i, (a, b) in enumerate(zip(class_names, weights.class_names, strict=True)) if a != b
        )
        raise ValueError(
            f"{where} names its classes differently from the weights in {str(weights.path)!r}: class {first} is "
            f"{class_names[first]!r} in the data but {weights.class_names[first]!r} in the weights; evaluate on "
            "shards with the same class order"
        )


def split_and_classes(cfg: JobConfig) -> tuple[str, int]:
    """``(data.val_split, model.num_classes)`` of an evaluate job's planned config (the weights decide the
    classes): what the evaluation reads and scores. A ValueError names what is still unset."""
    split, classes = cfg.data.val_split, cfg.model.num_classes
    if split is None or classes is None:
        raise ValueError(
            "an evaluation needs data.val_split and model.num_classes (the job plan takes the classes from "
            f"the weights), got data.val_split={split!r} model.num_classes={classes!r}"
        )
    return split, classes


def check_eval_batches(cfg: JobConfig, manifest: Manifest, workers: int | None = None) -> None:
    """Every rank of ``workers`` (by default the configured count, one while it is ``auto``) gets the same
    number of non-empty batches of ``data.val_split`` (raises naming the fix otherwise)."""
    from metaformer_platform.data import batch_schedule

    split = manifest.split(str(cfg.data.val_split))  # raises, naming the splits there are
    if workers is None:
        workers = cfg.scaling.num_workers if isinstance(cfg.scaling.num_workers, int) else 1
    batch_schedule(split.num_samples, world_size=workers, batch_size=cfg.trainer.batch_size, drop_last=False)
