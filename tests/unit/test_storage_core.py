"""The storage core on local folders: locations, settings, files, the download guard, completeness, the resolver."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from metaformer_platform import storage
from metaformer_platform.storage import Location, S3Settings
from metaformer_platform.storage import checkpoint_format as fmt
from metaformer_platform.storage import weights as W


def test_locations_parse_once_for_every_kind(tmp_path: Path) -> None:
    s3 = Location.parse("s3://bucket/runs/x/checkpoint-00000010/")
    assert (s3.remote, s3.bucket, s3.key, s3.uri, s3.fs_path, s3.name) == (
        True, "bucket", "runs/x/checkpoint-00000010", "s3://bucket/runs/x/checkpoint-00000010",
        "bucket/runs/x/checkpoint-00000010", "checkpoint-00000010",
    )
    assert s3.join("a/b.pt").uri == "s3://bucket/runs/x/checkpoint-00000010/a/b.pt"
    assert Location.parse("s3://bucket").join("k").uri == "s3://bucket/k"
    local = Location.parse(f"file://{tmp_path}/runs")
    assert not local.remote and local.path == tmp_path / "runs" and Location.parse(tmp_path / "runs") == local
    assert Location.parse("file://localhost/tmp/x").path == Path("/tmp/x")
    with pytest.raises(ValueError, match="names host 'server'.*file:///absolute/path"):
        Location.parse("file://server/share/runs")
    with pytest.raises(ValueError, match="names no bucket"):
        Location.parse("s3:///key")
    with pytest.raises(ValueError, match="unsupported URL scheme 'gs'"):
        Location.parse("gs://bucket/x")
    with pytest.raises(ValueError, match="on object storage, not a local path"):
        _ = s3.path


def test_one_settings_resolver_feeds_boto3_and_pyarrow() -> None:
    env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:8333",
           "AWS_DEFAULT_REGION": "eu-west-1", "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s",
           "AWS_RETRY_MODE": "adaptive", "AWS_MAX_ATTEMPTS": "3"}
    settings = S3Settings.from_env(env)
    assert (settings.endpoint, settings.region, settings.access_key, settings.retry_mode, settings.max_attempts) == (
        "http://127.0.0.1:8333", "eu-west-1", "k", "adaptive", 3)
    client = settings.boto3_client()
    assert client.meta.endpoint_url == "http://127.0.0.1:8333" and client.meta.region_name == "eu-west-1"
    assert client.meta.config.retries == {"mode": "adaptive", "total_max_attempts": 3}  # AWS_MAX_ATTEMPTS: all tries
    fs = settings.pyarrow_filesystem()
    assert fs.region == "eu-west-1"
    # a key without its secret is not a static credential: the SDKs walk their own chain
    assert S3Settings.from_env({"AWS_ACCESS_KEY_ID": "k"}).access_key is None
    with pytest.raises(ValueError, match="AWS_MAX_ATTEMPTS='x'"):
        S3Settings.from_env({"AWS_MAX_ATTEMPTS": "x"})


def test_files_list_read_write_delete_locally(tmp_path: Path) -> None:
    root = Location.parse(tmp_path / "f")
    storage.write_bytes(root.join("a.bin"), b"abc")
    storage.write_bytes(root.join("sub/b.bin"), b"hello")
    (tmp_path / "f" / ".c.bin.tmp-123").write_bytes(b"being written")
    assert storage.list_files(root) == {"a.bin": 3, "sub/b.bin": 5}
    assert storage.read_bytes(root.join("sub/b.bin")) == b"hello" and storage.exists(root.join("sub"))
    storage.delete(root.join("a.bin"))
    storage.delete(root.join("a.bin"))  # absent is fine
    assert storage.list_files(root) == {"sub/b.bin": 5}
    storage.delete(root, folder=True)
    assert not (tmp_path / "f").exists() and storage.list_files(root) == {}
    with pytest.raises(ValueError, match="cannot be written"):
        storage.check_writable("/proc/metaformer-not-writable")


def test_atomic_write_leaves_the_old_file_when_the_writer_fails(tmp_path: Path) -> None:
    target = tmp_path / "x.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), storage.atomic_write(target, "w") as out:
        out.write("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]


@pytest.mark.parametrize("name", ["../evil", "a/../../evil", "/etc/evil", "a\\..\\evil", ""])
def test_member_names_that_leave_the_destination_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="outside"):
        storage.safe_member(tmp_path / "dest", name, source="s3://b/k")


def test_download_refuses_a_link_out_and_writes_nothing(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "w.pt").write_bytes(b"w")
    dest = tmp_path / "dest"
    (dest).mkdir()
    (dest / "sub").symlink_to(tmp_path / "outside", target_is_directory=True)
    (tmp_path / "outside").mkdir()
    with pytest.raises(ValueError, match="resolves outside"):
        storage.download(src, dest)
    assert list((tmp_path / "outside").iterdir()) == []
    (dest / "sub").unlink()
    assert storage.download(src, dest) == {"sub/w.pt": 1} and (dest / "sub" / "w.pt").read_bytes() == b"w"


def _checkpoint(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    fmt.mark_complete(folder)  # every file with its size and sha256 (the strict marker)
    return folder


def test_one_completeness_rule(tmp_path: Path) -> None:
    folder = _checkpoint(tmp_path / "checkpoint-00000004", {"trainer.pt": b"t" * 10, "dcp/0.distcp": b"d" * 4})
    assert fmt.is_complete(folder) and fmt.is_complete(str(folder))
    (folder / "dcp" / "0.distcp").write_bytes(b"d")
    assert fmt.incomplete_reason(folder) == "COMPLETE lists files that are missing or short: dcp/0.distcp (1 of 4 bytes)"
    (folder / fmt.COMPLETE_MARKER).write_text("not json")
    assert "unreadable" in str(fmt.incomplete_reason(folder))
    assert fmt.incomplete_reason(tmp_path / "nothing") == "no COMPLETE marker"


def test_the_resolver_returns_local_weights_as_they_are_and_refuses_other_folders(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path / "ckpt", {"trainer.pt": b"t"})
    export = tmp_path / "export"
    export.mkdir()
    (export / fmt.WEIGHTS_FILE).write_bytes(b"w")
    (export / fmt.META_FILE).write_text("{}")
    assert W.resolve_weights(ckpt) == W.Weights(ckpt, "checkpoint", str(ckpt))
    assert W.resolve_weights(f"file://{export}").kind == "export"
    (tmp_path / "other").mkdir()
    with pytest.raises(ValueError, match="neither an export .* nor a complete checkpoint"):
        W.resolve(tmp_path / "other")
    with pytest.raises(ValueError, match="no such folder"):
        W.resolve(tmp_path / "missing")
    with pytest.raises(ValueError, match="not a registry URI"):
        W.model_version("models:/a/b/c", "sqlite:///x.db")


def _fill_slowly(entry: str, out: str) -> None:
    def fill(tmp: Path) -> None:
        (tmp / "w.bin").write_bytes(os.urandom(1 << 16))
        time.sleep(1.0)  # both processes are inside the resolver by now
    fetched = W._fill_entry(Path(entry), "test", fill)
    Path(out).write_text(json.dumps(fetched))


def test_the_cache_entry_is_filled_once_by_two_processes(tmp_path: Path) -> None:
    """The lock + temp folder + rename of the cache, without a server (the S3 version is in the integration tests)."""
    entry = tmp_path / "cache" / "e"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_fill_slowly, args=(str(entry), str(tmp_path / f"out{i}"))) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert sorted(json.loads((tmp_path / f"out{i}").read_text()) for i in range(2)) == [False, True]
    assert fmt.incomplete_reason(entry, marker=W.FETCHED_MARKER, verify_sha256=True) is None
    assert sorted(p.name for p in entry.parent.iterdir()) == ["e", "e.lock"]  # no temp folder left
