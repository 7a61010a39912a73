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
        ("https://u:pw@mlflow/#/experiments/1?workflowType=machine_learning&viewStateShareKey=tiny-family&apiKey=k",
         "https://u:***@mlflow/#/experiments/1?workflowType=machine_learning&viewStateShareKey=tiny-family&apiKey=***"),
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


@pytest.mark.parametrize("password", ["p/ss", "p?ss", "p#ss", "p ss/w?#"])
def test_a_database_password_sqlalchemy_accepts_is_masked_in_params_and_config_yaml(password, tmp_path):
    """SQLAlchemy (MLflow's SQL store) reads everything up to the @ as the password, ``/``, ``?`` and ``#`` too:
    the params and config.yaml must hold no part of it, and SQLAlchemy must read the masked URI's password as
    ``***`` (the real URI still reads as the real password: the job itself uses it)."""
    from sqlalchemy.engine import make_url

    uri = f"postgresql://user:{password}@db/x"
    assert make_url(uri).password == password
    cfg = load_config(None, [*DEBUG, f"tracking.tracking_uri={uri!r}", f"run.ray_address='ray://me:{password}@head:1'"])
    assert cfg.tracking.tracking_uri == uri
    param = cfg.flat()["tracking.tracking_uri"]
    assert make_url(param).password == "***" and param == "postgresql://user:***@db/x"
    assert cfg.flat()["run.ray_address"] == "ray://me:***@head:1"
    (tmp_path / "config.yaml").write_text(cfg.to_yaml())
    stored = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert make_url(stored["tracking"]["tracking_uri"]).password == "***"
    for text in (repr(cfg.flat()), (tmp_path / "config.yaml").read_text()):
        assert password not in text and "ss@" not in text


@pytest.mark.parametrize(
    "raw, clean",
    [
        ("error: API request to http://alice:p/w@h:9/api/2.0/x failed", "error: API request to http://alice:***@h:9/api/2.0/x failed"),
        ("x 'postgresql://u:a?b@db/x' y", "x 'postgresql://u:***@db/x' y"),
        ("https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F1&X-Amz-Signature=ab12"
         "&X-Amz-Security-Token=tok",
         "https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=***&X-Amz-Signature=***"
         "&X-Amz-Security-Token=***"),
        ("Traceback ...\n  conn = connect('mysql://root:hunter2@db/x')\nOperationalError", None),
        ("models:/poolformer_s12@champion", "models:/poolformer_s12@champion"),
        ("http://127.0.0.1:5000/#/experiments/1", "http://127.0.0.1:5000/#/experiments/1"),
    ],
)
def test_redact_finds_secrets_in_text(raw, clean):
    out = redact(raw)
    assert "hunter2" not in out and "p/w" not in out and "a?b" not in out and "ab12" not in out and "tok" not in out
    if clean is not None:
        assert out == clean


def test_secret_values_from_the_environment_are_masked_anywhere(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalr/XUtnFEMI+K7MDENG")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "mlfl0w-pw")
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "dapi-t0ken")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://bob:uri-pw-99@mlflow.example")
    text = ("botocore: signature for wJalr/XUtnFEMI+K7MDENG (wJalr%2FXUtnFEMI%2BK7MDENG) mismatch; "
            "basic auth mlfl0w-pw, bearer dapi-t0ken, uri-pw-99")
    out = redact(text)
    assert out == "botocore: signature for *** (***) mismatch; basic auth ***, bearer ***, ***"
    assert redact("key id AKIAEXAMPLE") == "key id AKIAEXAMPLE"  # an identifier, not a secret
    assert redact_tree({"t": ("x", "mlfl0w-pw", 3)}) == {"t": ("x", "***", 3)}


def test_log_records_and_their_tracebacks_print_redacted():
    import io
    import logging

    from metaformer_platform.storage.redact import redact_logging

    stream = io.StringIO()
    logger = logging.getLogger("test_trust_config.redacted")
    logger.propagate = False
    logger.addHandler(logging.StreamHandler(stream))
    redact_logging(logger)
    try:
        raise RuntimeError("cannot reach postgresql://me:p/ss@db/x")
    except RuntimeError:
        logger.exception("stage %s failed at %s", "pretrain", "http://a:b-secret@h/")
    assert "p/ss" not in stream.getvalue() and "b-secret" not in stream.getvalue()
    assert "postgresql://me:***@db/x" in stream.getvalue() and "Traceback" in stream.getvalue()
