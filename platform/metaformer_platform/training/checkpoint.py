"""Checkpoint files: atomic writes, safe loads (no arbitrary unpickling), and RNG state.

A checkpoint is a folder. Each file is written to a temporary name and renamed, so a process that dies
mid-write never leaves a file that looks complete. ``COMPLETE_MARKER`` is written last by rank 0: a folder
without it is not a checkpoint and is never resumed from.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

COMPLETE_MARKER = "COMPLETE"
TRAINER_FILE = "trainer.pt"
CONFIG_FILE = "config.yaml"
EMA_FILE = "ema.pt"  # the EMA's full fp32 weights (timm names), written by rank 0 for every strategy


def save_tensors(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path`` atomically (temp file + rename in the same folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_tensors(path: Path, map_location: torch.device | str = "cpu") -> Any:
    """Load a file written by ``save_tensors``; only tensors and plain containers are accepted."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {str(path)!r} is missing: the folder is not a complete checkpoint")
    return torch.load(path, map_location=map_location, weights_only=True)


def mark_complete(directory: Path) -> None:
    (directory / COMPLETE_MARKER).write_text("ok\n")


def is_complete(directory: Path) -> bool:
    return (directory / COMPLETE_MARKER).is_file()


def rng_state() -> dict[str, Any]:
    """This process's Python, NumPy and torch RNG states, in a form ``weights_only`` loading accepts."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": np_kind,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` captured."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["kind"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["gauss"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
