"""Run a planned pipeline: one thread per member drives its chain of Ray Train jobs; MLflow records everything.

- One MLflow parent run per pipeline run (found again by the pipeline's key: the same members, configs and data
  continue the same parent run); each stage's run points at it (``metaformer.pipeline_run_id``, not nested: the
  runs table would fold the members away, see ``compare``) and is tagged with the stage key, config hash, data manifest hash, its input checkpoint and, once done, its output checkpoint.
- A stage whose key has a FINISHED run with its output recorded is skipped (its checkpoint and metrics are
  reused). Any other stage runs under its key-derived ``run.name``: Ray Train resumes that run's latest
  checkpoint and RunHandle continues its MLflow run, so an interrupted stage continues, and nothing is duplicated.
- After an evaluate stage, the weights it evaluated are exported, registered (idempotent per run+checkpoint) and
  promoted by the registry's gate with the evaluated top-1 and the evaluation data's hash.
- Members run at once (``max_parallel``); Ray queues worker groups the cluster cannot hold yet. A member that
  fails stops only its own chain.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import PurePosixPath
from typing import TYPE_CHECKING

from metaformer_platform.pipelines import compare
from metaformer_platform.pipelines.outcome import MemberOutcome, PipelineResult, StageOutcome
from metaformer_platform.pipelines.plan import MemberPlan, StagePlan, digest, pipeline_key, stable_config
from metaformer_platform.pipelines.spec import PipelineSpec
from metaformer_platform.storage.redact import redact, redact_tree

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

    from metaformer_platform.launch.driver import JobResult
    from metaformer_platform.launch.stop import JobStopped

log = logging.getLogger(__name__)

TAG_PIPELINE = "metaformer.pipeline"
TAG_PIPELINE_KEY = "metaformer.pipeline_key"
TAG_MEMBER = "metaformer.member"
TAG_PIPELINE_STAGE = "metaformer.pipeline_stage"
TAG_STAGE_KEY = "metaformer.stage_key"
TAG_CONFIG_HASH = "metaformer.config_hash"
TAG_DATA_HASH = "metaformer.data_manifest_hash"
TAG_INPUT = "metaformer.input_checkpoint"
TAG_OUTPUT = "metaformer.output_checkpoint"
TAG_FAILED = "metaformer.failed_members"
EVAL_METRICS = ("eval/top1", "eval/top5", "eval/loss", "eval/samples", "eval/images_per_s")


# -- MLflow lookups --------------------------------------------------------------------------------


def _complete_checkpoint(path: str | None) -> bool:
    """The stage's recorded output is still a complete checkpoint where it was written (local or s3://)."""
    from metaformer_platform.storage.checkpoint_format import is_complete

    return bool(path) and is_complete(str(path))


def _name(location: str | None) -> str:
    from metaformer_platform.storage import Location

    return Location.parse(location).name if location else ""


def find_completed(client: MlflowClient, experiment_id: str | None, stage: StagePlan) -> Run | None:
    """The FINISHED run of this stage key whose output is still there (checkpoint, or eval metrics), or None."""
    if experiment_id is None or stage.key is None:
        return None
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{TAG_STAGE_KEY}` = '{stage.key}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=10,
    )
    for run in runs:
        if stage.trains and _complete_checkpoint(run.data.tags.get(TAG_OUTPUT)):
            return run
        if not stage.trains and "eval/top1" in run.data.metrics:
            return run
    return None


def previous_retrain(client: MlflowClient, experiment_id: str, pipeline: str, current: str) -> Run | None:
    """The last FINISHED run of the pipeline ``pipeline`` in the experiment, other than ``current``."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{TAG_PIPELINE}` = '{pipeline}' and tags.`{TAG_PIPELINE_KEY}` != '' "
        "and attributes.status = 'FINISHED'",
        order_by=["attributes.end_time DESC"], max_results=5,
    )
    return next((r for r in runs if r.info.run_id != current), None)


def resumable_checkpoint(run_dir: str) -> str | None:
    """The checkpoint Ray Train resumes a stage's run from when started again under its name, or None.

    Ray resumes from the checkpoints its controller registered: its own ``Result.from_path`` reads them from the
    run folder (local or s3://, through the storage core's filesystem); the latest one counts when complete.
    """
    from metaformer_platform import storage
    from metaformer_platform.storage.checkpoint_format import is_complete

    loc = storage.Location.parse(run_dir)
    if not storage.exists(loc):
        return None
    import ray.train

    try:
        result = ray.train.Result.from_path(loc.fs_path, storage_filesystem=loc.filesystem())
    except RuntimeError:  # a run folder without Ray's snapshot (no checkpoint was ever registered)
        return None
    if result.checkpoint is None:
        return None
    latest = loc.join(PurePosixPath(result.checkpoint.path).name)
    return latest.uri if is_complete(latest) else None


# -- the runner ------------------------------------------------------------------------------------


class PipelineRunner:
    """Drives the members of a resolved plan (see ``plan.resolve``) and records the outcome in MLflow."""

    def __init__(self, spec: PipelineSpec, plans: list[MemberPlan], tracking_uri: str, out: Callable[[str], None] = print):
        import mlflow

        self.spec, self.plans, self.tracking_uri = spec, plans, tracking_uri
        self.out = out
        self.client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        self.key = pipeline_key(spec, plans)
        self._print_lock = threading.Lock()
        self.stopped: JobStopped | None = None  # a member's stage stopped by SIGTERM/SIGINT (launch/stop.py)
        self.previous: Run | None = None  # the previous retrain's pipeline run (week over week)

    def say(self, text: str) -> None:
        with self._print_lock:
            self.out(redact(text))

    # -- planning view ---------------------------------------------------------------------------------

    def preview(self, experiment_id: str | None) -> list[MemberOutcome]:
        """What a run would do for each stage, from MLflow and the run folders (nothing is written)."""
        outcomes = []
        for plan in self.plans:
            member = MemberOutcome(plan.model, error=plan.error)
            outcomes.append(member)
            if plan.error:
                continue
            for stage in plan.stages:
                done = find_completed(self.client, experiment_id, stage)
                if done is not None:
                    action, detail = "skip", f"done: MLflow run {done.info.run_id}"
                elif resumable_checkpoint(stage.run_dir):
                    action, detail = "resume", f"from {_name(resumable_checkpoint(stage.run_dir))}"
                else:
                    action, detail = "run", ""
                member.stages.append(StageOutcome(plan.model, stage.name, action, stage.run_name, detail=detail))
        return outcomes

    def describe(self, outcomes: list[MemberOutcome]) -> str:
        chain = " -> ".join(f"{s.name} ({s.kind})" for s in self.spec.stages)
        lines = [
            f"pipeline {self.spec.name}: {len(self.plans)} members, stages {chain}",
            f"MLflow: experiment {self.spec.experiment!r} at {redact(self.tracking_uri)}; pipeline key {self.key[:12]}",
        ]
        for plan, member in zip(self.plans, outcomes, strict=True):
            lines.append(f"  {plan.model}")
            if member.error:
                lines.append(f"    ERROR  {member.error}")
                continue
            for stage, outcome in zip(plan.stages, member.stages, strict=True):
                source = stage.upstream and f"<- {stage.upstream}" or (stage.init_from and f"<- {stage.init_from}") or ""
                lines.append(
                    f"    {stage.name:<10} {outcome.action:<7} {stage.run_name}  {source}"
                    + (f"  ({outcome.detail})" if outcome.detail else "")
                )
            if self.spec.registry.enabled and any(s.kind == "evaluate" and s.upstream for s in plan.stages):
                lines.append(f"    {'register':<10} {self._registered_name(plan.model)} (champion if top-1 >= champion's)")
        return redact("\n".join(lines))

    def _registered_name(self, member: str) -> str:
        return self.spec.registry.name.replace("{model}", member)

    # -- running ---------------------------------------------------------------------------------------

    def run(self) -> PipelineResult:
        from metaformer_platform.launch.driver import connect_ray
        from metaformer_platform.tracking.runs import training_experiment

        # MLflow prints "View run"/"View experiment" links when a run ends; they open the GenAI view. The
        # pipeline prints its own, to the training view (``parent_link``).
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
        experiment_id = training_experiment(self.client, self.spec.experiment, create=True)
        assert experiment_id is not None  # create=True makes it
        parent = self._open_parent(experiment_id)
        self._share_family_view(experiment_id)
        self.previous = previous_retrain(self.client, experiment_id, self.spec.name, parent)
        runnable = [p for p in self.plans if not p.error]
        if runnable:
            connect_ray(runnable[0].stages[0].cfg)  # once, here: ray.init from several threads would race
        outcomes = {p.model: MemberOutcome(p.model, error=p.error and redact(p.error)) for p in self.plans}
        self._close_orphans(experiment_id, outcomes)
        for plan in self.plans:
            if plan.error:
                self.say(f"[{plan.model}] not run: {plan.error}")
        from metaformer_platform.launch.stop import STOPS

        with STOPS.handling():  # a signal stops every running stage at a checkpoint; none starts after it
            self._run_members(runnable, outcomes, experiment_id, parent)
        if self.stopped is not None:
            self._close_stopped(parent, self.stopped)
        result = PipelineResult(self.spec.name, [outcomes[p.model] for p in self.plans], parent,
                                self.previous.info.run_id if self.previous is not None else None)
        self._summarise(result)
        failed = result.failed
        if failed:
            self.client.set_tag(parent, TAG_FAILED, ", ".join(m.model for m in failed))
        self.client.set_terminated(parent, status="FAILED" if failed else "FINISHED")
        return result

    def _summarise(self, result: PipelineResult) -> None:
        """Each member's figures against the previous retrain, on the parent run, and the family report."""
        from metaformer_platform.pipelines import report

        for member in result.members:
            if not member.figures and member.stages:
                self._compare(member)
        compare.log_summary(self.client, str(result.parent_run_id), result.members)
        result.report = report.family_report(self.client, result)
        self.say(f"pipeline run {result.parent_run_id}: {self.parent_link(result.parent_run_id)}")
        from metaformer_platform.tracking import ui

        experiment = self.client.get_run(str(result.parent_run_id)).info.experiment_id
        self.say(f"the family side by side: {ui.link(self.tracking_uri, experiment, view=self.view_key)}")

    @property
    def view_key(self) -> str:
        """The pipeline's shared view in the MLflow UI: its name (letters, digits, '-', '_', '.': URL-safe)."""
        return self.spec.name

    def _share_family_view(self, experiment_id: str) -> None:
        """The experiment's runs table as the family is compared: member, stage and data beside the comparison
        metrics, every stage run in the charts (MLflow's shared view; the link printed at the end opens it)."""
        from metaformer_platform.tracking import ui

        ui.share_view(self.client, experiment_id, self.view_key, metrics=compare.COLUMNS,
                      tags=(TAG_MEMBER, TAG_PIPELINE_STAGE, compare.TAG_DATA))

    def parent_link(self, run_id: str | None) -> str:
        """Where the UI shows a run: its page in the experiment's training view (not the GenAI traces view)."""
        from metaformer_platform.tracking import ui

        return ui.link(self.tracking_uri, self.client.get_run(str(run_id)).info.experiment_id, run_id)

    def _compare(self, member: MemberOutcome) -> None:
        """The member's figures, the previous retrain's, and what regressed beyond the pipeline's limits."""
        member.figures = compare.member_figures(self.client, member.stages)
        member.previous = compare.previous_figures(self.previous, member.model)
        member.regressions = compare.regressions(member.figures, member.previous, self.spec.regressions)
        if member.regressions:
            self.say(f"[{member.model}] REGRESSION against the previous retrain: {'; '.join(member.regressions)}")

    def _run_members(
        self, runnable: list[MemberPlan], outcomes: dict[str, MemberOutcome], experiment_id: str, parent: str
    ) -> None:
        """Each member's chain in its own thread, ``max_parallel`` at once; each records its own outcome."""
        workers = min(len(runnable), self.spec.max_parallel or len(runnable)) or 1
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="member") as pool:
            futures = [pool.submit(self._run_member, p, outcomes[p.model], experiment_id, parent) for p in runnable]
            for future in futures:
                future.result()  # _run_member records its own failures

    def _open_parent(self, experiment_id: str) -> str:
        from metaformer_platform.tracking.runs import source_tags

        found = self.client.search_runs(
            [experiment_id], filter_string=f"tags.`{TAG_PIPELINE_KEY}` = '{self.key}'", max_results=1,
            order_by=["attributes.start_time DESC"],
        )
        if found:
            run_id = found[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
            self.say(f"continuing pipeline run {run_id} (same members, configs and data)")
            return run_id
        run = self.client.create_run(experiment_id, run_name=self.spec.name, tags={
            TAG_PIPELINE: self.spec.name,
            TAG_PIPELINE_KEY: self.key,
            **source_tags(),
            "metaformer.members": ", ".join(p.model for p in self.plans),
            "metaformer.stages": " -> ".join(s.name for s in self.spec.stages),
        })
        self.client.log_text(run.info.run_id, json.dumps(redact_tree(self.spec.model_dump(mode="json")), indent=2), "pipeline.json")
        return run.info.run_id

    def _close_orphans(self, experiment_id: str, outcomes: dict[str, MemberOutcome]) -> None:
        """The members' stage runs left RUNNING by a driver that is gone (the lease of the run folder shows it: a
        pipeline or job SIGKILLed, a lost node): closed KILLED (``tracking.runs.close_orphan``) and noted on the
        member for the report. A stage that runs again continues its run (RunHandle), as after any stop."""
        from metaformer_platform.storage import Location
        from metaformer_platform.tracking.runs import RUN_NAME_TAG, close_orphan
        from metaformer_platform.training.ownership import lost_driver

        for plan in (p for p in self.plans if p.stages):
            running = self.client.search_runs([experiment_id], filter_string=(
                f"tags.`{TAG_PIPELINE}` = '{self.spec.name}' and tags.`{TAG_MEMBER}` = '{plan.stages[0].member}' "
                "and attributes.status = 'RUNNING'"))
            for run in running:
                name, stage_name = run.data.tags.get(RUN_NAME_TAG), run.data.tags.get(TAG_PIPELINE_STAGE, "")
                stage = next((s for s in plan.stages if s.name == stage_name), plan.stages[0])
                lost = lost_driver(Location.parse(stage.cfg.run.storage_path).join(name).uri) if name else None
                if lost is None:  # alive, or no lease to tell: left alone
                    continue
                step = close_orphan(self.client, run, lost.why, lost.last_seen)
                detail = f"driver lost ({lost.why}); MLflow run closed KILLED at step {step if step is not None else 'none'}"
                outcomes[plan.model].orphaned.append(
                    StageOutcome(plan.model, stage_name, "orphaned", name, run.info.run_id, detail=detail))
                self.say(f"[{plan.model}] {stage_name}: {name}: {detail}")

    def _close_stopped(self, parent: str, stopped: JobStopped) -> None:
        """The parent run, like its stopped stages: KILLED with the signal's tag; re-running continues them."""
        from metaformer_platform.tracking.runs import STOPPED_TAG

        self.client.set_tag(parent, STOPPED_TAG, stopped.reason)
        self.client.set_terminated(parent, status="KILLED")
        raise stopped

    def _run_member(self, plan: MemberPlan, member: MemberOutcome, experiment_id: str, parent: str) -> None:
        from metaformer_platform.launch.stop import STOPS, JobStopped

        outputs: dict[str, StageOutcome] = {}
        for i, stage in enumerate(plan.stages):
            if STOPS.reason is not None:  # stopping: no stage starts
                return
            try:
                outcome = self._run_stage(plan, stage, outputs, experiment_id, parent)
            except JobStopped as stopped:  # at a checkpoint: the same command continues it
                self.stopped = stopped
                self.say(f"[{plan.model}] {stage.name}: {stopped.describe()}")
                return
            except Exception as err:  # recorded, reported, and the exit status says so: the other members go on
                log.exception("%s: stage %s failed", plan.model, stage.name)
                # the error goes to the console, the report and an MLflow artifact: scrubbed once, here
                self._stop_chain(plan, member, i, redact(f"stage {stage.name!r} failed: {type(err).__name__}: {err}"))
                return
            outputs[stage.name] = outcome
            member.stages.append(outcome)
            self.say(f"[{plan.model}] {stage.name}: {outcome.action} {outcome.run_name} {outcome.detail}".rstrip())
            if stage.kind == "evaluate" and not self._after_evaluation(plan, stage, outputs, member):
                return

    def _stop_chain(self, plan: MemberPlan, member: MemberOutcome, failed: int, error: str) -> None:
        """Stage ``failed`` failed with ``error``: the member's later stages are blocked."""
        stage = plan.stages[failed]
        member.error = error
        member.stages.append(StageOutcome(plan.model, stage.name, "failed", stage.run_name, detail=error))
        member.stages += [
            StageOutcome(plan.model, s.name, "blocked", s.run_name, detail=f"after {stage.name} failed")
            for s in plan.stages[failed + 1 :]
        ]
        self.say(f"[{plan.model}] {error}")

    def _after_evaluation(
        self, plan: MemberPlan, stage: StagePlan, outputs: dict[str, StageOutcome], member: MemberOutcome
    ) -> bool:
        """Keep what the report needs, compare with the previous retrain and register the evaluated weights;
        False when registering failed."""
        member.eval_cfg, member.num_classes = stage.cfg, stage.num_classes
        member.data_name = f"{stage.data_name or 'unnamed'} {stage.cfg.data.img_size}px"
        self._compare(member)
        if not self.spec.registry.enabled or stage.upstream is None:
            return True
        try:
            self._register(plan, stage, outputs, member)
        except Exception as err:  # as for a stage: this member fails, the others go on
            log.exception("%s: registering failed", plan.model)
            member.error = redact(f"registering {self._registered_name(plan.model)} failed: {type(err).__name__}: {err}")
            self.say(f"[{plan.model}] {member.error}")
            return False
        return True

    def _stage_tags(self, stage: StagePlan, parent: str) -> dict[str, str]:
        return {
            compare.TAG_PIPELINE_RUN: parent,
            TAG_PIPELINE: self.spec.name,
            TAG_MEMBER: stage.member,
            TAG_PIPELINE_STAGE: stage.name,
            TAG_STAGE_KEY: str(stage.key),
            TAG_CONFIG_HASH: digest(stable_config(stage.cfg)),
            TAG_DATA_HASH: str(stage.data_hash),
            TAG_INPUT: str(stage.cfg.model.init_from or "random-init"),
        }

    def _run_stage(
        self, plan: MemberPlan, stage: StagePlan, outputs: dict[str, StageOutcome], experiment_id: str, parent: str
    ) -> StageOutcome:
        # A models:/ URI is passed on as it is: the job resolves it (on every node) and records it as the input.
        stage.cfg.model.init_from = outputs[stage.upstream].checkpoint if stage.upstream is not None else stage.init_from

        done = find_completed(self.client, experiment_id, stage)
        if done is not None:
            return StageOutcome(
                plan.model, stage.name, "skip", stage.run_name, done.info.run_id, done.data.tags.get(TAG_OUTPUT),
                dict(done.data.metrics), detail="(done before: same config, data and input)",
            )
        return self._launch_stage(plan, stage, parent)

    def _launch_stage(self, plan: MemberPlan, stage: StagePlan, parent: str) -> StageOutcome:
        """Run the stage's job (resuming its latest checkpoint, if any) and record its output on its run."""
        from metaformer_platform.launch.driver import run_job

        previous = resumable_checkpoint(stage.run_dir)
        action = "resume" if previous else "run"
        stage.cfg.tracking.tags = {**stage.cfg.tracking.tags, **self._stage_tags(stage, parent)}
        self.say(f"[{plan.model}] {stage.name}: starting {stage.run_name}"
                 + (f" (continues {_name(previous)})" if previous else ""))
        from metaformer_platform.tracking.console import LINE_PREFIX

        LINE_PREFIX.set(f"[{plan.model}/{stage.name}] ")  # this member's thread: its job's progress lines
        try:
            result = run_job(stage.cfg)
        finally:
            LINE_PREFIX.set("")
        run_id = result.mlflow_run_id
        assert run_id is not None  # plan.resolve turns tracking on for every stage
        metrics = dict(result.metrics)
        if stage.trains:
            if not result.checkpoint_path:
                raise RuntimeError(f"{stage.run_name} finished without a checkpoint; set trainer.checkpoint_every_steps")
            self.client.set_tag(run_id, TAG_OUTPUT, result.checkpoint_path)
        else:
            self._record_evaluation(run_id, stage, result)
            metrics = {**metrics, **{k: v for k, v in self.client.get_run(run_id).data.metrics.items() if k not in metrics}}
        compare.log_stage_figures(self.client, run_id, stage)
        detail = f"(continued from {_name(previous)})" if previous else ""
        return StageOutcome(plan.model, stage.name, action, stage.run_name, run_id, result.checkpoint_path, metrics, detail)

    def _record_evaluation(self, run_id: str, stage: StagePlan, result: JobResult) -> None:
        """The evaluation's metrics, data hash and report on its run, so a later skip finds them there."""
        from mlflow.entities import Metric

        from metaformer_platform.tracking.registry import TAG_EVAL_DATA_HASH

        logged = self.client.get_run(run_id).data.metrics
        missing = [
            Metric(k, float(result.metrics[k]), 0, 0) for k in EVAL_METRICS if k in result.metrics and k not in logged
        ]
        if missing:
            self.client.log_batch(run_id, metrics=missing)
        if "eval/top1" not in result.metrics and "eval/top1" not in logged:
            raise RuntimeError(f"the evaluate stage {stage.run_name} reported no eval/top1")
        report_ = result.report or {}
        self.client.set_tag(run_id, TAG_EVAL_DATA_HASH, str(report_.get("data_hash") or stage.data_hash))
        if report_:
            self.client.log_dict(run_id, report_, "pipeline/eval_report.json")

    def _register(self, plan: MemberPlan, stage: StagePlan, outputs: dict[str, StageOutcome], member: MemberOutcome) -> None:
        from metaformer_platform.tracking import registry
        from metaformer_platform.training.export import export_checkpoint

        trained = plan.stage(str(stage.upstream))
        source = outputs[trained.name]
        evaluated = outputs[stage.name]
        eval_hash = self.client.get_run(str(evaluated.run_id)).data.tags.get(registry.TAG_EVAL_DATA_HASH) or str(stage.data_hash)
        name = self._registered_name(plan.model)
        tags = registry.lineage_tags(
            str(source.checkpoint), str(trained.data_hash),
            **{TAG_PIPELINE: self.spec.name, TAG_STAGE_KEY: str(trained.key), TAG_INPUT: str(trained.cfg.model.init_from or "random-init"),
               "metaformer.eval_run_id": str(evaluated.run_id)},
        )
        with tempfile.TemporaryDirectory(prefix="export-") as tmp:
            export_checkpoint(str(source.checkpoint), tmp, overwrite=True)
            version = registry.register_export(tmp, name, tracking_uri=self.tracking_uri, run_id=str(source.run_id), lineage_tags=tags)
        member.registered = f"{name} v{version}"
        blocked = None
        if self.spec.registry.block_on_regression and member.regressions:
            blocked = "regression against the previous retrain: " + "; ".join(member.regressions)
        figures = self.client.get_run(str(evaluated.run_id)).data.metrics
        evaluation = {registry.TAG_EVAL_DATA: member.data_name}
        for tag, key in ((registry.TAG_EVAL_TOP5, "eval/top5"), (registry.TAG_PARAMS_M, "params_m"),
                         (registry.TAG_GMACS, "gmacs")):
            if key in figures:
                evaluation[tag] = f"{figures[key]:.4g}"
        member.promotion = registry.promote(
            name, version, float(evaluated.metrics["eval/top1"]), eval_data_hash=eval_hash,
            tracking_uri=self.tracking_uri, evaluation_tags=evaluation, blocked=blocked,
        )
        self.say(f"[{plan.model}] registered {name} v{version}: {member.promotion.alias} ({member.promotion.reason})")
