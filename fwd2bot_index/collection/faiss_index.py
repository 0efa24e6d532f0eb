"""FAISS backend: exact flat search for small collections, HNSW or IVF-PQ for large ones.

``kind="auto"`` keeps an exact ``IndexIDMap2(IndexFlatIP)`` until ``auto_threshold`` vectors, then
rebuilds as HNSW (M=32) from the stored vectors. HNSW cannot delete: removed ids become tombstones,
excluded at query time with an ``IDSelector`` (exact, no over-fetch needed), and the graph is rebuilt
once tombstones pass ``tombstone_fraction``. IVF-PQ (``kind="ivfpq"``) is trained once enough vectors
exist (until then the flat index serves); it deletes natively but scores are approximate, which the
collection corrects by re-scoring hits with the exact stored embeddings.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ._fs import commit_tmp, disk_bytes, fsync_dir, tmp_name
from .errors import CollectionFormatError
from .index import Results, VectorIndex, as_ids, exact_topk

__all__ = ["FaissIndex"]

KINDS = ("auto", "flat", "hnsw", "ivfpq")


def _faiss() -> Any:
    import faiss

    return faiss


class FaissIndex(VectorIndex):
    """A FAISS index persisted as ``index.faiss`` (+ ``index.faiss.tombstones.npy`` for HNSW)."""

    backend = "faiss"

    def __init__(
        self,
        path: str | Path | None,
        dim: int,
        kind: str = "auto",
        hnsw_m: int = 32,
        ef_construction: int = 40,
        ef_search: int | None = None,
        auto_threshold: int = 100_000,
        tombstone_fraction: float = 0.2,
        ivf_nlist: int | None = None,
        pq_m: int | None = None,
        pq_nbits: int = 8,
        nprobe: int = 16,
        train_min: int = 10_000,
        small_filter: int = 2048,
        threads: int | None = None,
        ef_search_large_from: int = 500_000,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"faiss index kind must be one of {', '.join(KINDS)}, got {kind!r}")
        self.path = Path(path) if path is not None else None
        self.dim = int(dim)
        self.kind = kind
        self.hnsw_m, self.ef_construction, self.ef_search = hnsw_m, ef_construction, ef_search
        self.auto_threshold, self.tombstone_fraction = auto_threshold, tombstone_fraction
        self.ivf_nlist, self.pq_m, self.pq_nbits, self.nprobe = ivf_nlist, pq_m, pq_nbits, nprobe
        self.train_min, self.small_filter = train_min, small_filter
        self.threads = threads
        self.ef_search_large_from = ef_search_large_from
        self._tomb: set[int] = set()
        self._dirty = False
        if self.path is not None and self.path.exists():
            self._load()
        else:
            self._index, self._current = self._new_flat(), "flat"
            self._live: set[int] = set()

    @property
    def effective_ef_search(self) -> int:
        """HNSW's search breadth: ``ef_search`` when given, else by size. At 1M clustered 256-d vectors
        (efConstruction 40) 128 gave recall@10 0.944 and 256 gave 0.960 at 0.48 ms (bench/bench_search.py),
        so collections from ``ef_search_large_from`` vectors search twice as wide."""
        if self.ef_search is not None:
            return int(self.ef_search)
        return 256 if len(getattr(self, "_live", ())) >= self.ef_search_large_from else 128

    # ------------------------------------------------------------------ construction

    @property
    def tombstones_path(self) -> Path | None:
        return self.path.with_name(self.path.name + ".tombstones.npy") if self.path else None

    def _new_flat(self) -> Any:
        faiss = _faiss()
        return faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))

    def _new_hnsw(self) -> Any:
        faiss = _faiss()
        inner = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efConstruction = self.ef_construction
        inner.hnsw.efSearch = self.effective_ef_search
        return faiss.IndexIDMap2(inner)

    def _new_ivfpq(self, n: int) -> Any:
        faiss = _faiss()
        nlist = self.ivf_nlist or int(min(65536, max(16, 4 * math.sqrt(n))))
        m = self.pq_m or _pq_subquantizers(self.dim)
        if self.dim % m:
            raise ValueError(f"pq_m={m} must divide the embedding dimension {self.dim}")
        index = faiss.IndexIVFPQ(faiss.IndexFlatIP(self.dim), self.dim, nlist, m, self.pq_nbits, faiss.METRIC_INNER_PRODUCT)
        index.nprobe = self.nprobe
        return index

    def _target(self, n: int) -> str:
        if self.kind == "auto":
            return "hnsw" if n >= self.auto_threshold else "flat"
        if self.kind == "ivfpq":
            return "ivfpq" if n >= self.train_min else "flat"
        return self.kind

    def _load(self) -> None:
        faiss = _faiss()
        try:
            index = faiss.read_index(str(self.path))
        except RuntimeError as exc:
            raise CollectionFormatError(f"FAISS index {self.path} is unreadable ({exc})") from None
        if index.d != self.dim:
            raise CollectionFormatError(f"FAISS index {self.path} holds {index.d}-d vectors but the collection "
                                        f"stores {self.dim}-d embeddings")
        self._index = index
        if isinstance(index, faiss.IndexIVFPQ):
            self._current = "ivfpq"
            index.nprobe = self.nprobe
            self._live = set(_ivf_ids(index).tolist())
            return
        inner = faiss.downcast_index(index.index)
        self._current = "hnsw" if isinstance(inner, faiss.IndexHNSW) else "flat"
        if self._current == "hnsw":
            inner.hnsw.efSearch = self.effective_ef_search
        stored = faiss.vector_to_array(index.id_map).astype(np.int64)
        tp = self.tombstones_path
        if self._current == "hnsw" and tp is not None and tp.exists():
            self._tomb = set(np.load(tp).astype(np.int64).tolist()) & set(stored.tolist())
        self._live = set(stored.tolist()) - self._tomb

    # ------------------------------------------------------------------ VectorIndex

    @property
    def exact_scores(self) -> bool:  # type: ignore[override]
        return self._current != "ivfpq"

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        ids = as_ids(ids)
        if len(ids) == 0:
            return
        vecs = np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(ids), self.dim)
        dup = [int(i) for i in ids if int(i) in self._live or int(i) in self._tomb]
        if dup or len(set(ids.tolist())) != len(ids):
            raise ValueError(f"id {dup[0] if dup else ids[0]} is already in the FAISS index")
        target = self._target(len(self._live) + len(ids))
        if target != self._current:
            old_ids, old_vecs = self._live_vectors()
            self._rebuild(np.concatenate([old_ids, ids]), np.concatenate([old_vecs, vecs]), target)
        else:
            self._index.add_with_ids(vecs, ids)
            self._live.update(ids.tolist())
        self._dirty = True

    def remove(self, ids: Iterable[int]) -> None:
        gone = [int(i) for i in ids if int(i) in self._live]
        if not gone:
            return
        self._live.difference_update(gone)
        if self._current == "hnsw":
            self._tomb.update(gone)
            if len(self._tomb) > self.tombstone_fraction * (len(self._live) + len(self._tomb)):
                self.compact()
        else:
            self._index.remove_ids(np.asarray(gone, dtype=np.int64))
        self._dirty = True

    def compact(self) -> None:
        """Rebuild the HNSW graph without its tombstones."""
        ids, vecs = self._live_vectors()
        self._rebuild(ids, vecs, self._target(len(ids)) if self.kind != "hnsw" else "hnsw")

    def _live_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        ids = np.fromiter(sorted(self._live), dtype=np.int64, count=len(self._live))
        if len(ids) == 0:
            return ids, np.empty((0, self.dim), dtype=np.float32)
        if self._current == "ivfpq":
            raise RuntimeError("IVF-PQ keeps only compressed codes; rebuild it from the token store")
        return ids, self._index.reconstruct_batch(ids).reshape(len(ids), self.dim)

    def _rebuild(self, ids: np.ndarray, vecs: np.ndarray, kind: str) -> None:
        if kind == "hnsw":
            index = self._new_hnsw()
        elif kind == "ivfpq":
            index = self._new_ivfpq(len(ids))
            index.train(vecs)
        else:
            index = self._new_flat()
        if len(ids):
            index.add_with_ids(vecs, ids)
        self._index, self._current = index, kind
        self._live, self._tomb = set(ids.tolist()), set()
        self._dirty = True

    def rebuild(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Replace the whole content at once (picks the right kind for the size, trains IVF-PQ)."""
        ids = as_ids(ids)
        vecs = np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(ids), self.dim)
        self._rebuild(ids, vecs, self._target(len(ids)))

    def clear(self) -> None:
        self._index, self._current = self._new_flat(), "flat"
        self._live, self._tomb = set(), set()
        self._dirty = True

    def search(self, queries: np.ndarray, k: int, allowed_ids: set[int] | None = None) -> Results:
        q = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)
        if not self._live or k <= 0:
            return [[] for _ in range(len(q))]
        if allowed_ids is not None:
            allowed = np.fromiter((i for i in allowed_ids if i in self._live), dtype=np.int64)
            if len(allowed) == 0:
                return [[] for _ in range(len(q))]
            if self._current == "hnsw" and len(allowed) <= self.small_filter:
                return exact_topk(q, allowed, self._index.reconstruct_batch(allowed).reshape(-1, self.dim), k)
            return self._search(q, min(k, len(allowed)), _faiss().IDSelectorBatch(allowed), len(allowed))
        sel = None
        if self._tomb:
            faiss = _faiss()
            tomb = np.fromiter(self._tomb, dtype=np.int64, count=len(self._tomb))
            sel = faiss.IDSelectorNot(faiss.IDSelectorBatch(tomb))
            sel._keep = tomb  # keep the array alive as long as the selector
        return self._search(q, min(k, len(self._live)), sel, len(self._live))

    def _search(self, q: np.ndarray, k: int, sel: Any, n_allowed: int) -> Results:
        faiss = _faiss()
        if self._current == "hnsw":
            ratio = max(1.0, len(self._live) / max(1, n_allowed))
            params = faiss.SearchParametersHNSW(sel=sel, efSearch=int(min(4096, max(self.effective_ef_search, k) * ratio)))
        elif self._current == "ivfpq":
            params = faiss.SearchParametersIVF(sel=sel, nprobe=self.nprobe if n_allowed > self.small_filter else self._index.nlist)
        else:
            params = faiss.SearchParameters(sel=sel) if sel is not None else None
        threads = self._threads_for(len(q))
        previous = faiss.omp_get_max_threads()
        if threads is not None:
            faiss.omp_set_num_threads(threads)
        try:
            scores, ids = self._index.search(q, k, params=params) if params is not None else self._index.search(q, k)
        finally:
            if threads is not None:
                faiss.omp_set_num_threads(previous)
        return [
            [(int(i), float(s)) for i, s in zip(id_row, score_row) if i >= 0]
            for id_row, score_row in zip(ids, scores)
        ]

    def _threads_for(self, n_queries: int) -> int | None:
        """OpenMP threads for one search. A single query over a small flat index gains nothing from
        threads and, on a busy machine, loses a lot to spinning workers (25 ms instead of 2 ms for
        20k x 256 on 2 shared cores), so it runs on the calling thread. ``threads`` overrides."""
        if self.threads is not None:
            return self.threads
        if n_queries == 1 and len(self._live) < 200_000:
            return 1
        return None

    def ids(self) -> np.ndarray:
        return np.fromiter(self._live, dtype=np.int64, count=len(self._live))

    def __len__(self) -> int:
        return len(self._live)

    def save(self) -> None:
        """Write the index (and tombstones) atomically; cheap no-op when nothing changed."""
        if self.path is None or not self._dirty:
            return
        faiss = _faiss()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tp = self.tombstones_path
        if self._tomb:
            tmp = tmp_name(tp)
            with open(tmp, "wb") as fh:
                np.save(fh, np.fromiter(self._tomb, dtype=np.int64, count=len(self._tomb)))
            commit_tmp(tmp, tp)
        elif tp.exists():
            tp.unlink()
        tmp = tmp_name(self.path)
        try:
            faiss.write_index(self._index, str(tmp))
            commit_tmp(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)  # e.g. a full disk: leave no half-written file behind
            raise
        fsync_dir(self.path.parent)
        self._dirty = False

    def close(self) -> None:
        self._index = None

    def bytes_on_disk(self) -> int | None:
        if self.path is None:
            return None
        return disk_bytes(self.path) + (disk_bytes(self.tombstones_path) if self.tombstones_path else 0)

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"backend": "faiss", "kind": self.kind, "structure": self._current,
                               "vectors": len(self._live), "tombstones": len(self._tomb)}
        if self._current == "ivfpq":
            out["nlist"] = int(self._index.nlist)
        return out

    @staticmethod
    def files(path: Path) -> list[Path]:
        return [path, path.with_name(path.name + ".tombstones.npy")]


def _pq_subquantizers(dim: int) -> int:
    """Largest divisor of ``dim`` up to min(64, dim/2): 64-byte codes for D >= 128, finer for small D."""
    for m in range(min(64, max(1, dim // 2)), 0, -1):
        if dim % m == 0:
            return m
    return 1


def _ivf_ids(index: Any) -> np.ndarray:
    faiss = _faiss()
    lists = index.invlists
    parts = []
    for list_no in range(index.nlist):
        size = lists.list_size(list_no)
        if size:
            parts.append(faiss.rev_swig_ptr(lists.get_ids(list_no), size).copy())
    return np.concatenate(parts).astype(np.int64) if parts else np.empty(0, dtype=np.int64)

