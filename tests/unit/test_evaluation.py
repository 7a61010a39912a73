"""Evaluation without Ray: the metric sums (per class, stand-ins left out), the same numbers from a checkpoint,
an export and Trainer.validate(), the data hash, and bad input to the finetune/evaluate entry points (exit 2)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from metaformer_platform.config import load_config
from metaformer_platform.data import IGNORE_LABEL, load_manifest
from metaformer_platform.data.build.synthetic import ensure_synthetic_shards
from metaformer_platform.evaluation.metrics import MetricSums
from metaformer_platform.evaluation.report import build_report, split_hash, summary_line
from metaformer_platform.launch.checks import check_eval_batches, check_label_set, prepare_evaluation
from metaformer_platform.launch.plan import InitialWeights, evaluation_config
from metaformer_platform.launch.workers import evaluate_worker
from metaformer_platform.storage.weights import read_weights_info
from metaformer_platform.strategies.base import DistContext
from metaformer_platform.training.export import export_checkpoint
from metaformer_platform.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]


def test_metric_sums_per_class_and_ignored_stand_ins():
    # 3 classes; rows are logits. Sample 4 is a stand-in (IGNORE_LABEL): it must change no sum.
    logits = torch.tensor(
        [
            [3.0, 1.0, 0.0],  # label 0, top-1 hit
            [0.0, 2.0, 1.0],  # label 2, top-1 miss (predicts 1)
            [0.0, 1.0, 5.0],  # label 2, hit
            [1.0, 0.0, 4.0],  # label 1, miss
            [9.0, 0.0, 0.0],  # stand-in
        ]
    )
    targets = torch.tensor([0, 2, 2, 1, IGNORE_LABEL])
    sums = MetricSums(3)
    sums.update(logits[:2], targets[:2])  # two batches: sums add up
    sums.update(logits[2:], targets[2:])
    sums.add_skipped(1)
    sums.seconds = 2.0
    m = sums.metrics("eval")
    assert m["eval/samples"] == 4 and m["eval/skipped_samples"] == 1
    assert m["eval/top1"] == 50.0
    assert m["eval/top5"] == 100.0  # min(5, classes) = 3: every label is in the top 3
    expected_loss = F.cross_entropy(logits[:4], targets[:4]).item()
    assert math.isclose(m["eval/loss"], expected_loss, rel_tol=1e-6)
    assert m["eval/images_per_s"] == 2.0
    assert sums.per_class_top1() == [100.0, 0.0, 50.0]
    assert sums.class_samples.tolist() == [1.0, 1.0, 2.0]
    # the per-class numbers are consistent with top-1: hits summed over classes / samples
    assert 100.0 * sums.class_top1.sum().item() / sums.class_samples.sum().item() == m["eval/top1"]

    # a class without samples is None, and the sums survive the trip through ray.train.report (plain lists)
    sums2 = MetricSums(4)
    sums2.update(torch.eye(4)[:2] * 5, torch.tensor([0, 1]))
    again = MetricSums.from_dict(json.loads(json.dumps(sums2.to_dict())))
    assert again.per_class_top1() == [100.0, 100.0, None, None]
    assert again.metrics("x") == {**sums2.metrics("x")}

    with pytest.raises(ValueError, match="outside the model's 3 classes"):
        MetricSums(3).update(logits[:1], torch.tensor([3]))
    with pytest.raises(RuntimeError, match="no samples"):
        MetricSums(3).metrics("eval")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    # 90 validation samples in shards of 40, 40, 10
    return ensure_synthetic_shards(
        tmp_path_factory.mktemp("synthetic"), num_classes=4, train_samples=256, val_samples=90,
        image_size=32, samples_per_shard=40, seed=0,
    )


def _cfg(*overrides: str):
    return load_config(
        None,
        [
            "model.name=poolformer_debug", "model.drop_path_rate=0.0", "data.img_size=32", "data.crop_pct=1.0",
            "data.num_workers=0", "data.auto_augment=null", "data.re_prob=0", "data.mixup_alpha=0",
            "data.cutmix_alpha=0", "trainer.batch_size=16", "trainer.precision=fp32",
            "trainer.torch_threads=1", "optim.lr=3e-3", "optim.warmup_epochs=0", "scaling.num_workers=1",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory) -> tuple[Path, Path, dict[str, float]]:
    """(checkpoint, export, the Trainer's validation at that checkpoint) of a short run."""
    tmp = tmp_path_factory.mktemp("trained")
    saved = tmp / "ckpt"

    def report(metrics, checkpoint_dir):
        if checkpoint_dir is not None:
            import shutil

            shutil.copytree(checkpoint_dir, saved)

    cfg = _cfg("trainer.max_steps=16", "trainer.checkpoint_every_steps=16", "trainer.val_every_steps=16")
    validated = Trainer(cfg, DistContext(), data_root=shards, report=report).train()
    export_checkpoint(saved, tmp / "export")
    return saved, tmp / "export", validated


def test_checkpoint_export_and_trainer_validation_agree(shards, trained):
    saved, export, validated = trained
    assert validated["val/samples"] == 90 and 25.0 < validated["val/top1"] <= 100.0
    names = load_manifest(shards).class_names
    assert json.loads((export / "model.json").read_text())["class_names"] == list(names)  # the label set travels

    for source in (saved, export):
        info = read_weights_info(source)
        assert (info.model_name, info.num_classes, info.class_names, info.img_size) == (
            "poolformer_debug", 4, names, 32,
        )
        # a config that names no model: the weights decide it
        cfg = _cfg("stage=evaluate", "trainer.batch_size=7")
        weights, manifest = prepare_evaluation(cfg, source, shards)
        ecfg = evaluation_config(cfg, weights)
        sums = evaluate_worker(ecfg, DistContext(), shards, source)
        # what the worker ran with travels to the driver's report (channels_last: auto resolved for fp32)
        assert sums.settings == {"precision": "fp32", "channels_last": False}
        assert MetricSums.from_dict(sums.to_dict()).settings == sums.settings
        m = sums.metrics("val")
        assert m["val/samples"] == 90 and m["val/skipped_samples"] == 0  # batch 7 leaves a partial batch
        assert m["val/top1"] == validated["val/top1"] and m["val/top5"] == validated["val/top5"]
        assert math.isclose(m["val/loss"], validated["val/loss"], rel_tol=1e-5)
        per_class = sums.per_class_top1()
        hits = sum(p / 100 * n for p, n in zip(per_class, sums.class_samples.tolist(), strict=True))
        assert math.isclose(100 * hits / 90, m["val/top1"], rel_tol=1e-9)


def test_an_evaluate_job_with_auto_workers_is_checked_before_and_after_the_layout_is_chosen(shards, trained):
    _, export, _ = trained
    # scaling.num_workers=auto (the default) reaches the driver's checks before the layout is chosen: judged as
    # one worker (it used to divide the sample count by "auto", a TypeError)
    cfg = _cfg("stage=evaluate", "scaling.num_workers=auto")
    weights, manifest = prepare_evaluation(cfg, export, shards)
    ecfg = evaluation_config(cfg, weights)
    assert ecfg.scaling.num_workers == "auto"
    # the launcher checks again with the number it chose: 90 samples cannot give 91 workers a batch each
    chosen = ecfg.model_copy(update={"scaling": ecfg.scaling.model_copy(update={"num_workers": 91})})
    with pytest.raises(ValueError, match="fewer samples than ranks"):
        check_eval_batches(chosen, manifest)
    check_eval_batches(ecfg.model_copy(update={"scaling": ecfg.scaling.model_copy(update={"num_workers": 2})}),
                       manifest)


def test_label_set_and_model_checks(shards, tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    (export / "model.safetensors").write_bytes(b"")
    names = list(load_manifest(shards).class_names)
    (export / "model.json").write_text(json.dumps({"model_name": "poolformer_debug", "num_classes": 4,
                                                   "class_names": names[::-1]}))
    info = read_weights_info(export)
    with pytest.raises(ValueError, match=r"class 0 is 'circle' in the data but 'triangle'|names its classes"):
        check_label_set(info, 4, tuple(names), "the data")
    with pytest.raises(ValueError, match="has 5 classes but poolformer_debug"):
        check_label_set(info, 5, (), "the data")
    with pytest.raises(ValueError, match="holds poolformer_debug, but model.name=poolformer_s12"):
        prepare_evaluation(load_config(None, ["stage=evaluate", "model.name=poolformer_s12",
                                              f"model.init_from={export}"]), export, shards)
    with pytest.raises(ValueError, match="an evaluate job scores trained weights"):
        prepare_evaluation(load_config(None, ["stage=evaluate"]), None, shards)
    with pytest.raises(ValueError, match="neither an export"):
        read_weights_info(tmp_path)


def test_report_checks_the_total_and_shows_the_paper_beside_imagenet_results(shards):
    manifest = load_manifest(shards)
    sums = MetricSums(1000)
    sums.update(torch.eye(1000)[torch.zeros(90, dtype=torch.long)], torch.arange(90) % 2)  # class 0: 45 of 90
    sums.add_skipped(0)
    sums.seconds = 1.0
    cfg = load_config(None, ["stage=evaluate", "model.name=poolformer_s12", "model.num_classes=1000"])
    weights = read_weights_info_stub()
    report = build_report(sums, cfg=cfg, weights=weights, weights_uri="models:/poolformer_s12@champion",
                          manifest=manifest, expected_samples=90)
    assert report["eval/top1"] == 50.0 and report["paper_top1"] == 77.2
    assert report["precision"] == "auto"  # no worker said what it resolved: the config's value
    sums.settings = {"precision": "bf16", "channels_last": True}
    report = build_report(sums, cfg=cfg, weights=weights, weights_uri="models:/poolformer_s12@champion",
                          manifest=manifest, expected_samples=90)
    assert (report["precision"], report["channels_last"]) == ("bf16", True)
    line = summary_line(report)
    assert "measured top-1 50.00% at 224 px, paper (ImageNet-1k, 224 px) 77.2%" in line
    with pytest.raises(RuntimeError, match="dropped or counted twice"):
        build_report(sums, cfg=cfg, weights=weights, weights_uri="x", manifest=manifest, expected_samples=91)
    small = load_config(None, ["stage=evaluate", "model.name=poolformer_s12", "model.num_classes=4"])
    sums4 = MetricSums(4)
    sums4.update(torch.eye(4)[torch.arange(90) % 4], torch.arange(90) % 4)
    sums4.seconds = 1.0
    report = build_report(sums4, cfg=small, weights=weights, weights_uri="x", manifest=manifest, expected_samples=90)
    assert report["paper_top1"] is None and "paper" not in summary_line(report)  # not ImageNet-1k


def read_weights_info_stub():
    from metaformer_platform.storage.weights import WeightsInfo

    return WeightsInfo("export", Path("/nowhere"), "poolformer_s12", 1000, {}, (), 224, 0.9, 10)


@pytest.fixture(scope="module")
def sqlite_registry(tmp_path_factory) -> str:
    """One sqlite MLflow store for the module (creating its schema takes seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def test_registry_uri_resolves_on_the_driver_and_in_workers(trained, sqlite_registry, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from metaformer_platform.launch.checks import check_init_from, resolve_init_from
    from metaformer_platform.tracking import registry

    _, export, _ = trained
    monkeypatch.setenv("METAFORMER_WEIGHTS_CACHE", str(tmp_path / "cache"))
    uri = sqlite_registry
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("unit-eval")).info.run_id
    registry.register_export(export, "unit_debug", tracking_uri=uri, run_id=run_id,
                             lineage_tags=registry.lineage_tags("ckpt", "hash", git_commit="x"))
    client.set_registered_model_alias("unit_debug", "champion", "1")
    cfg = _cfg("stage=finetune", "model.init_from=models:/unit_debug@champion", f"tracking.tracking_uri={uri}")
    local = resolve_init_from(cfg)
    assert local.parent == tmp_path / "cache" / "models" / "unit_debug" and local.name.startswith("v1-")
    assert (local / "model.safetensors").is_file()
    info = check_init_from(cfg, local)  # same architecture: accepted
    assert info is not None
    # a worker that cannot see the driver's copy (another node) fetches its own
    elsewhere = InitialWeights(str(cfg.model.init_from), tmp_path / "on-the-driver-node", info, uri)
    assert elsewhere.on_this_node() == local
    assert InitialWeights(str(cfg.model.init_from), export, info, uri).on_this_node() == export
    with pytest.raises(ValueError, match="holds poolformer_debug, but this job trains poolformer_s12"):
        check_init_from(_cfg("stage=finetune", "model.name=poolformer_s12", "model.init_from=models:/x@y"), local)


def test_split_hash_follows_the_split_and_labels(shards, tmp_path):
    manifest = load_manifest(shards)
    digest, of = split_hash(manifest, "val")
    assert len(digest) == 64 and "val" in of
    assert split_hash(load_manifest(shards), "val") == (digest, of)  # stable
    assert split_hash(manifest, "train")[0] != digest
    import shutil

    other = tmp_path / "renamed"
    shutil.copytree(shards, other)
    body = json.loads((other / "_info.json").read_text())
    body["class_names"] = body["class_names"][::-1]
    (other / "_info.json").write_text(json.dumps(body))
    assert split_hash(load_manifest(other), "val")[0] != digest  # same images, other labels: not comparable


# -- the entry points: bad input exits 2 before Ray or MLflow ----------------------------------------------


def test_bad_input_to_finetune_and_evaluate_exits_2(shards, sqlite_registry, tmp_path, monkeypatch, capsys):
    from metaformer_platform.launch.cli import run_main

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # were Ray reached, the job would hang, then fail
    monkeypatch.chdir(tmp_path)
    names = list(load_manifest(shards).class_names)

    def weights(num_classes: int, class_names: list[str]) -> str:
        export = tmp_path / f"export-{num_classes}-{'-'.join(class_names)}"
        export.mkdir(exist_ok=True)
        (export / "model.safetensors").write_bytes(b"")
        (export / "model.json").write_text(json.dumps(
            {"model_name": "poolformer_debug", "num_classes": num_classes, "class_names": class_names}))
        return f"model.init_from={export}"

    common = [f"data.source={shards}", f"run.storage_path={tmp_path / 'runs'}", "trainer.batch_size=8",
              "data.img_size=32"]
    finetune_preset = ROOT / "jobs" / "configs" / "finetune_384.yaml"  # jobs/finetune.py's default
    cases = [
        ("evaluate", [weights(5, [])], "has 4 classes but poolformer_debug"),
        ("evaluate", [weights(4, names[::-1])], "names its classes differently"),
        ("evaluate", ["model.name=poolformer_s12", weights(4, names)], "but model.name=poolformer_s12"),
        ("finetune", ["model.name=poolformer_debug"], "a finetune job starts from trained weights"),
        ("finetune", ["model.name=poolformer_s12", weights(4, names)],
         "holds poolformer_debug, but this job trains poolformer_s12"),
        ("evaluate", ["model.init_from=models:/no_such_model@champion",
                      f"tracking.tracking_uri={sqlite_registry}"],
         "no registered model 'no_such_model'"),
    ]
    for stage, args, message in cases:
        code = run_main(stage, "", [*common, *args], finetune_preset if stage == "finetune" else None)
        err = capsys.readouterr().err
        assert code == 2 and message in err, (stage, args, err[-2000:])
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()

    # and as a user runs it: the entry point itself
    out = subprocess.run([sys.executable, str(ROOT / "jobs" / "evaluate.py"), *common], capture_output=True,
                         text=True, timeout=60, cwd=tmp_path, env={**os.environ, "RAY_ADDRESS": "127.0.0.1:1"})
    assert out.returncode == 2 and "an evaluate job scores trained weights: set model.init_from" in out.stderr
