"""Benchmark: ``ray job submit`` to the first training step on a warm local cluster (issue 27, item 6).

A Ray head with its dashboard (the Jobs API) on 127.0.0.1 is started once (``ray.cluster_utils.Cluster``, its
processes stopped by PID at the end), and the synthetic data is built once (the cache a warm cluster has).
Then, rounds alternating, this benchmark runs

- ``ray job submit --working-dir . -- python -c pass``: the floor of any job (upload of the working dir, the
  job supervisor actor, the driver process);
- the same with a bare ``TorchTrainer`` of one worker that only prints its first step: Ray Train's own floor
  (its controller and worker processes, torch's process group), under everything the small job adds;
- ``ray job submit --working-dir . -- python jobs/pretrain.py`` with a tiny config (the debug model, 32 px,
  2 steps, one worker);

and timestamps each line the submit prints to find: the job accepted, the driver's first line (its imports and
the config done), the plan (``worker layout``), the worker group started and built (rank 0's ``training ...``
line), and the first step (``step 1/``). Also: the driver's import time alone, in a fresh process.

    unshare -n sh -c 'ip link set lo up && exec "$0" "$@"' env PYTHONPATH=platform:infra/local \\
        nice -n 5 python tests/benchmarks/bench_submit.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
import devstack  # noqa: E402

RAY = str(Path(sys.executable).parent / "ray")
MARKS = {  # name -> the first line of the job driver's log that marks it
    "driver": re.compile(r"^Running entrypoint"),  # the job supervisor starts the driver process
    "config": re.compile(r"INFO metaformer_platform|^error:"),  # its imports and the config done
    "plan": re.compile(r"worker layout:"),
    "fit": re.compile(r"starting \d+ Ray Train worker"),  # Ray joined, run claimed, MLflow run open
    "workers": re.compile(r"^training \S+ \("),  # the worker group started, the Trainer built
    "first step": re.compile(r"^step +1/"),
}
FLOOR_STEP = re.compile(r"^first step at ([\d.]+)")  # the floor's: its worker's clock, printed by its driver

# Ray Train's own floor on this cluster: a TorchTrainer of one worker whose training function only prints its
# first step. Everything the small job adds (our driver's checks, MLflow, the model and data) comes on top.
TRAIN_FLOOR = """
import tempfile, time
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
with tempfile.TemporaryDirectory() as runs:
    result = TorchTrainer(lambda: time.time(), scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                          run_config=RunConfig(storage_path=runs, name="floor")).fit()
print("first step at", result.return_value, flush=True)  # a worker's stdout does not reach the job's log
"""


def tiny_job(cache: Path, runs: Path) -> list[str]:
    """The small job: the embedded default shrunk to 2 steps of the debug model."""
    return [
        sys.executable, "jobs/pretrain.py", "model.name=poolformer_debug", "data.synthetic.train_samples=256",
        "data.synthetic.val_samples=64", "data.num_workers=0", "data.val_split=null", f"data.cache_dir={cache}",
        "trainer.max_steps=2", "trainer.log_every_steps=1", "trainer.batch_size=16", "scaling.num_workers=1",
        "scaling.cpus_per_worker=1", f"run.storage_path={runs}", f"run.name=submit-{time.time_ns()}",
        f"tracking.tracking_uri=sqlite:///{runs}/mlflow.db",
    ]


def submit(address: str, logs: Path, tree: Path, entrypoint: list[str]) -> dict[str, float]:
    """Seconds from the submit's start to each of ``MARKS`` (the ones seen), for the job of the source tree
    ``tree`` (its working dir, and its ``platform/`` first on the job's PYTHONPATH). The driver's log file (in
    ``logs``) is polled as it grows: the submit's own log tail arrives in batches."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    sid = f"bench-{time.time_ns()}"
    env = json.dumps({"env_vars": {"PYTHONPATH": str(tree / "platform")}})
    cmd = [RAY, "job", "submit", "--address", address, "--working-dir", str(tree), "--runtime-env-json", env,
           "--submission-id", sid, "--no-wait", "--", *entrypoint]
    start, wall = time.perf_counter(), time.time()
    subprocess.run(cmd, check=True, capture_output=True, cwd=REPO)
    seen = {"accepted": time.perf_counter() - start}
    client, log, done = JobSubmissionClient(address), logs / f"job-driver-{sid}.log", 0
    while True:
        status = client.get_job_status(sid)
        text = log.read_text(errors="replace") if log.is_file() else ""
        now = time.perf_counter() - start
        for line in text[done:].splitlines():
            for name, pattern in MARKS.items():
                if name not in seen and pattern.search(line.strip()):
                    seen[name] = now
            if floor := FLOOR_STEP.search(line.strip()):
                seen["first step"] = float(floor.group(1)) - wall
        done = len(text) - len(text.rpartition("\n")[2])  # a line still being written: read again
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        time.sleep(0.05)
    seen["end"] = time.perf_counter() - start
    if status != JobStatus.SUCCEEDED:
        raise RuntimeError(f"job {sid} {status}:\n{text[-4000:]}")
    return seen


def import_time(tree: Path) -> float:
    """Seconds to import what jobs/pretrain.py imports before it parses its config, in a fresh interpreter."""
    code = "import time; t = time.perf_counter(); import metaformer_platform.launch.cli; print(time.perf_counter() - t)"
    env = {**os.environ, "PYTHONPATH": str(tree / "platform")}
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                env=env).stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tree", action="append", default=[], metavar="NAME=DIR",
                        help="a source tree to compare (e.g. main=/path/to/an/export/of/main); default: this one")
    args = parser.parse_args()
    trees = {name: Path(d) for name, _, d in (t.partition("=") for t in args.tree)} or {"this": REPO}
    for key, value in {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
                       "MLFLOW_DISABLE_TELEMETRY": "true"}.items():
        os.environ[key] = value
    os.environ.pop("RAY_ADDRESS", None)
    from ray._private import utils as ray_utils
    from ray.cluster_utils import Cluster

    imports = {name: [import_time(tree) for _ in range(args.rounds)] for name, tree in trees.items()}
    ports = devstack.Ports()
    port, gcs_port = ports.get(), ports.get()
    # Ray's job supervisor gives each job driver the address in <temp_dir>/ray_current_cluster (it overrides
    # RAY_ADDRESS with "auto"), which on a host shared with other clusters is whichever started last: a temp
    # dir of this cluster's own (short: Ray's socket paths live there).
    temp_dir = tempfile.mkdtemp(prefix="rs-", dir="/tmp")
    os.environ["RAY_ADDRESS"] = f"{devstack.HOST}:{gcs_port}"
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "include_dashboard": True, "dashboard_host": devstack.HOST, "dashboard_port": port,
        "gcs_server_port": gcs_port, "temp_dir": temp_dir})
    # what `ray start` writes there (Cluster does not; without it "auto" takes any GCS found on the host)
    ray_utils.write_ray_address(cluster.address, temp_dir)
    results: dict[str, list[dict[str, float]]] = {"python -c pass": [], "Ray Train floor": []}
    results.update({f"pretrain {name}": [] for name in trees})
    try:
        with tempfile.TemporaryDirectory(prefix="bench-submit-") as tmp_name:
            tmp = Path(tmp_name)
            address = f"http://{devstack.HOST}:{port}"
            logs = Path(cluster.head_node.get_session_dir_path()) / "logs"
            # warm-up: the first job of a cluster starts its job agent, and the tiny job's first run builds its
            # data into the cache (a warm cluster has both)
            submit(address, logs, REPO, tiny_job(tmp / "cache", tmp / "runs"))
            for _ in range(args.rounds):
                results["python -c pass"].append(submit(address, logs, REPO, [sys.executable, "-c", "pass"]))
                results["Ray Train floor"].append(submit(address, logs, REPO, [sys.executable, "-c", TRAIN_FLOOR]))
                for name, tree in trees.items():
                    results[f"pretrain {name}"].append(submit(address, logs, tree, tiny_job(tmp / "cache", tmp / "runs")))
                    print(name, {k: round(v, 2) for k, v in results[f"pretrain {name}"][-1].items()}, flush=True)
    finally:
        cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
    print(f"\nray job submit -> first step, warm local cluster ({os.cpu_count()} CPUs), median of {args.rounds} rounds "
          "(seconds from the submit's start):")
    for name, times in imports.items():
        print(f"  {name}: import metaformer_platform.launch.cli (fresh interpreter) {statistics.median(times):.2f} s")
    for name, rounds in results.items():
        marks = [m for m in ["accepted", *MARKS, "end"] if all(m in r for r in rounds)]
        print(f"  {name:16s} " + "  ".join(f"{m} {statistics.median(r[m] for r in rounds):6.2f}" for m in marks))


if __name__ == "__main__":
    main()
