"""Cluster manifests (infra/k8s, infra/aws): what can be checked without a cluster.

They parse, name what Kubernetes needs, run the project's image, keep credentials in Secrets, and run entry
points that exist with arguments the job's own command line accepts. The KubeRay documents (RayCluster,
RayJob, RayCronJob, also those embedded in ConfigMaps) validate against KubeRay's own CRD schemas.
"""

from __future__ import annotations

import copy
import functools
import os
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


def _rayjob_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The RayJob specs a document holds: a RayJob's own, or the one a RayCronJob creates RayJobs from."""
    if doc.get("kind") == "RayJob":
        return [doc["spec"]]
    if doc.get("kind") == "RayCronJob":
        return [doc["spec"]["jobTemplate"]]
    return []


def _commands(doc: dict[str, Any]) -> list[str]:
    """The shell commands a document runs: RayJob entrypoints, container command+args, launcher commands."""
    out = [" ".join(spec["entrypoint"].split()) for spec in _rayjob_specs(doc)]
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


# KubeRay's CRDs (v1.7.0; about 3 MB together) are not copied into the repo: CI and the project's machines keep
# them beside the checkout, in ../shared/schemas/kuberay/, and the schemas are extracted from them at test time.
KUBERAY_SCHEMAS = Path(os.environ.get("METAFORMER_KUBERAY_SCHEMAS", REPO.parent / "shared" / "schemas" / "kuberay"))
KUBERAY_CRDS = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
                "RayCronJob": "ray.io_raycronjobs.yaml"}
KUBERAY_MISSING = (
    f"KubeRay's CRD schemas not found in {KUBERAY_SCHEMAS}: the checks use KubeRay v1.7.0's CRD files "
    f"({', '.join(KUBERAY_CRDS.values())}, from ray-operator/config/crd/bases/ in github.com/ray-project/kuberay), "
    "which CI keeps in ../shared/schemas/kuberay/ beside the checkout; set METAFORMER_KUBERAY_SCHEMAS to a folder "
    "holding them to run these checks"
)
# The CRDs say only `metadata: {type: object}` (the API server checks ObjectMeta itself): the fields a manifest
# may set, with labels and annotations mapping names to strings.
OBJECT_META = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string"},
        "generateName": {"type": "string"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        "finalizers": {"type": "array", "items": {"type": "string"}},
    },
}
KUBERAY_DOCS = [
    (path.name, doc) for path in MANIFESTS if path.parent == K8S
    for doc in ALL_DOCS[path.name] if doc.get("kind") in KUBERAY_CRDS
]


def strict_schema(node: Any) -> Any:
    """A CRD's OpenAPI v3 (structural) schema as a Draft 7 JSON schema that refuses what Kubernetes would drop.

    The API server prunes unknown fields silently; here they fail: every object schema with ``properties`` gets
    ``additionalProperties: false`` unless it says what other keys may hold or keeps unknown fields
    (``x-kubernetes-preserve-unknown-fields: true``). ``x-kubernetes-int-or-string`` is an integer or a string,
    ``nullable`` admits null; the other ``x-kubernetes-*`` keys (list and map types) are annotations. CEL rules
    (``x-kubernetes-validations``) are not evaluated: in v1.7.0 they concern fields these manifests do not set
    (managedBy, deletionStrategy, gcsFaultToleranceOptions) or updates (``self == oldSelf``).
    """
    if isinstance(node, list):
        return [strict_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "properties":  # field name -> schema
            out[key] = {name: strict_schema(sub) for name, sub in value.items()}
        elif key in ("default", "enum", "example", "description", "x-kubernetes-validations"):  # values, not schemas
            out[key] = value
        else:
            out[key] = strict_schema(value)
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@functools.cache
def _load_kuberay_validators() -> dict[tuple[str, str], Any]:
    """(apiVersion, kind) -> a Draft 7 validator, for every served version of KubeRay's three CRDs."""
    from jsonschema import Draft7Validator

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: 3 MB of YAML in about 1 s, not 15
    validators = {}
    for kind, filename in KUBERAY_CRDS.items():
        crd = yaml.load((KUBERAY_SCHEMAS / filename).read_text(), Loader=loader)
        assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == kind, filename
        for version in crd["spec"]["versions"]:
            if not version.get("served"):
                continue
            api_version = f"{crd['spec']['group']}/{version['name']}"
            schema = strict_schema(version["schema"]["openAPIV3Schema"])
            schema["properties"].update(apiVersion={"const": api_version}, kind={"const": kind}, metadata=OBJECT_META)
            schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata", "spec"})
            validators[(api_version, kind)] = Draft7Validator(schema)
    return validators


@pytest.fixture(scope="session")
def kuberay_validators() -> dict[tuple[str, str], Any]:
    """The CRD validators, loaded once per session; skipped (failed in CI) where the CRD files are absent."""
    if not all((KUBERAY_SCHEMAS / name).is_file() for name in KUBERAY_CRDS.values()):
        if os.environ.get("CI"):
            pytest.fail(f"{KUBERAY_MISSING} (CI must run these checks)")
        pytest.skip(KUBERAY_MISSING)
    return _load_kuberay_validators()


def kuberay_errors(doc: dict[str, Any], validators: dict[tuple[str, str], Any]) -> list[str]:
    """What KubeRay's CRD schema (the served version named by the doc's apiVersion) refuses in ``doc``."""
    doc = {k: v for k, v in doc.items() if not k.startswith("_")}  # _embedded: a marker of _load, not a field
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key not in validators:
        served = sorted(v for v, k in validators if k == doc.get("kind"))
        return [f"$: apiVersion {key[0]!r} / kind {key[1]!r} is not served by KubeRay's CRDs (served: {served})"]
    return sorted(f"{err.json_path}: {err.message}" for err in validators[key].iter_errors(doc))


# ----------------------------------------------------------------------------------------------- the tests


def test_the_manifests_are_all_there() -> None:
    names = {p.relative_to(REPO / "infra").as_posix() for p in MANIFESTS}
    assert names == {
        "k8s/raycluster.yaml", "k8s/rayjob-pretrain.yaml", "k8s/cronjob-family.yaml", "k8s/raycronjob-family.yaml",
        "k8s/mlflow.yaml", "k8s/secrets.example.yaml", "k8s/networkpolicy.yaml", "aws/ray-cluster.yaml",
    }
    kinds = {name: sorted(d["kind"] for d in docs if "kind" in d) for name, docs in ALL_DOCS.items()}
    assert kinds["raycluster.yaml"] == ["RayCluster"]
    assert kinds["rayjob-pretrain.yaml"] == ["RayJob"]
    assert kinds["cronjob-family.yaml"] == ["ConfigMap", "CronJob", "RayJob", "Role", "RoleBinding", "ServiceAccount"]
    assert kinds["raycronjob-family.yaml"] == ["RayCronJob"]
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
        if doc["kind"] in KUBERAY_CRDS:
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
    # the checkpoint signing key reaches every Ray pod from that Secret, one value for all (storage/checkpoint_format)
    from metaformer_platform.storage.checkpoint_format import KEY_ENV

    assert KEY_ENV in secrets["metaformer-credentials"]["stringData"]


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
    rayjobs = [(name, spec) for name, docs in ALL_DOCS.items() for doc in docs for spec in _rayjob_specs(doc)]
    assert sorted(name for name, _ in rayjobs) == ["cronjob-family.yaml", "raycronjob-family.yaml", "rayjob-pretrain.yaml"]
    for name, spec in rayjobs:
        template = spec["submitterPodTemplate"]
        assert template["metadata"]["labels"].items() >= RAY_CLIENT_LABEL.items(), name
        assert [c for c in template["spec"]["containers"] if _has_ray_token(c)], name


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


SCHEDULED_RETRAINS = ("cronjob-family.yaml", "raycronjob-family.yaml")  # the two ways to run it weekly on KubeRay


def test_pipeline_commands_plan_every_member(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    checked, scheduled = 0, []
    for where, script, argv in _all_entry_points():
        if script.startswith("pipelines/"):
            plans = validate_pipeline_command(script, argv)
            assert [p.error for p in plans] == [None] * len(plans), (where, [p.error for p in plans])
            checked += 1
            if where in SCHEDULED_RETRAINS:
                assert [p.model for p in plans] == [f"poolformer_{s}" for s in ("s12", "s24", "s36", "m36", "m48")]
                assert [s.kind for s in plans[0].stages] == ["pretrain", "finetune", "evaluate"]
                scheduled.append(where)
    assert sorted(scheduled) == sorted(SCHEDULED_RETRAINS)
    assert checked >= 3  # the CronJob's RayJob, the RayCronJob's and infra/README.md's cron line


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


def _assert_weekly(schedule: str) -> None:
    """A cron schedule that fires once a week: a fixed minute, hour and weekday."""
    minute, hour, dom, month, dow = schedule.split()
    assert (dom, month) == ("*", "*") and re.fullmatch(r"[0-6]", dow) and minute.isdigit() and hour.isdigit(), schedule


def test_cronjob_is_weekly_and_submits_the_family_rayjob() -> None:
    docs = ALL_DOCS["cronjob-family.yaml"]
    cron = next(d for d in docs if d["kind"] == "CronJob")
    _assert_weekly(cron["spec"]["schedule"])
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


def test_raycronjob_runs_the_cronjobs_rayjob_on_the_same_schedule() -> None:
    """The RayCronJob alternative: the operator creates, on the CronJob's weekly schedule, the very RayJob that
    the CronJob's submitter creates (same entry point, image, token Secret, client label, cluster)."""
    (raycron,) = ALL_DOCS["raycronjob-family.yaml"]
    cron_docs = ALL_DOCS["cronjob-family.yaml"]
    cron = next(d for d in cron_docs if d["kind"] == "CronJob")
    rayjob = next(d for d in cron_docs if d["kind"] == "RayJob")
    _assert_weekly(raycron["spec"]["schedule"])
    assert (raycron["spec"]["schedule"], raycron["spec"]["timeZone"]) == (cron["spec"]["schedule"], cron["spec"]["timeZone"])
    assert raycron["spec"]["jobTemplate"] == rayjob["spec"]
    assert raycron["spec"]["jobTemplate"]["clusterSelector"] == {"ray.io/cluster": _ray_cluster()["metadata"]["name"]}
    assert not raycron["spec"].get("suspend")


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


def test_every_kuberay_document_is_held_to_its_crd() -> None:
    found = sorted((name, doc["kind"], bool(doc.get("_embedded"))) for name, doc in KUBERAY_DOCS)
    assert found == [
        ("cronjob-family.yaml", "RayJob", True), ("raycluster.yaml", "RayCluster", False),
        ("raycronjob-family.yaml", "RayCronJob", False), ("rayjob-pretrain.yaml", "RayJob", False),
    ]


@pytest.mark.parametrize("name, doc", KUBERAY_DOCS, ids=[f"{n}:{d['kind']}" for n, d in KUBERAY_DOCS])
def test_kuberay_documents_validate_against_the_crd_schemas(
    kuberay_validators: dict[tuple[str, str], Any], name: str, doc: dict[str, Any]
) -> None:
    assert kuberay_errors(doc, kuberay_validators) == [], name


def _set(path: str, value: Any) -> Any:
    """A change to a copy of a document: ``path`` is dotted, with [i] for list items; ``value`` is set there."""
    def change(doc: dict[str, Any]) -> None:
        *parents, last = re.findall(r"[^.\[\]]+", path)
        node = doc
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        node[int(last) if last.isdigit() else last] = value
    return change


BROKEN_COPIES = [
    # wrong types
    pytest.param("rayjob-pretrain.yaml", _set("spec.activeDeadlineSeconds", "two weeks"),
                 "$.spec.activeDeadlineSeconds: 'two weeks' is not of type 'integer'", id="type-rayjob-deadline"),
    pytest.param("raycluster.yaml", _set("spec.workerGroupSpecs[0].replicas", "8"),
                 "$.spec.workerGroupSpecs[0].replicas: '8' is not of type 'integer'", id="type-raycluster-replicas"),
    pytest.param("raycluster.yaml", _set("spec.workerGroupSpecs[0].template.spec.containers[0].resources.limits.cpu", [8]),
                 "$.spec.workerGroupSpecs[0].template.spec.containers[0].resources.limits.cpu: [8] is not valid under any",
                 id="type-int-or-string"),
    pytest.param("rayjob-pretrain.yaml", _set("metadata.labels.broken", True),
                 "$.metadata.labels.broken: True is not of type 'string'", id="type-label-value"),
    # unknown fields, at the top of a spec and deep in a pod template
    pytest.param("cronjob-family.yaml", _set("spec.entryPoint", "python pipelines/poolformer_family.py"),
                 "$.spec: Additional properties are not allowed ('entryPoint' was unexpected)", id="unknown-rayjob-field"),
    pytest.param("raycluster.yaml", _set("spec.headGroupSpec.template.spec.containers[0].imagePulPolicy", "Always"),
                 "$.spec.headGroupSpec.template.spec.containers[0]: Additional properties are not allowed ('imagePulPolicy'",
                 id="unknown-container-field"),
    pytest.param("rayjob-pretrain.yaml", _set("metadata.label", {"a": "b"}),
                 "$.metadata: Additional properties are not allowed ('label' was unexpected)", id="unknown-metadata-field"),
    pytest.param("raycronjob-family.yaml", _set("spec.schedule", 6),
                 "$.spec.schedule: 6 is not of type 'string'", id="type-raycronjob-schedule"),
    pytest.param("raycronjob-family.yaml", _set("spec.concurrencyPolicy", "Forbid"),
                 "$.spec: Additional properties are not allowed ('concurrencyPolicy' was unexpected)",
                 id="unknown-raycronjob-field"),
    # an apiVersion KubeRay does not serve
    pytest.param("raycluster.yaml", _set("apiVersion", "ray.io/v2"),
                 "$: apiVersion 'ray.io/v2' / kind 'RayCluster' is not served", id="unserved-api-version"),
]


@pytest.mark.parametrize("name, change, expected", BROKEN_COPIES)
def test_the_crd_validation_refuses_broken_copies(
    kuberay_validators: dict[tuple[str, str], Any], name: str, change: Any, expected: str
) -> None:
    (original,) = [doc for n, doc in KUBERAY_DOCS if n == name]
    broken = copy.deepcopy(original)
    change(broken)
    assert broken != original
    errors = kuberay_errors(broken, kuberay_validators)
    assert errors, f"{name}: the broken copy was accepted"
    assert any(e.startswith(expected) for e in errors), errors
    assert kuberay_errors(original, kuberay_validators) == []


def test_int_or_string_fields_take_both(kuberay_validators: dict[tuple[str, str], Any]) -> None:
    (cluster,) = [doc for n, doc in KUBERAY_DOCS if n == "raycluster.yaml"]
    for cpu in (8, "8", "7500m"):
        copy_ = copy.deepcopy(cluster)
        copy_["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = cpu
        assert kuberay_errors(copy_, kuberay_validators) == [], cpu


def test_pods_give_a_stopping_job_time_to_checkpoint() -> None:
    """A SIGTERM'd job checkpoints within run.stop_grace_s (launch/stop.py): every Ray pod waits longer than that
    (plus an upload's margin) before Kubernetes' SIGKILL, and `ray job stop` on the head waits longer too."""
    from metaformer_platform.config.schema import RunSettings

    grace = RunSettings().stop_grace_s
    clusters = [doc for docs in ALL_DOCS.values() for doc in docs if doc.get("kind") == "RayCluster"]
    assert clusters
    for cluster in clusters:
        spec = cluster["spec"]
        pods = [spec["headGroupSpec"]["template"]["spec"], *(g["template"]["spec"] for g in spec["workerGroupSpecs"])]
        for pod in pods:
            assert pod.get("terminationGracePeriodSeconds", 30) >= grace + 20, pod["containers"][0]["name"]
        head = spec["headGroupSpec"]["template"]["spec"]
        env = {e["name"]: e.get("value") for c in head["containers"] for e in c.get("env", [])}
        wait = float(env.get("RAY_JOB_STOP_WAIT_TIME_S", 3))
        assert grace < wait < head["terminationGracePeriodSeconds"]
