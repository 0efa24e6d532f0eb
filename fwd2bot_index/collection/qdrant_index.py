"""Qdrant backends: Qdrant Edge (the real engine embedded in-process), qdrant-client local mode
(``QdrantClient(path=...)``, brute force, for small collections and tests) and a Qdrant server or
cluster reached by URL. Local and server share one implementation through qdrant-client.

All use the ``Dot`` distance on normalised vectors, so scores equal FAISS's inner products.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ._fs import disk_bytes
from .index import Results, VectorIndex, as_ids

__all__ = ["QdrantEdgeIndex", "QdrantLocalIndex", "QdrantServerIndex"]

_UPSERT_CHUNK = 1024
_SCROLL_PAGE = 10_000
QUANTIZATIONS = ("int8", "binary")


def cluster_settings(shards: int | None = None, replication_factor: int | None = None,
                     write_consistency_factor: int | None = None, on_disk: bool = False,
                     quantization: str | None = None) -> dict[str, Any]:
    """``create_collection`` keyword arguments for a collection at scale (a server or cluster).

    shards split the points across nodes; replication_factor keeps copies on other nodes (reads and
    writes survive a node loss); on_disk keeps full vectors and the HNSW graph memory-mapped instead of
    in RAM; quantization keeps int8 (4x smaller) or binary (32x) copies in RAM for the first pass, and
    searches rescore with the full vectors. ``None`` leaves the server's default.
    """
    from qdrant_client import models as m

    for name, value in (("shards", shards), ("replication_factor", replication_factor),
                        ("write_consistency_factor", write_consistency_factor)):
        if value is not None and (isinstance(value, bool) or int(value) != value or value < 1):
            raise ValueError(f"Qdrant option {name} must be a whole number >= 1, got {value!r}")
    if quantization not in (None, *QUANTIZATIONS):
        raise ValueError(f"Qdrant quantization {quantization!r}: use {' or '.join(QUANTIZATIONS)} (or none)")
    kwargs: dict[str, Any] = {
        "shard_number": shards, "replication_factor": replication_factor,
        "write_consistency_factor": write_consistency_factor,
    }
    if quantization == "int8":
        kwargs["quantization_config"] = m.ScalarQuantization(
            scalar=m.ScalarQuantizationConfig(type=m.ScalarType.INT8, quantile=0.99, always_ram=True))
    elif quantization == "binary":
        kwargs["quantization_config"] = m.BinaryQuantization(binary=m.BinaryQuantizationConfig(always_ram=True))
    if on_disk:
        kwargs["on_disk_payload"] = True
    return {k: v for k, v in kwargs.items() if v is not None}


class QdrantEdgeIndex(VectorIndex):
    """An embedded Qdrant Edge shard in ``<collection>/qdrant-edge``.

    Edge locks its write-ahead log, so one process at a time may hold it open.
    """

    backend = "qdrant-edge"

    def __init__(self, path: str | Path, dim: int, ef_search: int = 128, exact: bool = False,
                 optimize_on_save: bool = True) -> None:
        import qdrant_edge as qe

        self._qe = qe
        self.path = Path(path)
        self.dim = int(dim)
        self.ef_search, self.exact, self.optimize_on_save = ef_search, exact, optimize_on_save
        config = qe.EdgeConfig(vectors=qe.EdgeVectorParams(size=self.dim, distance=qe.Distance.Dot))
        if (self.path / "edge_config.json").exists():
            self._shard = qe.EdgeShard.load(str(self.path), config)
        else:
            self.path.mkdir(parents=True, exist_ok=True)
            self._shard = qe.EdgeShard.create(str(self.path), config)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        qe = self._qe
        ids = as_ids(ids)
        vecs = np.asarray(vectors, dtype=np.float32).reshape(len(ids), self.dim)
        for start in range(0, len(ids), _UPSERT_CHUNK):
            points = [
                qe.Point(int(i), v.tolist())
                for i, v in zip(ids[start : start + _UPSERT_CHUNK], vecs[start : start + _UPSERT_CHUNK])
            ]
            self._shard.update(qe.UpdateOperation.upsert_points(points))

    def remove(self, ids: Iterable[int]) -> None:
        gone = [int(i) for i in ids]
        for start in range(0, len(gone), _UPSERT_CHUNK):
            self._shard.update(self._qe.UpdateOperation.delete_points(gone[start : start + _UPSERT_CHUNK]))

    def search(self, queries: np.ndarray, k: int, allowed_ids: set[int] | None = None) -> Results:
        qe = self._qe
        q = np.asarray(queries, dtype=np.float32).reshape(-1, self.dim)
        if k <= 0 or (allowed_ids is not None and not allowed_ids):
            return [[] for _ in range(len(q))]
        flt = qe.Filter(must=[qe.HasIdCondition({int(i) for i in allowed_ids})]) if allowed_ids is not None else None
        params = qe.SearchParams(hnsw_ef=max(self.ef_search, k), exact=self.exact)
        requests = [
            qe.QueryRequest(limit=k, query=qe.Query.Nearest(row.tolist()), filter=flt, params=params,
                            with_payload=False, with_vector=False)
            for row in q
        ]
        answers = self._shard.query_batch(qe.QueryBatchRequest(requests))
        return [[(int(p.id), float(p.score)) for p in answer] for answer in answers]

    def ids(self) -> np.ndarray:
        qe = self._qe
        out: list[int] = []
        offset = None
        while True:
            records, offset = self._shard.scroll(
                qe.ScrollRequest(offset=offset, limit=_SCROLL_PAGE, with_payload=False, with_vector=False)
            )
            out.extend(int(r.id) for r in records)
            if offset is None or not records:
                return np.asarray(out, dtype=np.int64)

    def __len__(self) -> int:
        return int(self._shard.count(self._qe.CountRequest(exact=True)))

    def clear(self) -> None:
        ids = self.ids()
        if len(ids):
            self.remove(ids.tolist())

    def save(self) -> None:
        if self.optimize_on_save:
            self._shard.optimize()
        self._shard.flush()

    def close(self) -> None:
        if self._shard is not None:
            self._shard.flush()
            self._shard.close()
            self._shard = None

    def bytes_on_disk(self) -> int | None:
        return disk_bytes(self.path)

    def describe(self) -> dict[str, Any]:
        info = self._shard.info()
        return {"backend": self.backend, "vectors": int(info.points_count),
                "indexed_vectors": int(info.indexed_vectors_count), "segments": int(info.segments_count)}


class _QdrantClientIndex(VectorIndex):
    """Shared qdrant-client implementation for local mode and servers."""

    #: True when the client searches by brute force (local mode), where HNSW params do not apply.
    exact_engine = False

    def __init__(self, client: Any, dim: int, collection_name: str = "f2b", ef_search: int = 128,
                 **cluster: Any) -> None:
        from qdrant_client import models

        self._m = models
        self.client = client
        self.dim = int(dim)
        self.collection_name = collection_name
        self.ef_search = ef_search
        self.on_disk = bool(cluster.get("on_disk"))
        self.quantization = cluster.get("quantization")
        self._create_options = cluster_settings(**cluster)
        if not client.collection_exists(collection_name):
            self._create()
        else:
            size = client.get_collection(collection_name).config.params.vectors.size
            if int(size) != self.dim:
                raise ValueError(
                    f"Qdrant collection {collection_name!r} holds {size}-d vectors, this collection needs {self.dim}"
                )

    def _create(self) -> None:
        m = self._m
        vectors = m.VectorParams(size=self.dim, distance=m.Distance.DOT, on_disk=self.on_disk or None,
                                 hnsw_config=m.HnswConfigDiff(on_disk=True) if self.on_disk else None)
        self.client.create_collection(self.collection_name, vectors_config=vectors, **self._create_options)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        ids = as_ids(ids)
        vecs = np.asarray(vectors, dtype=np.float32).reshape(len(ids), self.dim)
        for start in range(0, len(ids), _UPSERT_CHUNK):
            chunk = slice(start, start + _UPSERT_CHUNK)
            self.client.upsert(
                self.collection_name,
                points=self._m.Batch(ids=ids[chunk].tolist(), vectors=vecs[chunk].tolist()),
                wait=True,
            )

    def remove(self, ids: Iterable[int]) -> None:
        gone = [int(i) for i in ids]
        for start in range(0, len(gone), _UPSERT_CHUNK):
            self.client.delete(
                self.collection_name,
                points_selector=self._m.PointIdsList(points=gone[start : start + _UPSERT_CHUNK]),
                wait=True,
            )

    def search(self, queries: np.ndarray, k: int, allowed_ids: set[int] | None = None) -> Results:
        m = self._m
        q = np.asarray(queries, dtype=np.float32).reshape(-1, self.dim)
        if k <= 0 or (allowed_ids is not None and not allowed_ids):
            return [[] for _ in range(len(q))]
        flt = m.Filter(must=[m.HasIdCondition(has_id=sorted(int(i) for i in allowed_ids))]) if allowed_ids is not None else None
        # Local mode is brute force and warns about search params, so only servers get them.
        rescore = m.QuantizationSearchParams(rescore=True, oversampling=2.0) if self.quantization else None
        params = None if self.exact_engine else m.SearchParams(hnsw_ef=max(self.ef_search, k), quantization=rescore)
        requests = [
            m.QueryRequest(query=row.tolist(), limit=k, filter=flt, params=params, with_payload=False, with_vector=False)
            for row in q
        ]
        answers = self.client.query_batch_points(self.collection_name, requests=requests)
        return [[(int(p.id), float(p.score)) for p in answer.points] for answer in answers]

    def ids(self) -> np.ndarray:
        out: list[int] = []
        offset = None
        while True:
            points, offset = self.client.scroll(
                self.collection_name, limit=_SCROLL_PAGE, offset=offset, with_payload=False, with_vectors=False
            )
            out.extend(int(p.id) for p in points)
            if offset is None or not points:
                return np.asarray(out, dtype=np.int64)

    def __len__(self) -> int:
        return int(self.client.count(self.collection_name, exact=True).count)

    def clear(self) -> None:
        self.client.delete_collection(self.collection_name)
        self._create()

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None


class QdrantLocalIndex(_QdrantClientIndex):
    """qdrant-client local mode in ``<collection>/qdrant-local`` (or ``":memory:"``).

    Brute force inside qdrant-client: fine up to some tens of thousands of images.
    """

    backend = "qdrant-local"
    exact_engine = True

    def __init__(self, path: str | Path, dim: int, collection_name: str = "f2b", ef_search: int = 128) -> None:
        from qdrant_client import QdrantClient

        self.path = None if str(path) == ":memory:" else Path(path)
        client = QdrantClient(location=":memory:") if self.path is None else QdrantClient(path=str(self.path))
        super().__init__(client, dim, collection_name, ef_search)

    def bytes_on_disk(self) -> int | None:
        return disk_bytes(self.path) if self.path else None


class QdrantServerIndex(_QdrantClientIndex):
    """A collection on a Qdrant server or cluster. ``api_key`` defaults to ``$QDRANT_API_KEY`` and is
    never written into the manifest. ``url=":memory:"`` gives an in-process stand-in (tests).

    ``shards``, ``replication_factor``, ``write_consistency_factor``, ``on_disk`` and ``quantization``
    apply when this creates the collection (``cluster_settings``); an existing collection keeps its own.
    Filters are resolved in the catalog and reach Qdrant as id lists (``HasIdCondition``, served by
    Qdrant's id tracker), so the points carry no payload and need no payload index."""

    backend = "qdrant-server"

    def __init__(self, url: str, dim: int, api_key: str | None = None, collection_name: str = "f2b",
                 prefer_grpc: bool = False, timeout: int = 30, ef_search: int = 128, shards: int | None = None,
                 replication_factor: int | None = None, write_consistency_factor: int | None = None,
                 on_disk: bool = False, quantization: str | None = None) -> None:
        from qdrant_client import QdrantClient

        self.url = url
        if url == ":memory:":
            self.exact_engine = True
            client = QdrantClient(location=":memory:")
        else:
            client = QdrantClient(url=url, api_key=api_key or os.environ.get("QDRANT_API_KEY"),
                                  prefer_grpc=prefer_grpc, timeout=timeout)
        super().__init__(client, dim, collection_name, ef_search, shards=shards,
                         replication_factor=replication_factor, write_consistency_factor=write_consistency_factor,
                         on_disk=on_disk, quantization=quantization)

    def describe(self) -> dict[str, Any]:
        return {"backend": self.backend, "url": self.url, "collection_name": self.collection_name, "vectors": len(self)}
