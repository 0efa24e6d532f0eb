"""The plain records a ``Collection`` takes and returns (files, new images, hits, plans, reports)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any

import numpy as np

from .index import normalize

__all__ = ["FileStat", "Hit", "IndexPlan", "NewImage", "VerifyReport"]


@dataclass(frozen=True)
class FileStat:
    """A file as the scanner saw it: absolute path, size in bytes, mtime (``os.stat().st_mtime``),
    and its SHA-256 once known."""

    path: str
    size: int
    mtime: float
    hash: str | None = None

    @classmethod
    def of(cls, path: str | os.PathLike[str], hash: str | None = None) -> FileStat:
        st = os.stat(path)
        return cls(os.path.abspath(path), int(st.st_size), float(st.st_mtime), hash)


@dataclass
class NewImage:
    """One successfully encoded file for ``add_batch``."""

    path: str | os.PathLike[str]
    hash: str
    size: int
    mtime: float
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Hit:
    """One search result: image id, the path to show, cosine score (higher is better), metadata."""

    id: int
    path: str
    score: float
    metadata: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class IndexPlan:
    """What an incremental indexing run must do with the scanned files.

    Unpacks as ``to_encode, already_indexed, duplicates = plan``; the other lists are attributes.
    """

    #: New or changed content, hash filled, one file per distinct hash: decode, encode, ``add_batch``.
    to_encode: list[FileStat] = field(default_factory=list)
    #: Unchanged files already in the collection, with their image id: nothing to do.
    already_indexed: list[tuple[FileStat, int]] = field(default_factory=list)
    #: Content already in the collection, or equal to an earlier ``to_encode`` file (moved or copied
    #: files): call ``add_path_alias`` after the batch holding that content is added.
    duplicates: list[FileStat] = field(default_factory=list)
    #: Files that failed before and have not changed since (skipped; reason given).
    failed_unchanged: list[tuple[FileStat, str]] = field(default_factory=list)
    #: Files that could not even be read for hashing (record them with ``record_failure``).
    unreadable: list[tuple[FileStat, str]] = field(default_factory=list)
    #: Paths a user removed (``remove(..., remember=True)``) whose content has not changed: skipped.
    removed: list[FileStat] = field(default_factory=list)

    def __iter__(self) -> Iterator[Any]:
        return iter((self.to_encode, self.already_indexed, self.duplicates))

    def summary(self) -> dict[str, int]:
        return {"to_encode": len(self.to_encode), "already_indexed": len(self.already_indexed),
                "duplicates": len(self.duplicates), "failed_unchanged": len(self.failed_unchanged),
                "unreadable": len(self.unreadable)}


@dataclass
class VerifyReport:
    """Whether catalog, token store and index agree and are undamaged. ``ok`` is False when anything
    is off; each problem is one line that names the part (and the images it holds)."""

    ok: bool
    problems: list[str]
    counts: dict[str, int]
    missing_in_index: list[int] = field(default_factory=list)
    extra_in_index: list[int] = field(default_factory=list)
    orphan_shards: list[str] = field(default_factory=list)
    missing_shards: list[str] = field(default_factory=list)
    bad_rows: list[int] = field(default_factory=list)
    #: Shards whose content differs from the checksum recorded at commit, or that cannot be read.
    damaged_shards: list[str] = field(default_factory=list)
    #: What ``repair`` did (empty for a plain verify).
    actions: list[str] = field(default_factory=list)
    #: Shards on disk that carry another collection's id (never imported; repair sets them aside).
    foreign_shards: list[str] = field(default_factory=list)
    #: Parts that are the wrong kind of file-system object (one line each; repair sets them aside).
    odd_parts: list[str] = field(default_factory=list)
    #: ``verify(deep=True)``: paths whose file no longer holds their image's content
    #: (``{"path", "id", "found", "size", "mtime", "mtime_ns"}``, found: the image id whose content it
    #: holds, or None; size and mtime: the file's before it was hashed).
    mismatched_paths: list[dict[str, Any]] = field(default_factory=list)
    #: What ``damaged/`` holds (``{"path", "entries", "bytes"}``), or None when it is absent or empty: kept
    #: for the user to look through; never a problem (``ok`` does not depend on it).
    set_aside: dict[str, Any] | None = None
    #: Lines for the user that are not problems (what ``damaged/`` holds, and that it may be deleted).
    notes: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return self.ok

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------ helpers


def as_stat(item: FileStat | tuple[Any, ...] | str | os.PathLike[str]) -> FileStat:
    if isinstance(item, FileStat):
        return FileStat(abs_path(item.path), int(item.size), float(item.mtime), item.hash)
    if isinstance(item, tuple):
        path, size, mtime, *rest = item
        return FileStat(abs_path(path), int(size), float(mtime), rest[0] if rest else None)
    return FileStat.of(item)


def abs_path(path: str | os.PathLike[str]) -> str:
    return os.path.abspath(os.fspath(path))


def metadata_json(item: NewImage) -> str:
    try:
        return json.dumps(item.metadata or {}, sort_keys=True, default=_json_default, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{item.path}: metadata is not JSON-serialisable ({exc})") from None


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} value {value!r}")


def check_batch(m: Any, folder: Any, items: Sequence[NewImage], embeddings: np.ndarray,
                tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Shapes and finiteness of one batch against the manifest ``m``; normalized embeddings out."""
    n = len(items)
    emb = np.asarray(embeddings, dtype=np.float32)
    tok = np.asarray(tokens, dtype=np.float32)
    if emb.shape != (n, m.embed_dim):
        raise ValueError(f"embeddings have shape {emb.shape}, expected ({n}, {m.embed_dim}) for "
                         f"{n} images in collection {folder} ({m.describe_model()})")
    if tok.shape != (n, m.token_count, m.token_dim):
        raise ValueError(f"tokens have shape {tok.shape}, expected ({n}, {m.token_count}, {m.token_dim}) "
                         f"for collection {folder} ({m.describe_model()})")
    bad = ~np.isfinite(emb).all(axis=1) | ~np.isfinite(tok.reshape(n, -1)).all(axis=1)
    if bad.any():
        raise ValueError(f"{items[int(np.flatnonzero(bad)[0])].path}: its embedding or tokens contain NaN/inf; "
                         "nothing of this batch was stored")
    return (normalize(emb, "embedding") if n else emb.reshape(0, m.embed_dim)), tok
