"""The CUDA code paths: DDP over nccl in a Ray GPU worker, bf16 autocast + channels_last + torch.compile,
fused AdamW chosen automatically, and an exact checkpoint round trip on the device (CUDA RNG included).

Every test is marked ``gpu``: tests/conftest.py skips them where CUDA is missing. Run them on a GPU machine
(Ray starts here, so in a loopback-only namespace on a shared host):

    python -m pytest tests/gpu -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from metaformer_platform.config import load_config
from metaformer_platform.strategies.base import DistContext
from metaformer_platform.training.trainer import Trainer

pytestmark = pytest.mark.gpu

BASE = [
    "model.name=poolformer_debug", "model.num_classes=4", "model.drop_path_rate=0.0", "data.img_size=32",
    "data.val_split=null", "data.mixup_alpha=0", "data.cutmix_alpha=0", "data.label_smoothing=0",
    "trainer.batch_size=32", "trainer.max_steps=12", "trainer.log_every_steps=4", "trainer.checkpoint_every_steps=100",
    "trainer.precision=bf16", "trainer.channels_last=true", "optim.lr=3e-3", "optim.warmup_epochs=0",
    "scaling.num_workers=1", "tracking.enabled=false",
]


class _Batches:
    """Seeded in-memory batches with a learnable label (the brightest channel), in the loader protocol."""

    def __init__(self, n: int = 12, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.batches = []
        for _ in range(n):
            y = torch.randint(0, 3, (32,), generator=gen)
            x = torch.randn(32, 3, 32, 32, generator=gen)
            x[torch.arange(32), y] += 2.0
            self.batches.append((x, y))

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class _Losses:
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if "train/loss" in metrics:
            self.losses[step] = metrics["train/loss"]


def _trainer(*overrides: str, tracker=None, resume_from: Path | None = None, report=None, batches: int = 12) -> Trainer:
    cfg = load_config(None, [*BASE, *overrides])
    dist = DistContext(device=torch.device("cuda", 0))
    return Trainer(cfg, dist, data_root=None, tracker=tracker, loaders=(_Batches(batches), None),
                   resume_from=resume_from, report=report)


def test_bf16_channels_last_compiled_step_with_fused_adamw_learns_on_cuda(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    rec = _Losses()
    trainer = _trainer("trainer.compile=true", "trainer.ema_decay=0.9", tracker=rec)
    assert isinstance(trainer.forward_model, torch._dynamo.eval_frame.OptimizedModule)
    assert trainer.strategy.optimizer.defaults["fused"] is True  # optim.fused=null: on for CUDA parameters
    assert next(trainer.ema.module.parameters()).device.type == "cuda"
    trainer.train()
    losses = [rec.losses[s] for s in sorted(rec.losses)]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0], losses
    weight = trainer.strategy.module.stem.conv.weight
    assert weight.dtype == torch.float32 and weight.is_contiguous(memory_format=torch.channels_last)


def test_fused_adamw_matches_the_foreach_step():
    from metaformer_platform.config import OptimConfig
    from metaformer_platform.training.optim import build_optimizer

    torch.manual_seed(0)
    a = torch.nn.Linear(64, 10).cuda()
    b = torch.nn.Linear(64, 10).cuda()
    b.load_state_dict(a.state_dict())
    fused = build_optimizer(a, OptimConfig(), lr=1e-2)
    plain = build_optimizer(b, OptimConfig(fused=False), lr=1e-2)
    assert fused.defaults["fused"] is True and not plain.defaults.get("fused")
    x = torch.randn(16, 64, device="cuda")
    for model, opt in ((a, fused), (b, plain)):
        for _ in range(3):
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_checkpoint_round_trip_on_cuda_is_exact(tmp_path):
    import shutil

    def keep(metrics, directory):
        if directory is not None:
            shutil.copytree(directory, tmp_path / f"step-{int(metrics['step'])}")

    # 6 batches an epoch: the checkpoint at step 6 is an epoch boundary, where the in-memory loader (which keeps
    # no position) starts over in both runs
    args = ("trainer.checkpoint_every_steps=6", "trainer.ema_decay=0.9", "trainer.log_every_steps=1")
    full = _Losses()
    _trainer(*args, tracker=full, report=keep, batches=6).train()
    resumed = _Losses()
    trainer = _trainer(*args, tracker=resumed, resume_from=tmp_path / "step-6", batches=6)
    assert trainer.step == 6
    trainer.train()
    assert resumed.losses == {s: v for s, v in full.losses.items() if s > 6}
    assert sorted(resumed.losses) == list(range(7, 13))


@pytest.fixture(scope="module")
def gpu_ray():
    import ray

    context = ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False)
    try:
        yield context
    finally:
        ray.shutdown()


def _nccl_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch.distributed as tdist

    from metaformer_platform.config import JobConfig

    cfg = JobConfig.model_validate(config["cfg"])
    device = ray.train.torch.get_device()
    ones = torch.ones(2, device=device)
    tdist.all_reduce(ones)  # a real nccl collective (with one worker the Trainer itself has none to do)
    ctx = ray.train.get_context()
    rec = _Losses()
    dist = DistContext(rank=ctx.get_world_rank(), world_size=ctx.get_world_size(), device=device)
    Trainer(cfg, dist, data_root=None, tracker=rec, loaders=(_Batches(), None)).train()
    # Ray Train v2 keeps only metrics that come with a checkpoint: hand the figures back through a file
    Path(config["out"]).write_text(json.dumps({
        "device": device.type, "backend": tdist.get_backend(), "sum": ones.tolist(),
        "first": rec.losses[min(rec.losses)], "last": rec.losses[max(rec.losses)],
    }))


def test_ddp_over_nccl_in_a_ray_gpu_worker(gpu_ray, tmp_path):
    import sys

    import ray.cloudpickle
    import ray.train
    from ray.train.torch import TorchTrainer

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    cfg = load_config(None, [*BASE, "scaling.use_gpu=true"])
    result = TorchTrainer(
        _nccl_worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "out": str(tmp_path / "out.json")},
        scaling_config=ray.train.ScalingConfig(num_workers=1, use_gpu=True),
        run_config=ray.train.RunConfig(storage_path=str(tmp_path), name="gpu-nccl"),
    ).fit()
    assert result.error is None
    out = json.loads((tmp_path / "out.json").read_text())
    assert (out["device"], out["backend"], out["sum"]) == ("cuda", "nccl", [1.0, 1.0])
    assert out["last"] < out["first"]
