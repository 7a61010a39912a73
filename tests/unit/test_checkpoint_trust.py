"""Issue 24, findings 1, 2 and 6: native (pickle) reads need a marker signed with the deployment key, the marker
is strict (every file listed with size and sha256; nothing unlisted, missing, short or symlinked; size-capped),
and weights carry no instructions (model.json sets architecture kwargs only). Plus a fuzz test of the marker
parser: every input is parsed or refused with the platform's own ValueError, within a memory bound."""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import shlex
import stat
import tracemalloc
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyarrow import fs as pafs

from metaformer_platform.config import load_config
from metaformer_platform.storage import checkpoint_format as fmt
from metaformer_platform.strategies.base import DistContext
from metaformer_platform.strategies.config import StepSettings
from metaformer_platform.training import ownership

JOBS = Path(__file__).resolve().parents[2] / "jobs"


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


@pytest.fixture
def pwned(tmp_path) -> Path:
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "the checkpoint's pickle payload ran"


def _job(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_job", JOBS / f"{name}.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    return job


def _ddp_checkpoint(folder: Path, kwargs: dict | None = None) -> Path:
    """A real, complete, signed DDP checkpoint of poolformer_debug (4 classes), written without training."""
    import timm

    import metaformer_platform.models  # noqa: F401

    folder.mkdir(parents=True)
    model = timm.create_model("poolformer_debug", num_classes=4)
    fmt.save_tensors(model.state_dict(), folder / fmt.DDP_MODEL_FILE)
    fmt.save_tensors({"step": 3, "model_name": "poolformer_debug", "num_classes": 4}, folder / fmt.TRAINER_FILE)
    overrides = ["model.name=poolformer_debug", "model.num_classes=4"]
    (folder / fmt.CONFIG_FILE).write_text(load_config(None, overrides).to_yaml())
    if kwargs is not None:
        config = json.loads(json.dumps(load_config(None, overrides).model_dump(mode="json")))
        config["model"]["kwargs"] = kwargs
        (folder / fmt.CONFIG_FILE).write_text(json.dumps(config))
    fmt.mark_complete(folder)
    return folder


def _fsdp_folder(folder: Path, pwned: Path, *, signed: bool) -> Path:
    folder.mkdir(parents=True)
    (folder / "fsdp").mkdir()
    (folder / "fsdp" / ".metadata").write_bytes(pickle.dumps(Payload(pwned)))
    fmt.save_tensors({"step": 3, "model_name": "poolformer_debug", "num_classes": 4}, folder / fmt.TRAINER_FILE)
    fmt.mark_complete(folder, sign=signed)
    return folder


# -- finding 1: a native read needs the deployment key's signature -------------------------------------------


@pytest.mark.parametrize("tamper", ["unsigned", "forged-stamps", "other-key", "file-changed"])
def test_the_fsdp_resume_reads_no_pickle_that_is_not_signed(tamper, tmp_path, pwned, monkeypatch):
    """The worker's last gate, right before DCP unpickles .metadata (on main: the payload ran)."""
    from metaformer_platform.strategies.fsdp import FSDPStrategy

    if tamper == "other-key":
        monkeypatch.setenv(fmt.KEY_ENV, "a-key-that-is-not-this-deployments")
    folder = _fsdp_folder(tmp_path / "run" / "checkpoint-00000099", pwned, signed=tamper != "unsigned")
    monkeypatch.undo()
    if tamper == "forged-stamps":  # issue 24's reproduction: a stamp naming the run, on an unsigned folder
        folder = _fsdp_folder(tmp_path / "run2" / "checkpoint-00000099", pwned, signed=False)
        fmt.stamp(folder, {"run_id": fmt.run_id_for(str(tmp_path / "run2")), "attempt": "x"}, 0)
    if tamper == "file-changed":  # signed, then the pickle replaced by one of the same size
        data = (folder / "fsdp" / ".metadata").read_bytes()
        (folder / "fsdp" / ".metadata").write_bytes(data.replace(b"PWNED", b"PWNEX"))
    cfg = load_config(None, ["model.name=poolformer_debug", "strategy.name=fsdp"])
    strategy = FSDPStrategy(cfg.strategy, DistContext(), StepSettings(8, 1, None, "fp32"))
    strategy.model = torch.nn.Linear(2, 2)
    strategy.optimizer = torch.optim.SGD(strategy.model.parameters(), lr=0.1)
    expected = {"unsigned": "not signed", "forged-stamps": "not signed", "other-key": "signed with another key",
                "file-changed": "changed after the folder was written"}[tamper]
    with pytest.raises(ValueError, match=rf"refused to read the native files of .*checkpoint-00000099.*{expected}"):
        strategy.load(folder)
    assert not (tmp_path / "PWNEX").exists()


def test_the_accept_unsigned_setting_lets_an_old_checkpoint_through_loudly(tmp_path, capsys):
    folder = tmp_path / "checkpoint-00000001"
    folder.mkdir()
    (folder / "fsdp").mkdir()
    (folder / "fsdp" / ".metadata").write_bytes(b"old")
    fmt.mark_complete(folder, sign=False)
    with pytest.raises(fmt.UnsignedCheckpointError, match="run.accept_unsigned_checkpoints=true"):
        fmt.verify_native(folder)
    fmt.verify_native(folder, accept_unsigned=True, what="resuming")
    assert "SECURITY WARNING: resuming: reading the native files of the UNSIGNED checkpoint" in capsys.readouterr().out
    (folder / "fsdp" / "extra").write_bytes(b"x")  # the setting never lets an altered folder through
    with pytest.raises(fmt.UnsignedCheckpointError, match="fsdp/extra is not listed"):
        fmt.verify_native(folder, accept_unsigned=True)


def test_the_run_id_is_never_adopted_from_storage(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / fmt.OWNER_FILE).write_text(json.dumps({"run_id": "chosen-by-an-attacker", "released": True}))
    lease = ownership.claim_run(str(tmp_path), "r")
    try:
        assert lease.run_id != "chosen-by-an-attacker"
        assert lease.run_id == fmt.run_id_for(str(run))  # the same for every job under the name
    finally:
        lease.release()
    assert ownership.claim_run(str(tmp_path), "r").release() is None


def test_recovery_quarantines_a_folder_with_copied_stamps_but_no_signature(tmp_path, pwned):
    run = tmp_path / "r"
    run_id = fmt.run_id_for(str(run))
    planted = _fsdp_folder(run / "checkpoint-00000099", pwned, signed=False)
    fmt.stamp(planted, {"run_id": run_id, "attempt": "x"}, 0)
    own = _ddp_checkpoint(run / "checkpoint-00000010")
    fmt.stamp(own, {"run_id": run_id, "attempt": "y"}, 0)
    partial = run / "checkpoint-00000011"  # a part still uploading: no marker yet, recovery deletes it
    partial.mkdir()
    fmt.stamp(partial, {"run_id": run_id, "attempt": "y"}, 0)
    moved = ownership.quarantine_foreign(pafs.LocalFileSystem(), str(run), registered=[], run_id=run_id)
    assert moved == ["checkpoint-00000099"]
    assert own.is_dir() and partial.is_dir()


def test_the_key_file_is_generated_private_and_shared(tmp_path, monkeypatch):
    monkeypatch.delenv(fmt.KEY_ENV, raising=False)
    monkeypatch.setenv(fmt.KEY_FILE_ENV, str(tmp_path / "cfg" / "checkpoint.key"))
    key = fmt.deployment_key()
    path = tmp_path / "cfg" / "checkpoint.key"
    assert len(key) == 64 and fmt.deployment_key() == key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    path.chmod(0o644)
    with pytest.raises(ValueError, match="readable by other users .*chmod 600"):
        fmt.deployment_key()
    monkeypatch.setenv(fmt.KEY_ENV, "short")
    with pytest.raises(ValueError, match="shorter than 16 characters"):
        fmt.deployment_key()


# -- finding 2: the strict marker --------------------------------------------------------------------------


def _rewrite_marker(folder: Path, change) -> None:
    body = json.loads((folder / fmt.COMPLETE_MARKER).read_text())
    change(body)
    (folder / fmt.COMPLETE_MARKER).write_text(json.dumps(body))


@pytest.mark.parametrize("tamper, message", [
    ("added-safetensors", "model.safetensors is not listed in COMPLETE"),
    ("no-sha256", "records no sha256 digests"),
    ("null-size", "lists model.pt without a size"),
    ("symlink", "model.pt is a symbolic link"),
    ("short", r"missing or short: model.pt \(10 of"),
    ("huge-marker", "over the 8388608-byte cap"),
])
def test_export_and_init_from_refuse_a_tampered_checkpoint(tamper, message, tmp_path, capsys):
    """Through jobs/export.py and a fine-tune's init_from read: on main an added model.safetensors won over
    model.pt, markers without sha256 or with null sizes passed, and a symlink was followed out of the folder."""
    import timm

    from metaformer_platform.training.export import init_from

    folder = _ddp_checkpoint(tmp_path / "checkpoint-00000003")
    if tamper == "added-safetensors":
        fmt.save_weights({k: torch.zeros_like(v) for k, v in fmt.load_tensors(folder / "model.pt").items()},
                         folder / fmt.WEIGHTS_FILE)
    elif tamper == "no-sha256":
        _rewrite_marker(folder, lambda body: (body.pop("sha256"), body.pop("signature")))
    elif tamper == "null-size":
        _rewrite_marker(folder, lambda body: body["files"].update({"model.pt": None}))
    elif tamper == "symlink":
        outside = tmp_path / "outside.pt"
        os.replace(folder / "model.pt", outside)
        (folder / "model.pt").symlink_to(outside)
    elif tamper == "short":
        (folder / "model.pt").write_bytes(b"0123456789")
    elif tamper == "huge-marker":
        (folder / fmt.COMPLETE_MARKER).write_bytes(b" " * (fmt.MAX_MARKER_BYTES + 1))
    assert _job("export").main([str(folder), str(tmp_path / "out")]) == 2
    assert message.replace("\\", "") in capsys.readouterr().err.replace("\\", "") or \
        pytest.fail("the export error does not name the file")
    assert not (tmp_path / "out" / fmt.WEIGHTS_FILE).exists()
    with pytest.raises(ValueError, match=message):
        init_from(timm.create_model("poolformer_debug", num_classes=4), folder)


def test_an_intact_checkpoint_exports_with_its_own_strict_marker(tmp_path):
    from metaformer_platform.training.export import export_checkpoint, load_export, read_weights

    folder = _ddp_checkpoint(tmp_path / "checkpoint-00000003")
    fmt.stamp(folder, {"run_id": "r", "attempt": "a"}, 0)  # bookkeeping written after the marker: allowed
    export_checkpoint(folder, tmp_path / "out")
    assert fmt.native_refusal(tmp_path / "out") is None  # listed, hashed, signed
    load_export(tmp_path / "out")
    (tmp_path / "out" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="notes.txt is not listed"):
        read_weights(tmp_path / "out")


# -- finding 6: weights carry weights, not instructions ------------------------------------------------------


def test_an_exports_model_json_may_not_make_the_evaluate_driver_fetch_a_url(tmp_path, capsys):
    from metaformer_platform.launch.checks import prepare_evaluation
    from metaformer_platform.training.export import export_checkpoint, load_export

    export_checkpoint(_ddp_checkpoint(tmp_path / "checkpoint-00000003"), tmp_path / "export")
    meta = tmp_path / "export" / fmt.META_FILE
    info = json.loads(meta.read_text())
    info["model_kwargs"] = {"pretrained": True, "pretrained_cfg_overlay": {"url": "http://127.0.0.1:9/evil.pth"}}
    meta.write_text(json.dumps(info))
    fmt.mark_complete(tmp_path / "export")  # even re-signed (by a teammate with the key): instructions are refused
    cfg = load_config(None, ["stage=evaluate", f"model.init_from={tmp_path / 'export'}", "data.val_split=val"])
    with pytest.raises(ValueError, match=r"model kwargs that weights may not set: pretrained, pretrained_cfg_overlay"):
        prepare_evaluation(cfg, tmp_path / "export", tmp_path / "no-data")
    with pytest.raises(ValueError, match="may not set: pretrained"):
        load_export(tmp_path / "export")
    info["model_kwargs"] = {"drop_rate": "/etc/passwd"}  # an allowed name, but not a plain value
    meta.write_text(json.dumps(info))
    fmt.mark_complete(tmp_path / "export")
    with pytest.raises(ValueError, match="may not set: drop_rate"):
        load_export(tmp_path / "export")


def test_a_checkpoints_config_may_not_set_instructions_either(tmp_path, capsys):
    folder = _ddp_checkpoint(tmp_path / "checkpoint-00000003", kwargs={"checkpoint_path": "/tmp/x.pth"})
    assert _job("export").main([str(folder), str(tmp_path / "out")]) == 2
    assert "may not set: checkpoint_path" in capsys.readouterr().err


# -- the marker parser, fuzzed ----------------------------------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=30,
)
_markers = st.one_of(
    st.binary(max_size=2000),
    _json.map(lambda v: json.dumps(v).encode()),
    st.builds(lambda files, digests: json.dumps({"files": files, "sha256": digests}).encode(),
              st.dictionaries(st.text(max_size=12), _json, max_size=6),
              st.dictionaries(st.text(max_size=12), st.text(alphabet="0123456789abcdef", min_size=63, max_size=65),
                              max_size=6)),
    st.integers(1, 200_000).map(lambda n: b"[" * n + b"]" * n),  # nesting deep enough to blow the recursion
    st.integers(1, 5000).map(lambda n: b'{"files": {"a": 1' + b"0" * n + b"}}"),  # huge numbers
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_markers)
def test_the_marker_parser_parses_or_refuses_every_input_within_a_memory_bound(data):
    tracemalloc.start()
    try:
        try:
            marker = fmt.parse_marker(data)
        except fmt.MarkerError:
            return
        assert set(marker.files) == set(marker.sha256)
        assert all(type(size) is int and size >= 0 for size in marker.files.values())
        assert fmt.signature_refusal(marker) is not None  # nothing generated here carries this key's signature
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 64 * len(data) + (4 << 20), f"parsing {len(data)} bytes peaked at {peak} bytes"
