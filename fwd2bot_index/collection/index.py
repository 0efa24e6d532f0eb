"""Vector indexes behind one interface: FAISS, Qdrant Edge, Qdrant local mode, a Qdrant server.

The index is a *derived cache* of the embeddings kept in the token store: it can always be rebuilt
from them, which is what makes crash recovery and backend migration cheap. Every backend takes
L2-normalised float32 vectors with int64 ids and scores by inner product (= cosine), so scores are
comparable across backends and higher is better. ``allowed_ids`` restricts a search to a subset (the
catalog's metadata filter), which every backend supports.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CollectionLockedError

__all__ = [
    "ExactIndex",
    "Results",
    "VectorIndex",
    "index_location",
    "normalize",
    "open_index",
]

#: One result list per query: ``(id, score)`` pairs, best first.
Results = list[list[tuple[int, float]]]


def normalize(vectors: np.ndarray, what: str = "vector") -> np.ndarray:
    """float32 rows scaled to unit length; zero or non-finite rows are an error, not a silent NaN."""
    x = np.asarray(vectors, dtype=np.float32)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise ValueError(f"{what}s must be a 1-D or 2-D array, got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    bad = ~np.isfinite(norms[:, 0]) | (norms[:, 0] == 0)
    if bad.any():
        raise ValueError(f"{what} {int(np.flatnonzero(bad)[0])} is zero or not finite; it cannot be normalised")
    return np.ascontiguousarray(x / norms, dtype=np.float32)


def as_ids(ids: Iterable[int] | np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=np.int64))


class VectorIndex(ABC):
    """What the collection needs from a vector index."""

    #: Dimension D of the vectors.
    dim: int
    #: True when returned scores are the exact inner products (False for compressed codes like PQ).
    exact_scores: bool = True
    #: Name of the backend, as in the manifest.
    backend: str = ""

    @abstractmethod
    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Insert vectors (already normalised) under ids not yet present."""

    @abstractmethod
    def remove(self, ids: Iterable[int]) -> None:
        """Forget ids (unknown ids are ignored)."""

    @abstractmethod
    def search(self, queries: np.ndarray, k: int, allowed_ids: set[int] | None = None) -> Results:
        """Top-``k`` ``(id, score)`` per query, best first; only ids in ``allowed_ids`` when given."""

    @abstractmethod
    def ids(self) -> np.ndarray:
        """All ids currently searchable (int64, any order)."""

    @abstractmethod
    def __len__(self) -> int: ...

    def save(self) -> None:
        """Make the current state durable (no-op for engines that persist every write)."""

    def close(self) -> None:
        """Release files and engines; ``save`` first when the caller wants durability."""

    @abstractmethod
    def clear(self) -> None:
        """Drop every vector (before a full rebuild)."""

    def bytes_on_disk(self) -> int | None:
        """Disk space of the index files, None when remote."""
        return None

    def describe(self) -> dict[str, Any]:
        return {"backend": self.backend, "vectors": len(self)}

    def __enter__(self) -> VectorIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ExactIndex(VectorIndex):
    """Brute-force inner product in numpy, in memory only.

    Used when a reader cannot open the persistent index (another process holds an embedded Qdrant
    engine) and to cover vectors committed after the index was last saved.
    """

    backend = "exact"

    def __init__(self, dim: int) -> None:
        self.dim = int(dim)
        self._ids = np.empty(0, dtype=np.int64)
        self._vecs = np.empty((0, self.dim), dtype=np.float32)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        ids = as_ids(ids)
        if len(ids) == 0:
            return
        self._ids = np.concatenate([self._ids, ids])
        self._vecs = np.concatenate([self._vecs, np.asarray(vectors, dtype=np.float32).reshape(len(ids), self.dim)])

    def remove(self, ids: Iterable[int]) -> None:
        keep = ~np.isin(self._ids, as_ids(ids))
        self._ids, self._vecs = self._ids[keep], self._vecs[keep]

    def search(self, queries: np.ndarray, k: int, allowed_ids: set[int] | None = None) -> Results:
        q = np.asarray(queries, dtype=np.float32).reshape(-1, self.dim)
        ids, vecs = self._ids, self._vecs
        if allowed_ids is not None:
            mask = np.isin(ids, np.fromiter(allowed_ids, dtype=np.int64, count=len(allowed_ids)))
            ids, vecs = ids[mask], vecs[mask]
        return exact_topk(q, ids, vecs, k)

    def ids(self) -> np.ndarray:
        return self._ids.copy()

    def __len__(self) -> int:
        return len(self._ids)

    def clear(self) -> None:
        self._ids = np.empty(0, dtype=np.int64)
        self._vecs = np.empty((0, self.dim), dtype=np.float32)


def exact_topk(q: np.ndarray, ids: np.ndarray, vecs: np.ndarray, k: int) -> Results:
    """Exact top-k by inner product; ties broken by smaller id for determinism."""
    if len(ids) == 0 or k <= 0:
        return [[] for _ in range(len(q))]
    scores = q @ vecs.T
    kk = min(k, len(ids))
    out: Results = []
    for row in scores:
        top = np.argpartition(-row, kk - 1)[:kk] if kk < len(row) else np.arange(len(row))
        order = np.lexsort((ids[top], -row[top]))
        out.append([(int(ids[top[j]]), float(row[top[j]])) for j in order])
    return out


# ---------------------------------------------------------------------------------- factory

INDEX_LOCATIONS = {"faiss": "index.faiss", "qdrant-edge": "qdrant-edge", "qdrant-local": "qdrant-local"}


def index_location(backend: str, folder: str | Path) -> Path | None:
    """Where ``backend`` keeps its files inside a collection folder (None for a server)."""
    name = INDEX_LOCATIONS.get(backend)
    return Path(folder) / name if name else None


def open_index(
    backend: str, folder: str | Path, dim: int, options: dict[str, Any] | None = None, readonly: bool = False
) -> VectorIndex:
    """Open (or create) the index of a collection folder for ``backend``.

    Raises ``CollectionLockedError`` when an embedded Qdrant engine is held by another process.
    """
    opts = dict(options or {})
    location = index_location(backend, folder)
    if backend == "faiss":
        from .faiss_index import FaissIndex

        return FaissIndex(location, dim, **opts)
    if backend == "qdrant-edge":
        from .qdrant_index import QdrantEdgeIndex

        return _guard(lambda: QdrantEdgeIndex(location, dim, **opts), location)
    if backend == "qdrant-local":
        from .qdrant_index import QdrantLocalIndex

        return _guard(lambda: QdrantLocalIndex(location, dim, **opts), location)
    if backend == "qdrant-server":
        from .qdrant_index import QdrantServerIndex

        if not opts.get("url"):
            raise ValueError("the qdrant-server backend needs a url option (e.g. http://localhost:6333)")
        return QdrantServerIndex(dim=dim, **opts)
    raise ValueError(f"unknown index backend {backend!r}: use faiss, qdrant-edge, qdrant-local or qdrant-server")


def _guard(make: Any, location: Path | None) -> VectorIndex:
    try:
        return make()
    except Exception as exc:
        text = str(exc)
        if "already accessed" in text or "WouldBlock" in text:
            raise CollectionLockedError(
                f"the Qdrant index at {location} is open in another process (a search, a server or an "
                f"indexing run); close that process and retry"
            ) from None
        raise


from .faiss_index import FaissIndex  # noqa: E402  (re-exported; faiss itself is imported lazily)
from .qdrant_index import QdrantEdgeIndex, QdrantLocalIndex, QdrantServerIndex  # noqa: E402

__all__ += ["FaissIndex", "QdrantEdgeIndex", "QdrantLocalIndex", "QdrantServerIndex"]
