"""EMA of the weights (timm's ModelEmaV3): the hand-computed lerp, exact resume, validation, export, and FSDP2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from dist_helpers import run_ranks
from loader_helpers import RandomBatches

from metaformer_platform.config import ConfigError, load_config
from metaformer_platform.data.build.synthetic import ensure_synthetic_shards
from metaformer_platform.storage import checkpoint_format as fmt
from metaformer_platform.strategies.base import DistContext
from metaformer_platform.training.export import export_checkpoint
from metaformer_platform.training.trainer import Trainer

BASE = [
    "model.name=poolformer_debug", "model.drop_path_rate=0.0", "data.img_size=32", "data.crop_pct=1.0",
    "data.num_workers=0", "data.auto_augment=null", "data.re_prob=0", "data.mixup_alpha=0",
    "data.cutmix_alpha=0", "data.label_smoothing=0", "trainer.batch_size=32", "trainer.precision=fp32",
    "trainer.log_every_steps=1", "trainer.torch_threads=1", "optim.lr=3e-3", "optim.warmup_epochs=0",
    "scaling.num_workers=1",
]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return ensure_synthetic_shards(
        tmp_path_factory.mktemp("synthetic"), num_classes=4, train_samples=256, val_samples=64,
        image_size=32, samples_per_shard=64, seed=0,
    )


def _trainer(shards: Path, *overrides: str, keep: Path | None = None, resume_from: Path | None = None) -> Trainer:
    def report(metrics, checkpoint_dir):
        if keep is not None and checkpoint_dir is not None:
            shutil.copytree(checkpoint_dir, keep / f"step-{int(metrics['step'])}")

    cfg = load_config(None, [*BASE, *overrides])
    return Trainer(cfg, DistContext(), data_root=shards, report=report, resume_from=resume_from)


def _record_updates(trainer: Trainer) -> list[tuple[int, dict[str, torch.Tensor]]]:
    """Every EMA update's step number and the model weights it was given."""
    seen: list[tuple[int, dict[str, torch.Tensor]]] = []
    update = trainer.ema.update

    def recording(model, step=None):
        seen.append((step, {k: v.detach().clone() for k, v in model.state_dict().items()}))
        update(model, step=step)

    trainer.ema.update = recording
    return seen


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_is_the_hand_computed_lerp_of_the_weights(shards, warmup):
    decay = 0.8
    trainer = _trainer(shards, "trainer.max_steps=6", f"trainer.ema_decay={decay}", f"trainer.ema_warmup={warmup}",
                       "data.val_split=null", "trainer.checkpoint_every_steps=100")
    seen = _record_updates(trainer)
    trainer.train()
    assert [step for step, _ in seen] == [1, 2, 3, 4, 5, 6]  # after every optimizer step
    expected = {k: v.clone() for k, v in seen[0][1].items()}  # step 1: the EMA takes the weights
    for step, weights in seen[1:]:
        d = min(decay, 1 - step ** (-2 / 3)) if warmup else decay  # ModelEmaV3: 1 - (1 + (step - 1))^(-2/3)
        expected = {k: d * expected[k] + (1 - d) * w for k, w in weights.items()}
    got = trainer.ema.module.state_dict()
    assert got.keys() == expected.keys()
    for k in expected:
        assert got[k].dtype == torch.float32
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-7, msg=k)
    final = trainer.strategy.module.state_dict()
    assert any(not torch.allclose(got[k], final[k]) for k in final)  # not merely the last weights


def test_resume_with_ema_is_exact(shards, tmp_path):
    args = ("trainer.max_steps=10", "trainer.ema_decay=0.9", "trainer.checkpoint_every_steps=4", "data.val_split=null")
    full = _trainer(shards, *args, keep=tmp_path)
    full.train()
    assert (tmp_path / "step-4" / fmt.EMA_FILE).is_file()
    resumed = _trainer(shards, *args, resume_from=tmp_path / "step-4")
    assert resumed.step == 4
    saved = fmt.load_tensors(tmp_path / "step-4" / fmt.EMA_FILE)
    for k, v in resumed.ema.module.state_dict().items():
        assert torch.equal(v, saved[k]), k
    resumed.train()
    for name, (a, b) in {"ema": (full.ema.module, resumed.ema.module), "model": (full.strategy.module,
                                                                                 resumed.strategy.module)}.items():
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name  # bit-identical after steps 5..10


def test_ema_is_validated_and_exported(shards, tmp_path):
    # a decay near 0 makes the EMA the weights themselves: both scores must then agree exactly
    trainer = _trainer(shards, "trainer.max_steps=8", "trainer.ema_decay=1e-12", "trainer.checkpoint_every_steps=8",
                       keep=tmp_path)
    final = trainer.train()
    for k in ("top1", "top5", "loss"):
        assert final[f"val/ema_{k}"] == pytest.approx(final[f"val/{k}"], rel=1e-5), k

    slow = _trainer(shards, "trainer.max_steps=8", "trainer.ema_decay=0.99", "trainer.checkpoint_every_steps=8",
                    keep=tmp_path / "slow")
    final = slow.train()
    assert final["val/ema_loss"] != final["val/loss"]  # an EMA near the initial weights scores differently
    from safetensors.torch import load_file

    src = tmp_path / "slow" / "step-8"
    plain = export_checkpoint(src, tmp_path / "plain")
    ema = export_checkpoint(src, tmp_path / "ema", ema=True)
    assert json.loads(ema.meta.read_text())["weights"] == "ema"
    ema_weights, plain_weights = load_file(str(ema.weights)), load_file(str(plain.weights))
    expected = slow.ema.module.state_dict()
    assert ema_weights.keys() == plain_weights.keys() == expected.keys()
    assert all(torch.equal(ema_weights[k], expected[k]) for k in expected)
    assert not all(torch.equal(ema_weights[k], plain_weights[k]) for k in expected)
    _trainer(shards, "trainer.max_steps=1", "data.val_split=null", keep=tmp_path / "none").train()
    with pytest.raises(ValueError, match="holds no EMA"):
        export_checkpoint(tmp_path / "none" / "step-1", tmp_path / "x", ema=True)


def test_ema_config_is_checked_before_launch():
    with pytest.raises(ConfigError, match="ZeRO-3 partitions"):
        load_config(None, ["trainer.ema_decay=0.999", "strategy.name=deepspeed", "strategy.zero_stage=3"])
    with pytest.raises(ConfigError, match="ema_decay"):
        load_config(None, ["trainer.ema_decay=1.0"])
    assert load_config(None, ["trainer.ema_decay=0.9999", "strategy.name=deepspeed"]).trainer.ema_decay == 0.9999


def test_fused_optimizer_choice():
    from metaformer_platform.config import OptimConfig
    from metaformer_platform.training.optim import build_optimizer, use_fused

    model = torch.nn.Linear(4, 2)
    assert use_fused(model, OptimConfig()) is True  # auto: torch's AdamW has a fused CPU kernel (5.2x here)
    assert use_fused(model, OptimConfig(fused=False)) is False
    assert use_fused(model, OptimConfig(name="lamb")) is False  # auto: timm's own optimizers have none
    opt = build_optimizer(model, OptimConfig(fused=True), lr=1e-3)  # torch's fused AdamW runs on CPU too
    assert opt.defaults["fused"] is True
    with pytest.raises(ValueError, match="has no fused kernel"):
        build_optimizer(model, OptimConfig(name="lamb", fused=True), lr=1e-3)


# -- FSDP2: the EMA is sharded like the model ---------------------------------------------------------


def _Batches(rank: int) -> RandomBatches:  # noqa: N802 - reads as the loader it builds
    return RandomBatches(4, 8, seed=rank)


def _fsdp_rank(rank: int, world: int, init_method: str, results, out: str) -> None:
    import torch.distributed as tdist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    tdist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        cfg = load_config(None, [*BASE, "scaling.num_workers=2", "strategy.name=fsdp", "model.num_classes=4",
                                 "trainer.batch_size=8", "trainer.max_steps=4", "trainer.ema_decay=0.7",
                                 "trainer.checkpoint_every_steps=100", "data.val_split=null"])
        dist = DistContext(rank=rank, world_size=2)
        trainer = Trainer(cfg, dist, data_root=None, loaders=(_Batches(rank), None))
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        seen = []
        update = trainer.ema.update

        def recording(model, step=None):
            seen.append(get_model_state_dict(model, options=full))  # a collective: both ranks call it
            update(model, step=step)

        trainer.ema.update = recording
        trainer.train()
        sharded = next(iter(trainer.ema.module.parameters()))
        ema_full = trainer.strategy.ema_state_dict(trainer.ema.module)
        directory = Path(out) / "ckpt"
        trainer.save_checkpoint(directory)
        tdist.barrier()
        again = Trainer(cfg, dist, data_root=None, loaders=(_Batches(rank), None), resume_from=directory)
        reloaded = get_model_state_dict(again.ema.module, options=full)
        if rank == 0:
            expected = dict(seen[0])
            for weights in seen[1:]:
                expected = {k: 0.7 * expected[k] + 0.3 * w for k, w in weights.items()}
            close = all(torch.allclose(ema_full[k], expected[k], rtol=1e-5, atol=1e-7) for k in expected)
            same = all(torch.equal(reloaded[k], ema_full[k]) for k in ema_full)
            results.put((type(sharded).__name__, sorted(ema_full) == sorted(expected), close, same))
    finally:
        tdist.destroy_process_group()


def test_fsdp_ema_is_sharded_updated_and_restored(tmp_path):
    # the EMA's parameters are DTensor shards; it equals the lerp of the full weights; it survives a checkpoint
    assert run_ranks(_fsdp_rank, tmp_path, str(tmp_path), expect=1) == [("DTensor", True, True, True)]  # rank 0's
