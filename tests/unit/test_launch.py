"""The job assembly (``launch.build_trainer``), without a cluster."""

from __future__ import annotations

from metaformer_platform.config import load_config
from metaformer_platform.launch import build_trainer
from metaformer_platform.storage import Location


def test_the_job_trainer_starts_no_ray_data_actor_and_keeps_rays_other_callbacks(tmp_path, monkeypatch):
    """The jobs pass Ray no Dataset: Ray Train's DatasetsCallback (a DatasetManager actor per run) is left out,
    Ray's other default callbacks (placement-group cleaner, backend and accelerator setup) are kept where the
    cluster serves the State API the cleaner asks, and a trainer given a Ray Dataset would keep it. Where no
    State API is served the cleaner is left out too (it could only fail to ask)."""
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback

    from metaformer_platform import launch

    cfg = load_config(None, ["model.name=poolformer_debug", "scaling.num_workers=2", "scaling.cpus_per_worker=1",
                             "scaling.use_gpu=false", f"run.storage_path={tmp_path}", "run.name=assembly"])
    trainer = build_trainer(cfg, lambda config: None, {}, Location.parse(str(tmp_path)), remote_inputs=False)
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
