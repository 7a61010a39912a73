"""jobs/pretrain.py (and jobs/evaluate.py) as a user runs it: --help lists the keys; bad input exits non-zero with
the fix, before Ray."""

from __future__ import annotations

import base64
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import ClassVar

import pytest

ROOT = Path(__file__).resolve().parents[2]
PRETRAIN = ROOT / "jobs" / "pretrain.py"
EVALUATE = ROOT / "jobs" / "evaluate.py"


def _run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:1"}  # were Ray reached, the test would hang, then fail
    return subprocess.run(
        [sys.executable, str(PRETRAIN), *args], capture_output=True, text=True, timeout=120, cwd=cwd, env=env
    )


def test_help_lists_every_config_key():
    out = _run("--help")
    assert out.returncode == 0
    for key in ("--config", "data.source", "model.name", "optim.base_lr", "strategy.name", "trainer.precision",
                "trainer.checkpoint_every_steps", "scaling.num_workers", "run.storage_path", "tracking.tracking_uri"):
        assert key in out.stdout, key


# Every bad input below is run by the job script's own `run_main` (jobs/pretrain.py unless a test names another;
# the stage is the script's name), in ONE child process for all of them (each process start imports torch and
# timm, ~4.5 s): argv and working folder per case, exit code and stderr back.
# RAY_ADDRESS names a dead port: were Ray reached, the case would hang, then fail. The exit path of a real
# process (`sys.exit(run_main(...))`) is the --help test's.
RUN_CASES = """
import contextlib, io, json, os, runpy, sys, time
main = runpy.run_path(sys.argv[1], run_name="not_main")
stage = os.path.basename(sys.argv[1]).removesuffix(".py")
out = []
for args, cwd in json.load(sys.stdin):
    os.chdir(cwd)
    err = io.StringIO()
    start = time.monotonic()
    with contextlib.redirect_stderr(err):
        try:
            code = main["run_main"](stage, main["__doc__"], argv=args, default_config=main.get("DEFAULT_CONFIG"))
        except SystemExit as exit_:  # argparse's own errors
            code = exit_.code
    out.append([code, err.getvalue(), time.monotonic() - start, "ray" in sys.modules])
print(json.dumps(out))
"""


def _run_cases_timed(cases: list[tuple[list[str], Path]], job: Path = PRETRAIN) -> list[tuple[int, str, float, bool]]:
    """Each case's exit code, stderr, seconds, and whether Ray had been imported by then (the cases run in
    order, in one process: once a case imports Ray, the later ones say True too)."""
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:1"}
    proc = subprocess.run(
        [sys.executable, "-c", RUN_CASES, str(job)], input=json.dumps([[a, str(c)] for a, c in cases]),
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [(code, err, seconds, ray) for code, err, seconds, ray in json.loads(proc.stdout.strip().splitlines()[-1])]


def _run_cases(cases: list[tuple[list[str], Path]], job: Path = PRETRAIN) -> list[tuple[int, str]]:
    return [(code, err) for code, err, _, _ in _run_cases_timed(cases, job)]


BAD_INPUT = [
    (["model.name=poolformer_s13"], "poolformer_s12"),
    (["trainer.batchsize=8"], "unknown config key 'trainer.batchsize'"),
    (["trainer.max_steps=-1"], "trainer.max_steps: Input should be greater than or equal to 1"),
    (["--config", "nope.yaml"], "config file 'nope.yaml' does not exist"),
    (["model.kwargs.no_such_arg=1", "data.source={empty}"], "no shards found"),
]


@pytest.fixture(scope="module")
def bad_input_outcomes(tmp_path_factory) -> list[tuple[Path, int, str]]:
    folders = [tmp_path_factory.mktemp(f"bad-input-{i}") for i in range(len(BAD_INPUT))]
    cases = [([a.replace("{empty}", str(f)) for a in args], f) for (args, _), f in zip(BAD_INPUT, folders, strict=True)]
    return [(f, *outcome) for f, outcome in zip(folders, _run_cases(cases), strict=True)]


@pytest.mark.parametrize("case", range(len(BAD_INPUT)), ids=[str(args) for args, _ in BAD_INPUT])
def test_bad_input_exits_2_with_the_fix(case, bad_input_outcomes):
    folder, code, err = bad_input_outcomes[case]
    assert code == 2, err
    assert BAD_INPUT[case][1] in err
    assert not (folder / "mlflow.db").exists()  # no MLflow run was opened


def _tiny_shards(root: Path) -> Path:
    from metaformer_platform.data.build.synthetic import ensure_synthetic_shards

    return ensure_synthetic_shards(root, num_classes=4, train_samples=40, val_samples=8, image_size=16,
                                   samples_per_shard=20)


def test_malformed_manifest_and_bad_model_kwargs_are_refused_before_ray(tmp_path):
    import shutil

    shards = _tiny_shards(tmp_path / "data")
    # the manifest's two ways of being wrong, each in a copy of the shards folder
    miscounted, unreadable = tmp_path / "miscounted", tmp_path / "unreadable"
    shutil.copytree(shards, miscounted)
    shutil.copytree(shards, unreadable)
    body = json.loads((shards / "_info.json").read_text())
    body["splits"]["train"]["num_samples"] += 1
    (miscounted / "_info.json").write_text(json.dumps(body))
    (unreadable / "_info.json").write_text("{not json")

    def common(source: Path) -> list[str]:
        return [f"data.source={source}", f"run.storage_path={tmp_path / 'runs'}", "model.name=poolformer_debug",
                "trainer.batch_size=8"]

    outcomes = _run_cases([
        ([*common(shards), "model.kwargs.no_such_arg=1"], tmp_path),
        ([*common(shards), "trainer.batch_size=64"], tmp_path),
        ([*common(shards), "data.val_split=test"], tmp_path),
        (common(miscounted), tmp_path),
        (common(unreadable), tmp_path),
    ])
    expected = [
        ["does not build with model.kwargs={'no_such_arg': 1}"],
        ["fewer than one step of trainer.batch_size=64"],
        ["unknown split 'test'"],
        ["_info.json", "num_samples"],
        ["_info.json"],
    ]
    for (code, err), needles in zip(outcomes, expected, strict=True):
        assert code == 2 and all(n in err for n in needles), (needles, err)
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs" / "poolformer_debug-pretrain").exists()


def test_a_tracking_password_never_reaches_the_console(tmp_path):
    """A job whose MLflow server is unreachable is refused by the preflight (exit 2), naming the URL: jobs/pretrain.py's
    error line (and whatever it logged) must name it without the password, whether the password is plain or
    holds a ``/`` (which makes the URL invalid to requests: a different error, same URL)."""
    shards = _tiny_shards(tmp_path / "data")
    passwords = ["s3cr3t-tr4ck1ng", "p/ss-w0rd"]
    common = [f"data.source={shards}", f"run.storage_path={tmp_path / 'runs'}", "model.name=poolformer_debug",
              "trainer.batch_size=8", "model.init_from=models:/m@champion"]  # looked up before Ray is joined
    cases = [([*common, f"tracking.tracking_uri=http://alice:{pw}@127.0.0.1:9/"], tmp_path) for pw in passwords]
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:1", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    proc = subprocess.run(
        [sys.executable, "-c", RUN_CASES, str(PRETRAIN)], input=json.dumps([[a, str(c)] for a, c in cases]),
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    outcomes = json.loads(proc.stdout.strip().splitlines()[-1])
    for code, err, *_ in outcomes:
        assert code == 2 and "error: the MLflow server at " in err and "http://alice:***@127.0.0.1:9/" in err, err
    printed = proc.stdout + proc.stderr + "".join(err for _, err, *_ in outcomes)
    assert not [pw for pw in passwords if pw in printed], printed[-3000:]


def test_an_exports_model_json_cannot_make_evaluate_fetch_a_url(tmp_path):
    """Issue 24, finding 6, through jobs/evaluate.py: an export whose model.json sets ``pretrained: true`` with a
    ``pretrained_cfg_overlay`` URL (re-signed, as a teammate with the key could) exits 2 naming the refused keys,
    before Ray, and nothing ever connects to the URL's listener (on f0844da the evaluate driver fetched it)."""
    import http.server
    import threading

    from test_checkpoint_trust import _ddp_checkpoint

    from metaformer_platform.storage import checkpoint_format as fmt
    from metaformer_platform.training.export import export_checkpoint

    connections: list[str] = []

    class Counting(http.server.BaseHTTPRequestHandler):
        def setup(self) -> None:  # every connection counts, whether or not a request follows
            connections.append(str(self.client_address))
            super().setup()

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            self.send_error(404)

        def log_message(self, *args: object) -> None:
            pass

    export = tmp_path / "export"
    export_checkpoint(_ddp_checkpoint(tmp_path / "checkpoint-00000003"), export)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Counting)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/poolformer_debug.pth"
        info = json.loads((export / "model.json").read_text())
        info["model_kwargs"] = {"pretrained": True, "pretrained_cfg_overlay": {"url": url, "file": None}}
        (export / "model.json").write_text(json.dumps(info))
        fmt.mark_complete(export)  # signed again: the refusal is the allow-list's, not the marker's
        ((code, err),) = _run_cases([([f"model.init_from={export}", f"data.source={_tiny_shards(tmp_path / 'data')}",
                                        f"run.storage_path={tmp_path / 'runs'}"], tmp_path)], job=EVALUATE)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    assert connections == [], f"the evaluate job connected to the model.json's URL: {connections}; {err[-2000:]}"
    assert code == 2, err[-3000:]
    assert "model kwargs that weights may not set: pretrained, pretrained_cfg_overlay" in err, err[-3000:]
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()


TRACKING_SECRET = "pw-preflight-7f3a"


class _Refusing(http.server.BaseHTTPRequestHandler):
    """A tracking server that refuses every request (HTTP 401), noting the Authorization header it was sent."""

    seen: ClassVar[list[str]] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        self.seen.append(self.headers.get("Authorization", ""))
        self.send_response(401)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_tracking_server_unreachable_or_refusing_exits_2_in_seconds_before_ray(tmp_path):
    with socket.socket() as sock:  # a port nothing listens on once this closes
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    refusing = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
    threading.Thread(target=refusing.serve_forever, daemon=True).start()
    try:
        def case(port: int, name: str) -> tuple[list[str], Path]:
            uri = f"http://metaformer:{TRACKING_SECRET}@127.0.0.1:{port}"
            return [f"tracking.tracking_uri={uri}", f"run.storage_path={tmp_path / 'runs'}", f"run.name={name}",
                    f"data.cache_dir={tmp_path / 'cache'}"], tmp_path

        # the first case in the child pays its first imports (MLflow's client), which took 20 s at nice 19 beside
        # the suite's jobs: the two timed cases come after it
        outcomes = _run_cases_timed([case(closed, "warm-up"), case(closed, "down"),
                                     case(refusing.server_address[1], "refused")])
    finally:
        refusing.shutdown()
        refusing.server_close()
    warm, (down, down_err, down_s, down_ray), (refused, refused_err, refused_s, refused_ray) = outcomes
    assert warm[0] == 2 and warm[2] < 120, warm[1:3]  # MLflow's client alone retried for 300 s
    assert down == 2, down_err
    assert f"tracking.tracking_uri = http://metaformer:***@127.0.0.1:{closed}" in down_err
    assert "start the server" in down_err and "tracking.enabled=false" in down_err
    assert refused == 2, refused_err
    assert "HTTP 401" in refused_err and "MLFLOW_TRACKING_USERNAME" in refused_err
    # asked once, with the credentials MLflow's client sends (here the URI's own), no retry storm
    assert _Refusing.seen == ["Basic " + base64.b64encode(f"metaformer:{TRACKING_SECRET}".encode()).decode()]
    assert TRACKING_SECRET not in down_err + refused_err
    assert down_s < 10 and refused_s < 10, (down_s, refused_s)
    # nothing started or claimed: Ray not even imported, no run folder or lease, no data generated
    assert not down_ray and not refused_ray
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()
    assert not (tmp_path / "mlflow.db").exists()


# -- the job dry run (launch/cli.py --dry-run, launch/dryrun.py) --------------------------------------------------


def test_pretrain_dry_run_plans_the_embedded_default_and_exits_0_without_ray(tmp_path):
    blocker = tmp_path / "no-ray" / "ray"  # `import ray` fails in the child: a dry run that needs Ray exits 1
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('the dry run imported ray')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker.parent), os.environ.get("PYTHONPATH", "")])}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run(
        [sys.executable, str(PRETRAIN), "--dry-run", f"data.cache_dir={tmp_path / 'cache'}",
         f"run.storage_path={tmp_path / 'runs'}", "tracking.enabled=false"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "dry run of pretrain poolformer_s12-demo: poolformer_s12 (11,407,306 parameters)" in out.stdout  # 10 classes
    assert "scaling.num_workers=auto and no Ray cluster named" in out.stdout
    assert "62 per epoch, 186 in all" in out.stdout  # the default's documented 186 steps on one worker
    assert "estimate      expected" in out.stdout
    assert not (tmp_path / "runs" / "poolformer_s12-demo").exists()  # nothing claimed or written
    assert not (tmp_path / "mlflow.db").exists()
