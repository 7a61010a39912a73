"""Orphaned runs (issue 25): an MLflow run left RUNNING by a driver that is gone (SIGKILLed, a lost node) is closed
KILLED, with the last step it logged and ``metaformer.orphaned=driver-lost``, by whoever meets it: the next job
under its run name (which then continues it and clears the tag) or the pipeline runner (whose report shows it).
Real run folders with real leases, a real sqlite MLflow store."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow import MlflowClient

from metaformer_platform.pipelines.outcome import MemberOutcome, PipelineResult, StageOutcome
from metaformer_platform.storage import checkpoint_format as fmt
from metaformer_platform.tracking import runs
from metaformer_platform.training import ownership


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One sqlite MLflow store for the module (creating its schema takes seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _killed_driver(storage: Path, name: str) -> ownership.RunLease:
    """A job's lease whose driver was SIGKILLed: no more renewals, not released, its pid gone on this host."""
    lease = ownership.claim_run(str(storage), name)
    lease._stop.set()
    lease._thread.join()
    path = storage / name / fmt.OWNER_FILE
    path.write_text(json.dumps({**json.loads(path.read_text()), "pid": _dead_pid()}))
    return lease


def _running(client: MlflowClient, experiment: str, name: str, steps: int, **tags: str) -> str:
    exp = runs.training_experiment(client, experiment)
    run = client.create_run(str(exp), run_name=name, tags={runs.RUN_NAME_TAG: name, **tags})
    for step in range(1, steps + 1):
        client.log_metric(run.info.run_id, "train/loss", 1.0 / step, step=step)
    client.log_metric(run.info.run_id, "system/cpu_utilization_percentage", 50.0, step=99)  # its own step axis
    return run.info.run_id


def test_a_lease_tells_a_lost_driver_from_a_live_one(tmp_path):
    live = ownership.claim_run(str(tmp_path), "live")
    try:
        assert ownership.lost_driver(str(tmp_path / "live")) is None
        expired = ownership.lost_driver(str(tmp_path / "live"), now=time.time() + ownership.LEASE_TTL_S + 1)
        assert expired is not None and "lease expired" in expired.why
    finally:
        live.release()
    assert ownership.lost_driver(str(tmp_path / "live")).why == "its job released the run name"
    _killed_driver(tmp_path, "killed")
    lost = ownership.lost_driver(str(tmp_path / "killed"))
    assert lost is not None and "is gone" in lost.why and lost.last_seen is not None
    assert ownership.lost_driver(str(tmp_path / "never-leased")) is None  # nothing to judge by: left alone


def test_the_next_job_under_the_name_closes_the_orphan_and_continues_it(tmp_path, store):
    from metaformer_platform.config import load_config

    client = MlflowClient(store)
    run_id = _running(client, "orph-job", "r1", steps=7)
    _killed_driver(tmp_path, "r1")
    lost = ownership.lost_driver(str(tmp_path / "r1"))
    assert lost is not None
    assert runs.close_orphan(client, client.get_run(run_id), lost.why, lost.last_seen) == 7
    closed = client.get_run(run_id)
    assert closed.info.status == "KILLED" and closed.data.tags[runs.ORPHANED_TAG] == "driver-lost"
    assert lost.why in closed.data.tags[runs.ORPHANED_WHY_TAG]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, runs.ORPHANED_STEP_METRIC)] == [(7, 7.0)]
    assert closed.info.end_time == int(lost.last_seen * 1000)

    # the re-run takes the name (its lease) and continues the same MLflow run, the tag cleared
    cfg = load_config(None, [f"tracking.tracking_uri={store}", "tracking.experiment=orph-job", "run.name=r1"])
    handle = runs.RunHandle(cfg)
    again = client.get_run(run_id)
    assert handle.run_id == run_id and again.info.status == "RUNNING"
    assert runs.ORPHANED_TAG not in again.data.tags and runs.ORPHANED_WHY_TAG not in again.data.tags

    # its driver is SIGKILLed too: the run is RUNNING; the job after it closes it (at the last step) and continues
    client.log_metric(run_id, "train/loss", 0.1, step=9)
    runs.RunHandle(cfg)
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, runs.ORPHANED_STEP_METRIC)] == [
        (7, 7.0), (9, 9.0)]
    final = client.get_run(run_id)
    assert final.info.status == "RUNNING" and runs.ORPHANED_TAG not in final.data.tags


def _runner_view(client: MlflowClient, storage: Path, members: list[str]) -> SimpleNamespace:
    """What ``PipelineRunner._close_orphans`` reads of its runner: the client, the spec's name, the plans."""
    plans = [SimpleNamespace(model=m, stages=[SimpleNamespace(
        name="pretrain", member=m, cfg=SimpleNamespace(run=SimpleNamespace(storage_path=str(storage))))])
        for m in members]
    said: list[str] = []
    return SimpleNamespace(client=client, spec=SimpleNamespace(name="fam"), plans=plans, say=said.append, said=said)


def test_the_pipeline_closes_its_members_orphaned_runs_and_the_report_shows_them(tmp_path, store):
    from metaformer_platform.pipelines import report, runner

    client = MlflowClient(store)
    tags = {runner.TAG_PIPELINE: "fam", runner.TAG_PIPELINE_STAGE: "pretrain"}
    lost_id = _running(client, "orph-pipe", "s12-pre", 5, **{runner.TAG_MEMBER: "s12", **tags})
    live_id = _running(client, "orph-pipe", "s24-pre", 3, **{runner.TAG_MEMBER: "s24", **tags})
    _killed_driver(tmp_path, "s12-pre")
    live = ownership.claim_run(str(tmp_path), "s24-pre")
    try:
        view = _runner_view(client, tmp_path, ["s12", "s24"])
        outcomes = {m: MemberOutcome(m) for m in ("s12", "s24")}
        exp = client.get_experiment_by_name("orph-pipe").experiment_id
        runner.PipelineRunner._close_orphans(view, exp, outcomes)  # type: ignore[arg-type]
    finally:
        live.release()
    assert client.get_run(lost_id).info.status == "KILLED"
    assert client.get_run(live_id).info.status == "RUNNING"  # its driver renews its lease: not touched
    assert [o.run_id for o in outcomes["s12"].orphaned] == [lost_id] and outcomes["s24"].orphaned == []
    assert "MLflow run closed KILLED at step 5" in view.said[0]

    lines = report.status_lines(PipelineResult("fam", list(outcomes.values())))
    assert lines[0].split()[:3] == ["s12", "KILLED", "pretrain:"] and "killed (orphaned)" in lines[0]
    assert "s12-pre" in lines[1] and lost_id in lines[1] and "driver lost" in lines[1]
    assert lines[2].split()[:2] == ["s24", "ok"]
    # a pipeline run that then continues the stage shows what it did, not the orphan
    outcomes["s12"].stages.append(StageOutcome("s12", "pretrain", "resume", "s12-pre", lost_id))
    lines = report.status_lines(PipelineResult("fam", list(outcomes.values())))
    assert lines[0].split()[:3] == ["s12", "ok", "pretrain:"] and "orphaned" not in "".join(lines)
