"""No code runs from weights on object storage (issue 10, item 1), against the session's real S3 server
(SeaweedFS): a crafted, pickle-bearing FSDP checkpoint on s3:// is refused by export, ``model.init_from``,
``run.resume_from`` and a whole job (before any cluster time) and its payload never runs; a file changed on S3
after its run wrote it (same size, other bytes) never reaches the weights cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from metaformer_platform import storage
from metaformer_platform.config import load_config
from metaformer_platform.storage import checkpoint_format as fmt
from metaformer_platform.training import ownership

pytestmark = pytest.mark.beside_cluster  # no job on the session's Ray cluster (tests/conftest.py)

CONFIGS = Path(__file__).resolve().parents[2] / "jobs" / "configs"


def _unit_helpers():
    """The crafted checkpoints of the unit tests (tests/ is no package: loaded by path)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("weights_trust_unit",
                                                  Path(__file__).parents[1] / "unit" / "test_weights_trust.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_unit = _unit_helpers()
REFUSED, craft, _trained_ddp_checkpoint = _unit.REFUSED, _unit.craft, _unit._trained_ddp_checkpoint
marker = _unit.marker  # the fixture: asserts after each test that the payload's marker file was never created


@pytest.fixture
def s3_env(s3_server, tmp_path, monkeypatch):
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("METAFORMER_WEIGHTS_CACHE", str(tmp_path / "cache"))
    return s3_server


def _upload(folder: Path, uri: str) -> str:
    target = storage.Location.parse(uri)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        storage.write_bytes(target.join(path.relative_to(folder).as_posix()), path.read_bytes())
    return target.uri


def _cfg(tmp: Path, bucket: str, *extra: str):
    return load_config(CONFIGS / "default.yaml", [
        "model.name=poolformer_debug", "strategy.name=fsdp",
        "data.synthetic.num_classes=4", "data.synthetic.train_samples=64", "data.synthetic.val_samples=16",
        "data.synthetic.samples_per_shard=64", f"data.cache_dir={tmp / 'data'}", "data.num_workers=0",
        "trainer.batch_size=16", "trainer.max_steps=2", f"run.storage_path=s3://{bucket}/trust-runs",
        "run.name=trust-job", *extra,
    ])


def test_a_crafted_s3_checkpoint_is_refused_by_every_load_path(s3_env, tmp_path, marker):
    import timm

    import metaformer_platform.models  # noqa: F401
    from metaformer_platform.launch.checks import check_init_from, check_resume_from, resolve_init_from
    from metaformer_platform.launch.driver import run_job
    from metaformer_platform.training.export import export_checkpoint, init_from

    bucket = s3_env.bucket
    uri = _upload(craft(tmp_path / "crafted", "fsdp", marker), f"s3://{bucket}/trust-shared/checkpoint-00000003")

    with pytest.raises(ValueError, match=REFUSED):
        export_checkpoint(uri, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    with pytest.raises(ValueError, match=REFUSED):
        export_checkpoint(uri, f"s3://{bucket}/trust-exports/x")
    assert storage.list_files(f"s3://{bucket}/trust-exports") == {}

    cfg = _cfg(tmp_path, bucket, f"model.init_from={uri}")
    with pytest.raises(ValueError, match=REFUSED):
        check_init_from(cfg, resolve_init_from(cfg))  # the driver
    with pytest.raises(ValueError, match=REFUSED):
        init_from(timm.create_model("poolformer_debug", num_classes=4), uri)  # a worker

    with pytest.raises(ValueError, match="refused, unread: its marker is not signed"):
        check_resume_from(_cfg(tmp_path, bucket, f"run.resume_from={uri}"))
    with pytest.raises(ValueError, match="refused, unread"):
        run_job(_cfg(tmp_path, bucket, f"run.resume_from={uri}"))  # the whole job stops before Ray starts
    assert not storage.exists(f"s3://{bucket}/trust-runs/trust-job/{fmt.OWNER_FILE}")  # nothing claimed

    # dropped into a run folder on the job's storage, stamped as another run's: refused for its missing signature
    # (what the stamps say no longer decides a native read)
    run = f"s3://{bucket}/trust-runs/victim"
    storage.write_bytes(storage.Location.parse(f"{run}/{fmt.OWNER_FILE}"), json.dumps({"run_id": "v"}).encode())
    dropped = _upload(tmp_path / "crafted", f"{run}/checkpoint-00000009")
    with pytest.raises(ValueError, match="refused, unread: its marker is not signed"):
        check_resume_from(_cfg(tmp_path, bucket, f"run.resume_from={dropped}"))
    moved = ownership.quarantine_foreign(storage.Location.parse(run).filesystem(), storage.Location.parse(run).fs_path,
                                         registered=[], run_id="v")
    assert moved == ["checkpoint-00000009"]  # recovery moves it aside, unread


def test_a_file_changed_on_s3_after_its_run_wrote_it_never_reaches_the_cache(s3_env, tmp_path):
    from metaformer_platform.storage.weights import resolve

    folder = _trained_ddp_checkpoint(tmp_path / "checkpoint-00000003")
    uri = _upload(folder, f"s3://{s3_env.bucket}/trust-tamper/checkpoint-00000003")
    key = storage.Location.parse(uri).join("model.pt")
    data = storage.read_bytes(key)
    storage.write_bytes(key, data[:-64] + bytes(64))  # same size, other bytes
    assert fmt.is_complete(uri)  # by sizes (all S3 lists) it looks whole
    with pytest.raises(ValueError, match="model.pt changed after the folder was written"):
        resolve(uri)
    assert not any((tmp_path / "cache").rglob("model.pt"))  # refused before it entered the cache
    storage.write_bytes(key, data)  # restored: the same URI resolves, verified
    assert (resolve(uri) / "model.pt").read_bytes() == data
