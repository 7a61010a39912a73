"""The shard builder never replaces a data set it did not build: a non-empty destination that holds another
build, or files of its own, is refused (exit 2, nothing touched) unless --overwrite is given (issue 10, item 6)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from metaformer_platform.data import INFO_NAME, load_manifest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("src") / "train"
    for c in range(2):
        for i in range(3):
            path = root / f"class{c}" / f"img{c}_{i}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (16, 12), (40 * i, 90 * c, 7)).save(path, format="JPEG")
    return root


def _build(src: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "platform")}
    return subprocess.run(
        [sys.executable, str(REPO / "jobs" / "build_shards.py"), "--local", "--any-class-names",
         "--train", str(src), "--out", str(out), "--samples-per-shard", "2", *extra],
        capture_output=True, text=True, env=env, timeout=120,
    )


def _tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones too) by relative path -> sha256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_foreign_folder_is_refused_and_left_byte_identical(image_folder, tmp_path):
    out = tmp_path / "theirs"
    out.mkdir()
    (out / INFO_NAME).write_text('{"name": "someone-else", "splits": {}}\n')
    (out / "train-000000.tar").write_bytes(b"their shard, not ours" * 100)
    (out / "notes.txt").write_text("keep me")
    before = _tree(out)
    done = _build(image_folder, out)
    assert done.returncode == 2, done.stderr
    assert "--overwrite" in done.stderr and str(out) in done.stderr
    assert _tree(out) == before

    replaced = _build(image_folder, out, "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert load_manifest(out).split("train").num_samples == 6


def test_another_build_is_refused_the_same_build_resumes(image_folder, tmp_path):
    out = tmp_path / "ours"
    assert _build(image_folder, out).returncode == 0
    before = _tree(out)
    other = _build(image_folder, out, "--seed", "5", "--name", "other-set")  # another data set, same folder
    assert other.returncode == 2, other.stderr
    assert "another build" in other.stderr
    assert _tree(out) == before
    again = _build(image_folder, out)  # the same command again: resumes (every shard present, skipped)
    assert again.returncode == 0, again.stderr
    assert _tree(out) == before


def test_an_empty_or_missing_folder_is_built(image_folder, tmp_path):
    (tmp_path / "empty").mkdir()
    assert _build(image_folder, tmp_path / "empty").returncode == 0
    assert _build(image_folder, tmp_path / "missing" / "deeper").returncode == 0
