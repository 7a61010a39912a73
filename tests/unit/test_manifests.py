"""Cluster manifests (infra/k8s, infra/aws): what can be checked without a cluster.

They parse, name what Kubernetes needs, run the project's image, keep credentials in Secrets, and run entry
points that exist with arguments the job's own command line accepts.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "infra" / "k8s"
AWS = REPO / "infra" / "aws"
MANIFESTS = sorted([*K8S.glob("*.yaml"), *AWS.glob("*.yaml")])
IMAGE = re.compile(r"^(?:[\w.-]+(?::\d+)?/)*metaformer-platform:latest$")  # optionally behind a registry
# Containers that run no project code, only tooling (the CronJob's kubectl submitter).
TOOL_IMAGES = {"bitnami/kubectl:1.31"}
# Entry points the manifests (and infra/README.md) name before they exist. Each must NOT exist yet: when it
# lands, delete it here, so it is checked like the others (in the repo, copied into the image).
PENDING_ENTRY_POINTS: dict[str, str] = {}
SECRET_NAME = re.compile(r"KEY|SECRET|PASSWORD|TOKEN|CREDENTIAL", re.I)
PLACEHOLDER = "REPLACE-ME"
SHELL_OPERATORS = {"&&", "||", ";", "|", ">", ">>", "<", "&"}


def _load(path: Path) -> list[dict[str, Any]]:
    """The documents of a YAML file, plus those of YAML files embedded in its ConfigMaps (job templates)."""
    docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    embedded = []
    for doc in docs:
        if doc.get("kind") == "ConfigMap":
            for key, text in (doc.get("data") or {}).items():
                if key.endswith((".yaml", ".yml")):
                    embedded += [{**d, "_embedded": True} for d in yaml.safe_load_all(text) if d is not None]
    return docs + embedded


ALL_DOCS = {path.name: _load(path) for path in MANIFESTS}


def _walk(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every (dotted path, value) in a document."""
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}[{i}]")


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for path, value in _walk(doc):
        if path.endswith(("containers", "initContainers")) and isinstance(value, list):
            found += value
    return found


def _commands(doc: dict[str, Any]) -> list[str]:
    """The shell commands a document runs: RayJob entrypoints, container command+args, launcher commands."""
    out = []
    if doc.get("kind") == "RayJob":
        out.append(" ".join(doc["spec"]["entrypoint"].split()))
    for container in _containers(doc):
        argv = [*container.get("command", []), *container.get("args", [])]
        out.append(" ".join(argv))
    for key in ("head_start_ray_commands", "worker_start_ray_commands", "setup_commands", "initialization_commands"):
        out += doc.get(key) or []
    return out


def _entry_points(command: str) -> list[tuple[str, list[str]]]:
    """(script, its arguments) for each `python SCRIPT ...` in a shell command."""
    found = []
    for segment in re.split(r"&&|\|\||;|\n", command):
        try:
            words = shlex.split(segment)
        except ValueError:
            continue
        for i, word in enumerate(words[:-1]):
            if re.fullmatch(r"(.*/)?python3?(\.\d+)?", word) and words[i + 1].endswith(".py"):
                rest = words[i + 2 :]
                cut = next((j for j, w in enumerate(rest) if w in SHELL_OPERATORS), len(rest))
                found.append((words[i + 1], rest[:cut]))
    return found


def _image_copies() -> list[str]:
    """The repo paths the Dockerfile copies into the image."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    copied = []
    for line in text.splitlines():
        if line.strip().upper().startswith("COPY "):
            *sources, _dest = [p for p in line.split()[1:] if not p.startswith("--")]
            copied += [s.rstrip("/") for s in sources]
    return copied


def _job_stage(script: str) -> str | None:
    """The stage a jobs/ entry point passes to the shared command line (None: it has its own parser)."""
    match = re.search(r"run_main\(\s*[\"'](\w+)[\"']", (REPO / script).read_text())
    return match[1] if match else None


def validate_job_command(script: str, argv: list[str]):
    """The JobConfig that `python SCRIPT ARGV...` would run, parsed as the job does (no Ray, no MLflow).

    Raises ``ValueError`` (a ``ConfigError`` naming the key) for arguments the job would refuse.
    """
    from metaformer_platform.launch.cli import parse_job_config

    stage = _job_stage(script)
    assert stage is not None, f"{script} does not use the shared command line"
    try:
        return parse_job_config(stage, "", argv, None)
    except SystemExit as err:  # argparse: an unknown option
        raise ValueError(f"{script} {shlex.join(argv)}: refused by the command line") from err


# ----------------------------------------------------------------------------------------------- the tests


def test_the_manifests_are_all_there() -> None:
    names = {p.relative_to(REPO / "infra").as_posix() for p in MANIFESTS}
    assert names == {
        "k8s/raycluster.yaml", "k8s/rayjob-pretrain.yaml", "k8s/cronjob-family.yaml", "k8s/mlflow.yaml",
        "k8s/secrets.example.yaml", "k8s/networkpolicy.yaml", "aws/ray-cluster.yaml",
    }
    kinds = {name: sorted(d["kind"] for d in docs if "kind" in d) for name, docs in ALL_DOCS.items()}
    assert kinds["raycluster.yaml"] == ["RayCluster"]
    assert kinds["rayjob-pretrain.yaml"] == ["RayJob"]
    assert kinds["cronjob-family.yaml"] == ["ConfigMap", "CronJob", "RayJob", "Role", "RoleBinding", "ServiceAccount"]
    assert kinds["mlflow.yaml"] == ["Deployment", "Service"]
    assert kinds["secrets.example.yaml"] == ["Secret", "Secret", "Secret"]
    assert kinds["networkpolicy.yaml"] == ["NetworkPolicy", "NetworkPolicy"]


@pytest.mark.parametrize("path", [p for p in MANIFESTS if p.parent == K8S], ids=lambda p: p.name)
def test_kubernetes_documents_name_their_api_kind_and_object(path: Path) -> None:
    for doc in ALL_DOCS[path.name]:
        assert isinstance(doc.get("apiVersion"), str) and "/" in doc["apiVersion"] or doc.get("apiVersion") == "v1"
        assert isinstance(doc.get("kind"), str) and doc["kind"]
        meta = doc.get("metadata") or {}
        # A template that a job creates again and again gets a fresh name each time.
        name = meta.get("generateName") if doc.get("_embedded") else meta.get("name")
        assert name and re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9-])?", name), (path.name, doc["kind"], meta)
        if doc["kind"] in {"RayCluster", "RayJob"}:
            assert doc["apiVersion"] == "ray.io/v1"


def _ray_cluster() -> dict[str, Any]:
    return ALL_DOCS["raycluster.yaml"][0]


def test_ray_cluster_has_a_head_and_gpu_workers_on_the_project_image() -> None:
    spec = _ray_cluster()["spec"]
    pins = dict(line.split("==") for line in (REPO / "constraints.txt").read_text().split() if "==" in line)
    assert spec["rayVersion"] == pins["ray"], "rayVersion must be the ray the image installs"
    head = spec["headGroupSpec"]["template"]["spec"]["containers"]
    assert head and all(IMAGE.match(c["image"]) for c in head)
    groups = spec["workerGroupSpecs"]
    gpu_groups = [g for g in groups if any(
        int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) > 0
        for c in g["template"]["spec"]["containers"]
    )]
    assert gpu_groups, "no worker group asks for nvidia.com/gpu"
    for group in groups:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        for container in group["template"]["spec"]["containers"]:
            assert IMAGE.match(container["image"]), container["image"]


def test_every_container_runs_the_project_image_or_declared_tooling() -> None:
    seen = set()
    for name, docs in ALL_DOCS.items():
        for doc in docs:
            for container in _containers(doc):
                seen.add(container["image"])
                assert IMAGE.match(container["image"]) or container["image"] in TOOL_IMAGES, (name, container)
            if "docker" in doc:  # the Ray cluster launcher
                assert IMAGE.match(doc["docker"]["image"]), doc["docker"]["image"]
    assert any(IMAGE.match(image) for image in seen)
    assert TOOL_IMAGES <= seen, f"unused tooling images {TOOL_IMAGES - seen}: drop them from TOOL_IMAGES"


def test_no_literal_credentials() -> None:
    for name, docs in ALL_DOCS.items():
        text = (K8S / name if (K8S / name).exists() else AWS / name).read_text()
        assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text), f"{name}: an AWS access key id"
        for doc in docs:
            if doc.get("kind") == "Secret":
                assert name.endswith(".example.yaml"), f"{name}: Secrets belong in *.example.yaml only"
                values = {**(doc.get("stringData") or {}), **(doc.get("data") or {})}
                assert values and all(str(v).startswith(PLACEHOLDER) for v in values.values()), (name, values)
                continue
            for path, value in _walk(doc):
                if isinstance(value, str):
                    # A URI with a password in it (postgresql://user:pw@host) must come from a Secret.
                    assert not re.search(r"://[^/\s:@]+:[^/\s@]+@", value), f"{name}: {path} holds credentials"
                    for flag in re.findall(r"--env\s+(\w+)=", value):
                        assert not SECRET_NAME.search(flag), f"{name}: {path} passes {flag} literally"
            for container in _containers(doc):
                for env in container.get("env", []):
                    if SECRET_NAME.search(env["name"]):
                        assert "value" not in env and "secretKeyRef" in env.get("valueFrom", {}), (name, env)
                for source in container.get("envFrom", []):
                    assert set(source) <= {"secretRef", "configMapRef", "prefix"}, (name, source)


def test_pods_get_their_credentials_from_the_example_secrets() -> None:
    secrets = {d["metadata"]["name"]: d for d in ALL_DOCS["secrets.example.yaml"]}
    referenced = set()
    for docs in ALL_DOCS.values():
        for doc in docs:
            for container in _containers(doc):
                for source in container.get("envFrom", []):
                    if "secretRef" in source:
                        referenced.add(source["secretRef"]["name"])
                for env in container.get("env", []):
                    ref = env.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        referenced.add(ref["name"])
                        assert ref["key"] in secrets[ref["name"]]["stringData"], ref
    assert referenced == set(secrets)
    for kind in ("head", "workers"):
        group = [_ray_cluster()["spec"]["headGroupSpec"]] if kind == "head" else _ray_cluster()["spec"]["workerGroupSpecs"]
        for g in group:
            for container in g["template"]["spec"]["containers"]:
                assert {"secretRef": {"name": "metaformer-credentials"}} in container["envFrom"], kind


RAY_TOKEN_REF = {"name": "metaformer-ray-token", "key": "auth_token"}
RAY_CLIENT_LABEL = {"metaformer.io/ray-client": "true"}


def _has_ray_token(container: dict[str, Any]) -> bool:
    env = {e["name"]: e for e in container.get("env", [])}
    return (env.get("RAY_AUTH_MODE", {}).get("value") == "token"
            and env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef") == RAY_TOKEN_REF)


def test_ray_runs_with_token_auth_from_a_secret() -> None:
    """Every Ray node and every job submitter has RAY_AUTH_MODE=token and the token from the Secret."""
    spec = _ray_cluster()["spec"]
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        for container in group["template"]["spec"]["containers"]:
            assert _has_ray_token(container), container["name"]
    rayjobs = [doc for docs in ALL_DOCS.values() for doc in docs if doc.get("kind") == "RayJob"]
    assert len(rayjobs) == 2
    for job in rayjobs:
        template = job["spec"]["submitterPodTemplate"]
        assert template["metadata"]["labels"].items() >= RAY_CLIENT_LABEL.items()
        assert [c for c in template["spec"]["containers"] if _has_ray_token(c)], job["metadata"]


def _policies() -> dict[str, dict[str, Any]]:
    return {d["spec"]["podSelector"]["matchLabels"].get("ray.io/cluster") and "ray" or "mlflow": d
            for d in ALL_DOCS["networkpolicy.yaml"]}


def test_network_policies_limit_who_reaches_ray_and_mlflow() -> None:
    ray_policy, mlflow_policy = _policies()["ray"], _policies()["mlflow"]
    for policy in (ray_policy, mlflow_policy):
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        for rule in policy["spec"]["ingress"]:
            assert rule.get("from"), "a rule without `from` admits every pod"
    # Ray: its own pods on any port; labelled clients on the head's client-facing ports only.
    assert ray_policy["spec"]["podSelector"]["matchLabels"] == {"ray.io/cluster": _ray_cluster()["metadata"]["name"]}
    own, clients = ray_policy["spec"]["ingress"]
    assert own["from"] == [{"podSelector": {"matchLabels": {"ray.io/cluster": "metaformer"}}}] and "ports" not in own
    assert clients["from"] == [{"podSelector": {"matchLabels": RAY_CLIENT_LABEL}}]
    assert {p["port"] for p in clients["ports"]} == {6379, 8265, 10001}
    # MLflow: its one port, from Ray's pods and labelled clients.
    (deployment,) = [d for d in ALL_DOCS["mlflow.yaml"] if d["kind"] == "Deployment"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert mlflow_policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    (rule,) = mlflow_policy["spec"]["ingress"]
    assert [p["port"] for p in rule["ports"]] == [5000]
    assert {"podSelector": {"matchLabels": {"ray.io/cluster": "metaformer"}}} in rule["from"]


def _all_entry_points() -> list[tuple[str, str, list[str]]]:
    found = []
    for name, docs in ALL_DOCS.items():
        for doc in docs:
            for command in _commands(doc):
                found += [(name, script, argv) for script, argv in _entry_points(command)]
    for line in (REPO / "infra" / "README.md").read_text().replace("\\\n", " ").splitlines():
        found += [("infra/README.md", script, argv) for script, argv in _entry_points(line)]
    return found


def test_entry_points_exist_and_are_in_the_image() -> None:
    found = _all_entry_points()
    scripts = {script for _, script, _ in found}
    assert {"jobs/pretrain.py", "pipelines/poolformer_family.py"} <= scripts, scripts
    copied = _image_copies()
    for where, script, _ in found:
        if script in PENDING_ENTRY_POINTS:
            continue
        assert (REPO / script).is_file(), f"{where} runs {script}, which is not in the repo"
        assert any(script == c or script.startswith(c + "/") for c in copied), (
            f"{where} runs {script}, which the Dockerfile does not copy into the image"
        )
    for script, why in PENDING_ENTRY_POINTS.items():
        assert not (REPO / script).exists(), (
            f"{script} exists now: remove it from PENDING_ENTRY_POINTS ({why}) so it is checked like the others"
        )
        assert script in scripts, f"{script} is listed as pending but no manifest runs it"


def test_job_commands_are_accepted_by_the_jobs_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # the image's /app is laid out like the repo root; the paths are relative to it
    checked = []
    for where, script, argv in _all_entry_points():
        if script.startswith("jobs/") and _job_stage(script):
            cfg = validate_job_command(script, argv)
            checked.append((where, cfg))
    by_file = {where: cfg for where, cfg in checked}
    assert "rayjob-pretrain.yaml" in by_file
    cfg = by_file["rayjob-pretrain.yaml"]
    assert (cfg.stage, cfg.model.name, cfg.scaling.use_gpu) == ("pretrain", "poolformer_s12", True)
    assert cfg.data.source.startswith("s3://") and cfg.run.storage_path.startswith("s3://")
    # The job fits the cluster it is sent to: one GPU per Ray Train worker, CPUs per worker within a pod.
    gpu_slots, pod_cpus = 0, []
    for group in _ray_cluster()["spec"]["workerGroupSpecs"]:
        for container in group["template"]["spec"]["containers"]:
            limits = container["resources"]["limits"]
            gpu_slots += int(limits.get("nvidia.com/gpu", 0)) * group["maxReplicas"]
            pod_cpus.append(float(limits["cpu"]))
    assert cfg.scaling.num_workers <= gpu_slots
    assert cfg.scaling.cpus_per_worker <= max(pod_cpus)


def validate_pipeline_command(script: str, argv: list[str]) -> list:
    """The members `python SCRIPT ARGV...` would plan (the static part of its --dry-run: no data, Ray or MLflow).

    Raises ``SystemExit`` for arguments its command line refuses and ``ValueError`` for a wrong pipeline file.
    """
    from metaformer_platform.pipelines import expand, load_pipeline, parse_command

    args = parse_command(argv, REPO / Path(script).with_suffix(".yaml"))
    spec, base = load_pipeline(args.pipeline)
    return expand(spec, base, args.overrides)


def test_pipeline_commands_plan_every_member(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    checked = 0
    for where, script, argv in _all_entry_points():
        if script.startswith("pipelines/"):
            plans = validate_pipeline_command(script, argv)
            assert [p.error for p in plans] == [None] * len(plans), (where, [p.error for p in plans])
            checked += 1
            if where == "cronjob-family.yaml":
                assert [p.model for p in plans] == [f"poolformer_{s}" for s in ("s12", "s24", "s36", "m36", "m48")]
                assert [s.kind for s in plans[0].stages] == ["pretrain", "finetune", "evaluate"]
    assert checked >= 2  # the CronJob's RayJob and infra/README.md's cron line


@pytest.mark.parametrize("argv, match", [
    (["--config", "jobs/configs/poolformer_s12.yaml", "trainer.bogus=1"], "bogus"),
    (["--config", "jobs/configs/poolformer_s13.yaml"], "poolformer_s13"),
    (["--config", "jobs/configs/poolformer_s12.yaml", "model.name=poolformer_s13"], "poolformer_s13"),
    (["--config", "jobs/configs/poolformer_s12.yaml", "--gpus", "8"], "refused by the command line"),
])
def test_the_command_check_refuses_what_the_job_would(monkeypatch: pytest.MonkeyPatch, argv: list[str], match: str) -> None:
    monkeypatch.chdir(REPO)
    with pytest.raises(ValueError, match=match):
        validate_job_command("jobs/pretrain.py", argv)


def test_entry_point_parsing() -> None:
    assert _entry_points("cd /app && python jobs/pretrain.py --config a.yaml x.y=1 | tee log") == [
        ("jobs/pretrain.py", ["--config", "a.yaml", "x.y=1"])
    ]
    assert _entry_points("sh -c 'true'; /opt/venv/bin/python3 pipelines/p.py --dry-run") == [
        ("pipelines/p.py", ["--dry-run"])
    ]
    assert _entry_points("ray job submit --working-dir . -- python pipelines/poolformer_family.py") == [
        ("pipelines/poolformer_family.py", [])
    ]


def test_cronjob_is_weekly_and_submits_the_family_rayjob() -> None:
    docs = ALL_DOCS["cronjob-family.yaml"]
    cron = next(d for d in docs if d["kind"] == "CronJob")
    minute, hour, dom, month, dow = cron["spec"]["schedule"].split()
    assert (dom, month) == ("*", "*") and re.fullmatch(r"[0-6]", dow) and minute.isdigit() and hour.isdigit()
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    config_map = next(d for d in docs if d["kind"] == "ConfigMap")
    assert pod["volumes"][0]["configMap"]["name"] == config_map["metadata"]["name"]
    mount = pod["containers"][0]["volumeMounts"][0]["mountPath"]
    template_file = next(iter(config_map["data"]))
    assert f"kubectl create -f {mount}/{template_file}" in " ".join(pod["containers"][0]["command"])
    rayjob = next(d for d in docs if d["kind"] == "RayJob")
    assert rayjob["spec"]["clusterSelector"] == {"ray.io/cluster": _ray_cluster()["metadata"]["name"]}
    # The submitter may create and watch RayJobs, nothing else.
    role = next(d for d in docs if d["kind"] == "Role")
    assert role["rules"] == [{"apiGroups": ["ray.io"], "resources": ["rayjobs"],
                              "verbs": ["create", "get", "list", "watch"]}]
    assert pod["serviceAccountName"] == next(d for d in docs if d["kind"] == "ServiceAccount")["metadata"]["name"]


def test_aws_launcher_config() -> None:
    (doc,) = ALL_DOCS["ray-cluster.yaml"]
    assert doc["provider"]["type"] == "aws"
    assert doc["head_node_type"] in doc["available_node_types"]
    workers = {k: v for k, v in doc["available_node_types"].items() if k != doc["head_node_type"]}
    assert any(v["node_config"]["InstanceType"].startswith(("g", "p")) for v in workers.values()), "no GPU nodes"
    assert sum(v["max_workers"] for v in workers.values()) <= doc["max_workers"]
    assert doc["available_node_types"][doc["head_node_type"]]["resources"] == {"CPU": 0}
    # Token auth on every node, the token read from a file the nodes fetch (not written here), and the
    # dashboard (job submission) on the head's loopback only, reached through `ray dashboard`'s SSH tunnel.
    options = doc["docker"]["run_options"]
    assert "--env RAY_AUTH_MODE=token" in options
    # mounted where Ray looks by default: ~/.ray/auth_token of the image's user (the Dockerfile's `ray`)
    assert any(o.startswith("--volume ") and o.endswith(":/home/ray/.ray/auth_token:ro") for o in options)
    assert any("umask 077" in c and "auth_token" in c for c in doc["initialization_commands"])
    assert not [o for o in options if "RAY_AUTH_TOKEN" in o]
    (head_start,) = [c for c in doc["head_start_ray_commands"] if "--head" in c]
    assert "--dashboard-host=127.0.0.1" in head_start


def test_mlflow_server_uses_postgres_and_s3_from_secrets() -> None:
    deployment = next(d for d in ALL_DOCS["mlflow.yaml"] if d["kind"] == "Deployment")
    service = next(d for d in ALL_DOCS["mlflow.yaml"] if d["kind"] == "Service")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    argv = container["command"]
    assert argv[:2] == ["mlflow", "server"]
    options = dict(a.split("=", 1) for a in argv[2:] if "=" in a)
    assert options["--backend-store-uri"] == "$(MLFLOW_BACKEND_STORE_URI)"  # expanded by Kubernetes from env
    assert options["--artifacts-destination"].startswith("s3://") and "--serve-artifacts" in argv
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-credentials"
    secret = next(d for d in ALL_DOCS["secrets.example.yaml"] if d["metadata"]["name"] == "mlflow-credentials")
    assert "postgresql" in (REPO / "infra/k8s/secrets.example.yaml").read_text()
    assert set(secret["stringData"]) >= {"backend-store-uri"}
    assert deployment["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    # The Ray pods' tracking URI names this Service.
    head = _ray_cluster()["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    uri = next(e["value"] for e in head["env"] if e["name"] == "MLFLOW_TRACKING_URI")
    assert uri == f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
