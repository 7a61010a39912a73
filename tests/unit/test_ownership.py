"""A run is owned (issue 10, item 5): a second job under a live run name is refused; a stale lease is taken
over with the run's id kept; recovery moves, never deletes, folders its run did not write."""

from __future__ import annotations

import json
import time

import pytest
from pyarrow import fs as pafs

from metaformer_platform.storage import checkpoint_format as fmt
from metaformer_platform.training import ownership


def test_a_live_run_name_is_refused_a_released_or_stale_one_taken_over(tmp_path):
    first = ownership.claim_run(str(tmp_path), "r1")
    try:
        with pytest.raises(ValueError, match=r"run.name='r1'.*in use by a live job.*another run.name"):
            ownership.claim_run(str(tmp_path), "r1")
        other = ownership.claim_run(str(tmp_path), "r2")  # another name: fine
        other.release()
    finally:
        first.release()
    second = ownership.claim_run(str(tmp_path), "r1")  # released: the next job resumes the same run
    assert second.run_id == first.run_id and second.attempt != first.attempt
    # its driver dies (no release): a third job is refused until the lease is older than the TTL
    second._stop.set()
    with pytest.raises(ValueError, match="live job"):
        ownership.claim_run(str(tmp_path), "r1")
    third = ownership.claim_run(str(tmp_path), "r1", now=time.time() + ownership.LEASE_TTL_S + 1)
    assert third.run_id == first.run_id
    third.release()
    assert json.loads((tmp_path / "r1" / fmt.OWNER_FILE).read_text())["released"] is True


def test_jobs_claiming_one_local_run_name_at_once_get_it_once_without_waiting(tmp_path, monkeypatch):
    """A local run folder's lease is read, checked and written under an flock: of jobs claiming one name at
    the same moment exactly one gets it, the rest are refused naming it, and none waits ``SETTLE_S`` (the
    object-storage fallback). Each write is slowed (storage latency): unlocked, every claimer would read the
    empty lease first."""
    import threading

    write = ownership._write_json
    monkeypatch.setattr(ownership, "_write_json", lambda *a: (time.sleep(0.05), write(*a)))
    monkeypatch.setattr(ownership, "SETTLE_S", 30.0)
    barrier, outcomes = threading.Barrier(6), []

    def claim() -> None:
        barrier.wait()
        try:
            outcomes.append(ownership.claim_run(str(tmp_path), "r1"))
        except ValueError as err:
            outcomes.append(err)

    started = time.monotonic()
    threads = [threading.Thread(target=claim) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    leases = [o for o in outcomes if isinstance(o, ownership.RunLease)]
    try:
        assert len(outcomes) == 6 and len(leases) == 1, outcomes
        assert all("in use by a live job" in str(o) for o in outcomes if o not in leases)
        assert time.monotonic() - started < 10  # no claimer settled
        assert json.loads((tmp_path / "r1" / fmt.OWNER_FILE).read_text())["attempt"] == leases[0].attempt
    finally:
        for lease in leases:
            lease.release()


def test_the_read_only_check_refuses_a_live_name_and_writes_nothing(tmp_path):
    """``check_run_free`` (the driver's check before Ray): a live lease refused with claim_run's message, a free
    or released name passes, and nothing is written either way."""
    ownership.check_run_free(str(tmp_path), "r1")  # never used
    assert list(tmp_path.iterdir()) == []
    lease = ownership.claim_run(str(tmp_path), "r1")
    try:
        before = (tmp_path / "r1" / fmt.OWNER_FILE).read_bytes()
        with pytest.raises(ValueError, match=r"run.name='r1'.*in use by a live job.*another run.name"):
            ownership.check_run_free(str(tmp_path), "r1")
        assert (tmp_path / "r1" / fmt.OWNER_FILE).read_bytes() == before
        assert sorted(p.name for p in (tmp_path / "r1").iterdir()) == [fmt.OWNER_FILE]
    finally:
        lease.release()
    ownership.check_run_free(str(tmp_path), "r1")  # released


def _folder(run: str, name: str, owner: dict | None) -> None:
    from pathlib import Path

    path = Path(run) / name
    path.mkdir(parents=True)
    (path / "model.pt").write_bytes(b"weights of " + name.encode())
    if owner is not None:
        fmt.stamp(path, owner, 0)


def test_recovery_quarantines_what_its_run_did_not_write(tmp_path):
    run = str(tmp_path / "run")
    mine, theirs = {"run_id": "a" * 32, "attempt": "1"}, {"run_id": "b" * 32, "attempt": "9"}
    _folder(run, "checkpoint-00000002", mine)
    _folder(run, "checkpoint-00000004", theirs)
    _folder(run, "checkpoint-00000006", None)  # copied in by a person, or from before stamps
    _folder(run, "checkpoint-00000001", None)  # registered with Ray: Ray's own, never moved
    moved = ownership.quarantine_foreign(pafs.LocalFileSystem(), run, ["checkpoint-00000001"], mine["run_id"])
    assert moved == ["checkpoint-00000004", "checkpoint-00000006"]
    assert (tmp_path / "run" / "checkpoint-00000002" / "model.pt").is_file()
    assert (tmp_path / "run" / "checkpoint-00000001" / "model.pt").is_file()
    kept = sorted((tmp_path / "run" / ownership.QUARANTINE).iterdir())
    assert [p.name.split("-2")[0] for p in kept] == ["checkpoint-00000004", "checkpoint-00000006"]
    assert [(p / "model.pt").read_bytes() for p in kept] == [b"weights of checkpoint-00000004",
                                                             b"weights of checkpoint-00000006"]
