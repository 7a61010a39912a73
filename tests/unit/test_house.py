"""The house rules that keep the package changeable, checked on its source (no imports of it, fast).

The layers themselves are checked by `lint-imports` in `make lint` (pyproject.toml's [tool.importlinter]); what
that cannot see is held here: short functions, one place that copies the job config, one owner of the checkpoint
folder's file names, and a ratchet on untyped seams. Each message says what to do instead.
"""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "platform" / "metaformer_platform"
SOURCES = sorted(PACKAGE.rglob("*.py"))
MAX_FUNCTION_LINES = 60
# typing.Any used as a name (annotations, casts). 245 when this was first counted; lower it as you type seams,
# never raise it: a new Any is a seam someone must read the code to understand.
MAX_ANY = 122


def _trees() -> dict[Path, ast.Module]:
    return {path: ast.parse(path.read_text(), filename=str(path)) for path in SOURCES}


TREES = _trees()


def _rel(path: Path) -> str:
    return path.relative_to(PACKAGE).as_posix()


def test_no_function_is_longer_than_60_lines() -> None:
    long = [
        f"{_rel(path)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path, tree in TREES.items()
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno is not None and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (split them into named steps): {long}"


def test_the_job_config_is_copied_only_by_the_plan_builder() -> None:
    copies = sorted({
        _rel(path) for path, tree in TREES.items()
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and node.attr == "model_copy"
    })
    assert copies == ["launch/plan.py"], (
        f"model_copy outside the plan builder: {copies}; resolve the value in launch/plan.py once and pass it on"
    )


def test_untyped_seams_do_not_grow() -> None:
    count = sum(1 for tree in TREES.values() for node in ast.walk(tree) if isinstance(node, ast.Name) and node.id == "Any")
    assert count <= MAX_ANY, f"{count} uses of typing.Any (at most {MAX_ANY}): type the seam (a dataclass, a Protocol)"


def test_checkpoint_file_names_have_one_owner() -> None:
    """The names of a checkpoint or export folder's files are string constants of one storage module; everyone else
    imports them (a second definition drifts, and a renamed alias hides where a file is read)."""
    names = re.compile(r"(model|trainer|ema|optimizer|weights)[\w-]*\.(safetensors|pt|json)|COMPLETE|_owner\.json|OWNER-.*")
    owners = sorted({
        _rel(path) for path, tree in TREES.items()
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str) and names.fullmatch(node.value.value)
    })
    assert len(owners) == 1 and owners[0].startswith("storage/"), f"checkpoint file names defined in {owners}"


def test_the_layers_contract_names_every_package() -> None:
    contracts = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layers = next(c for c in contracts if c["type"] == "layers" and c.get("containers") == ["metaformer_platform"])
    packages = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists())
    assert sorted(layers["layers"]) == packages
    assert layers.get("exhaustive") is True
    assert not layers.get("ignore_imports"), f"layer breaches still waived: {layers['ignore_imports']}"
