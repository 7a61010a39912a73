"""Rehearsal (a benchmark, not in the suite): eight ranks on one machine (issue 27, item 3).

A Ray cluster of 8 one-CPU nodes on this machine (``ray.cluster_utils.Cluster``: a head on 127.0.0.1 and
nodes on 127.0.0.2 ... 127.0.0.8, as the suite's two-node cluster), the data on a private SeaweedFS on
127.0.0.1 (synthetic shards made by the platform's builder, fewer shards than ranks), the debug model at
32 px, fp32, one torch thread and no loader process per rank:

1. DDP at 1, 2, 4 and 8 ranks with the same per-rank micro-batch, and FSDP2 at 8: the median step time
   (``system/step_s``) against the bare compute (the same micro-batch through a plain timm loop in this process,
   no Ray, no DDP), and the S3 requests and bytes per sample (counted by a proxy in front of SeaweedFS that
   every node's ``AWS_ENDPOINT_URL`` names).
2. An elastic ``[4, 8]`` job: two nodes' raylets are SIGKILLed (nodes lost without notice) after a
   checkpoint; the job goes on at 6 ranks; two nodes are added back and it grows to 8; then every step was
   taken once at its group's size and every epoch saw every sample exactly once
   (``trainer.sample_log_dir``, the check of tests/integration/test_elastic_job.py).

The machine has 2 cores: 8 ranks share them, so a step at N ranks is at least N/2 times the bare step from
CPU sharing alone; the table shows the ratio and the ratio over that floor. Run it in a loopback-only
network namespace (Ray binds the machine's own address too):

    unshare -n sh -c 'ip link set lo up && exec "$0" "$@"' env PYTHONPATH=platform:infra/local \\
        nice -n 5 python tests/benchmarks/rehearse_8_ranks.py [--ranks 1,2,4,8] [--skip-elastic]
"""

from __future__ import annotations

import argparse
import http.client
import http.server
import os
import secrets
import signal
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "integration")]
import devstack  # noqa: E402
from common import private_s3  # noqa: E402

MICRO_BATCH, IMG, SHARD, SHARDS = 8, 32, 64, 6  # 6 shards of 64 samples: fewer shards than ranks
# The shuffle window is one shard, as ImageNet's 1,000-sample window is about one of its shards: a window larger
# than this small set (the default 1,000) would have every rank read every shard each epoch.
# [4, 8] keeps one global batch at every size from 4 to 8, so it must divide by each: lcm(4..8) = 840, 105 per rank
# at 8 (3 micro-batches of 35: less memory per worker; 8 ranks of 105 were killed by Ray's memory monitor on this
# shared 23 GiB machine), 140 at 6. Its own set: 6 shards of 560 samples, 4 steps per epoch.
ELASTIC_BATCH, ELASTIC_ACCUM, ELASTIC_SHARD = 35, 3, 560
ENV = {  # as tests/conftest.py sets them for the suite
    "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "MLFLOW_DISABLE_TELEMETRY": "true",
    "AWS_EC2_METADATA_DISABLED": "true", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_health_check_period_ms": "1000",
    "RAY_health_check_failure_threshold": "5", "METAFORMER_CHECKPOINT_KEY": secrets.token_hex(32),
}


class CountingProxy(http.server.ThreadingHTTPServer):
    """A pass-through HTTP proxy on 127.0.0.1 that counts the S3 requests and response bytes it forwards. The
    Host header goes through unchanged, so SeaweedFS checks the clients' SigV4 signatures as if called directly."""

    daemon_threads = True

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.removeprefix("http://")
        self.lock = threading.Lock()
        self.requests: dict[str, int] = {}
        self.bytes = 0
        super().__init__((devstack.HOST, 0), _ProxyHandler)

    @property
    def url(self) -> str:
        return f"http://{devstack.HOST}:{self.server_address[1]}"

    def take(self) -> tuple[dict[str, int], int]:
        """The counts since the last call, and reset."""
        with self.lock:
            out, self.requests, self.bytes = (self.requests, self.bytes), {}, 0
        return out


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: CountingProxy

    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
        conn = http.client.HTTPConnection(self.server.upstream, timeout=300)
        conn.request(self.command, self.path, body=body or None, headers=dict(self.headers))
        resp = conn.getresponse()
        self.send_response_only(resp.status, resp.reason)
        for key, value in resp.getheaders():
            self.send_header(key, value)
        self.end_headers()
        sent = 0
        while self.command != "HEAD" and (chunk := resp.read(1 << 16)):
            self.wfile.write(chunk)
            sent += len(chunk)
        conn.close()
        with self.server.lock:
            self.server.requests[self.command] = self.server.requests.get(self.command, 0) + 1
            self.server.bytes += sent

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward

    def log_message(self, *args: Any) -> None:  # quiet
        pass


def _config(tmp: Path, data: str, name: str, *extra: str, shard: int = SHARD) -> Any:
    from metaformer_platform.config import load_config

    return load_config(None, [
        "model.name=poolformer_debug", f"data.source={data}", f"data.img_size={IMG}", "data.auto_augment=null",
        "data.num_workers=0", f"data.shuffle_buffer={shard}", "data.re_prob=0", "data.mixup_alpha=0",
        "data.cutmix_alpha=0", "data.val_split=null",
        f"data.cache_dir={tmp / 'cache'}", "trainer.precision=fp32", "trainer.channels_last=true",
        "trainer.torch_threads=1", "trainer.log_every_steps=1", "optim.warmup_epochs=0",
        "scaling.cpus_per_worker=1", "scaling.use_gpu=false", f"run.storage_path={tmp / 'runs'}", f"run.name={name}",
        f"tracking.tracking_uri=sqlite:///{tmp / 'mlflow.db'}", f"tracking.experiment={name}",
        "tracking.system_metrics=false", *extra,
    ])


def _median_metric(tracking_uri: str, run_id: str, key: str, skip: int = 3) -> float:
    from mlflow import MlflowClient

    values = [m.value for m in sorted(MlflowClient(tracking_uri).get_metric_history(run_id, key), key=lambda m: m.step)]
    return statistics.median(values[skip:] or values)


def overhead(tmp: Path, data: str, proxy: CountingProxy, ranks: list[int], steps: int,
             strategies: list[str]) -> list[dict[str, Any]]:
    """DDP at each rank count (and FSDP2 at the largest): step times and S3 traffic per sample."""
    from metaformer_platform.launch.driver import run_job

    rows = []
    jobs = [("ddp", n) for n in ranks] * ("ddp" in strategies) + [("fsdp", max(ranks))] * ("fsdp" in strategies)
    for strategy, n in jobs:
        name = f"rehearse-{strategy}-{n}"
        cfg = _config(tmp, data, name, f"strategy.name={strategy}", f"scaling.num_workers={n}",
                      f"trainer.batch_size={MICRO_BATCH}", f"trainer.max_steps={steps}",
                      f"trainer.checkpoint_every_steps={steps}", "run.max_failures=2")
        proxy.take()
        start = time.perf_counter()
        result = run_job(cfg)
        wall = time.perf_counter() - start
        requests, nbytes = proxy.take()
        uri = cfg.tracking.tracking_uri
        samples = steps * n * MICRO_BATCH
        rows.append({
            "strategy": strategy, "ranks": n, "wall_s": wall,
            "step_s": _median_metric(uri, result.mlflow_run_id, "system/step_s"),
            "data_s": _median_metric(uri, result.mlflow_run_id, "system/step_data_s"),
            "gets_per_sample": requests.get("GET", 0) / samples, "requests": requests,
            "bytes_per_sample": nbytes / samples,
        })
        print(f"{strategy} at {n} ranks: {rows[-1]}", flush=True)
    return rows


def bare_step(steps: int) -> float:
    """Seconds per step of the same micro-batch through a plain timm loop (one thread, no Ray, no DDP)."""
    from common import bare_loop, make_batches

    batches = make_batches(max(steps, 20), MICRO_BATCH, IMG, seed=0, num_classes=4)
    return bare_loop("poolformer_debug", batches, threads=1, precision="fp32", label_smoothing=0.1)


def _add_nodes(cluster: Any, env: dict[str, str], ips: list[str]) -> None:
    """New nodes at ``ips``, with the environment the cluster's nodes started with (conftest.local_cluster)."""
    import pytest

    with pytest.MonkeyPatch.context() as mp:
        for key, value in {**env, "RAY_ADDRESS": cluster.address}.items():
            mp.setenv(key, value)
        for ip in ips:
            cluster.add_node(num_cpus=1, node_ip_address=ip)


def elastic(tmp: Path, data: str, cluster: Any, env: dict[str, str], steps: int, kill_after: int) -> dict[str, Any]:
    """The [4, 8] job: two nodes SIGKILLed after checkpoint ``kill_after``, added back once it runs at 6."""
    import ray
    from test_elastic_job import (
        Job,
        _effective_steps,
        _raylet_pid,
        _records,
        _refresh_coordinator,
        _world_sizes_seen,
    )

    from metaformer_platform.storage import checkpoint_format as fmt

    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "5"  # a restart counting dead nodes: take fewer
    name, keys = "rehearse-elastic", tmp / "keys"
    cfg = _config(tmp, data, name, "strategy.name=ddp", "scaling.num_workers=[4, 8]",
                  "scaling.elastic_resize_interval_s=1", f"trainer.batch_size={ELASTIC_BATCH}", f"trainer.grad_accum_steps={ELASTIC_ACCUM}",
                  f"trainer.max_steps={steps}", "trainer.checkpoint_every_steps=2", f"trainer.sample_log_dir={keys}",
                  "run.num_to_keep=2", "run.max_failures=5", shard=ELASTIC_SHARD)
    lost = ["127.0.0.7", "127.0.0.8"]
    job, started, times = Job(cfg), time.monotonic(), {}

    def wait(what: str, ready: Any) -> None:
        while not ready():
            if not job.is_alive():
                raise AssertionError(f"the job ended while waiting for {what}: {job.error!r}")
            assert time.monotonic() - started < 1800, f"timed out waiting for {what}"
            time.sleep(0.1)
        times[what] = round(time.monotonic() - started, 1)
        print(f"elastic: {what} at {times[what]} s", flush=True)

    def alive() -> int:
        return sum(n["Alive"] for n in ray.nodes())

    job.start()
    try:
        target = tmp / "runs" / name / f"checkpoint-{kill_after:08d}"
        wait(f"checkpoint {kill_after} of 8 ranks", lambda: target.is_dir() and fmt.is_complete(target))
        for ip in lost:
            os.kill(_raylet_pid(ip), signal.SIGKILL)
        wait("two nodes dead", lambda: alive() == 6)
        _refresh_coordinator()
        wait("6 ranks", lambda: 6 in _world_sizes_seen(keys))
        _add_nodes(cluster, env, lost)
        wait("two nodes back", lambda: alive() == 8)
        _refresh_coordinator()
        wait("8 ranks again", lambda: _world_sizes_seen(keys)[-1] == 8 and 6 in _world_sizes_seen(keys))
    finally:
        job.join(1800)
    if job.error is not None:
        raise job.error
    wall = time.monotonic() - started
    # the accounting of test_elastic_job: each step once, at its group's size; each epoch every sample once
    global_batch, samples = 8 * ELASTIC_BATCH * ELASTIC_ACCUM, SHARDS * ELASTIC_SHARD
    effective = _effective_steps(_records(keys))
    assert sorted(effective) == list(range(1, steps + 1)), "steps missing or extra"
    sizes = []
    for step in sorted(effective):
        rows = effective[step]
        assert sum(len(r["keys"]) for r in rows) == global_batch, (step, rows)
        assert sorted(r["rank"] for r in rows) == list(range(len(rows))), (step, [r["rank"] for r in rows])
        sizes.append(len(rows))
    per_epoch = samples // global_batch
    for epoch in range(steps // per_epoch):
        seen = [k for s in range(epoch * per_epoch + 1, (epoch + 1) * per_epoch + 1) for r in effective[s] for k in r["keys"]]
        assert len(seen) == len(set(seen)) == samples, f"epoch {epoch}: {len(seen)} keys, {len(set(seen))} distinct"
    runs = [(size, sum(1 for _ in group)) for size, group in __import__("itertools").groupby(sizes)]
    return {"times": times, "wall_s": wall, "epochs_checked": steps // per_epoch, "samples_per_epoch": samples,
            "world_sizes_by_step": runs, "step": job.result.metrics.get("step")}


def _print(bare: float, rows: list[dict[str, Any]], elastic_result: dict[str, Any] | None) -> None:
    print(f"\neight ranks on one machine ({os.cpu_count()} CPUs): poolformer_debug {IMG} px, micro-batch {MICRO_BATCH} "
          f"per rank, fp32, 1 thread per rank; {SHARDS} shards of {SHARD} on SeaweedFS")
    print(f"bare compute (timm loop, 1 thread, no Ray/DDP): {bare * 1e3:.1f} ms/step")
    print(f"  {'strategy':8s} {'ranks':>5s} {'step ms':>8s} {'x bare':>7s} {'x (bare*max(1,N/2))':>20s} {'data ms':>8s} "
          f"{'GET/sample':>10s} {'bytes/sample':>12s} {'job wall s':>10s}")
    for r in rows:
        floor = bare * max(1.0, r["ranks"] / (os.cpu_count() or 1))
        print(f"  {r['strategy']:8s} {r['ranks']:5d} {r['step_s'] * 1e3:8.1f} {r['step_s'] / bare:7.2f} "
              f"{r['step_s'] / floor:20.2f} {r['data_s'] * 1e3:8.1f} {r['gets_per_sample']:10.3f} "
              f"{r['bytes_per_sample']:12.0f} {r['wall_s']:10.1f}")
    if elastic_result:
        print(f"elastic [4, 8], 8 -> 6 -> 8: {elastic_result}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", default="1,2,4,8")
    parser.add_argument("--steps", type=int, default=12, help="steps of each overhead job")
    parser.add_argument("--strategies", default="ddp,fsdp", help="ddp: at each of --ranks; fsdp: at the largest")
    parser.add_argument("--elastic-steps", type=int, default=60)
    parser.add_argument("--kill-after", type=int, default=6)
    parser.add_argument("--skip-elastic", action="store_true")
    parser.add_argument("--skip-overhead", action="store_true")
    args = parser.parse_args()
    os.environ.update(ENV)
    for name in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
        os.environ.pop(name, None)
    import boto3
    import ray
    from conftest import local_cluster

    from metaformer_platform.data.build.synthetic import ensure_synthetic_shards

    bare = bare_step(args.steps)
    print(f"bare compute: {bare * 1e3:.1f} ms/step", flush=True)
    rows, elastic_result = [], None
    with private_s3("rehearse-", bucket="data") as s3:
        tmp = s3.tmp
        proxy = CountingProxy(s3.url)
        threading.Thread(target=proxy.serve_forever, daemon=True).start()
        cluster = None
        try:
            client = boto3.client("s3")
            for name, shard in (("set", SHARD), ("elastic", ELASTIC_SHARD)):
                shards = ensure_synthetic_shards(tmp / name, num_classes=4, train_samples=SHARDS * shard,
                                                 val_samples=shard, image_size=IMG, samples_per_shard=shard)
                for path in sorted(p for p in shards.iterdir() if p.is_file()):
                    client.upload_file(str(path), "data", f"{name}/{path.name}")
            # every process of the job (driver and nodes) reads S3 through the counting proxy
            env = devstack.s3_env(proxy.url, s3.key, s3.secret)
            os.environ.update(env)
            cluster = local_cluster(env, tuple(f"127.0.0.{i}" for i in range(2, 9)))
            cluster.wait_for_nodes()
            ray.init(address=cluster.address, log_to_driver=False)
            if not args.skip_overhead:
                rows = overhead(tmp, "s3://data/set", proxy, [int(n) for n in args.ranks.split(",")], args.steps,
                                args.strategies.split(","))
            if not args.skip_elastic:
                elastic_result = elastic(tmp, "s3://data/elastic", cluster, env, args.elastic_steps, args.kill_after)
        finally:
            ray.shutdown()
            if cluster is not None:
                cluster.shutdown()
            proxy.shutdown()
    _print(bare, rows, elastic_result)


if __name__ == "__main__":
    main()
