"""The shard builder without Ray: deterministic, idempotent, safe to interrupt, clear about bad input."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from metaformer_platform.data import INFO_NAME, build_loader, load_manifest, verify_checksums
from metaformer_platform.data.build import builder
from metaformer_platform.data.reader import iter_shard

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO.parent / "shared" / "data" / "imagenet-sample"
WNIDS = ["n00000003", "n00000007", "n00000011"]


def _jpeg(path: Path, seed: int, size: tuple[int, int]) -> None:
    # distinct content per image (a gradient with a seed-dependent colour), so byte comparisons mean something
    img = Image.new("RGB", size, ((37 * seed) % 256, (91 * seed) % 256, (53 * seed) % 256))
    img.putpixel((seed % size[0], 0), (255, 255, 255))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="JPEG", quality=85)


@pytest.fixture(scope="module")
def imagenet_like(tmp_path_factory) -> Path:
    """train/<wnid>/*.JPEG (5 per class, sizes vary), val/ flat + both labels-file formats, a classes file."""
    root = tmp_path_factory.mktemp("imagenet")
    n = 0
    for c, wnid in enumerate(WNIDS):
        for i in range(5):
            _jpeg(root / "train" / wnid / f"{wnid}_{i}.JPEG", n, (40 + 8 * i, 30 + 4 * c))
            n += 1
    lines, rows = [], ["ImageId,PredictionString"]
    for i in range(7):
        name = f"ILSVRC2012_val_{i + 1:08d}"
        _jpeg(root / "val" / f"{name}.JPEG", 100 + i, (48, 36))
        wnid = WNIDS[(i * 2) % 3]
        lines.append(f"{name}.JPEG {wnid}")
        rows.append(f"{name},{wnid} 1 2 30 40 {wnid} 3 4 20 20")
    (root / "val_labels.txt").write_text("\n".join(lines) + "\n")
    (root / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    (root / "classes.tsv").write_text(
        "index\twnid\tname\n" + "".join(f"{i}\t{w}\tthing {i}\n" for i, w in enumerate(WNIDS))
    )
    return root


def _build(root: Path, out: Path, labels: str = "val_labels.txt", **options) -> dict:
    opts = builder.BuildOptions(**{"samples_per_shard": 4, "seed": 3, **options})
    classes, tasks = builder.prepare_build(
        train=root / "train", val=root / "val", val_labels=root / labels, classes_file=root / "classes.tsv",
        options=opts,
    )
    return builder.build_dataset(out, tasks, classes=classes, name="tiny", log=lambda _: None)


def _size(img: Image.Image) -> torch.Tensor:
    return torch.tensor(img.size)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def _read_all(root: Path, split: str) -> dict[str, tuple[int, dict]]:
    manifest = load_manifest(root)
    out = {}
    for name in manifest.split(split).filenames:
        for s in iter_shard(manifest.storage, name):
            out[s.key] = (int(s.files["cls"]), json.loads(s.files["json"]))
    return out


def test_build_is_labelled_deterministic_and_checksummed(imagenet_like, tmp_path):
    body = _build(imagenet_like, tmp_path / "a")
    _build(imagenet_like, tmp_path / "b")
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert sorted(a) == [INFO_NAME, *[f"train-{i:06d}.tar" for i in range(4)], "val-000000.tar", "val-000001.tar"]
    assert a == b  # byte-identical shards and manifest

    manifest = load_manifest(tmp_path / "a")
    assert verify_checksums(manifest) == 6
    assert manifest.class_names == ("thing 0", "thing 1", "thing 2") and body["extra"]["wnids"] == WNIDS
    assert manifest.split("train").shard_lengths == (4, 4, 4, 3)
    train = _read_all(tmp_path / "a", "train")
    assert len(train) == 15
    for key, (label, meta) in train.items():
        assert key.startswith(WNIDS[label]) and meta == {"path": f"{WNIDS[label]}/{key}.JPEG", "wnid": WNIDS[label]}
    val = _read_all(tmp_path / "a", "val")
    assert {k: lab for k, (lab, _) in val.items()} == {f"ILSVRC2012_val_{i + 1:08d}": (i * 2) % 3 for i in range(7)}
    # The CSV labels file gives the same shards as the '<file> <wnid>' list.
    _build(imagenet_like, tmp_path / "c", labels="LOC_val_solution.csv")
    assert _files(tmp_path / "c") == a
    # Shuffled assignment: a different seed puts samples in other shards, same set.
    _build(imagenet_like, tmp_path / "d", seed=4)
    assert _read_all(tmp_path / "d", "train").keys() == train.keys()
    assert _files(tmp_path / "d")["train-000000.tar"] != a["train-000000.tar"]


def test_reencode_caps_the_longer_side(imagenet_like, tmp_path):
    _build(imagenet_like, tmp_path / "small", max_side=24, quality=80)
    manifest = load_manifest(tmp_path / "small")
    for name in manifest.split("train").filenames:
        for s in iter_shard(manifest.storage, name):
            img = Image.open(io.BytesIO(s.files["jpg"]))
            assert img.format == "JPEG" and max(img.size) == 24, img.size


def test_interrupted_build_leaves_no_manifest_and_a_rerun_gives_the_same_bytes(imagenet_like, tmp_path):
    _build(imagenet_like, tmp_path / "ref")
    reference = _files(tmp_path / "ref")
    out = tmp_path / "out"
    _build(imagenet_like, out)

    def dies_after_two(tasks, dest):
        for task in tasks[:2]:
            yield builder.build_shard(task, dest)
        raise KeyboardInterrupt

    classes, tasks = builder.prepare_build(
        train=imagenet_like / "train", val=imagenet_like / "val", val_labels=imagenet_like / "val_labels.txt",
        classes_file=imagenet_like / "classes.tsv", options=builder.BuildOptions(samples_per_shard=4, seed=3),
    )
    with pytest.raises(KeyboardInterrupt):
        builder.build_dataset(out, tasks, classes=classes, name="tiny", run=dies_after_two, log=lambda _: None)
    assert not (out / INFO_NAME).exists()  # the old manifest went first, the new one never came
    # Damage the leftovers the ways an interruption (or a person) can: a missing and a truncated shard.
    (out / "train-000001.tar").unlink()
    with open(out / "val-000000.tar", "r+b") as f:
        f.truncate(1024)
    lines: list[str] = []
    builder.build_dataset(out, tasks, classes=classes, name="tiny", log=lines.append)
    assert _files(out) == reference
    skipped = sorted(line.split(":")[0] for line in lines if "skipped" in line)
    assert skipped == ["train-000000.tar", "train-000002.tar", "train-000003.tar", "val-000001.tar"]
    assert "samples/s" in lines[0] and "ETA" in lines[0]
    # Changed options change the plan's fingerprint: nothing is skipped, shards are rebuilt.
    lines.clear()
    _, tasks2 = builder.prepare_build(
        train=imagenet_like / "train", classes_file=imagenet_like / "classes.tsv",
        options=builder.BuildOptions(samples_per_shard=4, seed=3, max_side=16),
    )
    with pytest.raises(ValueError, match="another build"):  # a different data set: only when asked to
        builder.build_dataset(out, tasks2, classes=classes, name="tiny", log=lines.append)
    builder.build_dataset(out, tasks2, classes=classes, name="tiny", log=lines.append, overwrite=True)
    assert not [line for line in lines if "skipped" in line]
    assert list(load_manifest(out).splits) == ["train"]


def test_an_image_folder_val_tree_gets_the_labels_of_the_flat_layout(imagenet_like, tmp_path):
    """val/<wnid>/*.JPEG (the layout most ImageNet preparations produce) is detected and labelled by its
    folders: the same samples with the same labels as the flat folder + labels file, byte for byte."""
    tree = tmp_path / "val-tree"
    for line in (imagenet_like / "val_labels.txt").read_text().splitlines():
        name, wnid = line.split()
        (tree / wnid).mkdir(parents=True, exist_ok=True)
        (tree / wnid / name).write_bytes((imagenet_like / "val" / name).read_bytes())
    assert builder.is_image_folder_tree(tree) and not builder.is_image_folder_tree(imagenet_like / "val")
    opts = builder.BuildOptions(samples_per_shard=4, seed=3)
    flat_classes, flat_tasks = builder.prepare_build(
        val=imagenet_like / "val", val_labels=imagenet_like / "val_labels.txt",
        classes_file=imagenet_like / "classes.tsv", options=opts,
    )
    tree_classes, tree_tasks = builder.prepare_build(val=tree, classes_file=imagenet_like / "classes.tsv", options=opts)
    builder.build_dataset(tmp_path / "flat", flat_tasks, classes=flat_classes, name="tiny", log=lambda _: None)
    builder.build_dataset(tmp_path / "tree", tree_tasks, classes=tree_classes, name="tiny", log=lambda _: None)
    flat, from_tree = _read_all(tmp_path / "flat", "val"), _read_all(tmp_path / "tree", "val")
    assert len(flat) == 7 and {k: v[0] for k, v in from_tree.items()} == {k: v[0] for k, v in flat.items()}
    assert sorted({v[0] for v in flat.values()}) == [0, 1, 2]  # every class appears: the comparison can fail

    with pytest.raises(ValueError, match=r"is an ImageFolder tree .* drop the labels file"):
        builder.prepare_build(val=tree, val_labels=imagenet_like / "val_labels.txt",
                              classes_file=imagenet_like / "classes.tsv", options=opts)
    with pytest.raises(ValueError, match=r"is a flat folder of images: give its labels file"):
        builder.prepare_build(val=imagenet_like / "val", classes_file=imagenet_like / "classes.tsv", options=opts)


def test_bad_input_names_the_file(imagenet_like, tmp_path):
    opts = builder.BuildOptions()
    empty = tmp_path / "empty"
    (empty / "n00000001").mkdir(parents=True)
    (empty / "n00000001" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=rf"ImageFolder {empty} has no images"):
        builder.prepare_build(train=empty, options=opts)

    odd = tmp_path / "odd"
    _jpeg(odd / "n00000001" / "a.JPEG", 1, (8, 8))
    _jpeg(odd / "cats" / "b.JPEG", 2, (8, 8))
    with pytest.raises(ValueError, match=r"'cats' is not a WordNet id"):
        builder.prepare_build(train=odd, options=opts)
    _, tasks = builder.prepare_build(train=odd, require_wnids=False, options=opts)  # allowed when asked
    assert sorted(i.label for i in tasks["train"][0].images) == [0, 1]

    labels = tmp_path / "labels.txt"
    labels.write_text("ILSVRC2012_val_00000001.JPEG n00000003\nILSVRC2012_val_00000099.JPEG n00000003\n")
    with pytest.raises(ValueError, match=rf"{labels} names 1 file\(s\) that are not in .*: ILSVRC2012_val_00000099"):
        builder.prepare_build(
            val=imagenet_like / "val", val_labels=labels, classes_file=imagenet_like / "classes.tsv", options=opts
        )
    good = (imagenet_like / "val_labels.txt").read_text().splitlines()
    labels.write_text("\n".join(["ILSVRC2012_val_00000001.JPEG n09999999", *good[1:]]))
    with pytest.raises(ValueError, match=r"class 'n09999999' is not one of the 3 classes"):
        builder.prepare_build(train=imagenet_like / "train", classes_file=imagenet_like / "classes.tsv",
                              val=imagenet_like / "val", val_labels=labels, options=opts)
    with pytest.raises(ValueError, match="samples_per_shard"):
        builder.BuildOptions(samples_per_shard=0)

    broken = tmp_path / "broken"
    _jpeg(broken / "n00000001" / "good.JPEG", 1, (8, 8))
    (broken / "n00000001" / "bad.JPEG").write_bytes(b"\xff\xd8 not really a jpeg")
    classes, tasks = builder.prepare_build(train=broken, options=builder.BuildOptions(max_side=4))
    with pytest.raises(ValueError, match=r"bad\.JPEG: cannot decode this image to re-encode it"):
        builder.build_dataset(tmp_path / "out", tasks, classes=classes, log=lambda _: None)
    assert not (tmp_path / "out" / INFO_NAME).exists()


def test_build_shards_job_exits_2_on_bad_input(tmp_path):
    (tmp_path / "train" / "n00000001").mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(REPO / "platform")}
    out = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "build_shards.py"), "--train", str(tmp_path / "train"),
         "--out", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert out.returncode == 2, out.stderr
    assert f"ImageFolder {tmp_path / 'train'} has no images" in out.stderr
    assert not (tmp_path / "out").exists()

    # Class folders that are not wnids: the message names the flag the user types, not the Python argument.
    (tmp_path / "named" / "cat").mkdir(parents=True)
    out = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "build_shards.py"), "--local", "--train", str(tmp_path / "named"),
         "--out", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert out.returncode == 2 and "'cat' is not a WordNet id" in out.stderr, out.stderr
    assert "pass --any-class-names to jobs/build_shards.py" in out.stderr and not (tmp_path / "out").exists()


@pytest.mark.skipif(not SAMPLE.is_dir(), reason=f"the real ImageNet sample is not at {SAMPLE}")
def test_imagenet_sample_labels_follow_classes_tsv_and_timm_reads_it(tmp_path):
    # Every 10th class (100 real photos), so the test stays fast; labels still index all 1000 classes.
    subset = tmp_path / "train"
    subset.mkdir()
    wnids = sorted(p.name for p in SAMPLE.iterdir() if p.is_dir())
    assert len(wnids) == 1000
    for wnid in wnids[::10]:
        (subset / wnid).symlink_to(SAMPLE / wnid)
    rows = [line.split("\t") for line in (SAMPLE / "classes.tsv").read_text().splitlines()[1:]]
    index = {wnid: int(i) for i, wnid, _ in rows}
    names = [name for _, _, name in rows]

    classes, tasks = builder.prepare_build(
        train=subset, classes_file=SAMPLE / "classes.tsv",
        options=builder.BuildOptions(samples_per_shard=40, max_side=64, seed=0),
    )
    out = tmp_path / "shards"
    builder.build_dataset(out, tasks, classes=classes, name="imagenet-sample", log=lambda _: None)
    manifest = load_manifest(out)
    assert manifest.num_classes == 1000 and list(manifest.class_names) == names
    got = _read_all(out, "train")
    assert len(got) == 100
    assert {k: lab for k, (lab, _) in got.items()} == {k: index[meta["wnid"]] for k, (_, meta) in got.items()}
    assert {meta["wnid"] for _, meta in got.values()} == set(wnids[::10])

    from timm.data import create_dataset

    ds = create_dataset("wds/imagenet-sample", root=str(out), split="train", is_training=False, batch_size=1)
    items = list(ds)
    assert len(items) == 100
    assert all(isinstance(img, Image.Image) and max(img.size) == 64 for img, _ in items)
    assert sorted(t for _, t in items) == sorted(lab for lab, _ in got.values())
    # and our own loader batches it
    loader = build_loader(out, "train", batch_size=10, rank=0, world_size=1, num_workers=0, transform=_size,
                          seed=0, shuffle=False, drop_last=False, with_keys=True)
    loader_keys = [k for _, _, keys in loader for k in keys]
    assert sorted(loader_keys) == sorted(got)


def test_tars_have_fixed_headers(imagenet_like, tmp_path):
    _build(imagenet_like, tmp_path / "t")
    with tarfile.open(tmp_path / "t" / "train-000000.tar") as tar:
        members = tar.getmembers()
    assert [m.name.rsplit(".", 1)[1] for m in members[:3]] == ["jpg", "cls", "json"]
    assert {(m.mtime, m.uid, m.mode) for m in members} == {(946684800, 0, 0o444)}


def test_shard_bytes_budget_cuts_on_source_bytes(imagenet_like):
    classes = builder.load_classes(imagenet_like / "train")
    images = builder.scan_image_folder(imagenet_like / "train", classes)
    budget = 3 * max(i.size for i in images)
    plan = builder.plan_shards(
        {"train": images}, builder.BuildOptions(samples_per_shard=None, shard_bytes=budget, shuffle=False)
    )["train"]
    assert [i for t in plan for i in t.images] == sorted(images, key=lambda i: i.rel)  # all, in order, once
    assert all(sum(i.size for i in t.images) <= budget for t in plan)
    # each cut was needed: the next image would not have fit
    assert all(sum(i.size for i in a.images) + b.images[0].size > budget for a, b in zip(plan, plan[1:], strict=False))
    both = builder.plan_shards({"train": images}, builder.BuildOptions(samples_per_shard=2, shard_bytes=budget))
    assert max(len(t.images) for t in both["train"]) == 2
