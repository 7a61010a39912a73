"""Benchmark: the suite's per-job fixed cost, the small job on the suite's own kind of cluster, per node setting.

The critical path of ``make test`` is the "ray-cluster" group: about 25 short jobs run one after another by
``run_job`` inside the pytest process, on a cluster of two 1-CPU nodes (``tests/integration/conftest.py``:
``local_cluster``, ``SmallJob``). The driver's imports are paid once there; what every job pays again is Ray's
side: its actors' processes (the console queue, the stop flag, the Train controller, the synchronization actor,
the two workers), their imports, and the shutdown. This benchmark starts that cluster once per setting (a set
of environment variables for the nodes' raylets, on top of the suite's own ``node_env`` minus its S3 server),
runs the small job (DDP, 2 workers, 30 steps, MLflow on a local sqlite file) ``--jobs`` times after one
warm-up job, and alternates the settings round after round:

    unshare -n sh -c 'ip link set lo up && exec "$0" "$@"' env PYTHONPATH=platform:infra/local \\
        nice -n 5 python tests/benchmarks/bench_suite_job.py [--rounds 2] [--jobs 3] \\
        'suite:' 'parallel-starts:RAY_worker_maximum_startup_concurrency=8'

A setting is ``NAME:KEY=VALUE;KEY=VALUE`` (empty: the suite's own node environment). On a shared machine the
minimum of the warm jobs is the figure least disturbed by others' load.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def _load(name: str, path: Path) -> ModuleType:
    """The tests' conftest modules (both named conftest) under names of their own; the top one sets the suite's
    environment (no telemetry, Ray Train's poll interval, ...) on import, as under pytest."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=3, help="warm jobs per cluster, after one warm-up job")
    parser.add_argument("settings", nargs="+", metavar="NAME:KEY=VALUE;...")
    args = parser.parse_args()
    settings = {name: dict(kv.split("=", 1) for kv in env.split(";") if kv)
                for name, _, env in (s.partition(":") for s in args.settings)}
    sys.path[:0] = [str(HERE.parent / "integration")]
    _load("suite_conftest", HERE.parent / "conftest.py")
    itc = _load("integration_conftest", HERE.parent / "integration" / "conftest.py")
    import ray

    base_env = {key: value for key, value in itc.node_env(itc.S3Server("", "", "", "")).items()
                if not key.startswith("AWS_")}
    times: dict[str, list[float]] = {name: [] for name in settings}
    with tempfile.TemporaryDirectory(prefix="bench-suite-job-") as tmp:
        for r in range(args.rounds):
            for name, env in settings.items():
                cluster = itc.local_cluster({**base_env, **env})
                try:
                    cluster.wait_for_nodes()
                    ray.init(address=cluster.address, log_to_driver=False)
                    job = itc.SmallJob(Path(tmp) / f"{name}-{r}", f"sqlite:///{tmp}/{name}-{r}.db")
                    for j in range(args.jobs + 1):
                        start = time.perf_counter()
                        job.run(f"job-{j}", "strategy.name=ddp")
                        if j:  # the first job of a cluster also starts its pools: a warm-up
                            times[name].append(time.perf_counter() - start)
                    print(name, f"round {r}:", [round(t, 1) for t in times[name][-args.jobs:]], flush=True)
                finally:
                    ray.shutdown()
                    cluster.shutdown()
    print(f"\nthe small job on the suite's cluster (2 x 1-CPU nodes), {args.rounds} rounds x {args.jobs} warm jobs:")
    for name, ts in times.items():
        print(f"  {name:12s} min {min(ts):6.2f} s  median {statistics.median(ts):6.2f} s  ({settings[name] or 'suite'})")


if __name__ == "__main__":
    main()
