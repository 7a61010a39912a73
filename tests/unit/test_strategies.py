"""Strategy registry, the generated DeepSpeed config, checks that run before training, export refusals."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from metaformer_platform.config import ConfigError, load_config
from metaformer_platform.strategies import STRATEGIES, get_strategy_class
from metaformer_platform.strategies.base import Strategy


def test_registry_names_every_strategy_and_resolves_it():
    assert sorted(STRATEGIES) == ["ddp", "deepspeed", "fsdp"]
    for name in STRATEGIES:
        cls = get_strategy_class(name)
        assert issubclass(cls, Strategy) and cls.name == name
    with pytest.raises(ValueError, match=r"unknown strategy 'zero'; choose one of \['ddp', 'deepspeed', 'fsdp'\]"):
        get_strategy_class("zero")


def test_reading_the_config_or_the_registry_does_not_import_deepspeed():
    code = (
        "import sys; from metaformer_platform.config import load_config; "
        "load_config(None, ['strategy.name=deepspeed']); "
        "from metaformer_platform.strategies import get_strategy_class; get_strategy_class('deepspeed'); "
        "print('deepspeed' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_deepspeed_config_is_generated_from_the_job():
    from metaformer_platform.strategies.config import StepSettings
    from metaformer_platform.strategies.deepspeed import deepspeed_config

    cfg = load_config(None, ["strategy.name=deepspeed", "strategy.zero_stage=3"])
    ds = deepspeed_config(cfg.strategy, StepSettings(micro_batch=16, grad_accum_steps=4, clip_grad=2.5, precision="bf16"))
    assert ds["train_micro_batch_size_per_gpu"] == 16
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["gradient_clipping"] == 2.5
    assert ds["bf16"] == {"enabled": True}
    assert ds["zero_optimization"] == {"stage": 3}
    assert "optimizer" not in ds and "scheduler" not in ds  # timm's optimizer and schedule are passed in

    offload = load_config(None, ["strategy.name=deepspeed", "strategy.offload_optimizer=true"]).strategy
    off = deepspeed_config(offload, StepSettings(micro_batch=16, grad_accum_steps=1, clip_grad=None, precision="fp32"))
    # DeepSpeed clips at 1.0 when the key is absent: "off" must be written as 0.0.
    assert off["gradient_clipping"] == 0.0 and "gradient_clipping" in off
    assert off["bf16"] == {"enabled": False}
    assert off["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


@pytest.mark.parametrize("stage", ["0", "4", "-1"])
def test_zero_stage_out_of_range_is_refused_with_the_fix(stage):
    with pytest.raises(ConfigError, match=rf"strategy.zero_stage must be 1, 2 or 3, got {stage}.*strategy.name=ddp"):
        load_config(None, ["strategy.name=deepspeed", f"strategy.zero_stage={stage}"])


def test_fsdp_refuses_a_model_it_cannot_wrap():
    from metaformer_platform.launch.checks import check_model
    from metaformer_platform.strategies.fsdp import FSDPStrategy, shard_units

    with pytest.raises(ValueError, match=r"fsdp shards a MetaFormer .* Sequential has no `stages\[i\].blocks`"):
        FSDPStrategy.check_model(nn.Sequential(nn.Linear(2, 2)))
    import timm

    import metaformer_platform.models  # noqa: F401

    with torch.device("meta"):
        model = timm.create_model("poolformer_debug", num_classes=4)
    units = shard_units(model)
    assert [len(u) for u in units] == [2, 2, 2, 2]  # one block + its stage, per stage
    check_model(load_config(None, ["strategy.name=fsdp", "model.name=poolformer_debug"]), 4)  # a MetaFormer passes


def test_export_refuses_a_folder_that_is_not_a_checkpoint(tmp_path):
    from metaformer_platform.training.export import export_checkpoint, load_export

    (tmp_path / "model.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"is not a complete checkpoint \(missing COMPLETE, trainer.pt, config.yaml\)"):
        export_checkpoint(tmp_path, tmp_path / "out")
    with pytest.raises(ValueError, match="is not a folder"):
        export_checkpoint(tmp_path / "nope", tmp_path / "out")
    with pytest.raises(ValueError, match="is not an export"):
        load_export(tmp_path)
    assert not (tmp_path / "out").exists()


def test_ddp_export_loads_strictly_into_plain_timm_with_the_same_logits(tmp_path):
    from metaformer_platform.data.build.synthetic import ensure_synthetic_shards
    from metaformer_platform.storage import checkpoint_format as fmt
    from metaformer_platform.strategies.base import DistContext
    from metaformer_platform.training.export import export_checkpoint, load_export
    from metaformer_platform.training.trainer import Trainer

    shards = ensure_synthetic_shards(tmp_path / "data", num_classes=4, train_samples=64, val_samples=16,
                                     image_size=32, samples_per_shard=64)
    cfg = load_config(None, ["model.name=poolformer_debug", "data.img_size=32", "data.num_workers=0",
                             "data.val_split=null", "trainer.batch_size=16", "trainer.max_steps=2",
                             "trainer.precision=fp32", "trainer.torch_threads=1", "scaling.num_workers=1"])
    trainer = Trainer(cfg, DistContext(), data_root=shards)
    trainer.train()
    trainer.save_checkpoint(tmp_path / "ckpt")

    export = export_checkpoint(tmp_path / "ckpt", tmp_path / "export")
    assert export.num_tensors == len(trainer.strategy.module.state_dict())
    plain = load_export(tmp_path / "export")
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        # Equal up to the order of the convolutions' sums (the trained model is channels_last, timm's is not).
        torch.testing.assert_close(plain(x), trainer.strategy.module.eval()(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="already holds an export"):
        export_checkpoint(tmp_path / "ckpt", tmp_path / "export")

    # A checkpoint whose weights do not fit the model it names: the keys are listed, nothing is written.
    state = fmt.load_tensors(tmp_path / "ckpt" / fmt.TRAINER_FILE)
    fmt.save_tensors({**state, "num_classes": 7}, tmp_path / "ckpt" / fmt.TRAINER_FILE)
    fmt.mark_complete(tmp_path / "ckpt")  # re-marked: the sha256 of the changed trainer.pt is recorded anew
    with pytest.raises(ValueError, match=r"does not match poolformer_debug with 7 classes: .*wrong shape \['head.fc"):
        export_checkpoint(tmp_path / "ckpt", tmp_path / "export2")
    assert not (tmp_path / "export2").exists()


def test_init_from_an_export_or_checkpoint_keeps_the_trunk_and_makes_a_new_head(tmp_path):
    import timm

    import metaformer_platform.models  # noqa: F401
    from metaformer_platform.launch.checks import check_init_from
    from metaformer_platform.storage import checkpoint_format as fmt
    from metaformer_platform.training.export import export_checkpoint, init_from

    # A checkpoint folder as the DDP strategy writes it, for a 4-class model.
    source = timm.create_model("poolformer_debug", num_classes=4)
    folder = tmp_path / "ckpt"
    fmt.save_tensors(source.state_dict(), folder / "model.pt")
    fmt.save_tensors({"step": 3, "model_name": "poolformer_debug", "num_classes": 4}, folder / fmt.TRAINER_FILE)
    (folder / fmt.CONFIG_FILE).write_text(load_config(None, ["model.name=poolformer_debug"]).to_yaml())
    fmt.mark_complete(folder)
    export_checkpoint(folder, tmp_path / "export")

    for where in (folder, tmp_path / "export"):
        target = timm.create_model("poolformer_debug", num_classes=7)
        head_before = target.head.fc.weight.clone()
        assert init_from(target, where) == ["head.fc.bias", "head.fc.weight"]
        trunk = {k: v for k, v in source.state_dict().items() if not k.startswith("head.fc.")}
        for key, value in trunk.items():
            assert torch.equal(target.state_dict()[key], value), key
        assert torch.equal(target.head.fc.weight, head_before)  # the new head is left as initialised

    with pytest.raises(ValueError, match=r"does not fit MetaFormer: missing \['stages.0.blocks.1.*wrong shape \['head.norm.bias"):
        init_from(timm.create_model("poolformer_s12", num_classes=4), folder)
    check_init_from(load_config(None, ["model.name=poolformer_debug", f"model.init_from={folder}"]))
    with pytest.raises(ValueError, match="holds poolformer_debug, but this job trains poolformer_s12"):
        check_init_from(load_config(None, ["model.name=poolformer_s12", f"model.init_from={tmp_path / 'export'}"]))
    with pytest.raises(ValueError, match="is neither an export .* nor a complete checkpoint"):
        check_init_from(load_config(None, ["model.name=poolformer_debug", f"model.init_from={tmp_path}"]))
