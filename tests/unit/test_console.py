"""The console's two ends without Ray: rank 0's events from the Trainer's metrics, the driver's lines from events.

(tests/integration/test_pretrain_job.py checks the same lines from a real job's own process.)
"""

from __future__ import annotations

import io
import logging
from types import SimpleNamespace

from metaformer_platform.tracking.console import (
    Console,
    ForwardHandler,
    ProgressSender,
    failure_notice,
    format_duration,
)


class ListQueue(list):
    def put_nowait(self, item):
        self.append(item)


def test_durations_are_compact():
    assert [format_duration(s) for s in (0, 12.4, 65, 3600 + 120 + 5)] == ["0s", "12s", "1m05s", "1h02m"]


def test_the_trainer_metrics_become_events_and_pass_through_to_mlflow():
    queue, logged = ListQueue(), []
    inner = SimpleNamespace(log_metrics=lambda metrics, step: logged.append((step, metrics)))
    sender = ProgressSender(queue, "/runs/demo/", inner)
    sender.log_metrics({"train/loss": 1.5, "train/images_per_s": 10.0}, step=10)
    sender.log_metrics({"val/top1": 50.0}, step=20)
    sender.log_metrics({"system/checkpoint_stall_s": 0.25, "system/checkpoint_save_s": 0.2}, step=20)
    sender.log_metrics({"run/resumed_from_step": 5.0}, step=5)  # MLflow only
    sender.log_metrics({"system/checkpoint_stall_s": 0.5, "system/checkpoint_save_s": 0.2,
                        "system/checkpoint_dropped": 1.0}, step=30)  # on_upload_failure=continue gave up on it
    assert [(e["kind"], e["step"]) for e in queue] == [("step", 10), ("val", 20), ("checkpoint", 20), ("checkpoint", 30)]
    assert queue[2]["where"] == "/runs/demo/checkpoint-00000020" and queue[2]["stall_s"] == 0.25
    assert not queue[2]["dropped"] and queue[3]["dropped"]
    assert [step for step, _ in logged] == [10, 20, 20, 5, 30]  # MLflow still gets everything

    other_rank = ProgressSender(ListQueue(), "/runs/demo", inner, main=False)
    other_rank.log_metrics({"train/loss": 1.0}, step=10)
    assert other_rank.queue == []


def test_a_lost_queue_never_stops_training():
    class Gone:
        def put_nowait(self, item):
            raise ConnectionError("actor died")

    sender = ProgressSender(Gone(), "/runs/x")
    sender.send("step", step=1, metrics={})
    sender.send("step", step=2, metrics={})  # no second attempt, no exception
    assert sender._broken


def _start(console: Console, total: int = 100) -> None:
    console.handle({"kind": "start", "time": 0.0, "model": "m", "strategy": "ddp", "workers": 2,
                    "total_steps": total, "steps_per_epoch": 50, "global_batch": 10, "lr": 1e-3, "step": 0})


def _step(console: Console, step: int, t: float, ips: float = 100.0) -> None:
    console.handle({"kind": "step", "step": step, "time": t, "metrics": {
        "train/loss": 2.0 - step / 100, "train/lr": 1e-3, "train/images_per_s": ips, "train/epoch": step / 50,
        "system/data_wait_frac": 0.25}})


def test_lines_eta_and_summary():
    out = io.StringIO()
    console = Console(out)
    assert not console.use_bar  # not a terminal: lines only, never a bar in a log
    _start(console)
    _step(console, 10, 100.0, ips=100.0)  # the first window: 90 steps x 10 images / 100 img/s = 9 s
    _step(console, 20, 110.0)  # since then 10 steps in 10 s: 80 s left
    console.handle({"kind": "val", "step": 20, "time": 111.0,
                    "metrics": {"val/top1": 61.5, "val/top5": 97.0, "val/loss": 1.0234, "val/samples": 500}})
    console.handle({"kind": "checkpoint", "step": 20, "time": 112.0, "where": "/runs/x/checkpoint-00000020",
                    "stall_s": 0.41, "dropped": False})
    console.handle({"kind": "checkpoint", "step": 40, "time": 130.0, "where": "/runs/x/checkpoint-00000040",
                    "stall_s": 0.2, "dropped": True})
    _step(console, 100, 190.0)
    console.handle({"kind": "log", "time": 191.0, "rank": 1, "level": "WARNING", "message": "shard b.tar is bad"})
    console.handle({"kind": "finish", "time": 192.0, "step": 100})
    console.close(succeeded=True)
    lines = out.getvalue().splitlines()
    assert lines[0] == "training m (ddp, 2 workers): 100 steps, 50 per epoch, global batch 10, lr 0.001"
    one = io.StringIO()
    Console(one).handle({"kind": "start", "time": 0.0, "model": "m", "strategy": "ddp", "workers": 1,
                         "total_steps": 4, "steps_per_epoch": 2, "global_batch": 8, "lr": 1e-3, "step": 0})
    assert one.getvalue().startswith("training m (ddp, 1 worker): 4 steps,")
    assert lines[1] == "step  10/100 | epoch 0.20 | loss 1.9000 | lr 1.00e-03 |   100 img/s | data 25% | eta 9s"
    assert lines[2].endswith("| eta 1m20s")
    assert lines[3] == "val    step 20 | top-1 61.50% | top-5 97.00% | loss 1.0234 | 500 images"
    assert lines[4] == "checkpoint step 20 -> /runs/x/checkpoint-00000020 | stall 0.41 s"
    assert lines.pop(5) == ("checkpoint step 40 NOT stored (its upload failed; run.on_upload_failure=continue): "
                            "training goes on, and a restart resumes from the last stored checkpoint | stall 0.20 s")
    assert lines[5].startswith("step 100/100 |") and lines[5].endswith("| eta 0s")
    assert lines[6] == "[rank 1] WARNING: shard b.tar is bad"
    assert lines[7].startswith("done: 100 steps in ") and lines[7].endswith(  # the stored one counted; both stalls
        "| 100 img/s | data wait 25% | val top-1 61.50% top-5 97.00% | 1 checkpoint, stall 0.6 s")


def test_a_failed_job_gets_no_summary():
    out = io.StringIO()
    console = Console(out)
    _start(console)
    console.close(succeeded=False)
    assert len(out.getvalue().splitlines()) == 1


def test_workers_forward_their_platform_warnings():
    queue = ListQueue()
    handler = ForwardHandler(ProgressSender(queue, "/runs/x", main=False), rank=1)
    logger = logging.getLogger("metaformer_platform.test_console")
    logger.addHandler(handler)
    try:
        logger.info("not forwarded")
        logger.warning("bad shard %s", "b.tar")
    finally:
        logger.removeHandler(handler)
    assert [(e["kind"], e["rank"], e["level"], e["message"]) for e in queue] == [("log", 1, "WARNING", "bad shard b.tar")]


def test_a_worker_failure_reaches_the_console():
    queue = ListQueue()
    failure_notice(queue).after_exception(None, {1: RuntimeError("boom\nout of memory")})
    assert len(queue) == 1 and queue[0]["kind"] == "log" and queue[0]["rank"] == 1
    assert queue[0]["message"].startswith("worker failed: RuntimeError: out of memory (Ray Train restarts")


def test_the_done_line_shows_queue_time_apart_and_the_ledger():
    """The driver's ledger, fed from the events: queue time apart from the time the job took, then goodput,
    MFU, worker-hours and cost (cpu_hour set); a graceful stop says where it stopped."""
    import time

    from metaformer_platform.training.ledger import RunLedger

    now = time.time()
    out = io.StringIO()
    ledger = RunLedger(now - 100.0, cpu_hour=3.0)
    console = Console(out, ledger=ledger)
    _start(console, total=40)
    console.handle({"kind": "controller", "time": now - 99.0, "what": "start"})
    console.handle({"kind": "controller", "time": now - 60.0, "what": "placed", "scheduled_at": now - 98.0,
                    "placed_at": now - 65.0, "workers": 2, "gpu": False})
    snapshot = {"group": "g", "workers": 2, "gpu": False, "global_batch": 8, "from_step": 0, "step": 40,
                "began": now - 50.0, "time": now - 10.0, "data_s": 4.0, "phases": {}, "validation_s": 0.0,
                "checkpoint_s": 0.0, "flops_per_sample": 1e9, "peak_flops": 1e12}
    console.handle({"kind": "finish", "time": now - 10.0, "step": 40, "stopped": True, "ledger": snapshot})
    console.close(succeeded=True)
    line = out.getvalue().splitlines()[-1]
    # 33 s queued (the placement group's request to the placement); 100 s of wall in all; MFU: 40 x 8 x 1 GFLOP in
    # 40 s on 2 x 1 TFLOP/s
    assert line.startswith("stopped at step 40 in 1m07s (+33s queued) | ")
    hours = 2 * 65 / 3600  # 2 workers placed 65 s before the end
    assert line.endswith(f"| 0 checkpoints, stall 0.0 s | goodput 40% | MFU 0.4% | {hours:.3g} worker-hours | "
                         f"cost {hours * 3.0:.2f} USD")
