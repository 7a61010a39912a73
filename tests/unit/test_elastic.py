"""Elastic jobs: the [min, max] range is validated, the global batch is kept at every world size, resizes are
noted, DeepSpeed is refused, and FSDP2/DDP checkpoints of two ranks resume on one (DCP reshards)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
from loader_helpers import RandomBatches

from metaformer_platform.config import ConfigError, JobConfig, load_config
from metaformer_platform.config.batch import split_global_batch
from metaformer_platform.strategies.base import DistContext
from metaformer_platform.training.elastic import check_resume_world_size, fit_to_world, note_resume
from metaformer_platform.training.trainer import Trainer

BASE = [
    "model.name=poolformer_debug", "model.drop_path_rate=0.0", "data.img_size=32", "data.num_workers=0",
    "data.auto_augment=null", "data.re_prob=0", "data.mixup_alpha=0", "data.cutmix_alpha=0",
    "trainer.precision=fp32", "trainer.torch_threads=1", "optim.lr=3e-3", "optim.warmup_epochs=0",
    "model.num_classes=4", "data.val_split=null", "trainer.checkpoint_every_steps=100", "trainer.max_steps=4",
]


def test_a_worker_range_is_a_tuple_that_round_trips_and_keeps_the_global_batch_of_its_largest_size():
    cfg = load_config(None, ["scaling.num_workers=[2, 4]", "trainer.batch_size=12", "trainer.grad_accum_steps=2"])
    s = cfg.scaling
    assert (s.num_workers, s.elastic, s.min_workers, s.max_workers) == ((2, 4), True, 2, 4)
    assert cfg.global_batch == 12 * 2 * 4  # at 3 workers: 32 each, as 8 x 4 (12 does not divide 32)
    assert fit_to_world(cfg.scaling, cfg.trainer, 3, even=cfg.data.uses_mixup).micro_batch == 8
    assert JobConfig.model_validate(cfg.model_dump(mode="json")).scaling.num_workers == (2, 4)  # the worker payload
    fixed = load_config(None, ["scaling.num_workers=[3, 3]"]).scaling
    assert (fixed.num_workers, fixed.elastic) == (3, False)  # a range of one size is that size
    assert load_config(None, ["scaling.num_workers=2"]).scaling.elastic is False


@pytest.mark.parametrize(("overrides", "message"), [
    (["scaling.num_workers=[2, 1]"], r"needs 1 <= min <= max <= 4096"),
    (["scaling.num_workers=[0, 2]"], r"needs 1 <= min <= max"),
    (["scaling.num_workers=[1, 5000]"], r"needs 1 <= min <= max <= 4096"),
    (["scaling.num_workers=[1, 2, 3]"], r"\[min, max\] of two integers"),
    (["scaling.num_workers=[1, 2.5]"], r"\[min, max\] of two integers"),
    (["scaling.num_workers=[3, 4]", "trainer.batch_size=16"],
     r"global batch .* = 64 .* cannot be split evenly over 3 workers; choose a range within the sizes that divide "
     r"it \(\[1, 2, 4\]\)"),
    (["scaling.num_workers=[1, 2]", "strategy.name=deepspeed"], r"cannot run with strategy.name=deepspeed"),
    (["scaling.num_workers=[1, 2]", "stage=evaluate"], r"an evaluation runs on a fixed number of workers"),
])
def test_bad_ranges_are_refused_with_the_fix(overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(None, overrides)
    assert "'trainer':" not in str(err.value)  # a check across sections does not print the whole config back


def test_the_global_batch_is_split_into_the_largest_micro_batch_that_fits():
    assert split_global_batch(64, 4, 16) == (16, 1)
    assert split_global_batch(64, 2, 16) == (16, 2)
    assert split_global_batch(64, 1, 16) == (16, 4)
    assert split_global_batch(48, 3, 12) == (8, 2)  # 16 per worker: 12 does not divide it, 8 does
    assert split_global_batch(18, 1, 9, even=True) == (6, 3)  # mixup: an even micro-batch
    with pytest.raises(ValueError, match="cannot be split evenly over 3 workers"):
        split_global_batch(64, 3, 16)
    with pytest.raises(ValueError, match="no even micro-batch"):
        split_global_batch(9, 1, 9, even=True)


def test_each_world_size_of_a_range_trains_with_the_same_global_batch_and_learning_rate():
    cfg = load_config(None, ["scaling.num_workers=[1, 4]", "trainer.batch_size=12", "trainer.grad_accum_steps=1",
                             "optim.lr=null"])
    fitted = {w: fit_to_world(cfg.scaling, cfg.trainer, w, even=cfg.data.uses_mixup) for w in (1, 2, 3, 4)}
    assert {w: (b.world_size, b.micro_batch, b.grad_accum_steps) for w, b in fitted.items()} == {
        1: (1, 12, 4), 2: (2, 12, 2), 3: (3, 8, 2), 4: (4, 12, 1)}
    assert {b.global_batch for b in fitted.values()} == {48}
    assert len({cfg.optim.resolved_lr(b.global_batch) for b in fitted.values()}) == 1
    with pytest.raises(ValueError, match="outside scaling.num_workers=\\[1, 4\\]"):
        fit_to_world(cfg.scaling, cfg.trainer, 5, even=False)
    fixed = load_config(None, ["scaling.num_workers=2"])
    kept = fit_to_world(fixed.scaling, fixed.trainer, 1, even=fixed.data.uses_mixup)  # a fixed count is never rescaled
    assert (kept.micro_batch, kept.grad_accum_steps, kept.global_batch) == (
        fixed.trainer.batch_size, fixed.trainer.grad_accum_steps, fixed.global_batch)


def test_a_resize_is_noted_with_its_step_and_sizes():
    resizes: list[dict[str, int]] = []
    assert note_resume(resizes, 12, 2, 2) is False and note_resume(resizes, 12, None, 1) is False
    assert note_resume(resizes, 12, 2, 1) is True and note_resume(resizes, 20, 1, 2) is True
    assert resizes == [{"step": 12, "from": 2, "to": 1}, {"step": 20, "from": 1, "to": 2}]


def test_deepspeed_refuses_a_checkpoint_of_another_world_size_and_the_others_reshard():
    with pytest.raises(ValueError, match=r"DeepSpeed checkpoint of 2 ranks, and this job has 1: .* scaling.num_workers=2"):
        check_resume_world_size("deepspeed", 2, 1, "/runs/x/checkpoint-00000012")
    check_resume_world_size("deepspeed", 2, 2, "x")
    check_resume_world_size("deepspeed", None, 1, "x")  # a checkpoint from before the world size was stored
    for strategy in ("ddp", "fsdp"):
        check_resume_world_size(strategy, 2, 1, "x")


# -- a checkpoint of two ranks resumed on one ---------------------------------------------------------------


def _overrides(strategy: str) -> list[str]:
    return [*BASE, f"strategy.name={strategy}", "scaling.num_workers=[1, 2]", "trainer.batch_size=8"]


def _two_ranks(rank: int, port: int, strategy: str, out: str) -> None:
    import torch.distributed as tdist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        cfg = load_config(None, _overrides(strategy))
        trainer = Trainer(cfg, DistContext(rank=rank, world_size=2), data_root=None,
                          loaders=(RandomBatches(4, 8, seed=rank), None))
        trainer.train()
        full = get_model_state_dict(trainer.strategy.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        trainer.save_checkpoint(Path(out))
        if rank == 0:  # a file, not a queue: tensors in a queue need their sender alive
            torch.save((full, trainer.strategy.optimizer.param_groups[0]["lr"]), Path(out).parent / "saved.pt")
        # both ranks done before either tears gloo down: a rank destroying its group while the other still
        # talks to it aborted the other (exit -6, "terminate called without an active exception"), once in ~10 runs
        tdist.barrier()
    finally:
        tdist.destroy_process_group()


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_checkpoint_of_two_ranks_resumes_on_one_with_its_weights_optimizer_and_schedule(strategy, tmp_path):
    import torch.distributed as tdist
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    directory = tmp_path / "ckpt"
    procs = [ctx.Process(target=_two_ranks, args=(r, port, strategy, str(directory))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert [p.exitcode for p in procs] == [0, 0]
    saved, lr = torch.load(tmp_path / "saved.pt", weights_only=True)

    # one rank (a process group of one, as Ray Train gives a one-worker group)
    tdist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        cfg = load_config(None, _overrides(strategy))
        one = Trainer(cfg, DistContext(rank=0, world_size=1), data_root=None, loaders=(RandomBatches(8, 8), None),
                      resume_from=directory)
        assert (one.step, one.resized, one.resizes) == (4, True, [{"step": 4, "from": 2, "to": 1}])
        assert (one.batch.micro_batch, one.batch.grad_accum_steps, one.batch.global_batch) == (8, 2, 16)
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        loaded = get_model_state_dict(one.strategy.model, options=options)
        assert sorted(loaded) == sorted(saved) and all(torch.equal(loaded[k], saved[k]) for k in saved)
        optim = get_optimizer_state_dict(one.strategy.model, one.strategy.optimizer, options=options)["state"]
        assert optim and all(float(v["step"]) == 4 for v in optim.values())  # AdamW's moments after 4 steps
        assert one.strategy.optimizer.param_groups[0]["lr"] == lr and one.state_dict()["world_size"] == 1
        one.cfg = one.cfg.model_copy(update={"trainer": one.cfg.trainer.model_copy(update={"max_steps": 6})})
        one.total_steps = 6
        one.train()  # goes on at the new size
        assert one.step == 6
    finally:
        tdist.destroy_process_group()


def test_the_sample_log_lists_each_steps_keys_and_an_epoch_holds_the_split_once(tmp_path):
    import json

    from metaformer_platform.data.build.synthetic import ensure_synthetic_shards

    root = ensure_synthetic_shards(tmp_path / "data", num_classes=4, train_samples=64, val_samples=8, image_size=32,
                                   samples_per_shard=16, seed=0)
    cfg = load_config(None, [*BASE, "scaling.num_workers=[1, 2]", "trainer.batch_size=4", "trainer.max_steps=8",
                             f"trainer.sample_log_dir={tmp_path / 'keys'}"])
    Trainer(cfg, DistContext(), data_root=root).train()  # 1 of 2 workers: 4 x 2 micro-batches of the global 8
    [log] = (tmp_path / "keys").glob("keys-rank00000-*.jsonl")
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["step"], r["rank"], r["world_size"], len(r["keys"])) for r in records] == [
        (s, 0, 1, 8) for s in range(1, 9)]
    keys = [k for r in records for k in r["keys"]]
    assert len(set(keys)) == len(keys) == 64
