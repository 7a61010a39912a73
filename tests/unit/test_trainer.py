"""The Trainer in one process (no Ray): it learns, checkpoints, and resumes to the same losses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dist_helpers import run_ranks

from metaformer_platform.config import load_config
from metaformer_platform.data.build.synthetic import ensure_synthetic_shards
from metaformer_platform.storage import checkpoint_format as fmt
from metaformer_platform.strategies.base import DistContext
from metaformer_platform.training import checkpoint as ckpt
from metaformer_platform.training.trainer import Trainer


class Recorder:
    def __init__(self) -> None:
        self.rows: list[tuple[int, dict[str, float]]] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.rows.append((step, dict(metrics)))

    def series(self, key: str) -> dict[int, float]:
        return {step: m[key] for step, m in self.rows if key in m}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return ensure_synthetic_shards(
        tmp_path_factory.mktemp("synthetic"), num_classes=4, train_samples=512, val_samples=128,
        image_size=32, samples_per_shard=100, seed=0,
    )


def _cfg(*overrides: str):
    return load_config(
        None,
        [
            "model.name=poolformer_debug", "model.drop_path_rate=0.0", "data.img_size=32", "data.crop_pct=1.0",
            "data.num_workers=0", "data.auto_augment=null", "data.re_prob=0", "data.mixup_alpha=0",
            "data.cutmix_alpha=0", "data.label_smoothing=0", "trainer.batch_size=32", "trainer.precision=fp32",
            "trainer.log_every_steps=1", "trainer.torch_threads=1", "optim.lr=3e-3", "optim.warmup_epochs=0",
            "scaling.num_workers=1", *overrides,
        ],
    )


def _trainer(cfg, shards, recorder, reported=None, resume_from=None) -> Trainer:
    def report(metrics, checkpoint_dir):
        if reported is not None and checkpoint_dir is not None:
            # Keep a copy: the Trainer deletes its scratch folder after reporting, as after a Ray upload.
            import shutil

            dest = reported / f"step-{int(metrics['step'])}"
            shutil.copytree(checkpoint_dir, dest)

    return Trainer(cfg, DistContext(), data_root=shards, tracker=recorder, report=report, resume_from=resume_from)


def test_trains_and_validates_above_chance(shards):
    rec = Recorder()
    trainer = _trainer(_cfg("trainer.max_steps=120", "trainer.val_every_steps=120"), shards, rec)
    assert trainer.steps_per_epoch == 512 // 32
    final = trainer.train()
    losses = list(rec.series("train/loss").values())
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10, losses
    assert final["val/samples"] == 128  # every validation sample exactly once
    assert final["val/top1"] > 50.0  # chance is 25%
    assert final["val/top5"] == 100.0  # only 4 classes


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_loaders_make_batches_in_the_memory_format_the_model_trains_in(shards, precision):
    """channels_last=auto is resolved before the loaders are built: an fp32 CPU job gets NCHW batches (not NHWC
    batches copied back to NCHW every step), a bf16 one channels_last."""
    trainer = _trainer(_cfg(f"trainer.precision={precision}", "trainer.max_steps=1"), shards, Recorder())
    assert trainer.settings.channels_last is (precision == "bf16")
    images, _ = next(iter(trainer.train_loader))
    expected = torch.channels_last if precision == "bf16" else torch.contiguous_format
    assert images.is_contiguous(memory_format=expected) and trainer.memory_format == expected
    assert not (precision == "fp32" and images.is_contiguous(memory_format=torch.channels_last))


def test_checkpoint_resume_gives_identical_losses(shards, tmp_path):
    cfg = _cfg("trainer.max_steps=20", "trainer.checkpoint_every_steps=6", "data.val_split=null")
    full = Recorder()
    _trainer(cfg, shards, full, reported=tmp_path).train()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-12", "step-18", "step-20", "step-6"]
    assert fmt.is_complete(tmp_path / "step-12")

    resumed = Recorder()
    trainer = _trainer(cfg, shards, resumed, resume_from=tmp_path / "step-12")
    assert trainer.step == 12
    trainer.train()
    expected = {s: v for s, v in full.series("train/loss").items() if s > 12}
    assert resumed.series("train/loss") == expected  # bit-identical, steps 13..20, across the epoch boundary at 16


def test_resume_refuses_incomplete_or_foreign_checkpoints(shards, tmp_path):
    cfg = _cfg("trainer.max_steps=2", "trainer.checkpoint_every_steps=2", "data.val_split=null")
    _trainer(cfg, shards, Recorder(), reported=tmp_path).train()
    good = tmp_path / "step-2"
    half = tmp_path / "half"
    half.mkdir()
    (half / "model.pt").write_bytes(b"partial")
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        _trainer(cfg, shards, Recorder(), resume_from=half)
    other = _cfg("trainer.max_steps=2", "data.val_split=null", "model.num_classes=7")
    with pytest.raises(ValueError, match=r"holds poolformer_debug with 4 classes.*7"):
        _trainer(other, shards, Recorder(), resume_from=good)


def test_rng_state_round_trip():
    state = ckpt.rng_state()
    a = (torch.rand(3), __import__("random").random(), __import__("numpy").random.rand())
    ckpt.set_rng_state(state)
    b = (torch.rand(3), __import__("random").random(), __import__("numpy").random.rand())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


def test_bad_shards_are_counted_in_metrics_and_fatal_above_the_threshold(tmp_path):
    import os

    from metaformer_platform.data import DataFaultError

    root = ensure_synthetic_shards(
        tmp_path, num_classes=4, train_samples=128, val_samples=64, image_size=32, samples_per_shard=32, seed=0,
    )
    for name in ("train-000001.tar", "val-000000.tar"):  # bit rot: same size, so the manifest check passes
        path = root / name
        path.write_bytes(os.urandom(path.stat().st_size))
    rec = Recorder()
    cfg = _cfg(
        "trainer.max_steps=4", "data.max_bad_fraction=0.5", "trainer.log_every_steps=2",
        "trainer.checkpoint_every_steps=2",
    )
    saved = tmp_path / "checkpoints"
    saved.mkdir()
    trainer = _trainer(cfg, root, rec, reported=saved)
    final = trainer.train()
    halfway = rec.series("system/data_skipped_samples")[2]
    assert 0 < halfway < 32  # counted as the shuffled epoch reaches the bad shard's samples
    assert rec.series("system/data_skipped_samples")[4] == 32.0 and rec.series("system/data_bad_shards") == {2: 1.0, 4: 1.0}
    assert final["val/samples"] == 32 and final["val/skipped_samples"] == 32  # 32 + 32 == the split's 64
    assert trainer._data_faults() == {"system/data_skipped_samples": 64.0, "system/data_bad_shards": 2.0}  # with val's
    # a job resumed mid-epoch keeps the counts of its checkpoint (and so the threshold cannot be dodged)
    resumed = Recorder()
    _trainer(cfg, root, resumed, resume_from=saved / "step-2").train()
    assert resumed.series("system/data_skipped_samples") == {4: 32.0}
    with pytest.raises(DataFaultError, match=r"more than max_bad_fraction=0.1; bad shards: .*train-000001.tar"):
        _trainer(_cfg("trainer.max_steps=4", "data.max_bad_fraction=0.1"), root, Recorder()).train()


class _FaultyLoader:
    def __init__(self, skipped: int, shards: list[str]) -> None:
        self.stats = {"skipped_samples": skipped, "bad_shards": {name: {} for name in shards}}

    def fault_stats(self) -> dict:
        return self.stats


def _data_faults_on_rank(rank: int, world: int, init_method: str, results) -> None:
    from types import SimpleNamespace

    import torch.distributed as tdist

    tdist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    try:
        dist = SimpleNamespace(distributed=True, device=torch.device("cpu"), world_size=world)
        # rank 0: 3 bad samples in a.tar; rank 1: 4, in a.tar (a shard split over both ranks) and b.tar
        shards = ["a.tar"] if rank == 0 else ["a.tar", "b.tar"]
        me = SimpleNamespace(train_loader=_FaultyLoader(3 + rank, shards), val_loader=None, dist=dist)
        clean = SimpleNamespace(train_loader=_FaultyLoader(0, []), val_loader=None, dist=dist)
        results.put((rank, Trainer._data_faults(me), Trainer._data_faults(clean)))
    finally:
        tdist.destroy_process_group()


def test_fault_metrics_are_reduced_over_ranks(tmp_path):
    got = run_ranks(_data_faults_on_rank, tmp_path)
    assert [rank for rank, _, _ in got] == [0, 1]
    for _, faults, clean in got:  # the same on both ranks: 3 + 4 samples, 2 distinct shards
        assert faults == {"system/data_skipped_samples": 7.0, "system/data_bad_shards": 2.0}
        assert clean == {"system/data_skipped_samples": 0.0, "system/data_bad_shards": 0.0}


class _StopAt(Recorder):
    """Asks the Trainer to stop once it has logged step ``at`` (as the worker's stop watcher would, mid-step)."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at = at
        self.trainer: Trainer | None = None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        super().log_metrics(metrics, step)
        if step == self.at and "train/loss" in metrics and self.trainer is not None:
            self.trainer.request_stop()


def test_request_stop_checkpoints_at_the_next_step_boundary_and_the_resume_loses_no_step(shards, tmp_path):
    cfg = _cfg("trainer.max_steps=10", "trainer.checkpoint_every_steps=4", "data.val_split=null")
    full = Recorder()
    _trainer(cfg, shards, full).train()

    stopping, reported = _StopAt(6), tmp_path / "reported"
    trainer = _trainer(cfg, shards, stopping, reported)
    stopping.trainer = trainer
    out = trainer.train()
    assert trainer.stopped and trainer.step == 6 and out["step"] == 6.0
    assert sorted(p.name for p in reported.iterdir()) == ["step-4", "step-6"]  # the stop's own checkpoint
    assert fmt.incomplete_reason(reported / "step-6") is None

    resumed = Recorder()
    again = _trainer(cfg, shards, resumed, resume_from=reported / "step-6")
    assert again.step == 6
    again.train()
    assert not again.stopped and again.step == 10
    losses = {**stopping.series("train/loss"), **resumed.series("train/loss")}
    assert sorted(stopping.series("train/loss")) == list(range(1, 7))
    assert sorted(resumed.series("train/loss")) == list(range(7, 11))  # no step lost or doubled
    assert losses == pytest.approx(full.series("train/loss"), rel=1e-5)  # and exactly the uninterrupted run's


def test_a_drain_notice_checkpoints_once_at_the_next_log_window_and_training_goes_on(shards, tmp_path):
    """Ray's preemption notice (a node being drained) from step 5 on, asked every log window (2 steps): one
    checkpoint at step 6, none again while the same drain lasts, training to the end as Ray Train recommends."""
    cfg = _cfg("trainer.max_steps=10", "trainer.checkpoint_every_steps=8", "trainer.log_every_steps=2",
               "data.val_split=null")
    reported, rec, asked = tmp_path / "reported", Recorder(), []
    trainer = _trainer(cfg, shards, rec, reported)

    def draining() -> bool:
        asked.append(trainer.step)
        return trainer.step >= 5

    trainer._draining = draining
    trainer.train()
    assert asked == [2, 4, 6, 8, 10]  # the same steps on every rank: the notice is Ray's collective
    assert sorted(p.name for p in reported.iterdir()) == ["step-10", "step-6", "step-8"]
    assert not trainer.stopped and trainer.step == 10
    assert fmt.incomplete_reason(reported / "step-6") is None


def _stop_agreement_on_rank(rank: int, world: int, init_method: str, results) -> None:
    import threading
    from types import SimpleNamespace

    import torch.distributed as tdist

    tdist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    try:
        dist = SimpleNamespace(distributed=True, device=torch.device("cpu"), world_size=world)
        me = SimpleNamespace(dist=dist, _stop_requested=threading.Event(), _stop_group=None)
        before = Trainer._stop_agreed(me)  # type: ignore[arg-type]
        if rank == 1:  # only one rank's watcher saw the driver's flag
            me._stop_requested.set()
        results.put((rank, before, Trainer._stop_agreed(me)))  # type: ignore[arg-type]
    finally:
        tdist.destroy_process_group()


def test_one_ranks_stop_request_stops_every_rank_at_the_same_step(tmp_path):
    assert run_ranks(_stop_agreement_on_rank, tmp_path) == [(0, False, True), (1, False, True)]


def test_the_ledger_meter_accounts_the_groups_steps_validation_and_checkpoints(shards, tmp_path):
    """Rank 0's run-ledger counters after a real run: its steps, the step timer's data wait and phases, the time
    of each validation and checkpoint; the model's training FLOPs (6 x MACs at the run's resolution) and MFU."""
    from metaformer_platform.models import model_complexity
    from metaformer_platform.training.trainer import build_model

    rec = Recorder()
    cfg = _cfg("trainer.max_steps=20", "trainer.val_every_steps=10", "trainer.checkpoint_every_steps=10")
    trainer = _trainer(cfg, shards, rec, reported=tmp_path)
    trainer.train()
    s = trainer.meter.snapshot()
    assert s is not None and (s["from_step"], s["step"], s["workers"]) == (0, 20, 1)
    assert s["checkpoint_s"] == pytest.approx(sum(trainer.checkpoint_stalls)) and len(trainer.checkpoint_stalls) == 2
    assert s["validation_s"] > 0
    timed = s["data_s"] + sum(s["phases"].values())  # the step timer's own seconds
    train = s["time"] - s["began"] - s["validation_s"] - s["checkpoint_s"]
    assert 0.8 * train < timed <= train  # the rest: bookkeeping between steps, counted as compute
    macs = model_complexity(build_model(cfg, 4), 32)["macs"]
    assert s["flops_per_sample"] == 6.0 * macs
    if s["peak_flops"] is not None:  # a CPU whose vector units are known: MFU per log window
        mfus = list(rec.series("system/train_mfu").values())
        assert len(mfus) == 20 and all(0 < v < 1 for v in mfus)
