"""An elastic job (``scaling.num_workers: [1, 2]``) on the session's two-node cluster has its rank 0 SIGKILLed
(Ray Train restarts the group from the newest checkpoint), loses its second node mid-epoch, goes on with one
worker, grows back to two when the node returns, and finishes. Its run ledger accounts for all of it.

The second node's raylet is SIGKILLed by its PID (a node lost without notice). Ray Train restarts the group
with the one worker the cluster still holds, from the newest complete checkpoint; the test then starts a new
node with the same address and resources, and Ray's elastic policy grows the group back to two workers at
its next resize check (``scaling.elastic_resize_interval_s``), again from the newest checkpoint.

Ray's autoscaling coordinator refreshes its view of the nodes every 20 s; the test asks it for a fresh view as
soon as the node is dead or back, so the test waits for Ray's decisions, not for that timer.

``trainer.sample_log_dir`` makes every rank write the keys of each optimizer step: the steps a killed attempt
took after its last checkpoint are replayed by the next attempt (whose records win), and then every epoch,
the interrupted ones included, holds each training sample exactly once. The re-added node stays as the
session's second node (same IP, one CPU) for the tests after this one.

The run ledger (``ledger.json`` in the run folder, the ``system/ledger_*`` metrics in MLflow, the ``done:`` line): four
worker groups (start, the restart after the SIGKILL, the one-worker restart, the resize), the steps each one's
successor trained again (as the sample logs show them) at most a checkpoint interval, their time as lost work,
two recovery gaps and a resize gap, and categories that add up to the wall time the test measured within 2%.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
from mlflow import MlflowClient

from metaformer_platform.config import load_config
from metaformer_platform.launch.driver import run_job
from metaformer_platform.storage import checkpoint_format as fmt
from metaformer_platform.tracking.console import format_duration

CONFIGS = Path(__file__).resolve().parents[2] / "jobs" / "configs"
SECOND_NODE_IP = "127.0.0.2"  # as the session's ray_cluster fixture starts it
# 8 steps per epoch, 32 epochs: the job must still have steps left when Ray has noticed the dead node (seconds),
# restarted with one worker and grown back. Its checkpoints no longer wait ~1 s each for MLflow, so the steps
# alone give that runway (measured: 128 steps ended before the regrow on an idle machine).
SAMPLES, GLOBAL_BATCH, MAX_STEPS = 256, 32, 256
KILL_AFTER = 12  # the kill follows checkpoint 12: mid-epoch (epoch 2 is steps 9-16)
SIGKILL_AT = 6  # rank 0 is SIGKILLed once checkpoint 4 is complete and it has taken step 6: mid-interval
CHECKPOINT_EVERY = 4


def _config(tmp: Path, mlflow_uri: str, name: str):
    return load_config(CONFIGS / "default.yaml", [
        "model.name=poolformer_debug", "data.img_size=32", "data.auto_augment=null", "data.num_workers=0",
        "data.synthetic.num_classes=4", f"data.synthetic.train_samples={SAMPLES}", "data.synthetic.val_samples=32",
        "data.synthetic.samples_per_shard=32", f"data.cache_dir={tmp / 'cache'}", "data.val_split=null",
        "trainer.batch_size=16", f"trainer.max_steps={MAX_STEPS}", "trainer.log_every_steps=1",
        f"trainer.checkpoint_every_steps={CHECKPOINT_EVERY}", "trainer.precision=fp32", "trainer.torch_threads=1",
        f"trainer.sample_log_dir={tmp / 'keys'}", "optim.warmup_epochs=0",
        "scaling.num_workers=[1, 2]", "scaling.cpus_per_worker=1", "scaling.use_gpu=false",
        "scaling.elastic_resize_interval_s=1",
        f"run.storage_path={tmp / 'runs'}", f"run.name={name}", "run.num_to_keep=2", "run.max_failures=3",
        f"tracking.tracking_uri={mlflow_uri}", f"tracking.experiment={name}", "tracking.system_metrics=false",
    ])


def _records(folder: Path) -> list[dict]:
    """Every step record of every attempt; ``attempt`` is the file's start time (files of one attempt's ranks
    start within a second of each other, attempts many seconds apart)."""
    out = []
    for path in sorted(folder.glob("keys-rank*.jsonl")):
        started = int(path.stem.rpartition("-")[2])
        for line in path.read_text().splitlines():
            out.append({**json.loads(line), "started": started})
    return out


def _effective_steps(records: list[dict]) -> dict[int, list[dict]]:
    """Per step, the records of the last attempt that took it (a killed attempt's steps after its last
    checkpoint were taken again by the next one)."""
    by_step: dict[int, list[dict]] = {}
    for record in records:
        by_step.setdefault(record["step"], []).append(record)
    effective = {}
    for step, rows in by_step.items():
        last = max(r["started"] for r in rows)
        effective[step] = [r for r in rows if last - r["started"] < 3e9]  # the ranks of that attempt
    return effective


def _world_sizes_seen(folder: Path) -> list[int]:
    return [r["world_size"] for r in sorted(_records(folder), key=lambda r: r["started"])]


def _raylet_pid(ip: str) -> int:
    """The PID of this session's raylet at ``ip``, matched by its socket path (unique to this cluster's session
    folder): other Ray clusters on the machine may have a node at the same address."""
    import ray

    [node] = [n for n in ray.nodes() if n["Alive"] and n["NodeManagerAddress"] == ip]
    flag = f"--raylet_socket_name={node['RayletSocketName']}"
    pids = [p.pid for p in psutil.process_iter(["name", "cmdline"])
            if p.info["name"] == "raylet" and flag in (p.info["cmdline"] or [])]
    assert len(pids) == 1, f"{len(pids)} raylets with {flag}"
    # the session fixture started it from this process: never touch another cluster's
    assert psutil.Process(pids[0]).ppid() == os.getpid(), f"raylet {pids[0]} was not started by this test session"
    return pids[0]


def _refresh_coordinator() -> None:
    """Ask Ray's autoscaling coordinator (which the elastic policy asks how many workers fit) to look at the
    nodes now instead of at its next 20 s tick."""
    import ray
    from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
        get_or_create_autoscaling_coordinator,
    )

    ray.get(get_or_create_autoscaling_coordinator().get_reserved_resources.remote("test-elastic", recompute=True))


def _add_node(env: dict[str, str]):
    """A new Ray node like the session's second one (``ray.cluster_utils.Cluster.add_node``'s settings, ``env``:
    conftest.ray_node_env), its processes stopped at exit."""
    import ray
    from ray._private.node import Node
    from ray._private.parameter import RayParams

    params = RayParams(
        num_cpus=1, num_gpus=0, object_store_memory=150 * 1024 * 1024, min_worker_port=0, max_worker_port=0,
        node_ip_address=SECOND_NODE_IP, gcs_address=ray.get_runtime_context().gcs_address,
        include_log_monitor=False, node_manager_port=0,
    )
    params.dashboard_agent_listen_port = None
    with pytest.MonkeyPatch.context() as mp:  # the node's environment, as the fixture's nodes have it
        for key, value in env.items():
            mp.setenv(key, value)
        # and, as they have, RAY_ADDRESS naming this cluster (conftest.local_cluster: Ray Train's cleaner would
        # otherwise look up a stale cluster and hold every job's shutdown for 12 s)
        mp.setenv("RAY_ADDRESS", params.gcs_address)
        return Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)


class Job(threading.Thread):
    """``run_job`` in the background: the test's own thread must start the new node (Ray's ``Node`` installs
    signal handlers, and its processes share the fate of the thread that starts them)."""

    def __init__(self, cfg) -> None:
        super().__init__(daemon=True)
        self.cfg, self.result, self.error = cfg, None, None

    def run(self) -> None:
        try:
            self.result = run_job(self.cfg)
        except BaseException as err:  # re-raised by the test
            self.error = err


def _redone_by_attempt(folder: Path) -> list[tuple[int, int]]:
    """Per attempt but the last (in order): the step the next attempt resumed from, and how many of this one's
    steps it took again (rank 0's records)."""
    attempts: dict[int, list[int]] = {}
    for record in _records(folder):
        if record["rank"] == 0:
            attempts.setdefault(record["started"], []).append(record["step"])
    spans = [(min(steps), max(steps)) for _, steps in sorted(attempts.items())]
    return [(first - 1, reached - (first - 1)) for (_, reached), (first, _) in zip(spans, spans[1:], strict=False)]


def test_an_elastic_job_shrinks_when_a_node_dies_grows_back_and_sees_every_sample_once(
    ray_cluster, mlflow_server, ray_node_env, train_worker_pids, tmp_path, monkeypatch, capsys
):
    import ray

    # A restart that still counts the dead node waits this long for its second worker, then takes one.
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "5")
    name = "it-elastic"
    keys, run_dir = tmp_path / "keys", tmp_path / "runs" / name
    job = Job(_config(tmp_path, mlflow_server, name))
    started = time.monotonic()
    times: dict[str, float] = {}

    def wait(what: str, ready, each=lambda: None) -> None:
        while each() or not ready():
            if not job.is_alive():
                raise AssertionError(f"the job ended while the test waited for {what}: {job.error!r}")
            # generous: on a busy shared machine Ray takes minutes to start actors
            assert time.monotonic() - started < 600, f"timed out waiting for {what}"
            time.sleep(0.05)
        times[what] = round(time.monotonic() - started, 1)

    job.start()
    try:
        since = time.time()
        first = run_dir / f"checkpoint-{CHECKPOINT_EVERY:08d}"
        wait(f"checkpoint {CHECKPOINT_EVERY} and step {SIGKILL_AT}", lambda: first.is_dir() and fmt.is_complete(first)
             and any(r["step"] >= SIGKILL_AT and r["rank"] == 0 for r in _records(keys)))
        os.kill(train_worker_pids(since)[0], signal.SIGKILL)  # rank 0, on this node
        wait("the restart", lambda: len({r["started"] for r in _records(keys) if r["rank"] == 0}) == 2)
        target = run_dir / f"checkpoint-{KILL_AFTER:08d}"
        wait("checkpoint 12 of two workers", lambda: target.is_dir() and fmt.is_complete(target))
        os.kill(_raylet_pid(SECOND_NODE_IP), signal.SIGKILL)
        # The lost node's worker runs on until Ray notices its raylet is gone (seconds): until the one-worker
        # group has taken a step, every complete checkpoint is the two-worker group's.
        complete_by_two: set[int] = set()

        def note_checkpoints() -> None:
            for folder in run_dir.glob("checkpoint-*"):
                with contextlib.suppress(OSError):  # a partial folder deleted by the recovery meanwhile
                    if fmt.is_complete(folder):
                        complete_by_two.add(int(folder.name.removeprefix("checkpoint-")))

        wait("the node's death", lambda: sum(n["Alive"] for n in ray.nodes()) == 1, note_checkpoints)
        _refresh_coordinator()
        wait("one worker", lambda: 1 in _world_sizes_seen(keys), note_checkpoints)
        _add_node(ray_node_env)
        wait("the node's return", lambda: sum(n["Alive"] for n in ray.nodes()) == 2)
        _refresh_coordinator()
        wait("two workers again", lambda: _world_sizes_seen(keys)[-1] == 2)
    finally:
        job.join(600)
    wall = time.monotonic() - started
    print(f"elastic timeline (s from the job's start): {times}, finished at {time.monotonic() - started:.1f}")
    assert not job.is_alive(), "the job did not finish"
    if job.error is not None:
        raise job.error
    result = job.result
    assert result.metrics["step"] == MAX_STEPS
    # MLflow: one run, every step logged once, the resizes recorded where they happened
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name(name)
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [result.mlflow_run_id] and runs[0].info.status == "FINISHED"
    losses = client.get_metric_history(result.mlflow_run_id, "train/loss")
    assert sorted(m.step for m in losses) == list(range(1, MAX_STEPS + 1))
    resizes = json.loads(runs[0].data.tags["metaformer.elastic.resizes"])
    assert [(r["from"], r["to"]) for r in resizes] == [(2, 1), (1, 2)]
    shrink, grow = resizes[0]["step"], resizes[1]["step"]
    assert shrink == max(complete_by_two) >= KILL_AFTER  # the newest complete checkpoint of the lost group
    assert shrink < grow < MAX_STEPS
    sizes = sorted((m.step, m.value) for m in client.get_metric_history(result.mlflow_run_id, "elastic/world_size"))
    assert sizes == [(0, 2.0), (shrink, 1.0), (grow, 2.0)]

    # The data: each step taken once at the world size of its group, and every epoch is the split, each once
    steps = _effective_steps(_records(keys))
    assert sorted(steps) == list(range(1, MAX_STEPS + 1))
    for step, rows in steps.items():
        size = 1 if shrink < step <= grow else 2
        assert sorted(r["rank"] for r in rows) == list(range(size)), (step, rows)
        assert sum(len(r["keys"]) for r in rows) == GLOBAL_BATCH
    steps_per_epoch = SAMPLES // GLOBAL_BATCH
    for epoch in range(MAX_STEPS // steps_per_epoch):
        seen = [k for s in range(epoch * steps_per_epoch + 1, (epoch + 1) * steps_per_epoch + 1)
                for r in steps[s] for k in r["keys"]]
        assert len(seen) == len(set(seen)) == SAMPLES, f"epoch {epoch}: {len(seen)} keys, {len(set(seen))} distinct"
    _check_ledger(run_dir, keys, wall, client, result.mlflow_run_id, capsys.readouterr().out)


def _check_ledger(run_dir: Path, keys: Path, wall: float, client: MlflowClient, run_id: str, out: str) -> None:
    """The run ledger of the job above: its groups, lost work, gaps and sums, in the file, MLflow and the console."""
    from metaformer_platform.training import ledger as lg

    stored = json.loads((run_dir / lg.ARTIFACT).read_text())
    [attempt], summary = stored["attempts"], stored["summary"]
    m = summary["metrics"]
    stepped = [g for g in attempt["groups"] if g["progress"] is not None]
    assert [(g["cause"], g["workers"]) for g in stepped] == [("start", 2), ("recovery", 2), ("recovery", 1),
                                                             ("resize", 2)]
    steps = [i for i in summary["intervals"] if i["category"] == "steps"]
    redone = [i["steps_redone"] for i in steps]
    # the ledger knows a step once its progress event has left rank 0, which follows the step's sample record
    resumed_and_redone = _redone_by_attempt(keys)
    assert len(resumed_and_redone) == 3 and redone[-1] == 0
    for (resumed, expected), got in zip(resumed_and_redone, redone, strict=False):
        assert resumed % CHECKPOINT_EVERY == 0  # each restart resumed from a checkpoint: the rest was redone
        assert expected - 1 <= got <= expected, (resumed_and_redone, redone)
    assert sum(expected for _, expected in resumed_and_redone) > 0
    for i in steps:  # lost work = steps redone x that group's step time
        per_step = (i["train_s"] + i["lost_work_s"]) / (i["to_step"] - i["from_step"])
        assert i["lost_work_s"] == pytest.approx(i["steps_redone"] * per_step, abs=0.01)
    assert m[lg.LOST_WORK] == pytest.approx(sum(i["lost_work_s"] for i in steps), abs=0.01) and m[lg.LOST_WORK] > 0
    gaps = [(i["category"], i["workers"]) for i in summary["intervals"] if i["category"].endswith("_gap")]
    assert gaps == [("recovery_gap", 2), ("recovery_gap", 1), ("resize_gap", 2)]
    assert m[lg.RECOVERY_GAP] > 0 and m[lg.RESIZE_GAP] > 0
    assert sum(m[c] for c in lg.CATEGORIES) == pytest.approx(m[lg.WALL], rel=0.02)
    assert m[lg.WALL] == pytest.approx(wall, rel=0.02)  # the driver's start to its end, as the test measured it
    assert 0 < m[lg.GOODPUT] < 1 and m[lg.WORKER_HOURS] > 0 and lg.COST not in m
    logged = client.get_run(run_id).data.metrics
    assert {k: round(v, 6) for k, v in logged.items() if k.startswith("system/ledger_")} == {
        k: round(v, 6) for k, v in m.items()}
    [done] = [line for line in out.splitlines() if line.startswith(f"done: {MAX_STEPS} steps in ")]
    print(done)
    # the line is printed a moment before the ledger is stored: its wall is that much shorter
    goodput = re.search(r"\| goodput (\d+)% \|", done)
    assert goodput is not None and abs(int(goodput[1]) - 100 * m[lg.GOODPUT]) <= 1, done
    assert f"| {m[lg.WORKER_HOURS]:.3g} worker-hours" in done
    assert (f"(+{format_duration(m[lg.QUEUED])} queued)" in done) == (m[lg.QUEUED] >= 1), done
