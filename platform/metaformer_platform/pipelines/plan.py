"""From a pipeline spec to a plan: one job config per member and stage, each with a key naming what it computes.

Two steps, so that a plan can be shown without touching anything:

- ``expand`` (static): each member's stage configs, loaded and validated like a job's; a member whose configs
  are wrong (unknown model, bad key, a stage that names another architecture) carries the error, the others
  are untouched.
- ``resolve`` (reads the data manifests and the registry): every stage's data hash, input checks (a missing
  checkpoint, weights of another architecture, a ``models:/`` URI naming nothing), and its key:
  sha256 of (the config minus what does not change the result, the data manifest's hash, the input's key).
  A stage's run is named ``<pipeline>-<member>-<stage>-<key[:8]>``: the same config and data reuse the same Ray
  run (resuming its checkpoint) and the same MLflow run; anything else makes a new one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metaformer_platform.config import JobConfig, load_config
from metaformer_platform.pipelines.spec import TRAINING_KINDS, PipelineSpec, StageSpec

# Parts of a job config that name or place a run without changing what it computes. init_from is replaced in
# the key by the input's own key (its path is only known once the upstream stage has run).
_VOLATILE = {"tracking": None, "run": ("name", "ray_address"), "model": ("init_from",)}


@dataclass
class StagePlan:
    """One stage of one member."""

    member: str
    spec: StageSpec
    cfg: JobConfig
    upstream: str | None  # the stage whose checkpoint this one starts from (None: init_from or random)
    init_from: str | None  # an explicit input ({model} filled in)
    data_hash: str | None = None  # manifest_hash: the whole data set's, part of the key
    num_classes: int | None = None  # the head's size: model.num_classes, else the data's
    samples: int | None = None  # of the split the stage reads (training: train_split; evaluate: val_split)
    data_name: str | None = None  # the manifest's name (e.g. imagenet-1k): what the report compares with
    input_id: str | None = None  # what the key records about the input (upstream key, URI@version, path)
    key: str | None = None
    run_name: str | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def trains(self) -> bool:
        return self.kind in TRAINING_KINDS

    @property
    def run_dir(self) -> str:
        from metaformer_platform.storage import Location

        return Location.parse(self.cfg.run.storage_path).join(str(self.run_name)).uri


@dataclass
class MemberPlan:
    """A family member's chain; ``error`` (set before anything runs) keeps the whole chain from running."""

    model: str
    stages: list[StagePlan] = field(default_factory=list)
    error: str | None = None

    def stage(self, name: str) -> StagePlan:
        return next(s for s in self.stages if s.name == name)


def _fill(text: str, member: str) -> str:
    return text.replace("{model}", member)


def stable_config(cfg: JobConfig) -> dict[str, Any]:
    """The config as it bears on the result (``_VOLATILE`` removed), for hashing."""
    tree = cfg.model_dump(mode="json")
    for section, keys in _VOLATILE.items():
        if keys is None:
            tree.pop(section, None)
        else:
            for key in keys:
                tree.get(section, {}).pop(key, None)
    return tree


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def stage_overrides(spec: PipelineSpec, stage: StageSpec, member: str, extra: list[str]) -> list[str]:
    """The overrides of one stage's config, lowest precedence first (the command line's last)."""
    from metaformer_platform.models import paper_recipe

    items = [f"stage={stage.kind}", f"model.name={member}"]
    if spec.paper_recipe:
        try:
            recipe = paper_recipe(member)
        except ValueError:
            recipe = {}  # a model without a recorded recipe keeps its config's values
        items += [f"model.drop_path_rate={recipe['drop_path_rate']}", f"data.crop_pct={recipe['crop_pct']}"] if recipe else []
    items += spec.overrides + stage.overrides + stage.member_overrides.get(member, []) + list(extra)
    return [_fill(item, member) for item in items]


def expand(spec: PipelineSpec, base_dir: Path, extra_overrides: list[str] | None = None) -> list[MemberPlan]:
    """Every member's stage configs (no data, Ray or MLflow touched); a member's errors stay with it."""
    from metaformer_platform.models import check_model_name

    plans = []
    for member in spec.member_names:
        plan = MemberPlan(member)
        plans.append(plan)
        try:
            check_model_name(member)
        except ValueError as err:
            plan.error = f"member {member!r}: {err}"
            continue
        upstream: str | None = None
        for stage in spec.stages:
            config = _fill(stage.config, member) if stage.config else None
            path = None if config is None else (base_dir / config)
            try:
                cfg = load_config(path, stage_overrides(spec, stage, member, list(extra_overrides or [])))
            except ValueError as err:
                plan.error = f"stage {stage.name!r}: {err}"
                break
            if cfg.model.name != member:
                plan.error = (
                    f"stage {stage.name!r} sets model.name={cfg.model.name}, but the member is {member}: every stage "
                    f"of a member runs the member's architecture; remove the model.name override"
                )
                break
            cfg.tracking.enabled = True
            cfg.tracking.experiment = spec.experiment
            if spec.tracking_uri:
                cfg.tracking.tracking_uri = spec.tracking_uri
            explicit = _fill(stage.init_from, member) if stage.init_from else None
            if explicit is None and cfg.model.init_from:
                explicit = cfg.model.init_from  # set by the stage's config file
            plan.stages.append(StagePlan(member, stage, cfg, None if explicit else upstream, explicit))
            if stage.kind in TRAINING_KINDS:
                upstream = stage.name
    return plans


def manifest_hash(cfg: JobConfig) -> tuple[str, int | None, int, str]:
    """sha256 of the data's whole ``_info.json`` (which lists every split's shards and their sha256), the data
    set's identity in the stage's key, with its number of classes, the samples of the split the stage reads and
    the data set's name. Not the evaluation report's ``split_hash`` (one split under its labels)."""
    from metaformer_platform.data import load_manifest
    from metaformer_platform.data.manifest import sha256_of
    from metaformer_platform.launch import checks

    root = checks.resolve_data_root(cfg)
    manifest = load_manifest(root)
    if cfg.stage == "evaluate":
        if cfg.data.val_split is None:
            raise ValueError("an evaluate stage scores data.val_split: set it (e.g. data.val_split=val)")
        samples = manifest.split(cfg.data.val_split).num_samples  # evaluate reads only this split
    else:  # splits, num_classes, batch per rank: refused now rather than on the cluster (`auto`: one worker)
        checks.check_data(cfg, manifest, root)
        workers = cfg.scaling.num_workers
        checks.check_rank_batches(cfg, manifest, root, 1 if workers == "auto" else cfg.scaling.max_workers)
        samples = manifest.split(cfg.data.train_split).num_samples
    # the manifest's own file: two subsets given as `.../a.json` and `.../b.json` in one folder are two data sets
    return sha256_of(manifest.storage, manifest.info_name), manifest.num_classes, samples, manifest.name


def check_input(stage: StagePlan, tracking_uri: str | None) -> str:
    """Check an explicit input and return its identity for the key; ``ValueError`` names what is wrong."""
    from metaformer_platform.tracking import registry

    source = str(stage.init_from)
    where = f"stage {stage.name!r}: init_from={source!r}"
    if registry.is_registry_uri(source):
        mv = registry.get_model_version(source, tracking_uri=tracking_uri)  # ValueError listing what there is
        arch = mv.tags.get(registry.TAG_ARCHITECTURE)
        if arch and arch != stage.member:
            raise ValueError(
                f"{where} is v{mv.version} of a {arch}, but this member is {stage.member}: choose weights of "
                f"{stage.member}"
            )
        return f"{mv.name}/v{mv.version}:{mv.tags.get(registry.TAG_WEIGHTS_SHA256, '')}"
    from metaformer_platform import storage
    from metaformer_platform.launch.checks import check_weights_model

    loc = storage.check_access(source, what=where)
    if not storage.exists(loc):
        raise ValueError(f"{where}: the input checkpoint does not exist; run the stage that writes it, or fix the path")
    try:
        folder = storage.weights.resolve(loc.uri)  # a remote checkpoint is fetched once, into the weights cache
        check_weights_model(loc.uri, folder, stage.cfg.model.name)  # an export or complete checkpoint, of this architecture
    except ValueError as err:
        raise ValueError(f"stage {stage.name!r}: {err}") from None
    return loc.uri


def check_run_storage(storage_path: str) -> None:
    """``run.storage_path`` is reachable (an s3:// bucket that exists, with accepted keys): a ValueError naming
    it and the fix otherwise. Nothing is written (the job itself probes writing before its workers start)."""
    from metaformer_platform import storage

    storage.check_access(storage_path, what=f"run.storage_path={storage_path!r}")


def resolve(spec: PipelineSpec, plans: list[MemberPlan], tracking_uri: str | None = None) -> None:
    """Fill in data hashes, input identities, keys and run names; a member that fails gets its ``error``."""
    for plan in plans:
        if plan.error:
            continue
        keys: dict[str, str] = {}
        for stage in plan.stages:
            try:
                stage.data_hash, classes, stage.samples, stage.data_name = manifest_hash(stage.cfg)  # its own checks
                check_run_storage(stage.cfg.run.storage_path)
                stage.num_classes = stage.cfg.model.num_classes or classes
                if stage.upstream is not None:
                    stage.input_id = f"stage:{keys[stage.upstream]}"
                elif stage.init_from is not None:
                    stage.input_id = check_input(stage, tracking_uri)
                else:
                    stage.input_id = "random-init"
            except ValueError as err:
                message = str(err)
                plan.error = message if message.startswith("stage ") else f"stage {stage.name!r}: {message}"
                break
            stage.key = digest({"config": stable_config(stage.cfg), "data": stage.data_hash, "input": stage.input_id})
            keys[stage.name] = stage.key
            stage.run_name = f"{spec.name}-{plan.model}-{stage.name}-{stage.key[:8]}"
            stage.cfg.run.name = stage.run_name


def pipeline_key(spec: PipelineSpec, plans: list[MemberPlan]) -> str:
    """Identity of one pipeline run: its name and every stage key (or member error)."""
    return digest({
        "name": spec.name,
        "members": {p.model: p.error or [s.key for s in p.stages] for p in plans},
    })


def describe_estimates(plans: list[MemberPlan], actions: dict[tuple[str, str], str], tracking_uri: str | None) -> str:
    """Per member and stage that would run (``actions``: (member, stage) -> skip/run/resume), the expected wall
    time, worker-hours and cost at the stage's layout (``launch.estimate``: earlier runs in MLflow, else the
    capacity model), and the totals. A resumed stage is estimated whole (an upper bound)."""
    from metaformer_platform.launch.estimate import config_estimate
    from metaformer_platform.launch.plan import machine_layout

    lines, wall, hours, cost, currency = ["estimates at the planned layouts:"], 0.0, 0.0, 0.0, ""
    priced = True
    for plan in plans:
        if plan.error:
            continue
        lines.append(f"  {plan.model}")
        for stage in plan.stages:
            if actions.get((plan.model, stage.name), "run") == "skip" or stage.samples is None:
                continue
            layout = machine_layout(stage.cfg)
            est = config_estimate(stage.cfg, layout, stage.samples, stage.num_classes, tracking_uri)
            auto = " (auto: this machine's)" if stage.cfg.scaling.num_workers == "auto" else ""
            lines.append(f"    {stage.name:<10} {layout.num_workers} worker(s){auto}: {est.line()}")
            wall, hours, currency = wall + est.wall_s, hours + est.worker_hours, est.currency
            priced = priced and est.cost is not None
            cost += est.cost or 0.0
    if len(lines) == 1:
        return "estimates: nothing would run"
    total = f"{cost:,.2f} {currency}" if priced else "no price (set cost.accelerator_hour / cost.cpu_hour)"
    lines.append(f"  total: {wall / 3600:,.2f} h of stage wall time, {hours:,.2f} worker-hours, {total}")
    return "\n".join(lines)
