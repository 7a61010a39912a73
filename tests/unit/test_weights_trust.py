"""No code runs from weights (issue 10, item 1): a crafted, pickle-bearing checkpoint is refused on every load
path (init_from, resume_from, export, recovery, evaluate, registry) and its payload never runs; a file changed
after its run wrote it (same size, other bytes) is refused by the sha256 its marker records."""

from __future__ import annotations

import json
import os
import pickle
import shlex
from pathlib import Path

import pytest
import torch
from pyarrow import fs as pafs

from metaformer_platform.config import load_config
from metaformer_platform.storage import checkpoint_format as fmt
from metaformer_platform.training import checkpoint as ckpt
from metaformer_platform.training import ownership

REFUSED = r"native format .* can run code .* Export it first"


class Payload:
    """Unpickling this runs a shell command that creates ``marker``: the attack the loaders must never allow."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def _payload_bytes(marker: Path) -> bytes:
    return pickle.dumps(Payload(marker))


def _config(strategy: str) -> str:
    return load_config(None, ["model.name=poolformer_debug", f"strategy.name={strategy}"]).to_yaml()


def craft(folder: Path, strategy: str, marker: Path, *, run_id: str | None = "someone-else", signed: bool = False) -> Path:
    """A folder that looks like a complete checkpoint of ``strategy`` whose native files run the payload; its strict
    marker is unsigned (whoever can write the storage lacks the deployment key) unless ``signed``."""
    folder.mkdir(parents=True)
    fmt.save_tensors({"step": 3, "model_name": "poolformer_debug", "num_classes": 4}, folder / fmt.TRAINER_FILE)
    (folder / fmt.CONFIG_FILE).write_text(_config(strategy))
    evil = _payload_bytes(marker)
    if strategy == "fsdp":  # torch.distributed.checkpoint's FileSystemReader unpickles .metadata
        (folder / "fsdp").mkdir()
        (folder / "fsdp" / ".metadata").write_bytes(evil)
        (folder / "fsdp" / "__0_0.distcp").write_bytes(b"\0" * 64)
    elif strategy == "deepspeed":  # the engine's loaders: torch.load(weights_only=False)
        (folder / "deepspeed").mkdir()
        torch.save(Payload(marker), folder / "deepspeed" / "mp_rank_00_model_states.pt")
        torch.save(Payload(marker), folder / "deepspeed" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    else:  # ddp: model.pt itself is the pickle
        (folder / fmt.DDP_MODEL_FILE).write_bytes(evil)
    fmt.mark_complete(folder, sign=signed)
    if run_id is not None:
        fmt.stamp(folder, {"run_id": run_id, "attempt": "a"}, 0)
    return folder


@pytest.fixture
def marker(tmp_path) -> Path:
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "the checkpoint's pickle payload ran"


def test_the_crafted_checkpoints_are_live(tmp_path):
    """The payload runs when read the way the native readers read it: so the refusals below are real."""
    live = tmp_path / "live"
    fsdp = craft(tmp_path / "fsdp", "fsdp", live)
    from metaformer_platform.strategies import get_strategy_class

    with pytest.raises(BaseException):  # noqa: B017 (DCP fails after unpickling: the payload has run by then)
        get_strategy_class("fsdp").consolidate(fsdp)
    assert live.exists()
    live.unlink()
    torch.load(craft(tmp_path / "ds", "deepspeed", live) / "deepspeed" / "mp_rank_00_model_states.pt",
               weights_only=False)
    assert live.exists()


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed", "ddp"])
def test_init_from_refuses_a_crafted_checkpoint_unread(strategy, tmp_path, marker):
    import timm

    import metaformer_platform.models  # noqa: F401
    from metaformer_platform.launch.checks import check_init_from
    from metaformer_platform.training.export import init_from

    folder = craft(tmp_path / "checkpoint-00000003", strategy, marker)
    match = "objects other than tensors" if strategy == "ddp" else REFUSED
    with pytest.raises(ValueError, match=match):
        init_from(timm.create_model("poolformer_debug", num_classes=4), folder)  # in the worker
    if strategy != "ddp":  # the driver refuses before any cluster time (DDP's model.pt is read in the worker)
        with pytest.raises(ValueError, match=REFUSED):
            check_init_from(load_config(None, ["model.name=poolformer_debug", f"model.init_from={folder}"]))


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed", "ddp"])
def test_export_refuses_a_crafted_checkpoint_and_writes_nothing(strategy, tmp_path, marker):
    from metaformer_platform.training.export import export_checkpoint

    folder = craft(tmp_path / "checkpoint-00000003", strategy, marker)
    with pytest.raises(ValueError, match="objects other than tensors" if strategy == "ddp" else REFUSED):
        export_checkpoint(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_export_entry_point_exits_2_on_a_crafted_checkpoint(tmp_path, marker, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("export_job", Path(__file__).parents[2] / "jobs" / "export.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    folder = craft(tmp_path / "checkpoint-00000003", "fsdp", marker)
    assert job.main([str(folder), str(tmp_path / "out")]) == 2
    assert "Export it first" in capsys.readouterr().err


def _run_folder(storage: Path, run: str, run_id: str) -> Path:
    (storage / run).mkdir(parents=True)
    (storage / run / fmt.OWNER_FILE).write_text(json.dumps({"run_id": run_id, "released": True}))
    return storage / run


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed"])
def test_resume_from_reads_native_files_only_when_signed_with_the_deployment_key(strategy, tmp_path, marker, monkeypatch,
                                                                                  capsys):
    from metaformer_platform.launch.checks import check_resume_from

    storage = tmp_path / "runs"

    def cfg(source: Path, *extra: str):
        return load_config(None, ["model.name=poolformer_debug", f"strategy.name={strategy}", "run.name=new-run",
                                  f"run.storage_path={storage}", f"run.resume_from={source}", *extra])

    # someone else's checkpoint, given by path
    foreign = craft(tmp_path / "shared" / "checkpoint-00000003", strategy, marker)
    with pytest.raises(ValueError, match=r"native checkpoint reader, which can run code.*refused, unread.*not signed"):
        check_resume_from(cfg(foreign))
    # issue 24, finding 1: planted in a run folder of this storage, stamped with the run id its _owner.json records
    forged = craft(_run_folder(storage, "victim", "run-1") / "checkpoint-00000003", strategy, marker, run_id="run-1")
    with pytest.raises(ValueError, match="refused, unread: its marker is not signed"):
        check_resume_from(cfg(forged))
    # a signature made with another key (another deployment's, or a guessed one)
    monkeypatch.setenv(fmt.KEY_ENV, "another-deployments-key-0123456789")
    other = craft(tmp_path / "other" / "checkpoint-00000003", strategy, marker, signed=True)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="signed with another key .*same METAFORMER_CHECKPOINT_KEY on every node"):
        check_resume_from(cfg(other))
    own = craft(tmp_path / "mine" / "checkpoint-00000003", strategy, marker, signed=True)
    assert check_resume_from(cfg(own)) == own  # signed with this deployment's key: wherever it lies
    # an unsigned checkpoint of your own (written before signing) only with the explicit setting, said loudly
    assert check_resume_from(cfg(forged, "run.accept_unsigned_checkpoints=true")) == forged
    assert "SECURITY WARNING" in capsys.readouterr().out


def test_ddp_resume_reads_weights_only_and_refuses_a_pickle(tmp_path, marker):
    from metaformer_platform.launch.checks import check_resume_from
    from metaformer_platform.strategies.base import DistContext
    from metaformer_platform.strategies.config import StepSettings
    from metaformer_platform.strategies.ddp import DDPStrategy

    folder = craft(tmp_path / "shared" / "checkpoint-00000003", "ddp", marker)
    cfg = load_config(None, ["model.name=poolformer_debug", f"run.storage_path={tmp_path / 'runs'}",
                             f"run.resume_from={folder}"])
    assert check_resume_from(cfg) == folder  # DDP's reads are weights_only: any complete checkpoint
    strategy = DDPStrategy(cfg.strategy, DistContext(), StepSettings(8, 1, None, "fp32"))
    strategy.setup(torch.nn.Linear(2, 2), lambda m: torch.optim.SGD(m.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="objects other than tensors"):
        strategy.load(folder)


def test_recovery_never_resumes_a_foreign_folder_dropped_into_the_run(tmp_path, marker):
    """The newest complete folder of a run is resumed only when its run wrote it (its stamps name the run and its
    marker is signed); a foreign one is moved to _quarantine/ unread, forged stamps included, and the
    native-format check refuses it even if it stayed."""
    storage = tmp_path / "runs"
    run = _run_folder(storage, "r", "run-1")
    fs = pafs.LocalFileSystem()
    mine = run / "checkpoint-00000010"
    mine.mkdir()
    fmt.save_tensors({"w": torch.ones(2)}, mine / fmt.DDP_MODEL_FILE)
    fmt.mark_complete(mine)
    fmt.stamp(mine, {"run_id": "run-1", "attempt": "a"}, 0)
    dropped = craft(run / "checkpoint-00000020", "fsdp", marker, run_id="run-1")  # stamps copied from the run
    with pytest.raises(ValueError, match=r"its marker is not signed.*export them first"):
        ownership.check_native_checkpoint("fsdp", fs, str(dropped), str(storage), "resuming")
    ownership.check_native_checkpoint("fsdp", fs, str(mine), str(storage), "resuming")  # signed: allowed
    ownership.check_native_checkpoint("ddp", fs, str(dropped), str(storage), "resuming")  # weights_only reader

    assert ownership.quarantine_foreign(fs, str(run), registered=[], run_id="run-1") == ["checkpoint-00000020"]
    plan = ckpt.recover_run_folder(fs, str(run), registered=[], latest=None)
    assert plan.resume == "checkpoint-00000010" and plan.adopt


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed", "ddp"])
def test_evaluate_refuses_a_crafted_checkpoint(strategy, tmp_path, marker):
    from metaformer_platform.launch.checks import prepare_evaluation
    from metaformer_platform.launch.workers import load_weights_model

    folder = craft(tmp_path / "checkpoint-00000003", strategy, marker)
    cfg = load_config(None, ["stage=evaluate", "model.name=poolformer_debug", "model.num_classes=4",
                             f"model.init_from={folder}", "data.val_split=val"])
    if strategy != "ddp":
        with pytest.raises(ValueError, match=REFUSED):
            prepare_evaluation(cfg, folder, tmp_path / "no-data")  # the driver: before the data is even read
    with pytest.raises(ValueError, match="objects other than tensors" if strategy == "ddp" else REFUSED):
        load_weights_model(cfg, folder)  # the worker


def test_a_registered_version_whose_weights_are_a_pickle_is_refused(tmp_path, marker, monkeypatch):
    from mlflow import MlflowClient

    from metaformer_platform.storage.weights import resolve
    from metaformer_platform.tracking import registry
    from metaformer_platform.training.export import read_weights

    export = tmp_path / "export"
    export.mkdir()
    (export / "model.safetensors").write_bytes(_payload_bytes(marker))  # a pickle under the safetensors name
    (export / "model.json").write_text(json.dumps({"model_name": "poolformer_debug", "num_classes": 4}))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("METAFORMER_WEIGHTS_CACHE", str(tmp_path / "cache"))
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("trust")).info.run_id
    registry.register_export(export, "crafted", tracking_uri=uri, run_id=run_id,
                             lineage_tags=registry.lineage_tags("ckpt", "hash", git_commit="x"))
    local = resolve("models:/crafted/1", tracking_uri=uri)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        read_weights(local)


def storage_reason(folder: Path, *, verify: bool) -> str | None:
    from metaformer_platform.storage.checkpoint_format import incomplete_reason

    return incomplete_reason(folder, verify_sha256=verify)


def _trained_ddp_checkpoint(folder: Path) -> Path:
    import timm

    import metaformer_platform.models  # noqa: F401

    model = timm.create_model("poolformer_debug", num_classes=4)
    fmt.save_tensors(model.state_dict(), folder / fmt.DDP_MODEL_FILE)
    fmt.save_tensors({"step": 3, "model_name": "poolformer_debug", "num_classes": 4}, folder / fmt.TRAINER_FILE)
    (folder / fmt.CONFIG_FILE).write_text(_config("ddp"))
    fmt.mark_complete(folder)
    return folder


def test_a_file_changed_after_the_marker_same_size_is_refused_by_its_sha256(tmp_path):
    from metaformer_platform.storage.weights import read_weights_info, resolve
    from metaformer_platform.training.export import export_checkpoint

    folder = _trained_ddp_checkpoint(tmp_path / "checkpoint-00000003")
    recorded = json.loads((folder / fmt.COMPLETE_MARKER).read_text())["sha256"]
    assert set(recorded) == {fmt.DDP_MODEL_FILE, fmt.TRAINER_FILE, fmt.CONFIG_FILE}
    assert resolve(folder) == folder and fmt.is_complete(folder)

    # The classifier's weights overwritten in place: same size, other bytes, a perfectly loadable file.
    data = (folder / fmt.DDP_MODEL_FILE).read_bytes()
    weight = fmt.load_tensors(folder / fmt.DDP_MODEL_FILE)["head.fc.weight"].numpy().tobytes()
    assert data.count(weight) == 1
    (folder / fmt.DDP_MODEL_FILE).write_bytes(data.replace(weight, bytes(len(weight))))
    assert torch.count_nonzero(fmt.load_tensors(folder / fmt.DDP_MODEL_FILE)["head.fc.weight"]) == 0
    assert storage_reason(folder, verify=False) is None  # by sizes alone it would pass
    changed = r"model.pt changed after the folder was written: its sha256 is not the one COMPLETE records"
    assert not fmt.is_complete(folder)
    for load in (resolve, read_weights_info, lambda f: export_checkpoint(f, tmp_path / "out")):
        with pytest.raises(ValueError, match=changed):
            load(folder)


def test_fsdp_and_deepspeed_checkpoints_carry_pickle_free_weights_that_export_reads(tmp_path):
    """model.safetensors beside the native files is what export/init_from read: the native ones stay unread."""
    import timm

    import metaformer_platform.models  # noqa: F401
    from metaformer_platform.training.export import export_checkpoint, init_from

    model = timm.create_model("poolformer_debug", num_classes=4)
    folder = tmp_path / "checkpoint-00000003"
    craft(folder, "fsdp", tmp_path / "never")  # native files that would run the payload
    fmt.save_weights(model.state_dict(), folder / fmt.WEIGHTS_FILE)
    fmt.mark_complete(folder)
    export_checkpoint(folder, tmp_path / "out")
    target = timm.create_model("poolformer_debug", num_classes=4)
    assert init_from(target, folder) == [] and init_from(target, tmp_path / "out") == []
    for key, value in model.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
    assert not (tmp_path / "never").exists()
