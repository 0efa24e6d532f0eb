"""Training checkpoints: written atomically, found again after a crash, restored exactly.

A checkpoint is a folder ``checkpoints/step-NNNNNNNN/`` holding ``model/`` (the model in its released
format: a Fwd2Bot compressor checkpoint, or a plain transformers folder for base pretraining) and
``trainer_state.pt`` (optimizer, scheduler, RNG states, data position, step). It is first written to
a hidden temporary folder beside it and renamed into place, so a run killed at any moment leaves
either a complete checkpoint or none; ``trainer_state.pt`` is written last and marks completeness.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

STATE_FILE = "trainer_state.pt"
MODEL_DIR = "model"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def rng_state() -> dict[str, Any]:
    """Every RNG a training step draws from (python, numpy, torch CPU and CUDA)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def checkpoint_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def write_checkpoint(root: Path, step: int, save_model: Callable[[Path], None], state: dict[str, Any],
                     keep: int = 2) -> Path:
    """Write ``root/step-N`` atomically: model via ``save_model(folder)``, then the trainer state."""
    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir(root, step)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    try:
        save_model(tmp / MODEL_DIR)
        with open(tmp / STATE_FILE, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    prune_checkpoints(root, keep)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / STATE_FILE).is_file() and (child / MODEL_DIR).is_dir():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def prune_checkpoints(root: Path, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints (``keep`` <= 0 keeps all); drop leftovers of killed writes."""
    for child in root.iterdir() if root.is_dir() else []:
        if child.name.startswith(".tmp-step-") and child.is_dir():
            shutil.rmtree(child, ignore_errors=True)
    if keep > 0:
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def read_state(folder: Path) -> dict[str, Any]:
    """The trainer state of a checkpoint folder (tensors and plain values only: no pickled code)."""
    path = folder / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a training checkpoint (no {STATE_FILE})")
    return torch.load(path, map_location="cpu", weights_only=True)
