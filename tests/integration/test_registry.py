"""The model registry against a real `mlflow server`: exports as versions, lineage, the promotion gate, URIs."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import torch

from metaformer_platform.storage.checkpoint_format import META_FILE, WEIGHTS_FILE
from metaformer_platform.tracking import registry

pytestmark = pytest.mark.beside_cluster  # no job on the session's Ray cluster (tests/conftest.py)

NUM_CLASSES = 5


def _export(folder: Path, seed: int) -> dict[str, torch.Tensor]:
    """A poolformer_debug export as training/export.py writes it; returns the weights."""
    from safetensors.torch import save_file

    from metaformer_platform.models import create_model

    torch.manual_seed(seed)
    model = create_model("poolformer_debug", num_classes=NUM_CLASSES)
    weights = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    folder.mkdir(parents=True)
    save_file(weights, str(folder / WEIGHTS_FILE), metadata={"model_name": "poolformer_debug"})
    (folder / META_FILE).write_text(json.dumps({
        "model_name": "poolformer_debug", "num_classes": NUM_CLASSES, "model_kwargs": {},
        "pretrained_cfg": {**model.pretrained_cfg, "num_classes": NUM_CLASSES}, "img_size": 32, "step": seed,
        "strategy": "ddp", "source": f"/runs/r/checkpoint-{seed:08d}",
    }))
    return weights


@pytest.fixture()
def client(mlflow_server: str):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)


@pytest.fixture()
def run_id(client) -> str:
    exp = client.create_experiment(f"registry-{uuid.uuid4().hex[:8]}")
    return client.create_run(exp).info.run_id


def _name() -> str:
    return f"poolformer_debug_{uuid.uuid4().hex[:8]}"


def _register(tmp_path: Path, mlflow_server: str, run_id: str, name: str, seed: int) -> str:
    folder = tmp_path / f"export-{seed}"
    if not folder.exists():
        _export(folder, seed)
    tags = registry.lineage_tags(f"s3://runs/r/checkpoint-{seed:08d}", "data-abc", git_commit="deadbeef")
    return registry.register_export(
        folder, name, tracking_uri=mlflow_server, run_id=run_id, lineage_tags=tags, description=f"seed {seed}"
    )


def test_promotion_gate(tmp_path: Path, mlflow_server: str, client, run_id: str) -> None:
    name = _name()
    v = [_register(tmp_path, mlflow_server, run_id, name, seed) for seed in range(1, 6)]
    assert v == ["1", "2", "3", "4", "5"]

    def gate(version: str, top1: float, data: str = "val-111") -> registry.Promotion:
        return registry.promote(name, version, top1, eval_data_hash=data, tracking_uri=mlflow_server)

    def aliases() -> dict[str, str]:
        return {a: str(x) for a, x in client.get_registered_model(name).aliases.items()}

    first = gate(v[0], 70.0)
    assert (first.promoted, first.alias, first.previous_champion) == (True, "champion", None)
    assert aliases() == {"champion": "1"}

    worse = gate(v[1], 69.5)
    assert (worse.promoted, worse.alias, worse.previous_champion) == (False, "candidate", "1")
    assert aliases() == {"champion": "1", "candidate": "2"}
    def decision(version: str) -> str:
        mv = client.get_model_version(name, version)
        assert mv.description == f"seed {version}"  # the user's description: the gate writes only its tag
        return mv.tags[registry.TAG_PROMOTION]

    assert decision("2").startswith("candidate: ") and "69.5000 < champion v1's 70.0000" in decision("2")

    equal = gate(v[2], 70.0)
    assert (equal.promoted, equal.previous_champion) == (True, "1")
    assert aliases() == {"champion": "3", "candidate": "2"}
    assert decision("3").startswith("champion: ") and "70.0000 >= champion v1's 70.0000" in decision("3")

    better = gate(v[3], 71.25)
    assert better.promoted and aliases() == {"champion": "4", "candidate": "2"}

    # A far higher top-1 on other validation data is not comparable: the champion stays.
    other = gate(v[4], 99.0, data="val-222")
    assert (other.promoted, other.alias) == (False, "candidate")
    assert aliases() == {"champion": "4", "candidate": "5"}
    desc = decision("5")
    assert "other validation data (val-111, this version on val-222)" in desc and "champion kept" in desc

    # Promoting again is idempotent, and re-evaluating the candidate on the champion's data can promote it;
    # it then loses the candidate alias.
    assert gate(v[3], 71.25).promoted and aliases() == {"champion": "4", "candidate": "5"}
    assert gate(v[4], 80.0).promoted and aliases() == {"champion": "5"}
    mv = client.get_model_version(name, "5")
    assert mv.tags[registry.TAG_EVAL_TOP1] == "80.0" and mv.tags[registry.TAG_EVAL_DATA_HASH] == "val-111"
    # One decision, replaced by the re-evaluation (not appended): the tag now says champion, with the new reason.
    assert decision("5") == "champion: top-1 80.0000 >= champion v4's 71.2500 on data val-111"
    # and the registry's model list (the registered model's tags) shows the champion and its top-1
    tags = client.get_registered_model(name).tags
    assert (tags[registry.TAG_CHAMPION_VERSION], tags[registry.TAG_CHAMPION_TOP1]) == ("5", "80.00")

    # A blocked promotion (a regression against the previous retrain) keeps the champion whatever the top-1,
    # with the reason in the same tag; the evaluation's other facts land as version tags beside it.
    held = registry.promote(name, v[0], 99.0, eval_data_hash="val-111", tracking_uri=mlflow_server,
                            blocked="top-1 -3.00 vs the previous retrain", evaluation_tags={"metaformer.eval_top5": "99.5"})
    assert (held.promoted, held.alias) == (False, "candidate") and aliases() == {"champion": "5", "candidate": "1"}
    assert decision("1") == ("candidate: blocked: top-1 -3.00 vs the previous retrain; champion v5 kept; "
                             "top-1 99.0000 on data val-111")
    assert client.get_model_version(name, "1").tags["metaformer.eval_top5"] == "99.5"

    # A champion with no recorded evaluation (set by hand) cannot be compared either.
    client.set_registered_model_alias(name, "champion", "1")
    client.delete_model_version_tag(name, "1", registry.TAG_EVAL_TOP1)
    blind = gate(v[3], 100.0)
    assert (blind.promoted, blind.previous_champion) == (False, "1") and "no recorded evaluation" in blind.reason

    with pytest.raises(ValueError, match="percentage"):
        gate(v[0], 170.0)
    with pytest.raises(ValueError, match="eval_data_hash"):
        gate(v[0], 50.0, data="")


def test_register_is_idempotent_and_keeps_lineage(
    tmp_path: Path, mlflow_server: str, client, run_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = _name()
    first = _register(tmp_path, mlflow_server, run_id, name, seed=7)
    again = _register(tmp_path, mlflow_server, run_id, name, seed=7)
    assert first == again == "1"
    assert len(client.search_model_versions(f"name = '{name}'")) == 1
    # Another checkpoint of the same run is another version.
    assert _register(tmp_path, mlflow_server, run_id, name, seed=8) == "2"
    assert len(client.search_model_versions(f"name = '{name}'")) == 2

    mv = client.get_model_version(name, first)
    assert mv.run_id == run_id
    assert mv.tags[registry.TAG_RUN_ID] == run_id
    assert mv.tags[registry.TAG_CHECKPOINT] == "s3://runs/r/checkpoint-00000007"
    assert mv.tags[registry.TAG_DATA_HASH] == "data-abc"
    assert mv.tags[registry.TAG_GIT_COMMIT] == "deadbeef"
    assert mv.tags[registry.TAG_ARCHITECTURE] == "poolformer_debug"
    # The version is an MLflow 3 LoggedModel of the run (its Model column) holding exactly the export's two files.
    model = client.get_logged_model(mv.tags[registry.TAG_MODEL_ID])
    assert model.source_run_id == run_id and str(model.status) == "READY" and mv.source == model.artifact_location
    assert json.loads(model.tags["mlflow.modelVersions"]) == [{"name": name, "version": first}]
    logged = client.list_logged_model_artifacts(model.model_id)
    assert sorted(Path(f.path).name for f in logged) == sorted([WEIGHTS_FILE, META_FILE])
    assert [o.model_id for o in client.get_run(run_id).outputs.model_outputs].count(model.model_id) == 1

    # A second process that registers the same export at the same moment misses the first one's version in
    # its search: it deletes its own duplicate afterwards.
    real_find = registry._find_registered
    calls = []

    def racing_find(*args):
        calls.append(args)
        return None if len(calls) == 1 else real_find(*args)

    monkeypatch.setattr(registry, "_find_registered", racing_find)
    assert _register(tmp_path, mlflow_server, run_id, name, seed=7) == "1" and len(calls) == 2
    assert sorted(int(mv.version) for mv in client.search_model_versions(f"name = '{name}'")) == [1, 2]
    monkeypatch.undo()

    with pytest.raises(ValueError, match="without / @"):
        _register(tmp_path, mlflow_server, run_id, "it's", seed=7)
    with pytest.raises(ValueError, match="is not an export"):
        registry.register_export(tmp_path, name, tracking_uri=mlflow_server, run_id=run_id,
                                 lineage_tags=registry.lineage_tags("c", "d", git_commit="g"))
    with pytest.raises(ValueError, match="checkpoint_uri"):
        registry.register_export(tmp_path / "export-7", name, tracking_uri=mlflow_server, run_id=run_id,
                                 lineage_tags={registry.TAG_DATA_HASH: "d"})


def test_resolve_model_uri_gives_an_export_for_plain_timm(
    tmp_path: Path, mlflow_server: str, run_id: str
) -> None:
    import timm
    from safetensors.torch import load_file

    name = _name()
    weights = _export(tmp_path / "export-3", seed=3)
    _register(tmp_path, mlflow_server, run_id, name, seed=3)
    registry.promote(name, "1", 50.0, eval_data_hash="val", tracking_uri=mlflow_server)

    cache = tmp_path / "cache"
    folder = registry.resolve_model_uri(f"models:/{name}@champion", tracking_uri=mlflow_server, cache_dir=cache)
    assert folder.parent == cache / "models" / name and folder.name.startswith("v1-")  # v1 of this registry
    assert sorted(p.name for p in folder.iterdir()) == sorted([WEIGHTS_FILE, META_FILE, "FETCHED"])
    info = json.loads((folder / META_FILE).read_text())
    model = timm.create_model(info["model_name"], num_classes=info["num_classes"])
    model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)), strict=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights[key]), key
    # By version, and from the cache; a tampered cache entry is fetched again.
    assert registry.resolve_model_uri(f"models:/{name}/1", tracking_uri=mlflow_server, cache_dir=cache) == folder
    (folder / WEIGHTS_FILE).write_bytes(b"not weights")
    registry.resolve_model_uri(f"models:/{name}/1", tracking_uri=mlflow_server, cache_dir=cache)
    assert load_file(str(folder / WEIGHTS_FILE)).keys() == weights.keys()


def test_bad_registry_uris_say_what_exists(tmp_path: Path, mlflow_server: str, run_id: str) -> None:
    name = _name()
    _register(tmp_path, mlflow_server, run_id, name, seed=4)
    registry.promote(name, "1", 50.0, eval_data_hash="val", tracking_uri=mlflow_server)

    def resolve(uri: str) -> Path:
        return registry.resolve_model_uri(uri, tracking_uri=mlflow_server, cache_dir=tmp_path / "cache")

    with pytest.raises(ValueError, match=r"has no alias @staging; its aliases: @champion -> v1; its versions: 1"):
        resolve(f"models:/{name}@staging")
    with pytest.raises(ValueError, match=rf"'{name}' has no version 9; .* its versions: 1"):
        resolve(f"models:/{name}/9")
    with pytest.raises(ValueError, match=rf"no registered model 'no_such_model'.*registered models: .*{name}"):
        resolve("models:/no_such_model@champion")
    for bad in ("models:/" + name, "runs:/abc/model", "/tmp/export", f"models:/{name}@"):
        with pytest.raises(ValueError, match="not a registry URI"):
            resolve(bad)
    assert registry.is_registry_uri(f"models:/{name}@champion") and not registry.is_registry_uri("/tmp/x")
