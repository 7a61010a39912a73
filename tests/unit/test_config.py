"""The typed config: presets carry the paper's recipe, overrides work, bad input is named with its fix."""

from pathlib import Path

import pytest

from metaformer_platform.config import ConfigError, JobConfig, describe_keys, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "jobs" / "configs"
PAPER_DROP_PATH = {"s12": 0.1, "s24": 0.1, "s36": 0.2, "m36": 0.3, "m48": 0.4}
PAPER_CROP_PCT = {"s12": 0.9, "s24": 0.9, "s36": 0.9, "m36": 0.95, "m48": 0.95}


@pytest.mark.parametrize("size", sorted(PAPER_DROP_PATH))
def test_presets_carry_the_paper_recipe(size):
    cfg = load_config(CONFIGS / f"poolformer_{size}.yaml")
    assert cfg.model.name == f"poolformer_{size}"
    assert cfg.model.drop_path_rate == PAPER_DROP_PATH[size]
    assert cfg.data.crop_pct == PAPER_CROP_PCT[size]
    o, d, t = cfg.optim, cfg.data, cfg.trainer
    assert (o.name, o.betas, o.eps, o.weight_decay) == ("adamw", (0.9, 0.999), 1e-8, 0.05)
    assert (o.schedule, o.warmup_epochs, t.epochs) == ("cosine", 5, 300)
    assert d.auto_augment == "rand-m9-mstd0.5-inc1"
    assert (d.mixup_alpha, d.cutmix_alpha, d.re_prob, d.label_smoothing) == (0.8, 1.0, 0.25, 0.1)
    # lr = 1e-3 x global_batch / 1024: 8 workers x 128 -> 1e-3, and it scales linearly.
    assert cfg.global_batch == 1024 and cfg.optim.resolved_lr(cfg.global_batch) == pytest.approx(1e-3)
    half = load_config(CONFIGS / f"poolformer_{size}.yaml", ["scaling.num_workers=4"])
    assert half.optim.resolved_lr(half.global_batch) == pytest.approx(5e-4)
    assert cfg.run_name == f"poolformer_{size}-pretrain"


def test_the_finetune_preset_carries_the_384_recipe_with_its_ema():
    cfg = load_config(CONFIGS / "finetune_384.yaml", ["model.init_from=/weights"])
    o, t = cfg.optim, cfg.trainer
    assert (cfg.stage, cfg.data.img_size, o.name, o.lr, o.min_lr, o.warmup_epochs) == ("finetune", 384, "lamb", 1e-4, 1e-4, 0)
    assert (t.epochs, cfg.global_batch, cfg.data.mixup_alpha, cfg.data.cutmix_alpha) == (30, 1024, 0.0, 0.0)
    assert t.ema_decay == 0.9999 and not t.ema_warmup  # sail-sg's --model-ema-decay 0.9999


def test_defaults_are_the_paper_recipe_too():
    cfg = JobConfig()
    assert cfg.optim.base_lr == 1e-3 and cfg.optim.weight_decay == 0.05 and cfg.trainer.epochs == 300


def test_dotted_overrides_are_parsed_as_yaml():
    cfg = load_config(
        CONFIGS / "default.yaml",
        ["trainer.max_steps=7", "optim.betas=[0.8, 0.99]", "data.val_split=null", "model.kwargs.foo=1",
         "tracking.tags.team=vision", "trainer.precision=fp32"],
    )
    assert cfg.trainer.max_steps == 7 and cfg.optim.betas == (0.8, 0.99) and cfg.data.val_split is None
    assert cfg.model.kwargs == {"foo": 1} and cfg.tracking.tags == {"team": "vision"}
    assert cfg.trainer.precision == "fp32"
    flat = cfg.flat()
    assert flat["trainer.max_steps"] == 7 and flat["model.name"] == "poolformer_s12"
    assert JobConfig.model_validate(cfg.model_dump(mode="json")) == cfg  # round trip through Ray


def test_unknown_key_names_it_and_suggests():
    with pytest.raises(ConfigError, match=r"unknown config key 'trainer.max_step'.*trainer.max_steps"):
        load_config(None, ["trainer.max_step=3"])
    with pytest.raises(ConfigError, match=r"unknown config key 'optimizer'"):
        load_config(None, ["optimizer.lr=3"])


def test_unknown_key_in_a_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  batchsize: 3\n")
    with pytest.raises(ConfigError, match=r"'trainer.batchsize'.*trainer.batch_size"):
        load_config(bad)


@pytest.mark.parametrize(
    "override, match",
    [
        ("trainer.batch_size=0", r"trainer.batch_size: Input should be greater than or equal to 1"),
        ("trainer.batch_size=abc", r"trainer.batch_size: .*valid integer"),
        ("trainer.precision=fp8", r"trainer.precision: Input should be 'auto', 'fp32' or 'bf16'"),
        ("model.drop_path_rate=1.5", r"model.drop_path_rate"),
        ("optim.betas=[0.9, 1.5]", r"each beta must be in \[0, 1\)"),
        ("strategy.name=horovod", r"unknown strategy 'horovod'; choose one of \['ddp'"),
        ("model.name=poolformer_s13", r"poolformer_s12"),
        ("run.name=a/b", r"plain folder name"),
        ("trainer.batch_size=3", r"must be even when mixup"),
        ("no_equals_sign", r"must look like key.path=value"),
    ],
)
def test_bad_values_are_named_with_the_fix(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match=r"does not exist.*poolformer_s12.yaml"):
        load_config(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("trainer: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)


def test_help_lists_every_leaf_key_with_defaults():
    text = describe_keys()
    for key in ("data.source", "trainer.checkpoint_every_steps", "optim.base_lr = 0.001", "scaling.num_workers"):
        assert key in text
