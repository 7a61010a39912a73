"""`infra/local/stack.sh exec CMD`: the venv's tools are found without an activated venv.

Checked with no stack running (STACK_NETNS=none, an empty state dir): `exec` then exports no stack variables
and runs the command directly, so what is left to check is the PATH it runs with, not the servers.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STACK_SH = REPO / "infra" / "local" / "stack.sh"
SYSTEM_PATH = "/usr/bin:/bin"  # no venv on it: what a fresh shell has before `source .venv/bin/activate`


def _stack_exec(tmp_path: Path, python: Path, *command: str, path: str = SYSTEM_PATH) -> subprocess.CompletedProcess:
    env = {
        "PATH": path,
        "HOME": str(tmp_path),
        "STACK_NETNS": "none",
        "STACK_STATE_DIR": str(tmp_path / "state"),  # no stack recorded there
        "PYTHON": str(python),
    }
    return subprocess.run(["bash", str(STACK_SH), "exec", *command], env=env, capture_output=True, text=True,
                          timeout=120, check=False)


def _fake_venv(tmp_path: Path) -> Path:
    """A folder like a venv's bin: a `python` that runs devstack (stdlib only) and a `ray` that says where it is."""
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").symlink_to(sys.executable)
    ray = bin_dir / "ray"
    ray.write_text('#!/bin/sh\necho "venv ray $*"\n')
    ray.chmod(0o755)
    return bin_dir


def test_exec_runs_the_venvs_tools_first_on_path(tmp_path: Path) -> None:
    bin_dir = _fake_venv(tmp_path)
    other = tmp_path / "elsewhere"  # another `ray` earlier on the caller's PATH: the venv's still wins
    other.mkdir()
    (other / "ray").write_text("#!/bin/sh\necho other ray\n")
    (other / "ray").chmod(0o755)
    assert shutil.which("ray", path=SYSTEM_PATH) is None  # else the checks below could pass without the venv

    done = _stack_exec(tmp_path, bin_dir / "python", "ray", "job", "submit")
    assert (done.returncode, done.stdout) == (0, "venv ray job submit\n"), done.stderr

    done = _stack_exec(tmp_path, bin_dir / "python", "sh", "-c", 'echo "$PATH"', path=f"{other}:{SYSTEM_PATH}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().split(":") == [str(bin_dir), str(other), *SYSTEM_PATH.split(":")]
    done = _stack_exec(tmp_path, bin_dir / "python", "ray", path=f"{other}:{SYSTEM_PATH}")
    assert done.stdout == "venv ray \n", done.stderr
    assert not (tmp_path / "state").exists()  # `exec` only read the (absent) stack


def test_exec_finds_the_real_venvs_ray(tmp_path: Path) -> None:
    """What the README's `stack.sh exec ray job submit ...` needs: the project venv's own `ray`."""
    venv_ray = Path(sys.executable).parent / "ray"
    if not venv_ray.is_file():
        pytest.skip(f"no ray beside {sys.executable}")
    done = _stack_exec(tmp_path, Path(sys.executable), "sh", "-c", "command -v ray")
    assert (done.returncode, done.stdout.strip()) == (0, str(venv_ray)), done.stderr


def test_exec_stops_when_the_stack_cannot_be_read(tmp_path: Path) -> None:
    """No python at PYTHON, or one whose `devstack env` fails: the command does not run without the stack's
    variables (it did before: `eval "$(...)"` hides the failure)."""
    missing = tmp_path / "no-venv" / "bin" / "python"
    done = _stack_exec(tmp_path, missing, "sh", "-c", "echo ran")
    assert done.returncode != 0 and done.stdout == "" and os.fspath(missing) in done.stderr

    failing = tmp_path / "broken-venv" / "bin" / "python"
    failing.parent.mkdir(parents=True)
    failing.write_text("#!/bin/sh\necho 'devstack: broken' >&2\nexit 3\n")
    failing.chmod(0o755)
    done = _stack_exec(tmp_path, failing, "sh", "-c", "echo ran")
    assert done.returncode != 0 and done.stdout == "" and "devstack: broken" in done.stderr
