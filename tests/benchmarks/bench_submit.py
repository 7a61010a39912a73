"""Benchmark: ``ray job submit`` to the first training step on a warm local cluster (issue 27, item 6).

A Ray head with its dashboard (the Jobs API) on 127.0.0.1 is started once (``ray.cluster_utils.Cluster``, its
processes stopped by PID at the end), and the synthetic data is built once (the cache a warm cluster has).
Then, rounds alternating, this benchmark runs

- ``ray job submit --working-dir . -- python -c pass``: the floor of any job (upload of the working dir, the
  job supervisor actor, the driver process);
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
MARKS = {  # name -> the first output line that marks it
    "accepted": re.compile(r"submitted successfully"),
    "driver": re.compile(r"^\d{4}-\d\d-\d\d .*(INFO|WARNING)|^error:"),  # the driver's logging: imports and config done
    "plan": re.compile(r"worker layout:"),
    "workers": re.compile(r"^training \S+ \("),
    "first step": re.compile(r"^step +1/"),
    "end": re.compile(r"pretrain finished|error:|Job '.*' (succeeded|failed)"),
}


def tiny_job(cache: Path, runs: Path) -> list[str]:
    """The small job: the embedded default shrunk to 2 steps of the debug model."""
    return [
        sys.executable, "jobs/pretrain.py", "model.name=poolformer_debug", "data.synthetic.train_samples=256",
        "data.synthetic.val_samples=64", "data.num_workers=0", "data.val_split=null", f"data.cache_dir={cache}",
        "trainer.max_steps=2", "trainer.log_every_steps=1", "trainer.batch_size=16", "scaling.num_workers=1",
        "scaling.cpus_per_worker=1", f"run.storage_path={runs}", f"run.name=submit-{time.time_ns()}",
        f"tracking.tracking_uri=sqlite:///{runs}/mlflow.db",
    ]


def submit(address: str, tree: Path, entrypoint: list[str]) -> dict[str, float]:
    """Seconds from the submit's start to each of ``MARKS`` (the ones seen), for the job of the source tree
    ``tree`` (its working dir, and its ``platform/`` first on the job's PYTHONPATH)."""
    env = json.dumps({"env_vars": {"PYTHONPATH": str(tree / "platform")}})
    cmd = [RAY, "job", "submit", "--address", address, "--working-dir", str(tree), "--runtime-env-json", env, "--",
           *entrypoint]
    start = time.perf_counter()
    seen: dict[str, float] = {}
    lines: list[str] = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            now = time.perf_counter() - start
            for name, pattern in MARKS.items():
                if name not in seen and pattern.search(line.strip()):
                    seen[name] = now
    seen["exit"] = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{''.join(lines[-40:])}")
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
    from ray.cluster_utils import Cluster

    imports = {name: [import_time(tree) for _ in range(args.rounds)] for name, tree in trees.items()}
    port = devstack.Ports().get()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "include_dashboard": True, "dashboard_host": devstack.HOST, "dashboard_port": port})
    results: dict[str, list[dict[str, float]]] = {"python -c pass": []}
    results.update({f"pretrain {name}": [] for name in trees})
    try:
        with tempfile.TemporaryDirectory(prefix="bench-submit-") as tmp_name:
            tmp = Path(tmp_name)
            address = f"http://{devstack.HOST}:{port}"
            # warm-up: the first job of a cluster starts its job agent, and the tiny job's first run builds its
            # data into the cache (a warm cluster has both)
            submit(address, REPO, tiny_job(tmp / "cache", tmp / "runs"))
            for _ in range(args.rounds):
                results["python -c pass"].append(submit(address, REPO, [sys.executable, "-c", "pass"]))
                for name, tree in trees.items():
                    results[f"pretrain {name}"].append(submit(address, tree, tiny_job(tmp / "cache", tmp / "runs")))
                    print(name, {k: round(v, 2) for k, v in results[f"pretrain {name}"][-1].items()}, flush=True)
    finally:
        cluster.shutdown()
    print(f"\nray job submit -> first step, warm local cluster ({os.cpu_count()} CPUs), median of {args.rounds} rounds "
          "(seconds from the submit's start):")
    for name, times in imports.items():
        print(f"  {name}: import metaformer_platform.launch.cli (fresh interpreter) {statistics.median(times):.2f} s")
    for name, rounds in results.items():
        marks = [m for m in [*MARKS, "exit"] if all(m in r for r in rounds)]
        print(f"  {name:16s} " + "  ".join(f"{m} {statistics.median(r[m] for r in rounds):6.2f}" for m in marks))


if __name__ == "__main__":
    main()
