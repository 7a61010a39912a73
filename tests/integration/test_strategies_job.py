"""FSDP2 and DeepSpeed ZeRO-1/2/3 jobs: TorchTrainer, 2 CPU workers, gloo, poolformer_debug, synthetic data,
fp32, 2 micro-batches of 8 per step.

For each strategy, one job pair: a full run (learns; its losses equal DDP's from the same initial weights),
a second run continued from the first run's middle checkpoint (its losses equal the full run's within 1e-6
relative), and an export of the final checkpoint (loads strictly into plain timm with no process group and
without deepspeed, all four in one fresh process after the strategy tests; its validation loss equals the one
the job measured). Per-step losses come from MLflow. Last, the FSDP run submitted again by name after a forged,
pickle-bearing checkpoint was planted in its folder (issue 24, finding 1): it resumes from its own newest one.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

STEPS, RESUME_AT = 30, 15  # the small job's (tests/integration/conftest.py): 30 steps, a checkpoint every 15


@pytest.fixture(scope="module")
def workdir(small_job) -> Path:
    return small_job.workdir


@pytest.fixture(scope="module")
def ddp_losses(small_job, ddp_reference) -> dict[int, float]:
    return small_job.history(ddp_reference.mlflow_run_id)


def _val_loss_of_export(small_job, export_dir: Path) -> float:
    """Validation loss of the exported weights on the job's validation split, in this process, one rank."""
    from metaformer_platform.launch.checks import resolve_data_root
    from metaformer_platform.strategies.base import DistContext
    from metaformer_platform.training.export import load_export
    from metaformer_platform.training.trainer import Trainer

    cfg = small_job.config("it-eval", "scaling.num_workers=1", "trainer.torch_threads=1")
    trainer = Trainer(cfg, DistContext(), data_root=resolve_data_root(cfg))
    trainer.strategy.module.load_state_dict(load_export(export_dir).state_dict(), strict=True)
    return trainer.validate()["val/loss"]


STRATEGIES = {
    "fsdp": ["strategy.name=fsdp"],
    "zero1": ["strategy.name=deepspeed", "strategy.zero_stage=1"],
    "zero2": ["strategy.name=deepspeed", "strategy.zero_stage=2"],
    "zero3": ["strategy.name=deepspeed", "strategy.zero_stage=3"],
}

# Each export, strictly into plain timm in a fresh process with no process group and without deepspeed: one
# process for the four exports (its torch + timm import is seconds; the strategy tests run first, in file order).
LOAD_PLAIN = """
import json, sys, torch, timm
from safetensors.torch import load_file
import metaformer_platform.models  # registers poolformer_debug (a timm MetaFormer)
out = {}
for folder in sys.argv[1:]:
    info = json.load(open(folder + "/model.json"))
    model = timm.create_model(info["model_name"], num_classes=info["num_classes"])
    model.load_state_dict(load_file(folder + "/model.safetensors"), strict=True)
    torch.manual_seed(0)
    with torch.no_grad():
        out[folder] = model.eval()(torch.randn(4, 3, 32, 32)).tolist()
print(json.dumps({"logits": out, "deepspeed": "deepspeed" in sys.modules, "dist": torch.distributed.is_initialized()}))
"""


@pytest.mark.parametrize("strategy", [pytest.param(overrides, id=tag) for tag, overrides in STRATEGIES.items()])
def test_strategy_trains_matches_ddp_resumes_exactly_and_exports(strategy, request, ddp_losses, small_job, workdir):
    from metaformer_platform.training.export import export_checkpoint

    tag = request.node.callspec.id
    full = small_job.run(f"it-{tag}", *strategy)
    losses = small_job.history(full.mlflow_run_id)
    assert sorted(losses) == list(range(1, STEPS + 1))

    # It learns: the last steps' loss is well below the first steps' (ln 4 = 1.386 is chance).
    first, last = sum(losses[s] for s in range(1, 6)) / 5, sum(losses[s] for s in range(STEPS - 4, STEPS + 1)) / 5
    assert last < 0.85 * first, losses

    # From the same initial weights and data, with clipping off, it computes what DDP computes.
    rel = {s: abs(losses[s] - ddp_losses[s]) / ddp_losses[s] for s in losses}
    print(f"{tag} vs ddp: step 1 {rel[1]:.2e}, step 2 {rel[2]:.2e}, max over {STEPS} steps {max(rel.values()):.2e}")
    assert rel[1] < 1e-4 and rel[2] < 1e-4, (losses, ddp_losses)

    # Continued from the middle checkpoint in a new run: the following losses are the full run's.
    run_dir = workdir / "runs" / f"it-{tag}"
    middle = run_dir / f"checkpoint-{RESUME_AT:08d}"
    assert (middle / "COMPLETE").is_file() and (middle / "rng-rank00001.pt").is_file()
    resumed = small_job.run(f"it-{tag}-resumed", *strategy, f"run.resume_from={middle}")
    again = small_job.history(resumed.mlflow_run_id)
    assert sorted(again) == list(range(RESUME_AT + 1, STEPS + 1))  # it did not start over
    for step, value in again.items():
        assert value == pytest.approx(losses[step], rel=1e-6), (step, value, losses[step])

    # Export: its validation loss is the job's (and it loads into plain timm alone: the test after these).
    export_dir = workdir / "exports" / tag
    export_checkpoint(run_dir / f"checkpoint-{STEPS:08d}", export_dir)
    val_loss = _val_loss_of_export(small_job, export_dir)
    assert val_loss == pytest.approx(full.metrics["val/loss"], rel=1e-5), (val_loss, full.metrics["val/loss"])


def test_every_export_loads_into_plain_timm_alone(workdir):
    """Each strategy's export loads strictly into plain timm in a fresh process with no process group and no
    deepspeed, and predicts what ``load_export`` predicts here."""
    from metaformer_platform.training.export import load_export

    exports = [workdir / "exports" / tag for tag in STRATEGIES]
    missing = [e.name for e in exports if not (e / "model.safetensors").is_file()]
    if len(missing) == len(STRATEGIES):
        pytest.skip("needs the exports of test_strategy_trains_matches_ddp_resumes_exactly_and_exports")
    assert not missing, f"no export of {missing}: their strategy test failed before exporting"
    out = subprocess.run([sys.executable, "-c", LOAD_PLAIN, *map(str, exports)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    plain = json.loads(out.stdout.strip().splitlines()[-1])
    assert plain["deepspeed"] is False and plain["dist"] is False
    for export_dir in exports:
        model = load_export(export_dir)
        torch.manual_seed(0)
        with torch.no_grad():
            here = model(torch.randn(4, 3, 32, 32))
        torch.testing.assert_close(torch.tensor(plain["logits"][str(export_dir)]), here, msg=export_dir.name)


def test_zero3_checkpoint_initialises_fsdp_with_a_new_head(small_job, workdir, tmp_path):
    """Portability: the ZeRO-3 run's checkpoint initialises an FSDP2 trainer with a 6-class head: the trunk is
    exactly the ZeRO-3 run's, the head is new. In this process, in a process group of one (as Ray Train gives a
    one-worker group): the 2-worker path of ``model.init_from`` is the fine-tune job's (test_finetune_evaluate)."""
    import torch.distributed as tdist
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from metaformer_platform.launch.checks import resolve_data_root
    from metaformer_platform.strategies.base import DistContext
    from metaformer_platform.training.trainer import Trainer

    source = workdir / "runs" / "it-zero3" / f"checkpoint-{STEPS:08d}"
    if not source.is_dir():
        pytest.skip("needs the zero3 run of test_strategy_trains_matches_ddp_resumes_exactly_and_exports")
    cfg = small_job.config("it-zero3-to-fsdp", "strategy.name=fsdp", f"model.init_from={source}",
                           "model.num_classes=6", "scaling.num_workers=1", "trainer.torch_threads=1")
    tdist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        trainer = Trainer(cfg, DistContext(rank=0, world_size=1), data_root=resolve_data_root(cfg))
        assert trainer.strategy.name == "fsdp"
        tuned = get_model_state_dict(trainer.strategy.model,
                                     options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    finally:
        tdist.destroy_process_group()
    original = load_file(str(workdir / "exports" / "zero3" / "model.safetensors"))
    assert tuned["head.fc.weight"].shape == (6, 64) and original["head.fc.weight"].shape == (4, 64)
    assert sorted(tuned) == sorted(original)
    for key, value in original.items():
        if not key.startswith("head.fc."):
            assert torch.equal(tuned[key], value), key


def test_a_forged_checkpoint_planted_in_the_fsdp_run_is_never_read_when_the_run_is_submitted_again(
    small_job, workdir, ray_cluster, tmp_path
):
    """Issue 24, finding 1, through a job resubmitted by name. Whoever can write the storage reads the run's id
    from its ``_owner.json`` and plants newer FSDP checkpoint folders whose DCP ``.metadata`` is a pickle that
    runs a payload, with a ``COMPLETE`` marker and an ``OWNER-rank00000.json`` naming the run: one unsigned, one
    signed with another deployment's key. The next submission of the run (same run.name, 1 more step) moves
    both to ``_quarantine/`` unread and resumes from the run's own newest checkpoint (on f0844da it adopted the
    newest planted folder and unpickled it in a Ray Train worker: the payload ran)."""
    from metaformer_platform.storage import checkpoint_format as fmt

    spec = importlib.util.spec_from_file_location(  # tests/ is no package: the unit tests' crafted folders, by path
        "weights_trust_unit", Path(__file__).parents[1] / "unit" / "test_weights_trust.py")
    unit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(unit)

    run_dir = workdir / "runs" / "it-fsdp"
    if not (run_dir / f"checkpoint-{STEPS:08d}" / fmt.COMPLETE_MARKER).is_file():  # run alone: the strategy test's
        small_job.run("it-fsdp", *STRATEGIES["fsdp"])
    run_id = json.loads((run_dir / fmt.OWNER_FILE).read_text())["run_id"]  # what the attacker reads
    pwned = tmp_path / "PWNED"
    unit.craft(run_dir / "checkpoint-00000099", "fsdp", pwned, run_id=run_id)  # unsigned
    with pytest.MonkeyPatch.context() as mp:  # signed, but with a key that is not this deployment's
        mp.setenv(fmt.KEY_ENV, "another-deployments-checkpoint-key")
        unit.craft(run_dir / "checkpoint-00000098", "fsdp", pwned, run_id=run_id, signed=True)

    since = time.time()
    try:  # one more step, no validation: the job's own cost is its start, recovery and resume
        result = small_job.run("it-fsdp", *STRATEGIES["fsdp"], f"trainer.max_steps={STEPS + 1}", "data.val_split=null")
    finally:
        assert not pwned.exists(), "a planted checkpoint's pickle ran in a Ray Train worker"
    assert result.metrics["step"] == STEPS + 1
    assert small_job.history(result.mlflow_run_id, "run/resumed_from_step") == {STEPS: float(STEPS)}
    assert [s for s in small_job.history(result.mlflow_run_id) if s > STEPS] == [STEPS + 1]
    assert sorted(p.name[:len("checkpoint-00000099")] for p in (run_dir / "_quarantine").iterdir()) == [
        "checkpoint-00000098", "checkpoint-00000099"]
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == [
        f"checkpoint-{s:08d}" for s in (RESUME_AT, STEPS, STEPS + 1)]
    logs = Path(ray_cluster.address_info["session_dir"]) / "logs"
    worker_logs = "".join(p.read_text(errors="replace") for p in logs.glob("worker-*.err") if p.stat().st_mtime >= since)
    assert ("moved checkpoint folders this run did not write to _quarantine/: checkpoint-00000098, "
            "checkpoint-00000099") in worker_logs
