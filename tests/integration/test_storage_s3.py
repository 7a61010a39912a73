"""The storage core against the suite's SeaweedFS server: files, the download guard, refusals, the weights resolver.

No Ray here: every check runs in this process (or two spawned ones for the concurrent fetch), in seconds.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import time
from pathlib import Path
from typing import Any

import pytest

from metaformer_platform import storage
from metaformer_platform.storage import Location
from metaformer_platform.storage import checkpoint_format as fmt
from metaformer_platform.storage import weights as W

pytestmark = pytest.mark.beside_cluster  # no job on the session's Ray cluster (tests/conftest.py)


@pytest.fixture
def s3_env(s3_server: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    return s3_server


def _put(s3_server: Any, prefix: str, files: dict[str, bytes]) -> str:
    client = s3_server.client()
    for name, data in files.items():
        client.put_object(Bucket=s3_server.bucket, Key=f"{prefix}/{name}", Body=data)
    return f"s3://{s3_server.bucket}/{prefix}"


def _checkpoint_files(step: int = 10) -> dict[str, bytes]:
    files = {"trainer.pt": os.urandom(3000 + step), "dcp/__0_0.distcp": os.urandom(5000), "config.yaml": b"model: {}\n"}
    files[fmt.COMPLETE_MARKER] = _marker(files)
    return files


def _marker(files: dict[str, bytes]) -> bytes:
    """The strict marker of ``files``: every file with its size and sha256."""
    listed = {n: d for n, d in files.items() if n != fmt.COMPLETE_MARKER}
    return fmt.marker_text([{n: len(d) for n, d in listed.items()}],
                           sha256={n: hashlib.sha256(d).hexdigest() for n, d in listed.items()}).encode()


def test_files_round_trip_on_s3(s3_env: Any) -> None:
    root = Location.parse(f"s3://{s3_env.bucket}/core/files")
    data = os.urandom(70_000)
    storage.write_bytes(root.join("a/b.bin"), data)
    storage.write_bytes(root.join("c.txt"), b"c")
    assert storage.list_files(root) == {"a/b.bin": 70_000, "c.txt": 1}
    assert storage.read_bytes(root.join("a/b.bin")) == data and storage.exists(root.join("a"))
    storage.delete(root.join("c.txt"))
    assert storage.list_files(root) == {"a/b.bin": 70_000}
    storage.delete(root, folder=True)
    assert storage.list_files(root) == {}
    assert storage.check_writable(root.uri) == root and storage.list_files(root) == {}  # the probe is gone


@pytest.mark.parametrize("bad_key", ["../evil.pt", "sub/../../evil.pt", "/etc/evil.pt"])
def test_a_key_that_climbs_out_is_refused_and_nothing_is_written(s3_env: Any, tmp_path: Path, bad_key: str) -> None:
    """SeaweedFS itself refuses to store keys with ``..`` (InvalidRequest) and folds ``//``; AWS S3 and others keep
    them as written. So the hostile key goes into the listing the download works from (what such a server's
    ListObjectsV2 returns), beside real objects: the guard refuses it before the first byte is fetched."""
    from botocore.exceptions import ClientError

    prefix = f"core/traversal-{len(bad_key)}/checkpoint-00000010"
    url = _put(s3_env, prefix, _checkpoint_files())
    if ".." in bad_key:
        with pytest.raises(ClientError, match="InvalidRequest"):
            s3_env.client().put_object(Bucket=s3_env.bucket, Key=f"{prefix}/{bad_key}", Body=b"pwned")
    listing = {**storage.list_files(url), bad_key: 5}
    dest = tmp_path / "deep" / "dest"
    dest.mkdir(parents=True)
    with pytest.raises(ValueError, match=r"would be written outside .*nothing was fetched"):
        storage.download(url, dest, listing=listing)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []  # nothing outside, nothing inside either
    # the same objects without the hostile key arrive byte for byte
    assert storage.download(url, dest) == storage.list_files(url)
    assert (dest / "dcp" / "__0_0.distcp").is_file()


def test_refusals_name_the_location_and_the_fix(s3_env: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(storage.S3AccessError, match=r"bucket 'no-such-bucket' does not exist at http://127.*aws s3 mb"):
        storage.check_access("s3://no-such-bucket/runs")
    url = _put(s3_env, "core/not-a-checkpoint", {"notes.txt": b"x"})
    with pytest.raises(ValueError, match=r"core/not-a-checkpoint is neither an export .* nor a complete checkpoint"):
        W.resolve(url, cache_dir=tmp_path / "cache")
    files = _checkpoint_files()
    del files["dcp/__0_0.distcp"]  # the marker lists it: an upload cut short
    partial = _put(s3_env, "core/partial/checkpoint-00000010", {**files, fmt.COMPLETE_MARKER: _checkpoint_files()[fmt.COMPLETE_MARKER]})
    with pytest.raises(ValueError, match="not a complete checkpoint .*dcp/__0_0.distcp"):
        W.resolve(partial, cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="nothing is stored there"):
        W.resolve(f"s3://{s3_env.bucket}/core/empty", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.pt"))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong" * 8)
    with pytest.raises(storage.S3AccessError, match="refused the credentials .*AWS_ACCESS_KEY_ID"):
        storage.check_access(f"s3://{s3_env.bucket}/runs")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(storage.S3AccessError, match=r"cannot reach the S3 endpoint http://127.0.0.1:9"):
        storage.check_access(f"s3://{s3_env.bucket}/runs")


def test_bad_storage_stops_the_job_before_any_worker_with_exit_2(s3_env: Any, tmp_path: Path, capsys: Any) -> None:
    from metaformer_platform.launch.cli import run_main

    before = storage.list_files(f"s3://{s3_env.bucket}")
    common = ["model.name=poolformer_debug", "trainer.max_steps=1", "trainer.batch_size=4", "tracking.enabled=false",
              f"data.cache_dir={tmp_path / 'data'}", "data.synthetic.train_samples=32", "data.synthetic.val_samples=16"]
    assert run_main("pretrain", "t", [*common, "run.storage_path=s3://no-such-bucket/runs"]) == 2
    assert "bucket 'no-such-bucket' does not exist" in capsys.readouterr().err
    not_ckpt = _put(s3_env, "core/job/notes", {"notes.txt": b"x"})
    assert run_main("finetune", "t", [*common, f"model.init_from={not_ckpt}",
                                      f"run.storage_path=s3://{s3_env.bucket}/core/job/runs"]) == 2
    assert "neither an export" in capsys.readouterr().err
    assert storage.list_files(f"s3://{s3_env.bucket}") == {**before, "core/job/notes/notes.txt": 1}  # nothing written


def _resolve_in_child(url: str, cache: str, env: dict[str, str], out: str) -> None:
    os.environ.update(env)
    got = W.resolve_weights(url, cache_dir=cache)
    files = {str(p.relative_to(got.path)): p.read_bytes().hex() for p in sorted(got.path.rglob("*")) if p.is_file()}
    Path(out).write_text(json.dumps({"path": str(got.path), "fetched": got.fetched, "files": files}))


def test_weights_on_s3_are_fetched_once_even_by_two_processes_at_once(s3_env: Any, tmp_path: Path) -> None:
    files = {**_checkpoint_files(), "big.bin": os.urandom(4 << 20)}
    files[fmt.COMPLETE_MARKER] = _marker(files)
    url = _put(s3_env, "core/concurrent/checkpoint-00000020", files)
    cache = tmp_path / "cache"
    ctx = multiprocessing.get_context("spawn")
    outs = [tmp_path / f"out{i}.json" for i in range(2)]
    procs = [ctx.Process(target=_resolve_in_child, args=(url, str(cache), s3_env.env, str(o))) for o in outs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
    assert [p.exitcode for p in procs] == [0, 0]
    first, second = (json.loads(o.read_text()) for o in outs)
    assert sorted([first["fetched"], second["fetched"]]) == [False, True]  # one download
    assert first["path"] == second["path"] and first["files"] == second["files"]
    assert {n: bytes.fromhex(h) for n, h in first["files"].items() if n != W.FETCHED_MARKER} == files  # byte-identical
    entry = Path(first["path"])
    assert fmt.incomplete_reason(entry, marker=W.FETCHED_MARKER, verify_sha256=True) is None
    assert sorted(p.name for p in entry.parent.iterdir()) == [entry.name, entry.name + ".lock"]  # no temp folder left
    # a damaged entry (a file cut short) is fetched again; an export on S3 resolves the same way
    (entry / "big.bin").write_bytes(b"short")
    again = W.resolve_weights(url, cache_dir=cache)
    assert again.fetched and (entry / "big.bin").read_bytes() == files["big.bin"]
    export = _put(s3_env, "core/exports/debug", {fmt.WEIGHTS_FILE: b"w" * 100, fmt.META_FILE: b"{}"})
    got = W.resolve_weights(export, cache_dir=cache)
    assert got.kind == "export" and (got.path / fmt.WEIGHTS_FILE).read_bytes() == b"w" * 100
    # rewritten on S3 with other bytes of the same size (a re-created export, another server with this bucket
    # name): the cache does not hand back the old copy
    time.sleep(1.1)  # S3 modification times have one-second resolution
    _put(s3_env, "core/exports/debug", {fmt.WEIGHTS_FILE: b"v" * 100, fmt.META_FILE: b"{}"})
    fresh = W.resolve_weights(export, cache_dir=cache)
    assert fresh.fetched and (fresh.path / fmt.WEIGHTS_FILE).read_bytes() == b"v" * 100
    assert W.resolve_weights(export, cache_dir=cache).fetched is False  # and that copy is reused
