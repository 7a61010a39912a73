"""Loading a job config: YAML files (with ``base:`` presets), dotted CLI overrides, and error messages that name
the key and the fix. ``load_config(path, overrides)`` is the only way in, so every entry point validates alike."""

from __future__ import annotations

import difflib
import os
from collections.abc import Sequence
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from metaformer_platform.config.schema import JobConfig, flatten


class ConfigError(ValueError):
    """A config file or override is wrong; the message says which key and how to fix it."""


def _field_paths(model: type[BaseModel], prefix: str = "") -> dict[str, FieldInfo]:
    """Every settable dotted key of ``model`` with its field info (sections included)."""
    paths: dict[str, FieldInfo] = {}
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        paths[path] = field
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            paths.update(_field_paths(annotation, path + "."))
    return paths


def config_keys() -> dict[str, FieldInfo]:
    """All dotted config keys (leaves and sections) and their pydantic field infos."""
    return _field_paths(JobConfig)


def _check_key(path: str, free_form: bool) -> None:
    keys = config_keys()
    if path in keys or free_form:
        return
    parts = path.split(".")
    # Name the first segment that is wrong: "optimizer.lr" is wrong at "optimizer".
    for depth in range(1, len(parts) + 1):
        head = ".".join(parts[:depth])
        if head not in keys:
            break
    parent = head.rpartition(".")[0]
    siblings = sorted(k.rpartition(".")[2] for k in keys if k.rpartition(".")[0] == parent)
    close = difflib.get_close_matches(path, list(keys), n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ConfigError(
        f"unknown config key {head!r}" + (f" (in {path!r})" if head != path else "") + f".{hint} "
        f"Valid keys under {parent or 'the top level'!r}: {', '.join(siblings)}. Run with --help to list every key."
    )


def _walk_keys(tree: dict[str, object], prefix: str = "") -> None:
    for key, value in tree.items():
        path = f"{prefix}{key}"
        free_form = _is_free_form(prefix.rstrip("."))
        _check_key(path, free_form)
        if isinstance(value, dict) and not _is_free_form(path) and not free_form:
            _walk_keys(value, path + ".")


def _is_free_form(path: str) -> bool:
    """Dict-valued fields whose keys are the user's own (timm kwargs, tags, resources)."""
    return path in {"model.kwargs", "tracking.tags", "scaling.resources_per_worker"} or any(
        path.startswith(p + ".") for p in ("model.kwargs", "tracking.tags", "scaling.resources_per_worker")
    )


def parse_override(item: str) -> tuple[str, object]:
    """``"a.b=value"`` -> ``("a.b", parsed)``; the value is read as YAML (numbers, booleans, lists, null)."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like key.path=value, e.g. trainer.max_steps=100")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({err.problem})") from err
    return key, value


def _set_path(tree: dict[str, object], path: str, value: object) -> None:
    node = tree
    *parents, leaf = path.split(".")
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[leaf] = value


def read_yaml(path: str | os.PathLike[str]) -> dict[str, object]:
    """Read a config file into a dict, with errors that name the file."""
    file = Path(path)
    if not file.is_file():
        here = Path(__file__).resolve().parents[3] / "jobs" / "configs"
        known = sorted(p.name for p in here.glob("*.yaml")) if here.is_dir() else []
        hint = f" Presets in jobs/configs: {', '.join(known)}." if known else ""
        raise ConfigError(f"config file {str(file)!r} does not exist.{hint}")
    try:
        tree = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(file)!r} is not valid YAML: {err}") from err
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {str(file)!r} must hold a mapping of sections, got {type(tree).__name__}")
    base = tree.pop("base", None)
    if base is not None:
        tree = _merge(read_yaml(_base_file(file, base)), tree)
    return tree


PRESETS = Path(__file__).resolve().parents[3] / "jobs" / "configs"


def _base_file(config: Path, base: object) -> Path:
    """The file a config's ``base:`` names: a file beside the config, else a preset of jobs/configs. Nothing
    else: a shared config must not read (and log) an arbitrary file of the machine it runs on."""
    if not isinstance(base, str) or not base or Path(base).name != base or base in (".", ".."):
        raise ConfigError(
            f"config file {str(config)!r}: base: {base!r} must be the name of a file beside it or of a preset "
            "in jobs/configs (no folders); copy the file you want beside the config"
        )
    for candidate in (config.parent / base, PRESETS / base):
        if candidate.is_file():
            return candidate
    raise ConfigError(
        f"config file {str(config)!r}: base: {base!r} is neither beside it nor a preset in jobs/configs"
    )


def _merge(base: dict[str, object], top: dict[str, object]) -> dict[str, object]:
    merged = dict(base)
    for key, value in top.items():
        current = merged.get(key)
        if isinstance(value, dict) and isinstance(current, dict):
            merged[key] = _merge(current, value)
        else:
            merged[key] = value
    return merged


def load_config(path: str | os.PathLike[str] | None = None, overrides: Sequence[str] = ()) -> JobConfig:
    """Build a validated ``JobConfig`` from an optional YAML file and ``key.path=value`` overrides.

    Raises ``ConfigError`` (a ``ValueError``) naming the file, key or value that is wrong and the fix.
    """
    tree: dict[str, object] = read_yaml(path) if path is not None else {}
    _walk_keys(tree)
    for item in overrides:
        key, value = parse_override(item)
        _check_key(key, _is_free_form(key.rpartition(".")[0]))
        _set_path(tree, key, value)
    try:
        return JobConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_explain(err, path)) from None


def _explain(err: ValidationError, path: str | os.PathLike[str] | None) -> str:
    where = f" in {str(path)!r}" if path else ""
    lines = [f"invalid configuration{where}:"]
    for problem in err.errors():
        loc = ".".join(str(p) for p in problem["loc"])
        msg = problem["msg"].removeprefix("Value error, ")
        # a check across sections names its keys itself; its input would be the whole config
        lines.append(f"  {loc}: {msg} (got {problem.get('input')!r})" if loc else f"  {msg}")
    lines.append("Fix the value in the file or override it with key.path=value; --help lists every key.")
    return "\n".join(lines)


def describe_keys() -> str:
    """A help text listing every leaf key with its default and meaning."""
    flat = dict(flatten(_nested_defaults(JobConfig)))
    lines = []
    for path, field in config_keys().items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            continue
        default = flat.get(path)
        lines.append(f"  {path} = {default!r}\n      {field.description or ''}")
    return "\n".join(lines)


def _nested_defaults(model: type[BaseModel]) -> dict[str, object]:
    out: dict[str, object] = {}
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            out[name] = _nested_defaults(annotation)
        else:
            out[name] = field.get_default(call_default_factory=True)
    return out
