"""The pipeline file: a family of models and a chain of stages, validated by pydantic on load.

```yaml
name: poolformer-family
family: poolformer                 # a key of models.FAMILIES, or `members: [poolformer_s12, ...]`
overrides: [run.storage_path=s3://runs/metaformer]     # applied to every stage's config
stages:
  - {name: pretrain, kind: pretrain, config: ../jobs/configs/{model}.yaml}
  - {name: finetune, kind: finetune, config: finetune.yaml, overrides: [trainer.epochs=30]}
  - {name: evaluate, kind: evaluate, config: finetune.yaml}
registry: {name: "{model}", block_on_regression: false}
regressions: {top1_drop: 0.5, time_increase_pct: 20, worker_hours_increase_pct: 20, cost_increase_pct: 20}
```

``regressions``: what counts as a regression against the previous retrain (the last FINISHED run of this
pipeline in its experiment); flagged in the report and the console, and with ``registry.block_on_regression``
the member's new version is not promoted (the reason is its ``metaformer.promotion`` tag).

A stage's input is, unless it names one with ``init_from``, the checkpoint of the nearest earlier training stage
(pretrain or finetune); a pretrain stage starts from random weights. ``{model}`` in a config path, an override
or ``init_from`` is the member's model name.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

STAGE_KINDS = ("pretrain", "finetune", "evaluate")
TRAINING_KINDS = ("pretrain", "finetune")


class PipelineError(ValueError):
    """The pipeline file is wrong as a whole (nothing runs); the message names the key and the fix."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StageSpec(_Section):
    name: str = Field(description="unique name of the stage in the pipeline (part of each run's name)")
    kind: str = Field(description="what the stage does: pretrain, finetune or evaluate")
    config: str | None = Field(None, description="job config file, relative to the pipeline file ({model} allowed)")
    overrides: list[str] = Field(default_factory=list, description="key.path=value overrides of the job config")
    member_overrides: dict[str, list[str]] = Field(
        default_factory=dict, description="extra overrides for one member: {model_name: [key=value, ...]}"
    )
    init_from: str | None = Field(
        None,
        description="weights to start from instead of the previous training stage's checkpoint: a checkpoint "
        "or export folder, or models:/NAME@ALIAS ({model} allowed)",
    )

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, kind: str) -> str:
        if kind not in STAGE_KINDS:
            raise ValueError(f"unknown stage kind {kind!r}; choose one of {', '.join(STAGE_KINDS)}")
        return kind

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        if not name or not all(c.isalnum() or c in "-_" for c in name):
            raise ValueError(f"stage name {name!r} must be non-empty letters, digits, '-' or '_'")
        return name


class RegistrySpec(_Section):
    enabled: bool = Field(True, description="after evaluate: export, register and promote the evaluated weights")
    name: str = Field("{model}", description="registered model name ({model} is the member's name)")
    block_on_regression: bool = Field(
        False, description="a member that regressed against the previous retrain (see `regressions`) is not promoted"
    )


class RegressionSpec(_Section):
    top1_drop: float = Field(0.5, ge=0, description="flag a top-1 that fell by more than this many points")
    time_increase_pct: float = Field(20.0, ge=0, description="flag a time to final top-1 up by more than this %")
    worker_hours_increase_pct: float = Field(20.0, ge=0, description="flag worker-hours up by more than this %")
    cost_increase_pct: float = Field(20.0, ge=0, description="flag a cost up by more than this %")


class PipelineSpec(_Section):
    name: str = Field(description="the pipeline's name (MLflow parent run, part of every run name)")
    family: str | None = Field(None, description="a family of models.FAMILIES (or list `members`)")
    members: list[str] | None = Field(None, description="the models to run (instead of a family)")
    stages: list[StageSpec] = Field(min_length=1, description="the chain, in order")
    overrides: list[str] = Field(default_factory=list, description="overrides applied to every stage's config")
    paper_recipe: bool = Field(
        True, description="set each member's drop_path_rate and crop_pct from the paper before the overrides"
    )
    max_parallel: int | None = Field(None, ge=1, description="members run at once (null: all; Ray queues the rest)")
    experiment: str = Field("metaformer-pipelines", description="MLflow experiment of every run of the pipeline")
    tracking_uri: str | None = Field(None, description="MLflow URI (null: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    registry: RegistrySpec = Field(default_factory=RegistrySpec)
    regressions: RegressionSpec = Field(default_factory=RegressionSpec)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        if not name or not all(c.isalnum() or c in "-_." for c in name):
            raise ValueError(f"pipeline name {name!r} must be non-empty letters, digits, '-', '_' or '.'")
        return name

    @model_validator(mode="after")
    def _consistent(self) -> PipelineSpec:
        from metaformer_platform.models import FAMILIES

        if (self.family is None) == (self.members is None):
            raise ValueError("give exactly one of `family` (a name in models.FAMILIES) or `members` (a list)")
        if self.family is not None and self.family not in FAMILIES:
            raise ValueError(f"unknown family {self.family!r}; families: {', '.join(sorted(FAMILIES))}")
        if self.members is not None and (not self.members or len(set(self.members)) != len(self.members)):
            raise ValueError(f"members must be a non-empty list without repeats, got {self.members}")
        members = self.member_names
        for stage in self.stages:
            unknown = sorted(set(stage.member_overrides) - set(members))
            if unknown:
                raise ValueError(
                    f"stage {stage.name!r}: member_overrides names {', '.join(unknown)}, not members of this "
                    f"pipeline ({', '.join(members)})"
                )
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        for i, stage in enumerate(self.stages):
            has_input = stage.init_from is not None or any(s.kind in TRAINING_KINDS for s in self.stages[:i])
            if stage.kind != "pretrain" and not has_input:
                raise ValueError(
                    f"stage {stage.name!r} ({stage.kind}) has no input: put a pretrain or finetune stage before "
                    "it, or give it init_from (a checkpoint, an export or models:/NAME@ALIAS)"
                )
        return self

    @property
    def member_names(self) -> list[str]:
        from metaformer_platform.models import FAMILIES

        return list(self.members) if self.members is not None else list(FAMILIES[self.family or ""])


def load_pipeline(path: str | os.PathLike[str]) -> tuple[PipelineSpec, Path]:
    """Read and validate a pipeline file; returns the spec and the folder its relative paths start from."""
    file = Path(path)
    if not file.is_file():
        here = Path(__file__).resolve().parents[3] / "pipelines"
        known = sorted(p.name for p in here.glob("*.yaml")) if here.is_dir() else []
        raise PipelineError(f"pipeline file {str(file)!r} does not exist; pipelines in pipelines/: {', '.join(known)}")
    try:
        tree = yaml.safe_load(file.read_text())
    except yaml.YAMLError as err:
        raise PipelineError(f"pipeline file {str(file)!r} is not valid YAML: {err}") from None
    return parse_pipeline(tree, where=str(file)), file.resolve().parent


def parse_pipeline(tree: object, where: str = "pipeline") -> PipelineSpec:
    """Validate a pipeline given as a dict; ``PipelineError`` lists each wrong key with the fix."""
    if not isinstance(tree, dict):
        raise PipelineError(f"{where} must hold a mapping (name, family/members, stages), got {type(tree).__name__}")
    try:
        return PipelineSpec.model_validate(tree)
    except ValidationError as err:
        lines = [f"invalid pipeline {where}:"]
        for problem in err.errors():
            loc = ".".join(str(p) for p in problem["loc"]) or "(top level)"
            msg = problem["msg"].removeprefix("Value error, ")
            lines.append(f"  {loc}: {msg}")
        raise PipelineError("\n".join(lines)) from None
