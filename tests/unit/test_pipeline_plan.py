"""The pipeline runner without a cluster: spec validation, plan expansion and keys, skip/resume decisions from
MLflow (an embedded sqlite store), the dry run's output, bad input, and the family report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from metaformer_platform import pipelines as P
from metaformer_platform.pipelines import outcome, report, runner
from metaformer_platform.storage import checkpoint_format as fmt
from metaformer_platform.tracking.runs import training_experiment

REPO = Path(__file__).resolve().parents[2]
DEFAULT = str(REPO / "jobs" / "configs" / "default.yaml")


def _spec(tmp_path: Path, **changes: Any) -> dict[str, Any]:
    tree: dict[str, Any] = {
        "name": "t",
        "family": "debug",
        "experiment": "pipe-unit",
        "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "overrides": [
            f"data.cache_dir={tmp_path / 'cache'}", "data.synthetic.num_classes=4", "data.synthetic.train_samples=32",
            "data.synthetic.val_samples=16", "data.synthetic.samples_per_shard=16", "trainer.batch_size=8",
            "scaling.num_workers=1", f"run.storage_path={tmp_path / 'runs'}",
        ],
        "stages": [
            {"name": "pretrain", "kind": "pretrain", "config": DEFAULT},
            {"name": "finetune", "kind": "finetune", "config": DEFAULT, "overrides": ["trainer.max_steps=3"]},
            {"name": "evaluate", "kind": "evaluate", "config": DEFAULT},
        ],
    }
    tree.update(changes)
    return tree


def _write(tmp_path: Path, tree: dict[str, Any]) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def _planned(tmp_path: Path, tree: dict[str, Any], overrides: list[str] | None = None) -> P.PipelineRunner:
    return P.plan_pipeline(_write(tmp_path, tree), overrides or [], out=lambda _: None)


# -- spec and expansion ----------------------------------------------------------------------------


def test_expansion_chains_stages_and_applies_overrides_in_order(tmp_path: Path) -> None:
    tree = _spec(tmp_path)
    tree["stages"][1]["member_overrides"] = {"poolformer_debug_m": ["trainer.max_steps=5"]}
    spec = P.parse_pipeline(tree)
    plans = P.expand(spec, tmp_path, ["trainer.seed=7"])
    assert [p.model for p in plans] == ["poolformer_debug", "poolformer_debug_m"]
    assert all(p.error is None for p in plans)
    a, b = plans
    assert [(s.name, s.kind, s.upstream) for s in a.stages] == [
        ("pretrain", "pretrain", None), ("finetune", "finetune", "pretrain"), ("evaluate", "evaluate", "finetune"),
    ]
    assert a.stage("finetune").cfg.trainer.max_steps == 3 and b.stage("finetune").cfg.trainer.max_steps == 5
    assert {s.cfg.trainer.seed for p in plans for s in p.stages} == {7}  # the command line's overrides win
    assert [s.cfg.stage for s in a.stages] == ["pretrain", "finetune", "evaluate"]
    assert {s.cfg.model.name for s in b.stages} == {"poolformer_debug_m"}
    assert {s.cfg.tracking.experiment for p in plans for s in p.stages} == {"pipe-unit"}


def test_keys_follow_config_data_and_input(tmp_path: Path) -> None:
    first = _planned(tmp_path, _spec(tmp_path)).plans
    again = _planned(tmp_path, _spec(tmp_path), ["tracking.run_name=x", "run.ray_address=auto"]).plans
    assert [s.key for p in first for s in p.stages] == [s.key for p in again for s in p.stages]
    keys = [s.key for p in first for s in p.stages]
    assert len(set(keys)) == 6 and all(len(k) == 64 for k in keys)
    stage = first[0].stage("finetune")
    assert stage.run_name == f"t-poolformer_debug-finetune-{stage.key[:8]}" == stage.cfg.run.name
    assert stage.input_id == f"stage:{first[0].stage('pretrain').key}"
    assert len(stage.data_hash) == 64 and stage.num_classes == 4

    # A change to the pretrain config changes pretrain's key and, through the chain, every later key.
    tree = _spec(tmp_path)
    tree["stages"][0]["overrides"] = ["trainer.max_steps=9"]
    changed = _planned(tmp_path, tree).plans[0]
    assert all(s.key != o.key for s, o in zip(changed.stages, first[0].stages, strict=True))
    # Other data (another synthetic seed) for the finetune stage only: pretrain keeps its key.
    tree = _spec(tmp_path)
    tree["stages"][1]["overrides"] = ["trainer.max_steps=3", "data.synthetic.seed=5"]
    other = _planned(tmp_path, tree).plans[0]
    assert other.stage("pretrain").key == first[0].stage("pretrain").key
    assert other.stage("finetune").data_hash != first[0].stage("finetune").data_hash
    assert other.stage("finetune").key != first[0].stage("finetune").key


@pytest.mark.parametrize("change, match", [
    ({"stages": [{"name": "pretrain", "kind": "pretrian"}]}, "unknown stage kind 'pretrian'"),
    ({"stages": [{"name": "ft", "kind": "finetune"}]}, "stage 'ft' .finetune. has no input"),
    ({"family": "poolformers"}, "unknown family 'poolformers'"),
    ({"members": ["poolformer_debug"]}, "exactly one of `family`"),
    ({"stages": [{"name": "pretrain", "kind": "pretrain", "epochs": 3}]}, "stages.0.epochs: Extra inputs"),
])
def test_bad_pipeline_files_are_refused_naming_the_key(tmp_path: Path, change: dict, match: str) -> None:
    with pytest.raises(P.PipelineError, match=match):
        P.parse_pipeline(_spec(tmp_path, **change))


def test_main_exits_2_on_a_bad_pipeline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, _spec(tmp_path, stages=[{"name": "x", "kind": "train"}]))
    assert P.main(["--pipeline", str(path), "--dry-run"]) == 2
    assert "unknown stage kind 'train'" in capsys.readouterr().err
    assert P.main(["--pipeline", str(tmp_path / "nope.yaml")]) == 2


def _export(folder: Path, model_name: str) -> Path:
    """A real export of an untrained ``model_name`` (what jobs/export.py writes)."""
    from safetensors.torch import save_file

    from metaformer_platform.models import create_model

    model = create_model(model_name, num_classes=4)
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    (folder / "model.json").write_text(json.dumps({"model_name": model_name, "num_classes": 4}))
    return folder


def test_bad_members_fail_alone_before_anything_runs(tmp_path: Path) -> None:
    ok_export = _export(tmp_path / "exp-debug", "poolformer_debug")
    tree = _spec(tmp_path, family=None, members=["poolformer_debug", "poolformer_s13", "poolformer_debug_m"])
    tree["stages"] = [{"name": "finetune", "kind": "finetune", "config": DEFAULT, "init_from": str(ok_export)},
                      {"name": "evaluate", "kind": "evaluate", "config": DEFAULT}]
    plans = {p.model: p for p in _planned(tmp_path, tree).plans}
    assert plans["poolformer_debug"].error is None
    assert plans["poolformer_debug"].stage("finetune").input_id == str(ok_export.resolve())
    assert "unknown model name 'poolformer_s13'" in plans["poolformer_s13"].error
    # poolformer_debug_m may not fine-tune from poolformer_debug's weights: the error names both.
    err = plans["poolformer_debug_m"].error
    assert "stage 'finetune'" in err and "holds poolformer_debug" in err and "poolformer_debug_m" in err

    tree["stages"][0]["init_from"] = str(tmp_path / "runs" / "{model}-gone" / "checkpoint-00000010")
    plans = {p.model: p for p in _planned(tmp_path, tree).plans}
    err = plans["poolformer_debug"].error
    assert "poolformer_debug-gone/checkpoint-00000010" in err and "does not exist" in err

    tree["stages"][0]["init_from"] = "models:/{model}@champion"
    plans = {p.model: p for p in _planned(tmp_path, tree).plans}
    assert "models:/poolformer_debug@champion: no registered model 'poolformer_debug'" in plans["poolformer_debug"].error

    tree["stages"] = [{"name": "pretrain", "kind": "pretrain", "config": DEFAULT, "overrides": ["model.name=poolformer_s12"]}]
    plans = {p.model: p for p in _planned(tmp_path, tree).plans}
    assert "sets model.name=poolformer_s12, but the member is poolformer_debug" in plans["poolformer_debug"].error


def test_a_stage_whose_data_is_missing_blocks_its_member(tmp_path: Path) -> None:
    tree = _spec(tmp_path)
    tree["stages"][1]["member_overrides"] = {"poolformer_debug_m": [f"data.source={tmp_path / 'no-shards'}"]}
    plans = {p.model: p for p in _planned(tmp_path, tree).plans}
    assert plans["poolformer_debug"].error is None
    assert plans["poolformer_debug_m"].error.startswith("stage 'finetune': no shards found in")


# -- skip / resume decisions -----------------------------------------------------------------------


def _complete_checkpoint(folder: Path) -> Path:
    folder.mkdir(parents=True)
    fmt.mark_complete(folder)
    return folder


def _finished_run(planned: P.PipelineRunner, stage: P.StagePlan, status: str = "FINISHED", **tags: str) -> str:
    client = planned.client
    exp = training_experiment(client, planned.spec.experiment, create=True)
    run = client.create_run(exp, tags={runner.TAG_STAGE_KEY: str(stage.key), **tags})
    if not stage.trains:
        client.log_metric(run.info.run_id, "eval/top1", 50.0)
    client.set_terminated(run.info.run_id, status=status)
    return exp


def test_skip_needs_a_finished_run_of_the_same_key_with_its_output(tmp_path: Path) -> None:
    planned = _planned(tmp_path, _spec(tmp_path))
    pre = planned.plans[0].stage("pretrain")
    out = _complete_checkpoint(tmp_path / "out" / "checkpoint-00000004")
    exp = _finished_run(planned, pre, status="FAILED", **{runner.TAG_OUTPUT: str(out)})
    assert runner.find_completed(planned.client, exp, pre) is None  # failed: run it again (it resumes)
    _finished_run(planned, pre, **{runner.TAG_OUTPUT: str(tmp_path / "gone")})
    assert runner.find_completed(planned.client, exp, pre) is None  # its checkpoint is gone
    _finished_run(planned, planned.plans[1].stage("pretrain"), **{runner.TAG_OUTPUT: str(out)})
    assert runner.find_completed(planned.client, exp, pre) is None  # another key
    _finished_run(planned, pre, **{runner.TAG_OUTPUT: str(out)})
    found = runner.find_completed(planned.client, exp, pre)
    assert found is not None and found.data.tags[runner.TAG_OUTPUT] == str(out)
    evaluate = planned.plans[0].stage("evaluate")
    _finished_run(planned, evaluate)
    assert runner.find_completed(planned.client, exp, evaluate).data.metrics["eval/top1"] == 50.0


def _ray_registers(checkpoint: Path) -> None:
    """Register ``checkpoint`` in its run folder's snapshot with Ray's own checkpoint manager, as the controller
    does when every rank's report of a round arrived."""
    import asyncio

    import ray.train
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import CheckpointManager
    from ray.train.v2._internal.execution.storage import StorageContext
    from ray.train.v2._internal.execution.training_report import _TrainingReport

    async def register() -> None:  # the manager notifies waiters on an event loop
        context = StorageContext(storage_path=str(checkpoint.parent.parent), experiment_dir_name=checkpoint.parent.name)
        manager = CheckpointManager(storage_context=context, checkpoint_config=ray.train.CheckpointConfig())
        report = _TrainingReport(checkpoint=ray.train.Checkpoint(str(checkpoint)), metrics={"step": 2}, validation=False)
        manager.register_checkpoint(report)

    asyncio.run(register())


def test_dry_run_prints_the_plan_with_skips_and_resumes(tmp_path: Path) -> None:
    lines: list[str] = []
    tree = _spec(tmp_path, family=None, members=["poolformer_debug", "poolformer_s13", "poolformer_debug_m"])
    path = _write(tmp_path, tree)
    planned = P.plan_pipeline(path, out=lambda _: None)
    debug = planned.plans[0]
    out = _complete_checkpoint(tmp_path / "out" / "checkpoint-00000004")
    _finished_run(planned, debug.stage("pretrain"), **{runner.TAG_OUTPUT: str(out)})
    run_dir = Path(debug.stage("finetune").run_dir)
    _complete_checkpoint(run_dir / "checkpoint-00000002")
    _complete_checkpoint(run_dir / "checkpoint-00000004")  # complete, but Ray had not registered it: not resumed
    _ray_registers(run_dir / "checkpoint-00000002")
    assert runner.resumable_checkpoint(str(run_dir)) == str(run_dir / "checkpoint-00000002")
    assert runner.resumable_checkpoint(str(tmp_path / "runs" / "nothing")) is None

    result = P.run_pipeline(path, dry_run=True, out=lines.append)
    text = "\n".join(lines)
    assert result.dry_run and [m.model for m in result.members] == ["poolformer_debug", "poolformer_s13", "poolformer_debug_m"]
    actions = {(m.model, s.stage): s.action for m in result.members for s in m.stages}
    assert actions == {
        ("poolformer_debug", "pretrain"): "skip", ("poolformer_debug", "finetune"): "resume",
        ("poolformer_debug", "evaluate"): "run", ("poolformer_debug_m", "pretrain"): "run",
        ("poolformer_debug_m", "finetune"): "run", ("poolformer_debug_m", "evaluate"): "run",
    }
    assert "pipeline t: 3 members, stages pretrain (pretrain) -> finetune (finetune) -> evaluate (evaluate)" in text
    assert f"finetune   resume  {debug.stage('finetune').run_name}  <- pretrain  (from checkpoint-00000002)" in text
    assert "ERROR  member 'poolformer_s13': unknown model name 'poolformer_s13'" in text
    assert "register   poolformer_debug_m (champion if top-1 >= champion's)" in text
    # Nothing was written: no parent run, no run folder for what would run.
    runs = planned.client.search_runs([training_experiment(planned.client, "pipe-unit", create=False)])
    assert len(runs) == 1 and not Path(planned.plans[2].stage("pretrain").run_dir).exists()
    assert P.main(["--pipeline", str(path), "--dry-run"]) == 0  # the plan names the invalid member; nothing failed


# -- the family report -----------------------------------------------------------------------------


def test_family_report_table_and_plot(tmp_path: Path) -> None:
    from metaformer_platform.config import load_config

    members = []
    # The paper's numbers are ImageNet-1k at 224 px: only the member evaluated so is compared with them.
    for name, top1, data, size, classes in (("poolformer_debug", 40.0, "synthetic-shapes-v1", 32, 10),
                                            ("poolformer_s12", 70.0, "imagenet-1k", 224, 1000)):
        m = outcome.MemberOutcome(name, eval_cfg=load_config(DEFAULT, [f"data.img_size={size}"]), num_classes=classes,
                                  data_name=f"{data} {size}px")
        m.stages.append(outcome.StageOutcome(name, "evaluate", "run", metrics={
            "eval/top1": top1, "eval/top5": 90.0, "eval/images_per_s": 1234.0, "eval/samples": 64}))
        m.registered = f"{name} v1"
        members.append(m)
    members.append(outcome.MemberOutcome("poolformer_debug_m", error="stage 'pretrain' failed: boom"))
    result = outcome.PipelineResult("fam", members)
    data = report.rows(result)
    assert [r["model"] for r in data] == ["poolformer_debug", "poolformer_s12"]
    debug, s12 = data
    assert s12["params_m"] == pytest.approx(11_915_176 / 1e6) and s12["macs_g"] == pytest.approx(1.81, abs=0.01)
    assert s12["paper_top1"] == 77.2 and s12["vs_paper"] == pytest.approx(-7.2)
    assert debug["paper_top1"] is None and debug["vs_paper"] is None and debug["data"] == "synthetic-shapes-v1 32px"
    text = report.table(data)
    assert "| poolformer_s12 " in text and "-7.2" in text and "| poolformer_debug " in text and "n/a" in text
    png = report.plot(data, tmp_path / "fig.png", "fam")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    status = "\n".join(report.status_lines(result))
    assert "poolformer_debug_m           FAILED" in status and "boom" in status


def test_time_and_week_over_week_tables() -> None:
    """The ledger's figures per member and in total ("-" where a run logged none), and the change against the
    previous retrain with what the pipeline's limits flag."""
    from metaformer_platform.pipelines import compare
    from metaformer_platform.pipelines.spec import RegressionSpec

    a = outcome.MemberOutcome("poolformer_s12", figures={
        "top1": 70.0, "wall_s": 3600.0, "queued_s": 600.0, "worker_hours": 8.0, "cost": 20.0, "goodput": 0.5,
        "lost_work_s": 300.0, "checkpoint_stall_s": 60.0, "time_to_final_top1_s": 3000.0, "estimate_wall_s": 3000.0,
        "estimate_worker_hours": 6.0, "estimate_cost": 15.0},
        previous={"top1": 71.0, "worker_hours": 6.0, "cost": 20.0, "time_to_final_top1_s": 3000.0})
    b = outcome.MemberOutcome("poolformer_s24", figures={"top1": 75.0, "wall_s": 1200.0, "goodput": 1.0})
    limits = RegressionSpec(top1_drop=0.5, worker_hours_increase_pct=20)
    a.regressions = compare.regressions(a.figures, a.previous, limits)
    assert a.regressions == ["top1 -1.00 points (limit -0.5)", "worker_hours +33.3% (limit +20%)"]
    assert compare.regressions(b.figures, b.previous, limits) == []  # nothing to compare with: nothing flagged
    assert compare.largest_losses(a.figures) == [("queued", 600.0), ("lost_work", 300.0)]

    time = [[cell.strip() for cell in line.split("|")[1:-1]] for line in report.time_table([a, b]).splitlines()]
    assert time[2] == ["poolformer_s12", "1h00m", "10m00s", "8.000", "20.00", "50%", "queued 10m00s, lost_work 5m00s",
                       "50m00s", "50m00s / 6.000 / 15.00"]
    assert time[3] == ["poolformer_s24", "20m00s", "-", "-", "-", "100%", "-", "-", "- / - / -"]
    # 4800 s of wall, of which 0.5 x 3600 + 1.0 x 1200 = 3000 s productive
    assert time[4][:6] == ["total", "1h20m", "10m00s", "8.000", "20.00", "62%"]

    week = report.week_table([a, b])
    row = next(line for line in week.splitlines() if line.startswith("| poolformer_s12 "))
    assert "71.00 -> 70.00 (-1.00)" in row and "6.000 -> 8.000 (+33.3%)" in row and "20.00 -> 20.00 (+0.0%)" in row
    assert "REGRESSION: top1 -1.00 points (limit -0.5); worker_hours +33.3% (limit +20%)" in row
    last = [cell.strip() for cell in week.splitlines()[-1].split("|")[1:-1]]
    assert last == ["poolformer_s24", "- -> 75.00", "-", "-", "-", "no"]


def test_console_lines_carry_the_member_set_for_this_context() -> None:
    import contextvars
    import io

    from metaformer_platform.tracking import console

    def made_here() -> str:
        console.LINE_PREFIX.set("[poolformer_s12/pretrain] ")
        out = io.StringIO()
        console.Console(out, bar=False).print_line("step 10/40")
        return out.getvalue()

    assert contextvars.copy_context().run(made_here) == "[poolformer_s12/pretrain] step 10/40\n"
    out = io.StringIO()
    console.Console(out, bar=False).print_line("step 10/40")  # another context: no prefix
    assert out.getvalue() == "step 10/40\n"


def test_a_member_that_fails_stops_only_its_own_chain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The runner's bookkeeping around jobs (Ray jobs stubbed here; the integration test runs real ones)."""
    from metaformer_platform.launch import driver as launch

    started: list[str] = []

    def fake_job(cfg: Any) -> launch.JobResult:
        started.append(cfg.run.name)
        if cfg.model.name == "poolformer_debug_m":
            raise RuntimeError("worker group died")
        out = _complete_checkpoint(tmp_path / cfg.run.name / "checkpoint-00000003")
        run_id = planned.client.create_run(exp).info.run_id  # a stand-in for the run RunHandle would open
        return launch.JobResult({"step": 3.0}, str(out), str(out.parent), run_id, None)

    monkeypatch.setattr(launch, "run_job", fake_job)
    monkeypatch.setattr(launch, "connect_ray", lambda cfg: None)
    tree = _spec(tmp_path, stages=[{"name": "pretrain", "kind": "pretrain", "config": DEFAULT},
                                   {"name": "finetune", "kind": "finetune", "config": DEFAULT}])
    planned = _planned(tmp_path, tree)
    exp = training_experiment(planned.client, "pipe-unit", create=True)
    result = planned.run()
    by_model = {m.model: m for m in result.members}
    assert by_model["poolformer_debug"].ok and [s.action for s in by_model["poolformer_debug"].stages] == ["run", "run"]
    failed = by_model["poolformer_debug_m"]
    assert failed.error == "stage 'pretrain' failed: RuntimeError: worker group died"
    assert [s.action for s in failed.stages] == ["failed", "blocked"]
    assert sorted(started) == sorted([*(s.run_name for s in planned.plans[0].stages), planned.plans[1].stages[0].run_name])
    parent = planned.client.get_run(result.parent_run_id)
    assert parent.info.status == "FAILED" and parent.data.tags[runner.TAG_FAILED] == "poolformer_debug_m"
    assert "poolformer_debug_m           FAILED pretrain: failed, finetune: blocked" in result.report


def test_stage_runs_carry_the_columns_of_the_shared_family_view_and_links_open_the_training_view(tmp_path: Path) -> None:
    """The comparison metrics are unprefixed (after the curves on a run's page) and exactly the shared view's
    columns; the view is MLflow's own shared-view tag; every link opens the training view, a password masked."""
    from metaformer_platform.pipelines import compare
    from metaformer_platform.tracking import ui

    planned = _planned(tmp_path, _spec(tmp_path, name="weekly.family"))
    pre, ev = planned.plans[0].stage("pretrain"), planned.plans[0].stage("evaluate")
    logged = {"val/top1": 40.123456, "val/top5": 90.0, "train/images_per_s": 12.0, "eval/top1": 41.0, "eval/top5": 91.0,
              "eval/images_per_s": 30.0, "system/ledger_train_s": 5.0, "system/ledger_worker_hours": 0.01}
    figures = compare.stage_figures(pre, logged)
    assert list(figures) == [c for c in compare.COLUMNS if c != "cost"]  # no price, no cost
    assert (figures["top1"], figures["images_per_s"], figures["train_s"]) == (40.12, 12.0, 5.0)  # 4 digits
    assert compare.stage_figures(ev, logged)["top1"] == 41.0 and compare.stage_figures(ev, logged)["images_per_s"] == 30.0
    exp = training_experiment(planned.client, planned.spec.experiment, create=True)
    planned._share_family_view(exp)
    state = json.loads(planned.client.get_experiment(exp).tags[ui.SHARED_VIEW_TAG + "weekly.family"])
    shown = [f"metrics.`{c}`" for c in compare.COLUMNS] + [
        "tags.`metaformer.member`", "tags.`metaformer.pipeline_stage`", "tags.`metaformer.data`"]
    assert state["selectedColumns"] == ["attributes.`Models`", *shown] and state["columnOrder"] == shown

    assert state["runsHiddenMode"] == "SHOW_ALL"
    assert ui.link("https://me:pw@mlflow.example", exp, view=planned.view_key) == (
        f"https://me:***@mlflow.example/#/experiments/{exp}?workflowType=machine_learning&viewStateShareKey=weekly.family")
    assert ui.link("http://127.0.0.1:5000", "3", "abc").endswith("/#/experiments/3/runs/abc?workflowType=machine_learning")
    assert "ui --backend-store-uri sqlite:///" in ui.link(planned.tracking_uri, "3", "abc")


def test_a_manifest_given_as_a_file_is_hashed_as_that_file(tmp_path: Path) -> None:
    """Two data sets described by two manifest files in one folder are two data sets: the stage key's hash and
    the evaluation's are of the file named, not of the folder's _info.json."""
    from metaformer_platform.config import load_config
    from metaformer_platform.data import load_manifest
    from metaformer_platform.data.build.synthetic import ensure_synthetic_shards
    from metaformer_platform.evaluation import report as evaluation_report
    from metaformer_platform.pipelines import plan

    root = Path(ensure_synthetic_shards(tmp_path / "d", num_classes=4, train_samples=32, val_samples=16,
                                        samples_per_shard=16, image_size=32, seed=0))
    info = json.loads((root / "_info.json").read_text())
    (root / "a.json").write_bytes((root / "_info.json").read_bytes())
    info["name"] = "another-subset"
    (root / "b.json").write_text(json.dumps(info))
    hashes = {}
    for name in ("_info.json", "a.json", "b.json"):
        cfg = load_config(DEFAULT, [f"data.source={root / name}", "trainer.batch_size=8", "scaling.num_workers=1"])
        hashes[name] = plan.manifest_hash(cfg)[0]
        assert evaluation_report.split_hash(load_manifest(str(root / name)), "val")[1] == f"split 'val' of {name}"
    assert hashes["a.json"] == hashes["_info.json"] != hashes["b.json"]  # same bytes, same hash; other bytes, other
