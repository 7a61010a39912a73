"""Fault trial: the S3 server is killed mid-read and restarted; the reads go on and give the same bytes.

A private SeaweedFS (not the session's, which other tests share) is killed with SIGKILL (a crash, not a
clean shutdown) while a stream is in the middle of a large object and while a loader is mid-epoch, then
started again on the same port and data folder a moment later. (The restart completes before the reads
go on: SeaweedFS accepts requests a moment before it has loaded its credentials, and a request in that
window is refused as if the key were wrong, which a reader rightly does not retry.)
"""

from __future__ import annotations

import os
import secrets
import signal
import time
from pathlib import Path

import devstack
import pytest

from metaformer_platform.data import build_loader
from metaformer_platform.data.build.writer import Sample, write_dataset
from metaformer_platform.storage import open_store

pytestmark = pytest.mark.beside_cluster  # no job on the session's Ray cluster (tests/conftest.py)

BUCKET = "faults"


class _Server:
    def __init__(self, root: Path):
        self.root = root
        self.access_key, self.secret_key = "fault" + secrets.token_hex(4), secrets.token_hex(16)
        self.svc = devstack.start_s3(root / "data", self.access_key, self.secret_key, log_dir=root)
        self.port = self.svc.ports["http"]
        self.wait_until_signed_requests_work()

    def crash(self) -> None:
        os.killpg(self.svc.pid, signal.SIGKILL)  # the group this fixture started, by its id
        devstack.stop_service(self.svc, timeout=10)  # reaps it and cleans its sockets

    def start(self) -> None:
        self.svc = devstack.start_s3(
            self.root / "data", self.access_key, self.secret_key, port=self.port, log_dir=self.root
        )
        self.wait_until_signed_requests_work()

    def wait_until_signed_requests_work(self, seconds: float = 20.0) -> None:
        """SeaweedFS answers /healthz a moment before it has loaded its credentials (requests in that
        window are refused with InvalidAccessKeyId): wait for a signed write to pass (it makes the bucket)."""
        import boto3
        from botocore.exceptions import ClientError

        client = boto3.client(
            "s3", endpoint_url=self.svc.url, region_name="us-east-1",
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
        )
        deadline = time.monotonic() + seconds
        while True:
            try:  # a write: SeaweedFS answers some reads (HEAD bucket) before it checks signatures
                client.create_bucket(Bucket=BUCKET)
                return
            except ClientError as err:
                if err.response["Error"]["Code"] in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    return
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def restart(self, down_for: float = 1.0) -> None:
        time.sleep(down_for)
        self.start()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = _Server(tmp_path_factory.mktemp("s3-faults"))
    patch = pytest.MonkeyPatch()
    try:
        for key, value in devstack.s3_env(srv.svc.url, srv.access_key, srv.secret_key).items():
            patch.setenv(key, value)
        patch.setenv("AWS_MAX_ATTEMPTS", "10")  # a restart takes about a second; allow for a slow one
        yield srv
    finally:
        patch.undo()
        devstack.stop_service(srv.svc)


def test_a_stream_survives_a_server_crash_and_restart(server):
    import boto3

    data = os.urandom(48 << 20)
    boto3.client("s3").put_object(Bucket=BUCKET, Key="big/blob", Body=data)
    storage = open_store(f"s3://{BUCKET}/big")
    with storage.open("blob") as stream:
        head = stream.read(1 << 20)
        server.crash()  # the rest of the object is still on the server side of the connection
        server.restart()
        rest = stream.read()
    assert head + rest == data
    assert stream.raw.resumes >= 1  # it really broke and was resumed, not buffered through


def _jpeg(i: int) -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (16, 16), (i % 256, (3 * i) % 256, 90)).save(out, format="JPEG")
    return out.getvalue()


def test_a_loader_epoch_goes_on_across_a_server_restart(server, tmp_path):
    local = tmp_path / "shards"
    samples = [Sample(f"s{i:04d}", _jpeg(i), i % 3) for i in range(120)]
    write_dataset(local, {"train": samples}, name="f", samples_per_shard=10, num_classes=3)
    import boto3

    s3 = boto3.client("s3")
    for path in local.iterdir():
        s3.upload_file(str(path), BUCKET, f"ds/{path.name}")
    url = f"s3://{BUCKET}/ds"

    def epoch(loader, crash_after: int | None = None):
        keys = []
        for i, (_images, _, batch_keys) in enumerate(loader):
            keys += batch_keys
            if i == crash_after:  # mid-shard (10 per shard, batches of 5, a shuffle buffer of 4)
                server.crash()
                server.restart()
        return keys

    kw = dict(batch_size=5, rank=0, world_size=1, num_workers=0, transform=None, seed=0, shuffle=True,
              shuffle_buffer=4, with_keys=True)
    reference = epoch(build_loader(url, "train", **kw))
    assert sorted(reference) == [s.key for s in samples]
    assert epoch(build_loader(url, "train", **kw), crash_after=3) == reference


def test_bad_s3_shards_are_skipped_counted_and_refused(s3_server, tmp_path, monkeypatch):
    """On the session's S3 server: a shard deleted after the manifest check and a shard overwritten with
    random bytes of the same size are skipped and counted by name, batches stay full, the threshold fails
    naming them; a shard whose size disagrees with the manifest is refused before any reading."""
    from metaformer_platform.data import DataFaultError, load_manifest

    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    local = tmp_path / "shards"
    samples = [Sample(f"b{i:03d}", _jpeg(i), i % 3) for i in range(60)]
    write_dataset(local, {"train": samples}, name="bad", samples_per_shard=10, num_classes=3)
    s3 = s3_server.client()  # not boto3.client(): its default session keeps the credentials it saw first
    prefix = "bad-shards"
    for path in local.iterdir():
        s3.upload_file(str(path), s3_server.bucket, f"{prefix}/{path.name}")
    url = f"s3://{s3_server.bucket}/{prefix}"
    manifest = load_manifest(url)  # sizes from one listing: all agree

    gone, rotten = "train-000002.tar", "train-000004.tar"
    s3.delete_object(Bucket=s3_server.bucket, Key=f"{prefix}/{gone}")
    size = (local / rotten).stat().st_size
    s3.put_object(Bucket=s3_server.bucket, Key=f"{prefix}/{rotten}", Body=os.urandom(size))
    kw = dict(batch_size=5, rank=0, world_size=1, num_workers=2, transform=None, seed=0, shuffle=True,
              shuffle_buffer=4, with_keys=True, prefetch_shards=1)
    loader = build_loader(manifest, "train", **kw, max_bad_fraction=0.5)
    batches = list(loader)
    assert len(batches) == len(loader) == 12 and all(len(keys) == 5 for _, _, keys in batches)
    stats = loader.fault_stats()
    assert stats["skipped_samples"] == 20
    assert {k: v["kinds"] for k, v in stats["bad_shards"].items()} == {
        f"{url}/{gone}": {"missing": 10},
        f"{url}/{rotten}": {"not_a_tar": 10},
    }
    readable = {s.key for i, s in enumerate(samples) if i // 10 not in (2, 4)}
    assert {k for _, _, keys in batches for k in keys} == readable
    # raised as soon as the count passes 20% of the epoch's 60 samples, naming the shards seen bad so far
    with pytest.raises(DataFaultError, match=rf"more than max_bad_fraction=0.2; bad shards: {url}/{gone} \(\d+ miss"):
        list(build_loader(manifest, "train", **kw, max_bad_fraction=0.2))

    # a shard that disagrees with the manifest (here: missing, and one a byte short) is refused up front
    with pytest.raises(ValueError, match=rf"shard file\(s\) are missing from {url}: {gone}"):
        load_manifest(url)
    s3.upload_file(str(local / gone), s3_server.bucket, f"{prefix}/{gone}")
    s3.put_object(Bucket=s3_server.bucket, Key=f"{prefix}/{rotten}", Body=os.urandom(size - 1))
    with pytest.raises(ValueError, match=rf"size differs from the manifest: {url}/{rotten} \({size - 1} bytes"):
        load_manifest(url)


def test_a_checkpoint_upload_through_an_outage_fails_naming_the_endpoint_and_keeps_the_last_good_one(
    server, tmp_path, monkeypatch, caplog
):
    """Issue 25, an untried fault: S3 is down for longer than the retry budget while a checkpoint is uploaded
    (the rank's upload, as Ray Train's worker runs it; its failure fails the worker and Ray restarts the group
    from the last registered checkpoint, up to run.max_failures; with run.on_upload_failure=continue it is a
    warning and the worker trains on). The error names the endpoint and the folder;
    once S3 is back the last good checkpoint is complete, the failed one is not, and recovery resumes from the
    good one."""
    from metaformer_platform.storage import checkpoint_format as fmt
    from metaformer_platform.storage.settings import S3Settings
    from metaformer_platform.storage.upload import upload_checkpoint_part, upload_checkpoint_part_or_warn
    from metaformer_platform.training import checkpoint as ckpt

    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")
    fs = S3Settings.from_env().pyarrow_filesystem()
    run = f"{BUCKET}/runs/upload-outage"

    def checkpoint(step: int) -> Path:
        folder = tmp_path / f"scratch-{step}"
        folder.mkdir()
        (folder / fmt.TRAINER_FILE).write_bytes(os.urandom(300_000))
        fmt.mark_complete(folder)
        return folder

    upload_checkpoint_part(checkpoint(2), fs, f"{run}/checkpoint-00000002", rank=0, world_size=1)
    server.crash()
    try:
        start = time.monotonic()
        with pytest.raises(OSError) as raised:
            upload_checkpoint_part(checkpoint(4), fs, f"{run}/checkpoint-00000004", rank=0, world_size=1)
        took = time.monotonic() - start
        # run.on_upload_failure=continue: the same outage is a warning, and the worker trains on
        with caplog.at_level("WARNING", logger="metaformer_platform.storage.upload"):
            assert not upload_checkpoint_part_or_warn(checkpoint(6), fs, f"{run}/checkpoint-00000006", rank=0,
                                                      world_size=1, agree=lambda landed: landed)
    finally:
        server.start()
    print(f"upload given up after {took:.1f} s")
    assert str(raised.value).startswith(f"uploading the checkpoint to s3://{run}/checkpoint-00000004 failed: the S3 "
                                        f"endpoint http://127.0.0.1:{server.port} did not take it within its retries")
    assert "AWS Error NETWORK_CONNECTION" in str(raised.value)  # pyarrow's own words, which Ray retries on
    (warned,) = [r.getMessage() for r in caplog.records if r.name == "metaformer_platform.storage.upload"]
    assert warned.startswith(f"uploading the checkpoint to s3://{run}/checkpoint-00000006 failed: the S3 endpoint "
                             f"http://127.0.0.1:{server.port} did not take it within its retries (AWS_MAX_ATTEMPTS)")
    assert "run.on_upload_failure=continue: training goes on without this checkpoint" in warned
    assert took < 30
    assert fmt.incomplete_reason(f"s3://{run}/checkpoint-00000002") is None
    assert fmt.incomplete_reason(f"s3://{run}/checkpoint-00000004") is not None
    assert fmt.incomplete_reason(f"s3://{run}/checkpoint-00000006") is not None
    plan = ckpt.recover_run_folder(fs, run, ["checkpoint-00000002"], "checkpoint-00000002")
    assert plan.resume == "checkpoint-00000002" and not plan.adopt
