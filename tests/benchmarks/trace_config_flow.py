"""Where does the job config go? Follow it through the driver's planning of a small synthetic job and one worker's
setup (a process group of one, no Ray), and count how often it climbs back up the layers.

    PYTHONPATH=platform python tests/benchmarks/trace_config_flow.py

Under ``sys.setprofile`` every call into ``metaformer_platform`` that receives the job config, a section of it
(any pydantic model of the config), or the job plan as an argument is recorded with its caller (the nearest
frame of the package above it); the config's own methods (properties, validators: ``self`` is the config) only
read it and are left out. A callee's module maps to its layer (storage, data, models, strategies, config,
evaluation, training, tracking, launch, pipelines); a *climb* is a call where the config passes from a function
of a lower layer to one of a higher layer. Printed: the modules the config visits, and the climbs (distinct
caller -> callee edges, and calls). On code without ``launch.plan`` (before the job plan) the entry calls are
the old ``run_job``'s steps, and the worker's (payload -> config -> Trainer).
"""

from __future__ import annotations

import collections
import importlib.util
import sys
import tempfile
from pathlib import Path
from types import FrameType

LAYERS = ["storage", "data", "models", "strategies", "config", "evaluation", "training", "tracking", "launch",
          "pipelines"]
PACKAGE = "metaformer_platform"


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[0] == PACKAGE and parts[1] in LAYERS else None


def _tracked_types() -> tuple[type, ...]:
    """The config, its sections (every pydantic model the config package defines or composes) and the plan."""
    from pydantic import BaseModel

    from metaformer_platform.config import JobConfig

    types: set[type] = set()
    todo: list[type] = [JobConfig]
    while todo:
        model = todo.pop()
        if model in types:
            continue
        types.add(model)
        for field in model.model_fields.values():
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                todo.append(field.annotation)
    if importlib.util.find_spec(f"{PACKAGE}.launch.plan") is not None:
        from metaformer_platform.launch import plan

        types.add(plan.JobPlan)
    return tuple(types)


class Tracer:
    """The calls that receive a tracked object, with their callers."""

    def __init__(self, tracked: tuple[type, ...]) -> None:
        self.tracked = tracked
        self.calls: list[tuple[str, str, str, str]] = []  # caller module, caller function, callee module, callee
        self.own: list[bool] = []  # whether the call is one of the config's own methods (``self`` is the config)

    def _receives(self, frame: FrameType) -> bool | None:
        """True: receives the config; None: only as ``self`` (the config's own method); False: not at all."""
        code = frame.f_code
        n = code.co_argcount + code.co_kwonlyargcount
        n += bool(code.co_flags & 0x04) + bool(code.co_flags & 0x08)  # *args, **kwargs
        names = code.co_varnames[:n]
        if names and names[0] in ("self", "cls") and isinstance(frame.f_locals.get(names[0]), self.tracked):
            own: bool | None = None
            names = names[1:]
        else:
            own = False
        for name in names:
            value = frame.f_locals.get(name)
            values = value.values() if isinstance(value, dict) else value if isinstance(value, tuple) else (value,)
            if any(isinstance(v, self.tracked) for v in values):
                return True
        return own

    def __call__(self, frame: FrameType, event: str, arg: object) -> None:
        if event != "call":
            return
        module = frame.f_globals.get("__name__", "")
        if _layer(module) is None:
            return
        receives = self._receives(frame)
        if receives is False:
            return
        caller = frame.f_back
        while caller is not None and _layer(caller.f_globals.get("__name__", "")) is None:
            caller = caller.f_back
        # an entry call of this script has no caller in the package: a visit, never a climb
        caller_module, caller_name = ("", "") if caller is None else (caller.f_globals["__name__"], caller.f_code.co_name)
        self.calls.append((caller_module, caller_name, module, frame.f_code.co_name))
        self.own.append(receives is None)


def _job(tmp: Path) -> object:
    from metaformer_platform.config import load_config

    return load_config(None, [
        "model.name=poolformer_debug", "model.drop_path_rate=0.0", "data.img_size=32", "data.num_workers=0",
        f"data.cache_dir={tmp / 'cache'}", "data.synthetic.num_classes=4", "data.synthetic.train_samples=64",
        "data.synthetic.val_samples=16", "data.synthetic.samples_per_shard=32", "data.auto_augment=null",
        "data.re_prob=0", "data.mixup_alpha=0", "data.cutmix_alpha=0", "trainer.batch_size=8",
        "trainer.max_steps=2", "trainer.precision=fp32", "trainer.compile=false", "optim.warmup_epochs=0",
        "scaling.num_workers=1", "scaling.cpus_per_worker=1", "scaling.use_gpu=false", "tracking.enabled=false",
        f"run.storage_path={tmp / 'runs'}", "run.name=trace",
    ])


def _plan_and_set_up(cfg: object) -> None:
    """The driver's planning and one worker's setup, as the code at hand does them."""
    from metaformer_platform.strategies.base import DistContext
    from metaformer_platform.training.trainer import Trainer

    if importlib.util.find_spec(f"{PACKAGE}.launch.plan") is not None:
        from metaformer_platform.launch.plan import build_plan

        plan = build_plan(cfg)  # type: ignore[arg-type]
        init_from = plan.init_from.on_this_node() if plan.init_from else None
        Trainer(plan.cfg, DistContext(), data_root=plan.data.root, init_from=init_from)
        return
    # before the job plan: run_job's steps up to the payload, then the worker's (see launch/workers.py there)
    from metaformer_platform.config import JobConfig
    from metaformer_platform.data import load_manifest
    from metaformer_platform.launch import checks, driver, workers
    from metaformer_platform.training.ownership import check_run_free

    data_root = checks.resolve_data_root(cfg)
    checks.check_data(cfg, data_root)
    checks.check_model(cfg, cfg.model.num_classes or load_manifest(data_root).num_classes)  # type: ignore[attr-defined]
    local = checks.resolve_init_from(cfg)
    checks.check_init_from(cfg, local)
    resume_from = checks.check_resume_from(cfg)
    storage_path = checks.resolve_storage_path(cfg.run.storage_path)  # type: ignore[attr-defined]
    check_run_free(storage_path, cfg.run_name)  # type: ignore[attr-defined]
    cfg = driver.resolve_scaling(cfg)
    checks.check_data(cfg, data_root)
    cfg = checks.with_default_threads(cfg)
    payload = {"config": cfg.model_dump(mode="json"), "registry_uri": checks.registry_uri(cfg),  # type: ignore[attr-defined]
               "resume_from": str(resume_from) if resume_from else None,
               "init_from_local": str(local) if local else None}
    worker_cfg = workers._with_local_init_from(JobConfig.model_validate(payload["config"]), payload)
    Trainer(worker_cfg, DistContext(), data_root=checks.resolve_data_root(worker_cfg))


def main() -> None:
    import torch.distributed as tdist

    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        cfg = _job(tmp)
        tdist.init_process_group("gloo", init_method=f"file://{tmp / 'store'}", rank=0, world_size=1)
        tracer = Tracer(_tracked_types())
        sys.setprofile(tracer)
        try:
            _plan_and_set_up(cfg)
        finally:
            sys.setprofile(None)
            tdist.destroy_process_group()
    passed_on = [c for c, own in zip(tracer.calls, tracer.own, strict=True) if not own]
    print("== calls that pass the config on (its own methods left out) ==")
    _report(passed_on)
    print("\n== every call that receives it, its own methods (properties, validators) included ==")
    _report(tracer.calls)


def _report(calls: list[tuple[str, str, str, str]]) -> None:
    visits = collections.Counter(callee for _, _, callee, _ in calls)
    print(f"modules the config visits: {len(visits)}")
    for module, count in sorted(visits.items(), key=lambda kv: LAYERS.index(kv[0].split(".")[1])):
        print(f"  {module:45s} {count:4d} calls")
    climbs = [(a, f, b, g) for a, f, b, g in calls if a and (_layer(a) or 0) < (_layer(b) or 0)]
    edges = collections.Counter(climbs)
    print(f"calls from a lower layer's function to a higher layer's: {len(edges)} (distinct), {len(climbs)} calls")
    for (a, f, b, g), count in edges.items():
        print(f"  {a}.{f} -> {b}.{g}  x{count}")
    # the path: the config's successive stops, a module at a time; a climb is a stop in a higher layer than the last
    path = [callee for _, _, callee, _ in calls]
    stops = [m for i, m in enumerate(path) if i == 0 or m != path[i - 1]]
    back_up = [(a, b) for a, b in zip(stops, stops[1:], strict=False) if (_layer(a) or 0) < (_layer(b) or 0)]
    print(f"climbs back up along the path: {len(back_up)} ({len(stops)} stops)")
    for a, b in back_up:
        print(f"  {a} -> {b}")

if __name__ == "__main__":
    main()
