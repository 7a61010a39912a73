"""What a pipeline run did, member by member and stage by stage: the runner fills it in, the report reads it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from metaformer_platform.config import JobConfig
    from metaformer_platform.tracking.registry import Promotion


@dataclass
class StageOutcome:
    """What happened to one stage: ``skip`` (done before), ``run``, ``resume`` (continued a checkpoint),
    ``failed`` or ``blocked`` (an earlier stage failed); in a dry run, what would happen."""

    member: str
    stage: str
    action: str
    run_name: str | None = None
    run_id: str | None = None
    checkpoint: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    detail: str = ""


@dataclass
class MemberOutcome:
    model: str
    stages: list[StageOutcome] = field(default_factory=list)
    error: str | None = None
    registered: str | None = None  # "NAME vN"
    promotion: Promotion | None = None
    eval_cfg: JobConfig | None = None  # the evaluate stage's config (resolution, classes) for the report
    num_classes: int | None = None
    orphaned: list[StageOutcome] = field(default_factory=list)  # its runs found RUNNING with their driver gone
    data_name: str = ""  # the evaluated data's name and resolution ("imagenet-1k 224px")
    figures: dict[str, float] = field(default_factory=dict)  # top-1, ledger sums, estimates (pipelines.compare)
    previous: dict[str, float] = field(default_factory=dict)  # the same figures of the previous retrain
    regressions: list[str] = field(default_factory=list)  # what got worse beyond the pipeline's `regressions`

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def still_orphaned(self) -> list[StageOutcome]:
        """Its orphaned runs (closed KILLED) that no stage of this pipeline run met again."""
        met = {s.run_name for s in self.stages if s.action != "blocked"}
        return [o for o in self.orphaned if o.run_name not in met]

    @property
    def eval_metrics(self) -> dict[str, float]:
        for stage in reversed(self.stages):
            if "eval/top1" in stage.metrics:
                return stage.metrics
        return {}


@dataclass
class PipelineResult:
    name: str
    members: list[MemberOutcome]
    parent_run_id: str | None = None
    previous_run_id: str | None = None  # the previous retrain's pipeline run (week over week)
    report: str = ""
    dry_run: bool = False

    @property
    def failed(self) -> list[MemberOutcome]:
        return [m for m in self.members if not m.ok]
