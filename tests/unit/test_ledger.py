"""The run ledger's accounting on made-up timelines (the driver's events, as the console feeds them), the MFU
peaks, and rank 0's meter inside a real Trainer. tests/integration/test_elastic_job.py checks a real job's."""

from __future__ import annotations

import pytest

from metaformer_platform.training import ledger as lg
from metaformer_platform.training.ledger import GroupMeter, GroupSnapshot, RunLedger, load_attempts, summarize
from metaformer_platform.training.peak_flops import cpu_flags_and_clock, cpu_peak, gpu_peak


def snap(group: str, workers: int, from_step: int, step: int, began: float, at: float, *, data_s: float = 0.0,
         validation_s: float = 0.0, checkpoint_s: float = 0.0, fps: float | None = None,
         peak: float | None = None) -> GroupSnapshot:
    return GroupSnapshot(group=group, workers=workers, gpu=False, global_batch=8, from_step=from_step, step=step,
                         began=began, time=at, data_s=data_s, phases={"forward": 1.0}, validation_s=validation_s,
                         checkpoint_s=checkpoint_s, flops_per_sample=fps, peak_flops=peak)


def clean_run() -> RunLedger:
    """Driver up at 1000, controller at 1002, 2 workers asked for at 1003 and placed at 1010, first step at 1015,
    60 steps to 1075 (6 s data wait, 4 s validation, 2 s checkpoints), driver done at 1080."""
    ledger = RunLedger(1000.0)
    ledger.controller_started(1002.0)
    ledger.state("SCHEDULING", 1003.0)
    ledger.placed(1003.0, 1010.0, 2, False)
    ledger.state("RUNNING", 1012.0)
    ledger.progress(snap("a", 2, 0, 30, 1015.0, 1045.0))  # an earlier snapshot of the same group is replaced
    ledger.progress(snap("a", 2, 0, 60, 1015.0, 1075.0, data_s=6.0, validation_s=4.0, checkpoint_s=2.0))
    ledger.state("SHUTTING_DOWN", 1078.0)
    ledger.finish(at=1080.0)
    return ledger


def test_a_clean_run_splits_its_wall_time_into_the_categories():
    m = summarize(clean_run().attempts)["metrics"]
    assert m[lg.WALL] == 80.0
    assert m[lg.QUEUED] == 7.0  # the controller's first SCHEDULING to the placement group's readiness
    assert m[lg.STARTING] == 8.0  # the driver's planning, the controller's and the workers' start, to the first step
    assert (m[lg.TRAIN], m[lg.DATA_WAIT], m[lg.COMPUTE]) == (54.0, 6.0, 48.0)
    assert (m[lg.VALIDATION], m[lg.CHECKPOINT_STALL], m[lg.SHUTDOWN]) == (4.0, 2.0, 5.0)
    assert m[lg.LOST_WORK] == m[lg.RECOVERY_GAP] == m[lg.RESIZE_GAP] == 0.0
    assert sum(m[c] for c in lg.CATEGORIES) == pytest.approx(m[lg.WALL], rel=0.02)
    assert m[lg.GOODPUT] == pytest.approx(54 / 80)
    assert m[lg.WORKER_HOURS] == pytest.approx(2 * (1078 - 1010) / 3600)  # placed to released
    assert lg.MFU not in m and lg.COST not in m  # no peak known, no price set: absent, not guessed


def failing_and_resizing_run() -> RunLedger:
    """Group A (2 workers, 1 s/step) reaches step 26 (checkpoints at 10 and 20, 1 s each) and fails; group B
    (1 worker, 2 s/step) resumes at 20 and reaches 40; an elastic resize starts group C (2 workers) at 40."""
    ledger = RunLedger(1000.0, cpu_hour=0.5, currency="EUR")
    ledger.controller_started(1002.0)
    ledger.placed(1003.0, 1010.0, 2, False)
    ledger.progress(snap("a", 2, 0, 26, 1015.0, 1043.0, checkpoint_s=2.0))
    ledger.validated(20, 30.0, 1036.0)
    ledger.state("RESTARTING", 1050.0)
    ledger.state("SCHEDULING", 1051.0)
    ledger.placed(1051.0, 1058.0, 1, False)
    ledger.progress(snap("b", 1, 20, 40, 1062.0, 1104.0, checkpoint_s=2.0))
    ledger.validated(40, 50.0, 1100.0)
    ledger.state("RESIZING", 1106.0)
    ledger.placed(1107.0, 1110.0, 2, False)
    ledger.progress(snap("c", 2, 40, 60, 1113.0, 1135.0, checkpoint_s=2.0))
    ledger.validated(60, 50.0, 1134.0)
    ledger.state("SHUTTING_DOWN", 1136.0)
    ledger.finish(at=1140.0)
    return ledger


def test_a_failure_and_a_resize_cost_lost_work_and_gaps_of_their_size():
    summary = failing_and_resizing_run().summary()
    m = summary["metrics"]
    assert m[lg.WALL] == 140.0
    assert m[lg.LOST_WORK] == 6.0  # steps 21-26 trained again: 6 steps x group A's 1 s per step
    assert m[lg.RECOVERY_GAP] == 1062.0 - 1043.0  # A's last progress to B's first step
    assert m[lg.RESIZE_GAP] == 1113.0 - 1104.0  # B's last progress to C's first step
    assert m[lg.TRAIN] == 20.0 + 40.0 + 20.0  # A's 26 s less its 6 lost, B's, C's
    # no SCHEDULING state seen before the first placement: the wait since the group's own request
    assert (m[lg.QUEUED], m[lg.STARTING], m[lg.CHECKPOINT_STALL], m[lg.SHUTDOWN]) == (7.0, 8.0, 6.0, 5.0)
    assert sum(m[c] for c in lg.CATEGORIES) == pytest.approx(m[lg.WALL], rel=0.02)
    steps = [i for i in summary["intervals"] if i["category"] == "steps"]
    assert [(i["from_step"], i["to_step"], i["steps_redone"]) for i in steps] == [(0, 26, 6), (20, 40, 0), (40, 60, 0)]
    # workers x held time: A 2 x (1010-1050), B 1 x (1058-1106), C 2 x (1110-1136)
    hours = (2 * 40 + 48 + 2 * 26) / 3600
    assert m[lg.WORKER_HOURS] == pytest.approx(hours)
    assert m[lg.COST] == pytest.approx(hours * 0.5)  # CPU workers: cost.cpu_hour
    # top-1 50 first reached at 1100: A's 20 productive s and 38 of B's 42 s span; 2 x 40 + 1 x 42 worker-s
    assert m[lg.TIME_TO_FINAL_TOP1] == pytest.approx(20 + 40 * 38 / 42)
    assert m[lg.WORKER_HOURS_TO_FINAL_TOP1] == pytest.approx((80 + 42) / 3600)
    assert [row["top1"] for row in summary["time_to_accuracy"]] == [30.0, 50.0]  # each value first reached


def test_a_driver_restart_appends_an_attempt_and_its_redone_steps_are_lost_work():
    first = clean_run()
    stored = load_attempts(first.to_json())
    assert summarize(stored) == summarize(first.attempts)  # the file holds everything the summary needs
    second = RunLedger(2000.0, stored)
    second.placed(2001.0, 2002.0, 2, False)
    second.progress(snap("d", 2, 50, 80, 2005.0, 2035.0))  # resumed at 50: the first reached 60
    second.finish(at=2040.0)
    m = second.summary()["metrics"]
    assert m[lg.WALL] == 80.0 + 40.0
    assert m[lg.LOST_WORK] == pytest.approx(10 * 54 / 60)  # 10 steps at the first attempt's 0.9 s per step
    assert sum(m[c] for c in lg.CATEGORIES) == pytest.approx(m[lg.WALL], rel=0.02)


def test_mfu_counts_model_flops_over_the_workers_peak():
    ledger = RunLedger(0.0, accelerator_hour=2.0)
    ledger.placed(0.0, 1.0, 2, True)
    ledger.progress(snap("g", 2, 0, 100, 2.0, 12.0, fps=1e9, peak=1e12))
    ledger.finish(at=13.0)
    summary = ledger.summary()
    # 100 steps x 8 samples x 1 GFLOP in 10 s on 2 x 1 TFLOP/s
    assert summary["metrics"][lg.MFU] == pytest.approx(800e9 / (10 * 2e12))
    assert summary["metrics"][lg.COST] == pytest.approx(2 * 12 / 3600 * 2.0)  # GPU workers: accelerator_hour
    assert lg.mfu(None, 10.0, 1e12, 1) is None and lg.mfu(1e9, 10.0, None, 1) is None


def test_a_run_that_never_took_a_step_is_queued_and_starting_only():
    ledger = RunLedger(0.0)
    ledger.controller_started(1.0)
    ledger.state("SCHEDULING", 2.0)
    ledger.state("RESCHEDULING", 12.0)  # its placement group timed out: asked for again
    ledger.state("SCHEDULING", 12.0)
    ledger.placed(12.0, 30.0, 1, False)
    ledger.finish(at=40.0)
    m = ledger.summary()["metrics"]
    assert (m[lg.QUEUED], m[lg.STARTING], m[lg.GOODPUT]) == (28.0, 12.0, 0.0)


def test_the_meter_sums_windows_and_snapshots_only_after_the_first_step():
    meter = GroupMeter(workers=2, gpu=False, global_batch=16)
    assert meter.snapshot() is None
    meter.begin(10)
    meter.add_window({"system/step_data_s": 0.1, "system/step_forward_s": 0.2, "system/step_s": 0.5}, 4, 14)
    meter.add_window({"system/step_data_s": 0.3, "system/step_forward_s": 0.2, "system/step_s": 0.5}, 2, 16)
    s = meter.snapshot()
    assert s is not None and (s["from_step"], s["step"]) == (10, 16)
    assert s["data_s"] == pytest.approx(0.4 + 0.6) and s["phases"] == {"forward": pytest.approx(1.2)}


def test_gpu_peaks_by_name_and_precision():
    assert gpu_peak("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert gpu_peak("NVIDIA H100 PCIe", "bf16") == 756e12
    assert gpu_peak("NVIDIA H200", "fp32") == 67e12
    assert gpu_peak("NVIDIA A100-SXM4-80GB", "bf16") == 312e12
    assert gpu_peak("NVIDIA A10", "bf16") == 125e12  # not the A100's
    assert gpu_peak("NVIDIA L4", "bf16") == 121e12
    assert gpu_peak("Tesla V100-SXM2-16GB", "bf16") is None  # no bf16 unit: not guessed
    assert gpu_peak("Some Future GPU", "bf16") is None


def test_cpu_peaks_from_vector_units(tmp_path):
    assert cpu_peak(2, "fp32", frozenset({"avx512f", "avx2"}), 2.5e9) == 2 * 2.5e9 * 64
    assert cpu_peak(2, "fp32", frozenset({"avx2"}), 2.5e9) == 2 * 2.5e9 * 32
    assert cpu_peak(4, "bf16", frozenset({"avx512f", "amx_bf16"}), 2e9) == 4 * 2e9 * 1024
    assert cpu_peak(1, "bf16", frozenset({"avx2"}), 2e9) == 2e9 * 32  # emulated bf16: the fp32 rate
    assert cpu_peak(1, "fp32", frozenset(), 2e9) is None and cpu_peak(1, "fp32", frozenset({"avx2"}), None) is None
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\ncpu MHz\t\t: 2596.142\nflags\t\t: fpu avx2 fma avx512f avx512_bf16\n"
                    "processor\t: 1\ncpu MHz\t\t: 2400.000\n")
    assert cpu_flags_and_clock(info) == (frozenset({"avx2", "avx512f", "avx512_bf16"}), 2596.142e6)
    assert cpu_flags_and_clock(tmp_path / "absent") == (frozenset(), None)
