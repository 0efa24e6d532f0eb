"""A demo stage's resumable state: weights, optimizer, step, time spent and the monitor history.

Written atomically (temporary file, then rename) with ``torch.save`` of tensors and numbers only, so
``torch.load(weights_only=True)`` reads it back; the history (a list of flat dicts of numbers) is
stored as one tensor plus its column names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def save_stage_state(path: Path, state: dict[str, Any], history: list[dict[str, float]]) -> None:
    keys = sorted({k for row in history for k in row})
    table = torch.tensor([[float(row.get(k, float("nan"))) for k in keys] for row in history], dtype=torch.float64)
    tmp = path.with_suffix(".tmp")
    torch.save({**state, "history_keys": keys, "history": table}, tmp)
    tmp.replace(path)


def load_stage_state(path: Path) -> dict[str, Any] | None:
    """The saved state with ``history`` as a list of dicts again, or None when there is none."""
    if not path.is_file():
        return None
    state = torch.load(path, weights_only=True)
    keys = state.pop("history_keys")  # once: a comprehension would pop it again for every row
    state["history"] = [dict(zip(keys, row)) for row in state["history"].tolist()]
    return state
