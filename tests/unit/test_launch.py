"""The job assembly (``launch.build_trainer``), without a cluster."""

from __future__ import annotations

from metaformer_platform.config import load_config
from metaformer_platform.launch.driver import build_trainer
from metaformer_platform.launch.plan import DataSummary, JobPlan
from metaformer_platform.training.hardware import Layout


def test_the_job_trainer_starts_no_ray_data_actor_and_keeps_rays_other_callbacks(tmp_path, monkeypatch):
    """The jobs pass Ray no Dataset: Ray Train's DatasetsCallback (a DatasetManager actor per run) is left out,
    Ray's other default callbacks (placement-group cleaner, backend and accelerator setup) are kept where the
    cluster serves the State API the cleaner asks, and a trainer given a Ray Dataset would keep it. Where no
    State API is served the cleaner is left out too (it could only fail to ask)."""
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback

    from metaformer_platform.launch import driver as launch

    cfg = load_config(None, ["model.name=poolformer_debug", "scaling.num_workers=2", "scaling.cpus_per_worker=1",
                             "scaling.use_gpu=false", f"run.storage_path={tmp_path}", "run.name=assembly"])
    plan = JobPlan(cfg=cfg, layout=Layout.of(cfg.scaling), data=DataSummary(tmp_path, 4, {}), init_from=None,
                   resume_from=None, storage_path=str(tmp_path), registry_uri="", remote_inputs=False)
    trainer = build_trainer(plan, lambda: None)
    monkeypatch.setattr(launch, "state_api_served", lambda: True)
    kinds = {type(c).__name__ for c in trainer._create_default_callbacks()}
    assert "DatasetsCallback" not in kinds
    assert {"PlacementGroupCleanerCallback", "BackendSetupCallback", "AcceleratorSetupCallback"} <= kinds, kinds
    monkeypatch.setattr(launch, "state_api_served", lambda: False)
    kinds = {type(c).__name__ for c in trainer._create_default_callbacks()}
    assert "PlacementGroupCleanerCallback" not in kinds and "DatasetsCallback" not in kinds
    assert {"BackendSetupCallback", "AcceleratorSetupCallback"} <= kinds, kinds
    trainer.datasets = {"train": object()}
    assert any(isinstance(c, DatasetsCallback) for c in trainer._create_default_callbacks())


def test_the_state_api_counts_only_when_this_clusters_dashboard_serves_it(monkeypatch):
    """``state_api_served``: no dashboard (refused), another cluster's dashboard at the default address the GCS
    names (unauthorized, or listing other nodes): not served; this cluster's own nodes listed: served."""
    from types import SimpleNamespace

    import ray
    import ray.util.state

    from metaformer_platform.launch import driver as launch

    monkeypatch.setattr(ray, "get_runtime_context", lambda: SimpleNamespace(gcs_address="127.0.0.1:6379"))
    monkeypatch.setattr(ray, "nodes", lambda: [{"NodeID": "a"}, {"NodeID": "b"}])

    def answer(result):
        def list_nodes(**kwargs):
            assert kwargs["address"] == "127.0.0.1:6379"
            if isinstance(result, Exception):
                raise result
            return [SimpleNamespace(node_id=n) for n in result]
        return list_nodes

    from ray.util.state.exception import ServerUnavailable

    for result, served in [(ServerUnavailable("refused"), False), (RuntimeError("Unauthorized"), False),
                           (["x"], False), ([], False), (["a", "b"], True)]:
        monkeypatch.setattr(ray.util.state, "list_nodes", answer(result))
        assert launch.state_api_served() is served, result


def test_a_ranks_checkpoint_scratch_is_emptied_for_its_own_run_and_rank_only(tmp_path, monkeypatch):
    """What a killed attempt left in its scratch folder is cleared by the next attempt of the same run and rank;
    another run's and another rank's are left alone; the folder is private to the user."""
    import os
    import tempfile

    from metaformer_platform.launch.workers import checkpoint_scratch

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    first = checkpoint_scratch("run-a", 0)
    (first / "ckpt-00000007-left").mkdir()
    other_run, other_rank = checkpoint_scratch("run-b", 0), checkpoint_scratch("run-a", 1)
    (other_run / "ckpt-00000007-b").mkdir()
    (other_rank / "ckpt-00000007-r1").mkdir()
    again = checkpoint_scratch("run-a", 0)
    assert again == first and again.is_dir() and not any(again.iterdir())
    assert (other_run / "ckpt-00000007-b").is_dir() and (other_rank / "ckpt-00000007-r1").is_dir()
    assert (tmp_path / f"metaformer-checkpoints-{os.getuid()}").stat().st_mode & 0o777 == 0o700
