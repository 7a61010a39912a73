"""Fast by default: `auto` settings resolve per device (probe faked both ways, and the real probe here), the
chosen settings are printed and logged, the step-time breakdown is logged, and images/s counts training only."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import pytest
import torch
from loader_helpers import RandomBatches

from metaformer_platform.config import load_config
from metaformer_platform.strategies.base import DistContext
from metaformer_platform.training import hardware
from metaformer_platform.training.hardware import Capabilities
from metaformer_platform.training.trainer import Trainer

AMX_CPU = Capabilities("cpu", "fake AMX Xeon", 2, frozenset({"amx_bf16", "avx512_bf16"}))
AVX512_BF16_CPU = Capabilities("cpu", "fake Xeon", 2, frozenset({"avx512_bf16"}))
PLAIN_CPU = Capabilities("cpu", "fake CPU", 2, frozenset())
H100 = Capabilities("cuda", "fake H100", 16, cuda_capability=(9, 0))
T4 = Capabilities("cuda", "fake T4", 8, cuda_capability=(7, 5))


def _trainer_cfg(*overrides: str):
    return load_config(None, list(overrides)).trainer


@pytest.mark.parametrize(
    ("caps", "expected"),
    [(AMX_CPU, "bf16"), (AVX512_BF16_CPU, "bf16"), (PLAIN_CPU, "fp32"), (H100, "bf16"), (T4, "fp32")],
)
def test_auto_precision_follows_the_device(caps, expected):
    settings = hardware.resolve_settings(_trainer_cfg(), caps, total_steps=100)
    assert settings.precision == expected
    assert settings.reasons["precision"].startswith("auto: ")
    # channels_last goes with bf16 on CPU and always on CUDA; fp32 on CPU stays NCHW
    assert settings.channels_last == (caps.device_type == "cuda" or expected == "bf16")


@pytest.mark.parametrize("explicit", ["bf16", "fp32"])
@pytest.mark.parametrize("caps", [AMX_CPU, PLAIN_CPU, H100, T4])
def test_explicit_precision_is_kept(caps, explicit):
    settings = hardware.resolve_settings(
        _trainer_cfg(f"trainer.precision={explicit}", "trainer.channels_last=true"), caps, total_steps=100
    )
    assert settings.precision == explicit and settings.channels_last is True
    assert "precision" not in settings.reasons  # printed as "set in the config"


def test_the_real_probe_on_this_machine():
    caps = hardware.probe(torch.device("cpu"))
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    assert caps.cpu_flags == {f for f in ("amx_bf16", "avx512_bf16") if re.search(rf"\b{f}\b", text)}
    settings = hardware.resolve_settings(_trainer_cfg(), caps, total_steps=100)
    assert settings.precision == ("bf16" if caps.cpu_flags else "fp32")  # either bf16 unit counts
    assert caps.cpus >= 1


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_tile amx_bf16\n")
    assert hardware.cpu_flags(info) == {"avx512_bf16", "amx_bf16"}
    info.write_text("flags: fpu avx512f avx512_vnni\n")
    assert hardware.cpu_flags(info) == frozenset()
    assert hardware.cpu_flags(tmp_path / "missing") == frozenset()


def test_compile_auto_weighs_the_run_length():
    short = hardware.resolve_settings(_trainer_cfg(), H100, total_steps=100)
    long = hardware.resolve_settings(_trainer_cfg(), H100, total_steps=100_000)
    assert (short.compile, long.compile) == (False, True)
    assert not hardware.resolve_settings(_trainer_cfg(), PLAIN_CPU, total_steps=1000).compile
    assert hardware.resolve_settings(_trainer_cfg("trainer.compile=true"), PLAIN_CPU, total_steps=10).compile


def test_inductor_cache_goes_under_the_platform_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert hardware.inductor_cache_dir(str(tmp_path)) == tmp_path / "inductor"
    import os

    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor")


def _scaling(*overrides: str):
    return load_config(None, list(overrides)).scaling


def test_layout_one_worker_per_cpu_node_and_one_per_gpu():
    one_machine = hardware.resolve_layout(_scaling(), [{"CPU": 2.0, "GPU": 0.0}])
    assert (one_machine.num_workers, one_machine.cpus_per_worker, one_machine.use_gpu) == (1, 2.0, False)
    two_nodes = hardware.resolve_layout(_scaling(), [{"CPU": 1.0}, {"CPU": 1.0}])
    assert (two_nodes.num_workers, two_nodes.cpus_per_worker) == (2, 1.0)
    gpus = hardware.resolve_layout(_scaling(), [{"CPU": 16.0, "GPU": 2.0}, {"CPU": 32.0, "GPU": 4.0}])
    assert (gpus.num_workers, gpus.cpus_per_worker, gpus.use_gpu) == (6, 8.0, True)
    explicit = hardware.resolve_layout(_scaling("scaling.num_workers=2", "scaling.cpus_per_worker=1"),
                                       [{"CPU": 2.0}])
    assert (explicit.num_workers, explicit.cpus_per_worker, explicit.reason) == (2, 1.0, "set in the config")
    shared = hardware.resolve_layout(_scaling("scaling.num_workers=2"), [{"CPU": 2.0}])
    assert (shared.num_workers, shared.cpus_per_worker) == (2, 1.0)  # they share the node's CPUs
    with pytest.raises(ValueError, match="no GPU"):
        hardware.resolve_layout(_scaling("scaling.use_gpu=true"), [{"CPU": 2.0}])


def test_code_after_the_launcher_reads_a_resolved_layout_and_an_unresolved_auto_is_named():
    resolved = _scaling("scaling.num_workers=3", "scaling.cpus_per_worker=2", "scaling.use_gpu=false")
    assert hardware.Layout.of(resolved) == hardware.Layout(3, 2.0, False, "read from the resolved config")
    # the launcher's own result reads back unchanged (the job plan copies it into the config)
    chosen = hardware.resolve_layout(_scaling(), [{"CPU": 4.0}])
    copied = _scaling().model_copy(update={"num_workers": chosen.num_workers,
                                           "cpus_per_worker": chosen.cpus_per_worker, "use_gpu": chosen.use_gpu})
    layout = hardware.Layout.of(copied)
    assert (layout.num_workers, layout.cpus_per_worker, layout.use_gpu) == (1, 4.0, False)
    for field in ("num_workers", "cpus_per_worker", "use_gpu"):
        left_auto = resolved.model_copy(update={field: "auto"})
        with pytest.raises(ValueError, match=rf"scaling\.{field}=auto has not been resolved yet"):
            hardware.Layout.of(left_auto)
    assert hardware.resolved(False, "scaling.use_gpu") is False  # a concrete falsy value is not "auto"


# -- in the Trainer ----------------------------------------------------------------------------------


def _Batches(n: int = 8, batch: int = 8) -> RandomBatches:  # noqa: N802 - reads as the loader it builds
    return RandomBatches(n, batch)


class Recorder:
    def __init__(self) -> None:
        self.rows: list[tuple[int, dict[str, float]]] = []
        self.params: dict[str, object] = {}

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.rows.append((step, dict(metrics)))

    def log_params(self, params: dict[str, object]) -> None:
        self.params.update(params)


def _cfg(*overrides: str):
    return load_config(None, [
        "model.name=poolformer_debug", "model.num_classes=4", "model.drop_path_rate=0.0", "data.mixup_alpha=0",
        "data.cutmix_alpha=0", "trainer.batch_size=8", "trainer.torch_threads=1", "trainer.log_every_steps=4",
        "trainer.checkpoint_every_steps=1000", "optim.warmup_epochs=0", *overrides,
    ])


def test_the_trainer_prints_and_logs_the_settings_it_resolved(caplog):
    rec = Recorder()
    with caplog.at_level(logging.INFO, logger="metaformer_platform.training.trainer"):
        trainer = Trainer(_cfg("trainer.max_steps=8", "data.val_split=null"), DistContext(), data_root=None,
                          tracker=rec, loaders=(_Batches(), None))
    expected = hardware.resolve_settings(_cfg().trainer, hardware.probe(torch.device("cpu")), total_steps=8)
    assert rec.params["resolved.precision"] == expected.precision == trainer.settings.precision
    assert rec.params["resolved.channels_last"] == expected.channels_last
    assert rec.params["resolved.compile"] is False  # 8 steps never pay for a compile
    assert rec.params["resolved.torch_threads"] == 1
    assert rec.params["resolved.fused_optimizer"] is True  # AdamW on the CPU: torch's fused kernel (auto)
    assert (trainer.batch.world_size, trainer.batch.global_batch) == (1, 8)  # auto: the world the Trainer runs in
    assert f"precision = {expected.precision}  (auto: " in caplog.text
    assert "torch_threads = 1  (set in the config)" in caplog.text


def test_step_time_breakdown_is_logged_at_the_log_cadence():
    rec = Recorder()
    Trainer(_cfg("trainer.max_steps=8", "data.val_split=null"), DistContext(), data_root=None, tracker=rec,
            loaders=(_Batches(), None)).train()
    logged = [(step, m) for step, m in rec.rows if "train/loss" in m]
    assert [step for step, _ in logged] == [4, 8]
    for _, m in logged:
        parts = [m[f"system/step_{p}_s"] for p in ("data", "forward", "backward", "optimizer")]
        assert all(p >= 0 for p in parts) and m["system/step_forward_s"] > 0 and m["system/step_backward_s"] > 0
        assert m["system/step_s"] == pytest.approx(sum(parts))
        assert m["train/images_per_s"] == pytest.approx(8 / m["system/step_s"])


def test_images_per_s_excludes_validation_time(monkeypatch):
    """A slow validation inside every log window leaves the training throughput as it is.

    The validation moves the clock the Trainer reads on by 100 s instead of sleeping: beside the suite's jobs
    this process runs at nice 19, where its own steps can take a good share of a real sleep (a wall-clock
    comparison of two runs failed that way once)."""
    real, skipped = time.perf_counter, [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: real() + skipped[0])

    def run(validate_s: float) -> list[float]:
        rec = Recorder()
        trainer = Trainer(_cfg("trainer.max_steps=16", "trainer.val_every_steps=2"), DistContext(), data_root=None,
                          tracker=rec, loaders=(_Batches(), _Batches(2)))

        def slow_validate() -> dict[str, float]:
            skipped[0] += validate_s
            return {"val/top1": 0.0}

        trainer.validate = slow_validate  # type: ignore[method-assign]
        start = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - start
        rates = [m["train/images_per_s"] for _, m in rec.rows if "train/images_per_s" in m]
        assert wall > 8 * validate_s  # the validations did run inside the windows
        return rates

    fast, slowed = run(0.0), run(100.0)
    assert len(fast) == len(slowed) == 4  # a rate per 4-step window
    # Counted, the 2 validations of 100 s in each 4-step window would make every step 50 s or more (8 images);
    # a step of this debug model takes milliseconds, under a starved CPU well under a second.
    assert all(8 / rate < 5 for rate in fast + slowed), (fast, slowed)


def test_allreduce_time_is_measured_by_a_ddp_comm_hook(tmp_path):
    import torch.distributed as tdist
    from torch.nn.parallel import DistributedDataParallel

    from metaformer_platform.training.steptime import StepTimer, watch_allreduce

    tdist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        plain = torch.nn.Linear(16, 4)
        ddp = DistributedDataParallel(torch.nn.Linear(16, 4))
        ddp.module.load_state_dict(plain.state_dict())
        timer = StepTimer(torch.device("cpu"))
        assert watch_allreduce(ddp, timer) and not watch_allreduce(plain, timer)
        x = torch.randn(8, 16)
        ddp(x).square().sum().backward()
        plain(x).square().sum().backward()
        assert torch.allclose(ddp.module.weight.grad, plain.weight.grad)  # the hook still reduces the gradient
        timer.start()
        timer.mark("data")
        times = timer.window(1)
        assert times["system/step_allreduce_s"] > 0 and times["system/step_data_s"] >= 0
        assert "system/step_allreduce_s" not in timer.window(1)  # a new window starts empty
    finally:
        tdist.destroy_process_group()
