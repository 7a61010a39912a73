"""A tiny family (poolformer_debug, poolformer_debug_m) through pretrain -> finetune (new head) -> evaluate ->
register/promote, with shards AND run folders (checkpoints, eval reports) on the session's SeaweedFS, the
session's two-node Ray cluster and the real MLflow server: no folder is shared between stages but S3.

One story, four pipeline runs: (1) a pipeline driver stopped by SIGTERM (a preempted pod) while pretrain trains:
the running pretrains checkpoint the step they are at, their MLflow runs and the pipeline's are closed as stopped,
exit 143; (2) the re-run continues each stopped stage from that checkpoint and finishes everything (top-level runs with the comparison metrics,
lineage, versions with their evaluation tags, champion, report, links to the training view); (3) a third run
re-trains nothing and duplicates nothing; (4) the fine-tune's config changed (a learning rate that wrecks it):
a new pipeline run, compared week over week with the previous one, its regressions flagged and not promoted.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from metaformer_platform import storage
from metaformer_platform.data.build.synthetic import ensure_synthetic_shards
from metaformer_platform.pipelines import compare, run_pipeline, runner
from metaformer_platform.storage import checkpoint_format as fmt
from metaformer_platform.tracking import registry
from metaformer_platform.tracking.runs import STOPPED_TAG

REPO = Path(__file__).resolve().parents[2]
MEMBERS = ["poolformer_debug", "poolformer_debug_m"]
# The pretrains must still be training when the test sees their first registered checkpoint and kills the
# driver: 24 steps with a checkpoint every 2 leave them seconds of runway.
PRETRAIN_STEPS = 24


@pytest.fixture(scope="module")
def family_pipeline(s3_server, mlflow_server, ray_cluster, tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("pipeline")
    # Pretrain on 6 classes, fine-tune and evaluate on another set of 3 classes: the fine-tune gets a new head.
    pre = ensure_synthetic_shards(root / "pre", num_classes=6, train_samples=64, val_samples=16, image_size=32,
                                  samples_per_shard=32, seed=0)
    ft = ensure_synthetic_shards(root / "ft", num_classes=3, train_samples=32, val_samples=24, image_size=32,
                                 samples_per_shard=16, seed=1)
    pre_url, ft_url = s3_server.upload(pre, "pipe/pre"), s3_server.upload(ft, "pipe/ft")
    default = str(REPO / "jobs" / "configs" / "default.yaml")
    spec = {
        "name": "tiny-family",
        "family": "debug",
        "experiment": "pipeline-it",
        "tracking_uri": mlflow_server,
        "overrides": [
            "data.num_workers=0", "trainer.batch_size=8", "trainer.precision=fp32", "trainer.channels_last=false",
            "trainer.log_every_steps=2", "scaling.num_workers=1", "tracking.system_metrics=false",
            f"run.storage_path=s3://{s3_server.bucket}/pipe/runs", "run.max_failures=0",
            "run.stop_grace_s=120",  # a stage whose workers are still starting at the SIGTERM must not be forced
        ],
        "stages": [
            {"name": "pretrain", "kind": "pretrain", "config": default, "overrides": [
                f"data.source={pre_url}", f"trainer.max_steps={PRETRAIN_STEPS}", "trainer.checkpoint_every_steps=2"]},
            {"name": "finetune", "kind": "finetune", "config": default, "overrides": [
                f"data.source={ft_url}", "trainer.max_steps=4", "trainer.checkpoint_every_steps=4"]},
            {"name": "evaluate", "kind": "evaluate", "config": default, "overrides": [f"data.source={ft_url}"]},
        ],
        "registry": {"name": "pipe-{model}"},
    }
    path = root / "tiny_family.yaml"
    path.write_text(yaml.safe_dump(spec))
    runs = f"s3://{s3_server.bucket}/pipe/runs"
    return {"path": path, "root": root, "runs": runs, "tracking_uri": mlflow_server, "ray": ray_cluster}


def _run_names(runs: str) -> set[str]:
    return {key.split("/", 1)[0] for key in storage.list_files(runs)}


def _resumable_pretrains(runs: str) -> dict[str, int]:
    """Pretrain run name -> step of the checkpoint Ray would resume it from (registered by its controller)."""
    found = {}
    for name in _run_names(runs):
        if "-pretrain-" in name and (checkpoint := runner.resumable_checkpoint(f"{runs}/{name}")) is not None:
            found[name] = int(checkpoint.rsplit("-", 1)[1])
    return found


def _wait_for_free_cpus(want: float, timeout: float = 60.0) -> None:
    import ray

    deadline = time.monotonic() + timeout
    while ray.available_resources().get("CPU", 0.0) < want:
        assert time.monotonic() < deadline, f"the killed pipeline's workers still hold CPUs: {ray.available_resources()}"
        time.sleep(0.5)


def _rest(uri: str, endpoint: str, method: str = "GET", **query: Any) -> dict[str, Any]:
    """What the UI reads: MLflow's REST API (the server's own JSON, not the Python client's objects)."""
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    kwargs = {"json": query} if method == "POST" else {"params": query}
    response = http_request(get_default_host_creds(uri), f"/api/2.0/mlflow/{endpoint}", method, **kwargs)
    assert response.status_code == 200, response.text
    return dict(response.json())


def _metrics(run: dict[str, Any]) -> dict[str, float]:
    return {m["key"]: m["value"] for m in run["data"].get("metrics", [])}


def _tags(entity: dict[str, Any]) -> dict[str, str]:
    return {t["key"]: t["value"] for t in entity.get("tags", entity.get("data", {}).get("tags", []))}


def test_family_pipeline_killed_resumed_and_rerun(family_pipeline, s3_server, monkeypatch, capsys) -> None:
    import mlflow

    path, root, uri = family_pipeline["path"], family_pipeline["root"], family_pipeline["tracking_uri"]
    runs = family_pipeline["runs"]
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("METAFORMER_WEIGHTS_CACHE", str(root / "weights-cache"))
    client = mlflow.MlflowClient(uri, registry_uri=uri)

    # (1) The pipeline as its own Ray driver, stopped by SIGTERM once a pretrain checkpoint exists. (A driver that
    # is SIGKILLed instead leaves its runs RUNNING: closing them is tests/unit/test_orphaned_runs.py's, on real
    # leases whose driver's pid is gone; Ray's lost report of a SIGKILLed worker is test_fault_tolerance's.)
    env = {**os.environ, "RAY_ADDRESS": family_pipeline["ray"].address_info["address"],
           "PYTHONPATH": os.pathsep.join(p for p in [str(REPO / "platform"), os.environ.get("PYTHONPATH", "")] if p)}
    log_path = root / "stopped.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, str(REPO / "pipelines" / "poolformer_family.py"), "--pipeline",
                                 str(path)], env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 420  # worker start-up is slow on a busy 2-core machine
            while not _resumable_pretrains(runs):
                assert proc.poll() is None, log_path.read_text()[-3000:]
                assert time.monotonic() < deadline, "no pretrain checkpoint within 420 s: " + log_path.read_text()[-3000:]
                time.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=150)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    stopped_log = log_path.read_text()
    assert proc.returncode == 143, stopped_log[-3000:]
    # each running pretrain: "[member] pretrain: stopped on SIGTERM at step N: checkpoint s3://.../run/checkpoint-N"
    stops = {name: int(step) for name, step in re.findall(
        rf"\] pretrain: stopped on SIGTERM at step (?:\d+): checkpoint {re.escape(runs)}/(\S+)/checkpoint-(\d+)\. "
        r"To continue", stopped_log)}
    interrupted = _resumable_pretrains(runs)  # run name -> the step it continues from
    assert stops and stops == interrupted, (stops, interrupted, stopped_log[-3000:])  # the stop's own checkpoints
    assert "pipeline stopped on SIGTERM" in stopped_log and "PC: @" not in stopped_log
    assert not any("-finetune-" in k and "/checkpoint-" in k for k in storage.list_files(runs)), "stopped too late"
    killed = client.search_runs([client.get_experiment_by_name("pipeline-it").experiment_id],
                                filter_string="attributes.status = 'KILLED'")
    assert {r.data.tags["metaformer.run_name"] for r in killed if runner.TAG_STAGE_KEY in r.data.tags} == set(stops)
    assert all(r.data.tags[STOPPED_TAG] == "sigterm" for r in killed) and len(killed) == len(stops) + 1  # + parent
    _wait_for_free_cpus(2)

    # (2) Re-run: the interrupted pretrain stages continue from their checkpoints, the rest runs.
    lines: list[str] = []
    result = run_pipeline(path, out=lines.append)
    output = "\n".join(lines)
    assert not result.failed, output
    actions = {(m.model, s.stage): s for m in result.members for s in m.stages}
    for member in MEMBERS:
        pre, ft, ev = (actions[(member, s)] for s in ("pretrain", "finetune", "evaluate"))
        assert pre.action == ("resume" if pre.run_name in interrupted else "run"), (pre, interrupted)
        if pre.run_name in interrupted:
            assert pre.detail == f"(continued from checkpoint-{interrupted[pre.run_name]:08d})"
        assert (ft.action, ev.action) == ("run", "run")
        assert pre.metrics["step"] == PRETRAIN_STEPS and pre.checkpoint == f"{runs}/{pre.run_name}/checkpoint-{PRETRAIN_STEPS:08d}"
        assert fmt.is_complete(pre.checkpoint) and fmt.is_complete(ft.checkpoint)
        assert storage.exists(f"{runs}/{ev.run_name}/eval.json")  # the evaluate job's report, on S3 too
        assert 0 <= ev.metrics["eval/top1"] <= 100 and ev.metrics["eval/samples"] == 24
    assert any(a.action == "resume" for a in actions.values())

    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags[runner.TAG_PIPELINE] == "tiny-family"
    experiment = parent.info.experiment_id
    stage_runs = client.search_runs([experiment], filter_string=f"tags.`{runner.TAG_PIPELINE}` = 'tiny-family' "
                                    f"and tags.`{runner.TAG_STAGE_KEY}` != ''")
    assert len(stage_runs) == 6  # one per member and stage: the resumed stage continued its own MLflow run
    by_stage = {(r.data.tags[runner.TAG_MEMBER], r.data.tags[runner.TAG_PIPELINE_STAGE]): r for r in stage_runs}
    for (member, stage), run in by_stage.items():
        tags = run.data.tags
        # Not nested (the runs table would fold them under the parent): linked by a tag, each a top-level row.
        assert tags[compare.TAG_PIPELINE_RUN] == result.parent_run_id and run.info.status == "FINISHED"
        assert STOPPED_TAG not in tags  # a stopped stage, continued, is no longer marked stopped
        assert "mlflow.parentRunId" not in tags
        assert len(tags[runner.TAG_DATA_HASH]) == 64 and tags["mlflow.source.git.commit"]
        assert tags["metaformer.run_name"] == actions[(member, stage)].run_name
    # The members ran side by side (1 CPU each on the 2-CPU cluster): their fine-tunes overlap in time.
    fts = [by_stage[(m, "finetune")].info for m in MEMBERS]
    assert max(i.start_time for i in fts) < min(i.end_time for i in fts), fts
    for member in MEMBERS:
        pre, ft, ev = (by_stage[(member, s)] for s in ("pretrain", "finetune", "evaluate"))
        assert ft.data.tags[runner.TAG_INPUT] == pre.data.tags[runner.TAG_OUTPUT]  # lineage: fine-tuned from that
        assert ev.data.tags[runner.TAG_INPUT] == ft.data.tags[runner.TAG_OUTPUT]
        assert pre.data.tags[runner.TAG_DATA_HASH] != ft.data.tags[runner.TAG_DATA_HASH]
        steps = [m.step for m in client.get_metric_history(pre.info.run_id, "train/loss")]
        assert max(steps) == PRETRAIN_STEPS, steps
        if pre.data.tags["metaformer.run_name"] in interrupted:
            # Continued, not started over: no step up to the checkpoint it continued from was logged twice.
            done = interrupted[pre.data.tags["metaformer.run_name"]]
            assert all(steps.count(s) <= 1 for s in range(1, done + 1)), (done, steps)

        name = f"pipe-{member}"
        (version,) = client.search_model_versions(f"name = '{name}'")
        assert version.run_id == ft.info.run_id
        assert version.tags[registry.TAG_CHECKPOINT] == ft.data.tags[runner.TAG_OUTPUT]
        assert version.tags[registry.TAG_DATA_HASH] == ft.data.tags[runner.TAG_DATA_HASH]
        assert version.tags[registry.TAG_ARCHITECTURE] == member and version.tags[registry.TAG_GIT_COMMIT]
        assert version.tags[runner.TAG_INPUT] == pre.data.tags[runner.TAG_OUTPUT]
        assert float(version.tags[registry.TAG_EVAL_TOP1]) == pytest.approx(ev.data.metrics["eval/top1"])
        assert client.get_registered_model(name).aliases == {"champion": version.version}
        folder = registry.resolve_model_uri(f"models:/{name}@champion", tracking_uri=uri, cache_dir=root / "cache")
        assert (folder / "model.json").is_file()

    # Checkpoints were handed between stages on S3 only: every recorded output is an s3:// URI, and the only local
    # copies of checkpoint files on this machine are in the weights cache (Ray's scratch copies are deleted after
    # upload); nothing of the runs was written to a local run folder.
    outputs = [r.data.tags[runner.TAG_OUTPUT] for r in stage_runs if runner.TAG_OUTPUT in r.data.tags]
    assert len(outputs) == 4 and all(o.startswith(f"{runs}/") for o in outputs), outputs
    local_state = [p for p in root.rglob("trainer.pt") if (root / "weights-cache") not in p.parents]
    assert local_state == [] and not (root / "runs").exists()

    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id, "report")}
    assert {"report/family_report.md", "report/family_report.json", "report/family_top1_vs_macs.png"} <= artifacts
    for member in MEMBERS:
        assert f"| {member} " in result.report and f"pipe-{member} v1 @champion" in result.report
    assert "Family report: pipeline tiny-family" in output and "all 2 members succeeded" in output
    _check_ui_view(uri, experiment, result, output, capsys.readouterr().out)

    # (3) Again: nothing re-trained, no new run, no new version, the same parent run.
    before = len(client.search_runs([experiment]))
    again = run_pipeline(path, out=lambda _: None)
    assert not again.failed and again.parent_run_id == result.parent_run_id
    assert {s.action for m in again.members for s in m.stages} == {"skip"}
    assert len(client.search_runs([experiment])) == before
    for member in MEMBERS:
        assert len(client.search_model_versions(f"name = 'pipe-{member}'")) == 1
        assert client.get_registered_model(f"pipe-{member}").aliases == {"champion": "1"}

    # An export from a checkpoint on S3 to S3 (jobs/export.py), read back through the weights resolver.
    from metaformer_platform.training.export import load_export

    ft_checkpoint = actions[(MEMBERS[0], "finetune")].checkpoint
    export_url = f"s3://{s3_server.bucket}/pipe/exports/{MEMBERS[0]}"
    assert _export_main([ft_checkpoint, export_url]) == 0
    assert sorted(storage.list_files(export_url)) == ["COMPLETE", "model.json", "model.safetensors"]  # signed marker
    assert load_export(storage.weights.resolve(export_url)).num_classes == 3
    assert _export_main([ft_checkpoint, export_url]) == 2  # an export is there already: refused, nothing replaced

    # (4) The fine-tune changed (a learning rate that wrecks it, on purpose): a new pipeline run, compared with
    # the previous retrain; a drop in top-1 is flagged (limit 0 points) and, with block_on_regression, not promoted.
    spec = yaml.safe_load(path.read_text())
    spec["stages"][1]["overrides"] += ["optim.lr=100", "optim.warmup_epochs=0"]
    spec["regressions"] = {"top1_drop": 0.0}
    spec["registry"]["block_on_regression"] = True
    changed = root / "tiny_family_changed.yaml"
    changed.write_text(yaml.safe_dump(spec))
    lines.clear()
    week = run_pipeline(changed, out=lines.append)
    output = "\n".join(lines)
    assert not week.failed and week.parent_run_id != result.parent_run_id, output
    assert week.previous_run_id == result.parent_run_id
    assert {(m.model, s.stage, s.action) for m in week.members for s in m.stages} == {
        (m, st, "skip" if st == "pretrain" else "run") for m in MEMBERS for st in ("pretrain", "finetune", "evaluate")}
    before, now = (_metrics(_rest(uri, "runs/get", run_id=r)["run"]) for r in (result.parent_run_id, week.parent_run_id))
    assert f"Against the previous retrain (pipeline run {result.parent_run_id}):" in week.report
    flagged = []
    for member in MEMBERS:
        top1, was = now[f"{member}/top1"], before[f"{member}/top1"]
        assert top1 == pytest.approx(week.members[MEMBERS.index(member)].figures["top1"])
        row = next(line for line in week.report.splitlines() if line.startswith(f"| {member} ") and "->" in line)
        assert f"{was:.2f} -> {top1:.2f} ({top1 - was:+.2f})" in row, row
        version = _rest(uri, "model-versions/get", name=f"pipe-{member}", version="2")["model_version"]
        decision = _tags(version)[registry.TAG_PROMOTION]
        if top1 < was:  # the regression: flagged in the report and the console, the champion kept, and why
            flagged.append(member)
            assert "REGRESSION: top1" in row and f"[{member}] REGRESSION against the previous retrain: top1" in output
            assert decision.startswith("candidate: blocked: regression against the previous retrain: top1 ")
            assert client.get_registered_model(f"pipe-{member}").aliases["champion"] == "1"
        else:
            assert row.split("|")[-2].strip() == "no" and not decision.startswith("candidate: blocked")
    assert flagged, f"the wrecked fine-tune scored no lower than the first one: {before} {now}"


def _check_ui_view(uri: str, experiment: str, result: Any, output: str, stdout: str) -> None:
    """What a person sees in the MLflow UI, through the REST API it reads: every member and stage a top-level row
    with the same comparison columns, the family's summary on the pipeline's run, the evaluation on the registry
    versions, and links that open the training view (MLflow's own GenAI-view links silenced)."""
    runs = _rest(uri, "runs/search", "POST", experiment_ids=[experiment], max_results=100)["runs"]
    top = [r for r in runs if "mlflow.parentRunId" not in _tags(r)]
    stages = [r for r in top if runner.TAG_STAGE_KEY in _tags(r)]
    assert len(stages) == 6 and len(top) == 7  # 2 members x 3 stages and the pipeline's run, nothing folded
    for run in stages:
        metrics, tags = _metrics(run), _tags(run)
        assert {"params_m", "gmacs", "img_size"} <= set(metrics), metrics
        assert metrics["img_size"] == 32 and tags[compare.TAG_DATA] == "synthetic-shapes-v1 32px"
        if tags[runner.TAG_PIPELINE_STAGE] == "evaluate":
            assert metrics["top1"] == float(f"{metrics['eval/top1']:.4g}") and metrics["top5"] == pytest.approx(
                metrics["eval/top5"], rel=1e-3)
    parent = _metrics(_rest(uri, "runs/get", run_id=result.parent_run_id)["run"])
    evals = {_tags(r)[runner.TAG_MEMBER]: _metrics(r) for r in stages if _tags(r)[runner.TAG_PIPELINE_STAGE] == "evaluate"}
    for member in MEMBERS:
        assert parent[f"{member}/top1"] == evals[member]["eval/top1"] and parent[f"{member}/top5"] == evals[member]["eval/top5"]
        (version,) = _rest(uri, "model-versions/search", filter=f"name = 'pipe-{member}'")["model_versions"]
        tags = _tags(version)
        assert float(tags[registry.TAG_EVAL_TOP1]) == evals[member]["eval/top1"]
        assert float(tags[registry.TAG_EVAL_TOP5]) == pytest.approx(evals[member]["eval/top5"], rel=1e-3)
        assert tags[registry.TAG_EVAL_DATA] == "synthetic-shapes-v1 32px" and float(tags[registry.TAG_GMACS]) > 0
        assert tags[registry.TAG_PROMOTION].startswith("champion: first evaluated version: top-1 ")
    assert parent["family/best_top1"] == max(e["eval/top1"] for e in evals.values()) and parent["family/members_ok"] == 2
    link = f"{uri}/#/experiments/{experiment}/runs/{result.parent_run_id}?workflowType=machine_learning"
    assert link in output
    # The runs table as the family is compared: MLflow's shared view, stored on the experiment, opened by the link
    shared = {t["key"]: t["value"] for t in _rest(uri, "experiments/get", experiment_id=experiment)["experiment"]["tags"]}
    columns = json.loads(shared["mlflow.sharedViewState.tiny-family"])["selectedColumns"]
    assert {f"metrics.`{c}`" for c in compare.COLUMNS} | {"tags.`metaformer.member`"} <= set(columns)
    assert f"the family side by side: {uri}/#/experiments/{experiment}?workflowType=machine_learning" \
           "&viewStateShareKey=tiny-family" in output
    assert "View run" not in stdout and "View experiment" not in stdout
    assert f"[{MEMBERS[0]}/pretrain] " in stdout and f"[{MEMBERS[1]}/finetune] " in stdout  # whose line it is
    assert "Not compared with the paper (ImageNet-1k at 224 px)" in result.report and "vs paper" in result.report


def _export_main(argv: list[str]) -> int:
    import importlib.util

    spec = importlib.util.spec_from_file_location("export_job", REPO / "jobs" / "export.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return int(module.main(argv))
