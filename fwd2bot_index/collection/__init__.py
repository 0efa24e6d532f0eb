"""Collections: the storage side of fwd2bot-index. No torch here, ever (see ARCHITECTURE.md).

A collection is a folder with a SQLite catalog (the truth), a token store of immutable Arrow shards
(summary tokens + embeddings), a vector index (FAISS, Qdrant Edge, Qdrant local or a Qdrant server)
that is a rebuildable cache, a manifest and a writer lock. ``Collection`` is the entry point.
"""

from .catalog import Catalog, FilterError, ImageRow, parse_filter
from .errors import (
    CollectionError,
    CollectionExistsError,
    CollectionFormatError,
    CollectionLockedError,
    CollectionMismatchError,
    CollectionNotFoundError,
    CollectionReadOnlyError,
)
from .index import ExactIndex, FaissIndex, QdrantEdgeIndex, QdrantLocalIndex, QdrantServerIndex, VectorIndex, open_index
from .lock import WriterLock
from .manifest import BACKENDS, FORMAT_VERSION, Manifest
from .store import DEFAULT_COLLECTION, Collection, FileStat, Hit, IndexPlan, NewImage, VerifyReport
from .tokens import TokenStore

__all__ = [
    "BACKENDS", "DEFAULT_COLLECTION", "FORMAT_VERSION", "Catalog", "Collection", "CollectionError",
    "CollectionExistsError", "CollectionFormatError", "CollectionLockedError", "CollectionMismatchError",
    "CollectionNotFoundError", "CollectionReadOnlyError", "ExactIndex", "FaissIndex", "FileStat", "FilterError",
    "Hit", "ImageRow", "IndexPlan", "Manifest", "NewImage", "QdrantEdgeIndex", "QdrantLocalIndex",
    "QdrantServerIndex", "TokenStore", "VectorIndex", "VerifyReport", "WriterLock", "open_index", "parse_filter",
]
