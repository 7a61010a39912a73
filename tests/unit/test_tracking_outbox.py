"""Tracking never stops training: rank 0's outbox holds what it logs through an outage (bounded, in order, the
drops counted), says once that the store is out and once that it is back; the driver's close waits out an outage
for a bounded time and says so when it gives up. A fake store stands in for the server (the real one is
tests/integration/test_tracking_outage.py's)."""

from __future__ import annotations

import io
import logging
import os
import threading
import time

import pytest
from mlflow.entities import Metric, Param, RunTag

from metaformer_platform.tracking import runs
from metaformer_platform.tracking.console import Console
from metaformer_platform.tracking.runs import DROPPED_METRIC, Outbox, ServerError, retry_outage


class FakeStore:
    """A tracking store that is out while ``down`` is set (no connection), and records what it stored."""

    def __init__(self) -> None:
        self.down = threading.Event()
        self.metrics: list[tuple[str, int]] = []
        self.params: list[str] = []
        self.tags: list[str] = []
        self.calls = 0

    def send(self, metrics: list[Metric], params: list[Param], tags: list[RunTag]) -> None:
        self.calls += 1
        if self.down.is_set():
            raise ServerError("http://u:secret@127.0.0.1:1", None, "no connection")
        self.metrics += [(m.key, m.step) for m in metrics]
        self.params += [p.key for p in params]
        self.tags += [t.key for t in tags]


def _metric(step: int, key: str = "train/loss") -> Metric:
    return Metric(key, float(step), 0, step)


def _wait(pred, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not pred():
        assert time.monotonic() < deadline
        time.sleep(0.01)


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    monkeypatch.setattr(runs, "RETRY_FIRST_S", 0.01)
    monkeypatch.setattr(runs, "RETRY_MAX_S", 0.05)


def test_an_outage_is_held_in_order_bounded_and_counted_and_said_once_each_way():
    store, lines = FakeStore(), []
    outbox = Outbox(store.send, limit=100, where="http://u:***@127.0.0.1:1", on_change=lines.append)
    outbox.put("metric", _metric(1))
    outbox.flush()
    assert store.metrics == [("train/loss", 1)]

    store.down.set()
    outbox.put("metric", _metric(2))
    _wait(lambda: outbox.down_since is not None)
    started = time.monotonic()
    outbox.flush()  # a checkpoint's flush: training goes on at once while the store is out
    assert time.monotonic() - started < 0.5
    outbox.put("param", Param("p", "1"))
    outbox.put("tag", RunTag("t", "x"))
    for step in range(3, 200):  # past the bound (100: step 2, the param, the tag, steps 3-99) values are dropped
        outbox.put("metric", _metric(step))
    _wait(lambda: store.calls > 5)  # tried again and again, one line only
    assert len(outbox) == 100 and outbox.dropped == 100
    assert lines == ["tracking: MLflow is out (MLflow at http://u:***@127.0.0.1:1: no connection); training goes on, "
                     "holding what it logs (up to 100 values) until the server is back"]

    store.down.clear()
    _wait(lambda: outbox.down_since is None)  # found back at its next try
    outbox.flush()
    assert [s for k, s in store.metrics if k == "train/loss"] == list(range(1, 100))  # in order, none twice
    assert store.params == ["p"] and store.tags == ["t"]
    assert store.metrics[-1] == (DROPPED_METRIC, 199)  # the count, at the newest step seen
    assert len(lines) == 2 and lines[1].startswith("tracking: MLflow at http://u:***@127.0.0.1:1 is back after ")
    assert "delivering the 100 values held; 100 metric values were dropped at tracking.buffer_limit" in lines[1]
    assert outbox.close(wait_s=1) == 0


def test_close_delivers_once_the_store_is_back_and_gives_up_after_its_wait():
    store, lines = FakeStore(), []
    store.down.set()
    outbox = Outbox(store.send, limit=1000, where="http://127.0.0.1:1", on_change=lines.append)
    for step in range(1, 11):
        outbox.put("metric", _metric(step))
    threading.Timer(0.3, store.down.clear).start()
    assert outbox.close(wait_s=30) == 0  # the end of the job waits the outage out
    assert [s for _, s in store.metrics] == list(range(1, 11))

    store.down.set()
    outbox = Outbox(store.send, limit=1000, where="http://127.0.0.1:1", on_change=lines.append)
    outbox.put("metric", _metric(1))
    started = time.monotonic()
    assert outbox.close(wait_s=0.3) == 1  # bounded: one value not delivered, and said
    assert time.monotonic() - started < 5
    assert lines[-1].startswith("tracking: gave up on MLflow at http://127.0.0.1:1 after waiting ")
    assert lines[-1].endswith("(tracking.outage_wait_s): 1 values not delivered")


def test_a_refused_batch_is_dropped_not_retried():
    sent: list[int] = []

    def send(metrics, params, tags):
        sent.append(len(metrics))
        if len(sent) == 1:
            raise ServerError("http://127.0.0.1:1", 400, "HTTP 400 Bad Request on /api/2.0/mlflow/runs/log-batch")

    outbox = Outbox(send, limit=100, where="http://127.0.0.1:1")
    outbox.put("metric", _metric(1))
    _wait(lambda: outbox.refused == 1)
    outbox.put("metric", _metric(2))
    outbox.flush()
    assert sent == [1, 1] and outbox.down_since is None


def test_the_driver_console_prints_the_tracking_lines():
    out = io.StringIO()
    Console(out, bar=False).handle({"kind": "tracking", "time": 0.0, "message": "tracking: MLflow is out (...)"})
    assert out.getvalue() == "tracking: MLflow is out (...)\n"


def test_the_run_close_waits_out_an_outage_within_its_bound_and_says_so(monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger=runs.__name__)
    failures = iter([ServerError("http://u:pw@127.0.0.1:1", None, "no connection")] * 3)

    def action():
        err = next(failures, None)
        if err is not None:
            raise err

    assert retry_outage(action, "mark MLflow run r FINISHED", "http://u:pw@127.0.0.1:1", wait_s=10)
    text = caplog.text
    assert "retrying to mark MLflow run r FINISHED for up to 10 s" in text
    assert "MLflow at http://u:***@127.0.0.1:1 is back: done, mark MLflow run r FINISHED" in text
    assert "pw" not in text.replace("***", "")

    def down():
        raise ServerError("http://127.0.0.1:1", 503, "HTTP 503")

    started = time.monotonic()
    assert not retry_outage(down, "mark MLflow run r FINISHED", "http://127.0.0.1:1", wait_s=0.2)
    assert time.monotonic() - started < 2
    assert "gave up after 0 s trying to mark MLflow run r FINISHED" in caplog.text

    def refused():
        raise ServerError("http://127.0.0.1:1", 404, "HTTP 404")

    with pytest.raises(ServerError):  # a refusal is not waited out
        retry_outage(refused, "mark MLflow run r FINISHED", "http://127.0.0.1:1", wait_s=10)


HOLD_SQLITE = """
import sys
from metaformer_platform.config import JobConfig
from metaformer_platform.launch.checks import claim_sqlite_store
claim_sqlite_store(JobConfig.model_validate({"tracking": {"tracking_uri": sys.argv[1]}}))
print("claimed", flush=True)
sys.stdin.read()  # holds the store until the test closes stdin
"""


def test_a_second_job_on_one_sqlite_store_is_refused_before_the_start(tmp_path):
    """Two jobs writing one sqlite MLflow store at once (issue 25, untried fault): the second `jobs/pretrain.py`
    exits 2 before Ray is joined (RAY_ADDRESS names nothing that listens) or its run folder made, naming the
    store and the server to run instead; once the first job's process is gone, the store is free again."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from metaformer_platform.config import JobConfig
    from metaformer_platform.launch import checks

    repo = Path(__file__).resolve().parents[2]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:1", "PYTHONPATH": str(repo / "platform")}
    holder = subprocess.Popen([sys.executable, "-c", HOLD_SQLITE, uri], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=env)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "claimed"
        second = subprocess.run(
            [sys.executable, "jobs/pretrain.py", "model.name=poolformer_debug", f"tracking.tracking_uri={uri}",
             f"run.storage_path={tmp_path / 'runs'}", "run.name=second", f"data.cache_dir={tmp_path / 'cache'}"],
            cwd=repo, env=env, capture_output=True, text=True, timeout=120)
    finally:
        holder.communicate("", timeout=30)
    assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
    err = second.stderr
    assert f"tracking.tracking_uri = {uri} is an sqlite store another job is writing now" in err, err[-2000:]
    assert "mlflow server --backend-store-uri" in err and "infra/local/stack.sh up" in err
    assert not (tmp_path / "runs" / "second").exists() and not (tmp_path / "mlflow.db").exists()
    # the first job's process has exited: its lock went with it, and this process may claim the store
    checks.claim_sqlite_store(JobConfig.model_validate({"tracking": {"tracking_uri": uri}}))
    assert (tmp_path / "mlflow.db.lock").is_file()


def test_mlflows_own_client_gives_up_on_an_outage_in_seconds(monkeypatch, caplog):
    """The calls MLflow's client makes for the platform (system metrics, an evaluation's report, a logged model)
    retry for about four minutes by default; once a process has resolved its tracking URI (every driver) or
    opened rank 0's tracker, a server that is down fails such a call within seconds (3 tries)."""
    import socket

    import mlflow
    from mlflow.exceptions import MlflowException

    for key in runs.CLIENT_RETRIES:
        monkeypatch.delenv(key, raising=False)
    with socket.socket() as probe:  # a port where nothing listens: connection refused, as a stopped server's
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    uri = runs.resolve_tracking_uri(f"http://127.0.0.1:{port}")
    assert {k: os.environ[k] for k in runs.CLIENT_RETRIES} == runs.CLIENT_RETRIES
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="urllib3"), pytest.raises(MlflowException, match="Max retries"):
        mlflow.MlflowClient(uri).log_artifact("0" * 32, __file__)  # an evaluation report's call
    took = time.monotonic() - start
    assert len([r for r in caplog.records if r.getMessage().startswith("Retrying")]) == 2, caplog.text
    assert took < 10.0, took
