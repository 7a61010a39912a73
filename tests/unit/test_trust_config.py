"""Trust boundaries of the config: bounded, finite numbers, safe run names, host-less file:// URLs, `base:`
kept beside the config or among the presets, and secret-bearing values redacted wherever the config is
logged or stored (issue 10, items 4 and 8)."""

from pathlib import Path

import pytest
import yaml

from metaformer_platform.config import ConfigError, load_config
from metaformer_platform.storage.redact import redact, redact_tree

CONFIGS = Path(__file__).resolve().parents[2] / "jobs" / "configs"
DEBUG = ["model.name=poolformer_debug"]


@pytest.mark.parametrize(
    "override, match",
    [
        ("trainer.epochs=.inf", "trainer.epochs"),
        ("trainer.epochs=.nan", "trainer.epochs"),
        ("optim.base_lr=.inf", "optim.base_lr"),
        ("trainer.epochs=1e12", "trainer.epochs"),
        ("data.img_size=100000000", "data.img_size"),
        ("trainer.batch_size=100000000", "trainer.batch_size"),
        ("trainer.max_steps=1000000000000", "trainer.max_steps"),
        ("scaling.num_workers=1000000", "scaling.num_workers"),
        ("data.shuffle_buffer=1000000000", "data.shuffle_buffer"),
        ("data.synthetic.train_samples=1000000000000", "data.synthetic.train_samples"),
    ],
)
def test_numbers_are_finite_and_bounded(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [*DEBUG, override])


@pytest.mark.parametrize("name", ['my"run', "run'x", "a b", "x" * 200, "-lead", "räksmörgås", "a\nb", "..", "a/b"])
def test_run_name_alphabet_is_safe(name):
    with pytest.raises(ConfigError, match=r"run.name.*A-Za-z0-9"):
        load_config(None, [*DEBUG, f"run.name={name!r}" if "'" not in name else f'run.name="{name}"'])


def test_run_name_plain_names_pass():
    assert load_config(None, [*DEBUG, "run.name=s12_v1.2-try3"]).run.name == "s12_v1.2-try3"


@pytest.mark.parametrize(
    "key", ["data.source", "run.storage_path", "model.init_from", "run.resume_from"]
)
def test_file_urls_with_a_host_are_refused(key):
    with pytest.raises(ConfigError, match=r"file://host/x.*file:///"):
        load_config(None, [*DEBUG, f"{key}=file://host/x"])
    assert load_config(None, [*DEBUG, f"{key}=file:///tmp/x"])  # an absolute path is fine
    assert load_config(None, [*DEBUG, f"{key}=file://localhost/tmp/x"])


def test_base_beside_the_config_or_a_preset(tmp_path):
    (tmp_path / "sub").mkdir()
    secret = tmp_path / "secret.yaml"
    secret.write_text("trainer:\n  max_steps: 9\n")
    (tmp_path / "sub" / "up.yaml").write_text("base: ../secret.yaml\n")
    with pytest.raises(ConfigError, match=r"base.*\.\./secret\.yaml.*beside"):
        load_config(tmp_path / "sub" / "up.yaml")
    (tmp_path / "sub" / "abs.yaml").write_text(f"base: {secret}\n")
    with pytest.raises(ConfigError, match="base"):
        load_config(tmp_path / "sub" / "abs.yaml")
    (tmp_path / "sub" / "nowhere.yaml").write_text("base: nothing_like_it.yaml\n")
    with pytest.raises(ConfigError, match="nothing_like_it.yaml"):
        load_config(tmp_path / "sub" / "nowhere.yaml")
    # a file beside the config: fine; a preset by its name: fine (the file beside wins)
    (tmp_path / "sub" / "side.yaml").write_text("trainer:\n  max_steps: 5\n")
    (tmp_path / "sub" / "ok.yaml").write_text("base: side.yaml\n")
    assert load_config(tmp_path / "sub" / "ok.yaml").trainer.max_steps == 5
    (tmp_path / "sub" / "preset.yaml").write_text("base: poolformer_s12.yaml\n")
    assert load_config(tmp_path / "sub" / "preset.yaml").model.name == "poolformer_s12"
    assert load_config(CONFIGS / "poolformer_s24.yaml").model.name == "poolformer_s24"


@pytest.mark.parametrize(
    "raw, clean",
    [
        ("postgresql://user:pa55@db.example:5432/mlflow", "postgresql://user:***@db.example:5432/mlflow"),
        ("ray://admin:hunter2@head:10001", "ray://admin:***@head:10001"),
        ("http://tok3n@mlflow:5000", "http://***@mlflow:5000"),
        ("mysql://u:p@h/db?password=zz&charset=utf8", "mysql://u:***@h/db?password=***&charset=utf8"),
        ("https://mlflow:5000/?token=abc", "https://mlflow:5000/?token=***"),
        ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
        ("s3://bucket/key", "s3://bucket/key"),
        ("plain text", "plain text"),
    ],
)
def test_redact(raw, clean):
    assert redact(raw) == clean


def test_config_dumps_are_redacted():
    cfg = load_config(None, [*DEBUG, "tracking.tracking_uri=postgresql://me:s3cr3t@db/mlflow",
                             "run.ray_address=ray://me:s3cr3t@head:10001"])
    assert cfg.tracking.tracking_uri == "postgresql://me:s3cr3t@db/mlflow"  # the job itself still uses it
    assert "s3cr3t" not in cfg.to_yaml()
    assert "s3cr3t" not in repr(cfg.flat())
    assert yaml.safe_load(cfg.to_yaml())["tracking"]["tracking_uri"] == "postgresql://me:***@db/mlflow"
    assert redact_tree({"a": ["x://u:p@h"], "b": 1}) == {"a": ["x://u:***@h"], "b": 1}


def test_printed_mlflow_hint_is_redacted():
    from metaformer_platform.tracking.runs import RunHandle

    handle = RunHandle.__new__(RunHandle)  # the hint needs no server: only what it prints
    handle.cfg = load_config(None, DEBUG)
    handle.tracking_uri, handle.experiment_id, handle.run_id = "postgresql://me:s3cr3t@db/mlflow", "1", "abc"
    assert "s3cr3t" not in handle.ui_hint() and "postgresql://me:***@db/mlflow" in handle.ui_hint()
    handle.tracking_uri = "https://me:s3cr3t@mlflow.example"
    assert "s3cr3t" not in handle.ui_hint() and "https://me:***@mlflow.example/#/experiments/1/runs/abc" in handle.ui_hint()


def test_checkpoint_config_yaml_is_redacted(tmp_path):
    """Every checkpoint's config.yaml is what `to_yaml` writes (training/trainer.py): no password in it, and
    it still reads back as a valid config."""
    from metaformer_platform.config import JobConfig

    cfg = load_config(None, [*DEBUG, "tracking.tracking_uri=postgresql://me:s3cr3t@db/mlflow"])
    (tmp_path / "config.yaml").write_text(cfg.to_yaml())
    text = (tmp_path / "config.yaml").read_text()
    assert "s3cr3t" not in text
    assert JobConfig.model_validate(yaml.safe_load(text)).model.name == "poolformer_debug"
