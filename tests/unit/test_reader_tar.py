"""The shard reader's own tar parsing: other writers' formats, truncation, and skipping."""

from __future__ import annotations

import io
import tarfile

import pytest

from metaformer_platform.data.reader import iter_shard
from metaformer_platform.storage.files import LocalStore


def _tar(path, members, fmt, dirs=()):
    with tarfile.open(path, "w", format=fmt) as tar:
        for name in dirs:
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


LONG = "d" * 120  # longer than ustar's 100-character name field: GNU long names / PAX paths


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_reads_what_tarfile_writes(tmp_path, fmt):
    members = []
    for i in range(5):
        key = f"{LONG}/s{i}" if fmt != tarfile.USTAR_FORMAT else f"sub/s{i}"
        members += [(f"{key}.jpg", bytes([i]) * (700 * i + 1)), (f"{key}.cls", str(i).encode())]
    _tar(tmp_path / "a.tar", members, fmt, dirs=["sub"])
    samples = list(iter_shard(LocalStore(tmp_path), "a.tar"))
    assert [(s.key.rsplit("/", 1)[1], s.files) for s in samples] == [
        (f"s{i}", {"jpg": bytes([i]) * (700 * i + 1), "cls": str(i).encode()}) for i in range(5)
    ]
    assert [s.key.rsplit("/", 1)[1] for s in iter_shard(LocalStore(tmp_path), "a.tar", 2, 4)] == ["s2", "s3"]


def test_truncated_and_garbage_tars_name_the_shard(tmp_path):
    _tar(tmp_path / "t.tar", [(f"s{i}.jpg", b"x" * 5000) for i in range(4)], tarfile.USTAR_FORMAT)
    data = (tmp_path / "t.tar").read_bytes()
    (tmp_path / "t.tar").write_bytes(data[:9000])
    with pytest.raises(tarfile.ReadError, match=r"t\.tar: unexpected end of data"):
        list(iter_shard(LocalStore(tmp_path), "t.tar"))
    (tmp_path / "g.tar").write_bytes(bytes(range(256)) * 8)
    with pytest.raises(tarfile.ReadError, match=r"g\.tar: not a valid tar header"):
        list(iter_shard(LocalStore(tmp_path), "g.tar"))
