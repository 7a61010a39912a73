"""Driver-side checks of a job: everything that can fail on bad input runs here, before the MLflow run is opened
and before any Ray worker starts, so a bad job costs no cluster time and writes nothing.

Locations (data, weights, run storage) are judged through the storage core: a missing bucket, a refused key,
an endpoint that does not answer or a folder that is not a checkpoint is a ValueError naming the location and
the fix (the entry points exit 2 on it).
"""

from __future__ import annotations

from pathlib import Path

from metaformer_platform import storage
from metaformer_platform.config import JobConfig
from metaformer_platform.storage import Location
from metaformer_platform.training import hardware


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


def check_data(cfg: JobConfig, data_root: str | Path) -> None:
    """The manifest is valid, has the splits the job uses, and each rank gets at least one batch."""
    from metaformer_platform import data as mdata

    manifest = mdata.load_manifest(data_root)
    if cfg.data.val_split:
        manifest.split(cfg.data.val_split)  # raises, naming the splits there are
    train = manifest.split(cfg.data.train_split)
    # `auto` is resolved once Ray is joined (launch.resolve_scaling); until then judge one worker's share.
    workers = 1 if cfg.scaling.num_workers == "auto" else cfg.scaling.max_workers
    per_rank = train.num_samples // workers
    if per_rank < cfg.trainer.batch_size * cfg.trainer.grad_accum_steps:
        raise ValueError(
            f"the {cfg.data.train_split!r} split of {str(data_root)!r} has {train.num_samples} samples, "
            f"{per_rank} per worker: fewer than one step of trainer.batch_size={cfg.trainer.batch_size} x "
            f"grad_accum_steps={cfg.trainer.grad_accum_steps}; lower the batch size or scaling.num_workers"
        )
    if cfg.model.num_classes is None and manifest.num_classes is None:
        raise ValueError(f"{str(data_root)!r}/_info.json does not say num_classes: set model.num_classes")
    if cfg.model.num_classes is not None and manifest.num_classes and cfg.model.num_classes < manifest.num_classes:
        raise ValueError(
            f"model.num_classes={cfg.model.num_classes} but the data has {manifest.num_classes} classes; "
            "set model.num_classes=null to take it from the data"
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


def check_init_from(cfg: JobConfig, folder: Path | None = None) -> None:
    """``model.init_from`` (resolved to ``folder``) is an export or a complete checkpoint of the same model
    (read cheaply, on the driver); a fine-tune needs one."""
    if cfg.model.init_from is None:
        if cfg.stage == "finetune":
            raise ValueError(
                "a finetune job starts from trained weights: set model.init_from to a checkpoint folder, an "
                "export folder or a registered model (models:/NAME@ALIAS)"
            )
        return
    from metaformer_platform.storage.weights import read_weights_info

    name = read_weights_info(folder or cfg.model.init_from).model_name
    if name != cfg.model.name:
        raise ValueError(
            f"model.init_from={cfg.model.init_from!r} holds {name}, but this job trains {cfg.model.name}: "
            f"set model.name={name} or choose weights of {cfg.model.name}"
        )


def check_resume_from(cfg: JobConfig) -> Path | str | None:
    """``run.resume_from`` as a local folder (or its s3:// URI: each worker reads it there), refused unless it is
    a complete checkpoint of this model (judged where the files are, by the marker's file list)."""
    if cfg.run.resume_from is None:
        return None
    from metaformer_platform.storage.checkpoint_format import TRAINER_FILE, incomplete_reason, load_tensors
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
        state = load_tensors(folder / TRAINER_FILE)
    if state["model_name"] != cfg.model.name:
        raise ValueError(
            f"{where} holds {state['model_name']}, but this job trains "
            f"{cfg.model.name}: set model.name={state['model_name']} or choose another checkpoint"
        )
    return loc.uri if loc.remote else loc.path


def resolve_storage_path(storage_path: str) -> str:
    """An absolute local path (created) or an s3:// URI, checked writable (a probe file, removed again)."""
    return storage.check_writable(storage_path, what="run.storage_path").uri


def check_cluster(cfg: JobConfig) -> None:
    """The cluster has room for the worker group (Ray would otherwise wait for it forever); an elastic job's
    for its smallest size."""
    import ray

    resources = ray.cluster_resources()
    s = cfg.scaling
    layout = hardware.Layout.of(s)  # resolved by launch.resolve_scaling
    workers = s.min_workers  # an elastic job starts once its minimum fits
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


def with_default_threads(cfg: JobConfig) -> JobConfig:
    """``trainer.torch_threads`` unset means one torch thread per CPU the worker is given (not all of the node's)."""
    if cfg.trainer.torch_threads is not None:
        return cfg
    threads = max(1, int(hardware.resolved(cfg.scaling.cpus_per_worker, "scaling.cpus_per_worker")))
    return cfg.model_copy(update={"trainer": cfg.trainer.model_copy(update={"torch_threads": threads})})
