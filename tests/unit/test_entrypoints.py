"""jobs/pretrain.py as a user runs it: --help lists the keys; bad input exits non-zero with the fix, before Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PRETRAIN = ROOT / "jobs" / "pretrain.py"


def _run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:1"}  # were Ray reached, the test would hang, then fail
    return subprocess.run(
        [sys.executable, str(PRETRAIN), *args], capture_output=True, text=True, timeout=120, cwd=cwd, env=env
    )


def test_help_lists_every_config_key():
    out = _run("--help")
    assert out.returncode == 0
    for key in ("--config", "data.source", "model.name", "optim.base_lr", "strategy.name", "trainer.precision",
                "trainer.checkpoint_every_steps", "scaling.num_workers", "run.storage_path", "tracking.tracking_uri"):
        assert key in out.stdout, key


@pytest.mark.parametrize(
    "args, message",
    [
        (["model.name=poolformer_s13"], "poolformer_s12"),
        (["trainer.batchsize=8"], "unknown config key 'trainer.batchsize'"),
        (["trainer.max_steps=-1"], "trainer.max_steps: Input should be greater than or equal to 1"),
        (["--config", "nope.yaml"], "config file 'nope.yaml' does not exist"),
        (["model.kwargs.no_such_arg=1", "data.source={empty}"], "no shards found"),
    ],
)
def test_bad_input_exits_2_with_the_fix(args, message, tmp_path):
    args = [a.replace("{empty}", str(tmp_path)) for a in args]
    out = _run(*args, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr
    assert not (tmp_path / "mlflow.db").exists()  # no MLflow run was opened


def _tiny_shards(root: Path) -> Path:
    from metaformer_platform.data import ensure_synthetic_shards

    return ensure_synthetic_shards(root, num_classes=4, train_samples=40, val_samples=8, image_size=16,
                                   samples_per_shard=20)


def test_malformed_manifest_and_bad_model_kwargs_are_refused_before_ray(tmp_path):
    shards = _tiny_shards(tmp_path / "data")
    common = [f"data.source={shards}", f"run.storage_path={tmp_path / 'runs'}", "model.name=poolformer_debug",
              "trainer.batch_size=8"]

    out = _run(*common, "model.kwargs.no_such_arg=1", cwd=tmp_path)
    assert out.returncode == 2 and "does not build with model.kwargs={'no_such_arg': 1}" in out.stderr

    out = _run(*common, "trainer.batch_size=64", cwd=tmp_path)
    assert out.returncode == 2 and "fewer than one step of trainer.batch_size=64" in out.stderr

    out = _run(*common, "data.val_split=test", cwd=tmp_path)
    assert out.returncode == 2 and "unknown split 'test'" in out.stderr

    info = shards / "_info.json"
    body = json.loads(info.read_text())
    body["splits"]["train"]["num_samples"] += 1
    info.write_text(json.dumps(body))
    out = _run(*common, cwd=tmp_path)
    assert out.returncode == 2 and "_info.json" in out.stderr and "num_samples" in out.stderr
    info.write_text("{not json")
    out = _run(*common, cwd=tmp_path)
    assert out.returncode == 2 and "_info.json" in out.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs" / "poolformer_debug-pretrain").exists()
