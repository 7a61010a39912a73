"""Checkpoint completeness across ranks' uploads, and reconciling a run folder with what Ray registered."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.fs
import pytest

from metaformer_platform.storage import checkpoint_format as fmt
from metaformer_platform.training import checkpoint as ckpt


def _rank_part(folder: Path, rank: int, payload: bytes = b"x" * 100) -> dict[str, tuple[int, str]]:
    """One rank's scratch folder, as the Trainer writes it before Ray uploads it."""
    folder.mkdir(parents=True)
    (folder / f"rng-rank{rank:05d}.pt").write_bytes(payload)
    if rank == 0:
        (folder / "model.pt").write_bytes(payload * 3)
        (folder / "dcp").mkdir()
        (folder / "dcp" / "__0_0.distcp").write_bytes(payload)
    return fmt.describe_files(folder)


def _merged(tmp_path: Path, name: str = "merged", *, upload_rank1: bool = True) -> Path:
    """Both ranks' parts copied into one folder, as Ray's per-rank uploads do; rank 0 holds the marker."""
    parts = [_rank_part(tmp_path / f"{name}-scratch0", 0), _rank_part(tmp_path / f"{name}-scratch1", 1)]
    fmt.mark_complete(tmp_path / f"{name}-scratch0", parts)
    dest = tmp_path / name
    shutil.copytree(tmp_path / f"{name}-scratch0", dest)
    if upload_rank1:
        shutil.copytree(tmp_path / f"{name}-scratch1", dest, dirs_exist_ok=True)
    return dest


def test_the_marker_lists_every_ranks_files_and_a_partial_upload_is_incomplete(tmp_path):
    folder = _merged(tmp_path)
    listed = json.loads((folder / fmt.COMPLETE_MARKER).read_text())["files"]
    assert listed == {"dcp/__0_0.distcp": 100, "model.pt": 300, "rng-rank00000.pt": 100, "rng-rank00001.pt": 100}
    assert fmt.is_complete(folder) and fmt.incomplete_reason(folder) is None

    # rank 1 died before its upload: rank 0's marker is there, but its part is not
    partial = _merged(tmp_path, "partial", upload_rank1=False)
    assert (partial / fmt.COMPLETE_MARKER).is_file() and not fmt.is_complete(partial)
    assert fmt.incomplete_reason(partial) == "COMPLETE lists files that are missing or short: rng-rank00001.pt"

    # a file cut short by a dying upload, and a marker that is not one
    (folder / "model.pt").write_bytes(b"x" * 10)
    assert fmt.incomplete_reason(folder) == "COMPLETE lists files that are missing or short: model.pt (10 of 300 bytes)"
    (folder / fmt.COMPLETE_MARKER).write_text("ok\n")
    assert not fmt.is_complete(folder)
    shutil.rmtree(partial / "dcp")
    (partial / fmt.COMPLETE_MARKER).unlink()
    assert fmt.incomplete_reason(partial) == "no COMPLETE marker"


def test_another_ranks_scratch_files_in_a_shared_folder_are_not_described(tmp_path, monkeypatch):
    """Two ranks saving into one folder: what the other is still writing under a hidden temporary name (ours,
    DCP's, tempfile's) is left out, a file gone between the listing and its hash too; DCP's .metadata is kept."""
    for name in ("model.pt", ".metadata", ".model.pt.tmp-123", ".metadata.tmp", ".tmplvmoxh"):
        (tmp_path / name).write_bytes(b"x" * 3)
    assert sorted(fmt.finished_files(tmp_path)) == [".metadata", "model.pt"]

    listing = fmt.finished_files
    monkeypatch.setattr(fmt, "finished_files", lambda d: {**listing(d), "renamed-away.tmp": 3})
    described = fmt.describe_files(tmp_path)
    assert sorted(described) == [".metadata", "model.pt"] and described["model.pt"][0] == 3
    with pytest.raises(FileNotFoundError):  # a file the caller names must exist
        fmt.describe_files(tmp_path, ["renamed-away.tmp"])


def test_a_single_writer_marks_its_own_files(tmp_path):
    _rank_part(tmp_path / "one", 0)
    fmt.mark_complete(tmp_path / "one")
    assert fmt.is_complete(tmp_path / "one")
    (tmp_path / "one" / "rng-rank00000.pt").unlink()
    assert not fmt.is_complete(tmp_path / "one")


def test_an_incomplete_checkpoint_is_never_resumed_from(tmp_path):
    """The Trainer refuses a folder whose marker lists a missing rank part, naming it."""
    from metaformer_platform.config import load_config
    from metaformer_platform.data.build.synthetic import ensure_synthetic_shards
    from metaformer_platform.strategies.base import DistContext
    from metaformer_platform.training.trainer import Trainer

    shards = ensure_synthetic_shards(tmp_path / "data", num_classes=4, train_samples=64, val_samples=16,
                                     image_size=32, samples_per_shard=64)
    cfg = load_config(None, ["model.name=poolformer_debug", "data.img_size=32", "data.num_workers=0",
                             "data.val_split=null", "trainer.batch_size=16", "trainer.max_steps=1",
                             "trainer.precision=fp32", "trainer.torch_threads=1", "scaling.num_workers=1"])
    trainer = Trainer(cfg, DistContext(), data_root=shards)
    trainer.train()
    folder = tmp_path / "ckpt"
    trainer.save_checkpoint(folder)
    assert fmt.is_complete(folder)
    Trainer(cfg, DistContext(), data_root=shards, resume_from=folder)  # loads
    (folder / "optimizer.pt").unlink()
    with pytest.raises(ValueError, match=r"not a complete checkpoint \(COMPLETE lists files that are missing .*optimizer.pt"):
        Trainer(cfg, DistContext(), data_root=shards, resume_from=folder)


def _names(*steps: int) -> list[str]:
    return [f"checkpoint-{s:08d}" for s in steps]


def test_plan_recovery_adopts_the_newest_complete_orphan_and_removes_the_rest():
    c10, c20, c30, c40 = _names(10, 20, 30, 40)
    # Ray registered 10 and 20; 30 was uploaded by a worker killed before its report was collected,
    # 40 was being uploaded when it died.
    plan = ckpt.plan_recovery({c10: True, c20: True, c30: True, c40: False}, [c10, c20], c20)
    assert plan == ckpt.Recovery(resume=c30, adopt=True, remove=(c40,))
    # nothing newer is complete: Ray's own latest, and the partial folder goes
    assert ckpt.plan_recovery({c10: True, c20: True, c30: False}, [c10, c20], c20) == ckpt.Recovery(c20, False, (c30,))
    # two complete orphans (the controller was slow): the newer wins, the older can never be pruned by Ray
    assert ckpt.plan_recovery({c10: True, c20: True, c30: True}, [c10], c10) == ckpt.Recovery(c30, True, (c20,))
    # an unregistered folder older than Ray's latest (a prune cut short, or an old leftover)
    assert ckpt.plan_recovery({c10: True, c20: True, c30: True}, [c20, c30], c30) == ckpt.Recovery(c30, False, (c10,))
    # Ray registered nothing yet: the first checkpoint's report was the one lost
    assert ckpt.plan_recovery({c10: True}, [], None) == ckpt.Recovery(c10, True, ())
    assert ckpt.plan_recovery({}, [], None) == ckpt.Recovery(None, False, ())
    # other folders in the run folder are not ours to judge
    assert ckpt.plan_recovery({"checkpoint_2026-01-01": False, c10: True}, [c10], c10) == ckpt.Recovery(c10, False, ())


def test_recover_run_folder_reads_completeness_on_the_storage_filesystem_and_deletes_orphans(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for step in (10, 20):
        shutil.copytree(_merged(tmp_path, f"c{step}"), run / f"checkpoint-{step:08d}")
    shutil.copytree(_merged(tmp_path, "c30", upload_rank1=False), run / "checkpoint-00000030")
    fs = pyarrow.fs.LocalFileSystem()
    plan = ckpt.recover_run_folder(fs, str(run), registered=_names(10), latest="checkpoint-00000010")
    assert plan == ckpt.Recovery("checkpoint-00000020", True, ("checkpoint-00000030",))
    assert sorted(p.name for p in run.iterdir()) == _names(10, 20)
    assert ckpt.is_complete_on(fs, str(run / "checkpoint-00000020"))


def test_a_registered_checkpoint_cut_short_is_quarantined_and_the_newest_complete_one_resumed(tmp_path):
    """Ray's newest registered checkpoint had a file truncated after it was registered: recovery (before the
    Trainer reads anything) moves it to _quarantine/, leaves Ray a placeholder, and resumes from the previous
    one; a second start does the same, not the bad folder again; a redone step gets a name of its own."""
    from metaformer_platform.training import quarantine

    run = tmp_path / "run"
    run.mkdir()
    for step in (10, 20):
        shutil.copytree(_merged(tmp_path, f"c{step}"), run / f"checkpoint-{step:08d}")
    (run / "checkpoint-00000020" / "model.pt").write_bytes(b"x" * 7)  # cut short
    fs = pyarrow.fs.LocalFileSystem()
    c10, c20 = _names(10, 20)
    plan = ckpt.recover_run_folder(fs, str(run), registered=[c10, c20], latest=c20)
    assert plan == ckpt.Recovery(c10, False, (), (
        (c20, "COMPLETE lists files that are missing or short: model.pt (7 of 300 bytes)"),))
    moved = list((run / quarantine.QUARANTINE).iterdir())
    assert [p.name.startswith(f"{c20}-") for p in moved] == [True]
    assert (moved[0] / "model.pt").read_bytes() == b"x" * 7 and (moved[0] / fmt.COMPLETE_MARKER).is_file()
    # Ray's snapshot still names checkpoint-00000020: a placeholder keeps it loadable, and is never resumed from
    assert sorted(p.name for p in (run / c20).iterdir()) == [quarantine.QUARANTINED_NOTE]
    assert json.loads((run / c20 / quarantine.QUARANTINED_NOTE).read_text())["moved_to"] == str(moved[0])
    again = ckpt.recover_run_folder(fs, str(run), registered=[c10, c20], latest=c20)
    assert again == ckpt.Recovery(c10, False, (), ())
    assert len(list((run / quarantine.QUARANTINE).iterdir())) == 1
    # the redone step 20 is reported beside the placeholder (Ray deletes the placeholder's path when it prunes it)
    assert ckpt.checkpoint_dir_name(fs, str(run), 20) == "checkpoint-00000020-1"
    assert ckpt.checkpoint_dir_name(fs, str(run), 30) == "checkpoint-00000030"
    shutil.copytree(run / c10, run / "checkpoint-00000020-1")
    redone = ckpt.recover_run_folder(fs, str(run), registered=[c10, c20, "checkpoint-00000020-1"],
                                     latest="checkpoint-00000020-1")
    assert redone == ckpt.Recovery("checkpoint-00000020-1", False, (), ())
    assert fmt.checkpoint_step("checkpoint-00000020-1") == 20


def test_a_digest_mismatch_is_caught_before_the_folder_is_chosen_and_all_bad_means_a_fresh_start(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copytree(_merged(tmp_path, "c10"), run / "checkpoint-00000010")
    (run / "checkpoint-00000010" / "model.pt").write_bytes(b"y" * 300)  # same size, other bytes
    plan = ckpt.recover_run_folder(pyarrow.fs.LocalFileSystem(), str(run), registered=_names(10),
                                   latest="checkpoint-00000010")
    assert plan.resume is None and [name for name, _ in plan.quarantine] == _names(10)
    assert "model.pt changed after the folder was written" in plan.quarantine[0][1]


def test_a_full_disk_during_a_checkpoint_names_the_folder_and_never_adopts_the_partial_one(tmp_path):
    """Issue 25, an untried fault: the disk fills while a checkpoint is written, for real (a 4 MiB tmpfs in a
    mount namespace of its own, filled by a ballast file; tests/unit/disk_full_job.py). The upload into the run
    folder finds it full, then the scratch write of a later checkpoint: each is an error that names the folder
    and the free space, the scratch copy is deleted, the partial run folder has no marker and recovery removes
    it, resuming from the last good checkpoint, which trains on to the same losses (the state is intact)."""
    import os
    import subprocess
    import sys

    disk = tmp_path / "disk"
    disk.mkdir()
    repo = Path(__file__).resolve().parents[2]
    mount = f"mount -t tmpfs -o size=4m tmpfs {disk} && exec \"$0\" \"$@\""
    proc = subprocess.run(["unshare", "-m", "sh", "-c", mount, sys.executable, str(Path(__file__).with_name(
        "disk_full_job.py")), str(disk), str(tmp_path / "shards")], capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(repo / "platform")})
    if proc.returncode != 0 and "unshare" in proc.stderr and "Operation not permitted" in proc.stderr:
        pytest.skip(f"no mount namespace here (needs root): {proc.stderr.strip()[:200]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    run = disk / "runs" / "r"
    assert out["upload_error"].startswith(f"[Errno 28] no space left on the disk of {run}/checkpoint-00000004 "
                                          "while writing a checkpoint there (")
    assert " bytes free): free space there, or set run.storage_path to a larger disk." in out["upload_error"]
    assert out["scratch_error"].startswith(f"[Errno 28] no space left on the disk of {disk}/scratch/ckpt-00000006-")
    assert "give the workers a TMPDIR on a larger disk" in out["scratch_error"]
    assert out["scratch_after_upload"] == [] and out["scratch_after_save"] == []  # no scratch copy left behind
    assert out["partial_4"] == "no COMPLETE marker"
    assert out["recovery"] == {"resume": "checkpoint-00000002", "remove": ["checkpoint-00000004"]}
    assert out["left"] == ["checkpoint-00000002"]
    first, resumed = out["losses"]["first"], out["losses"]["resumed"]
    assert resumed == {"3": first["3"], "4": first["4"]}  # exactly the steps the first trainer took from step 2
    assert out["complete_4"] is None  # with room again, the same step is written whole


def _dead_s3(monkeypatch) -> tuple[pyarrow.fs.FileSystem, str]:
    """A pyarrow S3 filesystem at a 127.0.0.1 port where nothing listens (2 attempts per request), and its URL."""
    import socket

    from metaformer_platform.storage.settings import S3Settings

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    for key, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s",
                       "AWS_MAX_ATTEMPTS": "2"}.items():
        monkeypatch.setenv(key, value)
    return S3Settings.from_env().pyarrow_filesystem(), endpoint


def test_on_upload_failure_continue_warns_naming_the_endpoint_and_training_goes_on(tmp_path, monkeypatch, caplog):
    """run.on_upload_failure=continue, on the real upload code: every checkpoint's upload to a dead S3 endpoint
    fails after its retries; each is a warning naming the endpoint and the folder, never an error, the Trainer
    trains to its last step, logs each as dropped (what the console then says: not stored, not "checkpoint ->"),
    and no scratch copy is left behind."""
    from metaformer_platform.config import load_config
    from metaformer_platform.data.build.synthetic import ensure_synthetic_shards
    from metaformer_platform.storage.upload import upload_checkpoint_part_or_warn
    from metaformer_platform.strategies.base import DistContext
    from metaformer_platform.training.checkpoint import CheckpointNotStored
    from metaformer_platform.training.trainer import NullTracker, Trainer

    fs, endpoint = _dead_s3(monkeypatch)
    shards = ensure_synthetic_shards(tmp_path / "data", num_classes=4, train_samples=64, val_samples=16,
                                     image_size=32, samples_per_shard=64)
    cfg = load_config(None, ["model.name=poolformer_debug", "data.img_size=32", "data.num_workers=0",
                             "data.val_split=null", "trainer.batch_size=16", "trainer.max_steps=4",
                             "trainer.checkpoint_every_steps=2", "trainer.precision=fp32", "trainer.torch_threads=1",
                             "scaling.num_workers=1", "run.on_upload_failure=continue", "run.checkpoint_upload=sync"])
    reported: list[tuple[int, bool]] = []

    def report(metrics: dict[str, float], checkpoint: Path | None) -> bool:
        if checkpoint is not None:  # launch.checkpoint_reporter's continue path, without Ray
            dest = f"bucket/runs/r/checkpoint-{int(metrics['step']):08d}"
            reported.append((int(metrics["step"]), upload_checkpoint_part_or_warn(
                checkpoint, fs, dest, rank=0, world_size=1, agree=lambda landed: landed)))
            if not reported[-1][1]:
                raise CheckpointNotStored(dest)
        return False

    class Recorder(NullTracker):
        def __init__(self) -> None:
            self.logged: list[tuple[int, dict[str, float]]] = []

        def log_metrics(self, metrics: dict[str, float], step: int) -> None:
            self.logged.append((step, metrics))

    scratch, tracker = tmp_path / "scratch", Recorder()
    scratch.mkdir()
    with caplog.at_level("WARNING", logger="metaformer_platform.storage.upload"):
        trainer = Trainer(cfg, DistContext(), data_root=shards, report=report, checkpoint_scratch=scratch,
                          tracker=tracker)
        trainer.train()
    assert trainer.step == 4 and reported == [(2, False), (4, False)]
    assert [step for step, m in tracker.logged if m.get("system/checkpoint_dropped") == 1.0] == [2, 4]
    warnings = [r.getMessage() for r in caplog.records if r.name == "metaformer_platform.storage.upload"]
    assert len(warnings) == 2, warnings
    for step, text in zip((2, 4), warnings, strict=True):
        assert text.startswith(f"uploading the checkpoint to s3://bucket/runs/r/checkpoint-{step:08d} failed: the S3 "
                               f"endpoint {endpoint} did not take it within its retries (AWS_MAX_ATTEMPTS): "), text
        assert "run.on_upload_failure=continue: training goes on without this checkpoint" in text
    assert list(scratch.iterdir()) == []


def test_on_upload_failure_continue_writes_no_marker_unless_every_rank_landed_and_needs_sync(tmp_path):
    """Rank 0's part landed but another rank's did not (the ranks' agreement says so): no COMPLETE is written,
    so the folder is never resumed from; the local marker is put back. The setting needs synchronous uploads."""
    from metaformer_platform.config import load_config
    from metaformer_platform.storage.upload import upload_checkpoint_part_or_warn

    local = tmp_path / "scratch"
    parts = [_rank_part(local, 0)]
    fmt.mark_complete(local, parts)
    fs = pyarrow.fs.LocalFileSystem()
    dest = tmp_path / "runs" / "checkpoint-00000002"
    landed: list[bool] = []

    def another_rank_failed(ok: bool) -> bool:
        landed.append(ok)
        return False

    assert not upload_checkpoint_part_or_warn(local, fs, str(dest), rank=0, world_size=2, agree=another_rank_failed)
    assert landed == [True] and (dest / "model.pt").is_file() and not (dest / fmt.COMPLETE_MARKER).exists()
    assert (local / fmt.COMPLETE_MARKER).is_file()
    assert upload_checkpoint_part_or_warn(local, fs, str(dest), rank=0, world_size=1, agree=lambda ok: ok)
    assert fmt.is_complete(dest)

    with pytest.raises(ValueError, match="run.on_upload_failure=continue .* set run.checkpoint_upload=sync"):
        load_config(None, ["run.on_upload_failure=continue"])
