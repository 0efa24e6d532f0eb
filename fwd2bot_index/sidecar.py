"""Per-image metadata from a sidecar file (``f2b index --metadata FILE``).

A module of its own below the facade: reading a user's JSON or CSV has nothing to do with joining a
model and a collection, and ``service.py`` stays under 500 lines. ``fwd2bot_index.service.read_sidecar``
stays importable (re-exported).
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ServiceError

__all__ = ["read_sidecar"]


def read_sidecar(path: str | os.PathLike) -> dict[str, dict]:
    """Per-image metadata from a JSON (object keyed by path, or list of rows) or CSV with a ``path`` column.

    Relative paths are resolved against the sidecar's folder. Values are stored and filterable.
    """
    import csv
    import json

    path = Path(path)
    base = path.parent
    try:
        if path.suffix.lower() == ".csv":
            with path.open(newline="") as fh:
                rows = list(csv.DictReader(fh))
        else:
            data = json.loads(path.read_text())
            rows = [{"path": k, **v} for k, v in data.items()] if isinstance(data, dict) else data
    except (OSError, ValueError) as exc:
        raise ServiceError(f"metadata file {path}: cannot read it ({exc})") from exc
    out = {}
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not row.get("path"):
            raise ServiceError(f"metadata file {path}: record {n} has no 'path'")
        meta = {k: v for k, v in row.items() if k != "path"}
        out[str((base / row["path"]).resolve())] = meta
    return out
