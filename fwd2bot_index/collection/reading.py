"""Reading a ``Collection``: search (with filters, pagination, thresholds, "more like this"), image
records, stored tokens and embeddings, and ``info``. Every read first catches up with what other
processes committed (``_refresh``), so a server finds images indexed beside it at its next search."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any, Callable

import numpy as np

from ._fs import disk_bytes
from .catalog import CATALOG_NAME, ImageRow
from .index import normalize
from .records import FileStat, Hit, IndexPlan, abs_path, as_stat


class Reading:
    """The read half of ``Collection`` (state lives there)."""

    def plan(self, files: Iterable[FileStat | tuple[Any, ...] | str | os.PathLike[str]],
             on_checked: Callable[[int], None] | None = None, include_removed: bool = False) -> IndexPlan:
        """Sort scanned files into what needs encoding, what is done, and what is a duplicate.

        Files are ``FileStat``s, ``(path, size, mtime[, hash])`` tuples or plain paths (stat'ed
        here). Only new or changed files are hashed. Nothing is written. ``on_checked(1)`` is called
        per file (hashing a large new folder takes a while: it drives a progress bar). A path the
        user removed goes to ``plan.removed`` while its content is the one removed (same hash; a
        touched file is still the same file), unless ``include_removed``.
        """
        from ..imaging import file_sha256

        stats = [as_stat(f) for f in files]
        plan = IndexPlan()
        with self._mutex:
            states = self.catalog.path_states([f.path for f in stats])
            removed = {} if include_removed else self.catalog.removed_states([f.path for f in stats])
        to_hash: list[FileStat] = []
        for f in stats:  # hashing reads files: done outside the mutex so searches are not blocked
            if on_checked is not None:
                on_checked(1)
            state = states.get(f.path)
            if state is not None and state[1] == f.size and state[2] == f.mtime:
                if state[0] == "indexed":
                    plan.already_indexed.append((f, int(state[3])))
                else:
                    plan.failed_unchanged.append((f, str(state[3])))
                continue
            if f.path in removed and removed[f.path][1:] == (f.size, f.mtime):
                plan.removed.append(f)  # untouched since its removal: no need to read it
                continue
            if f.hash is None:
                try:
                    f = FileStat(f.path, f.size, f.mtime, file_sha256(f.path))
                except OSError as exc:
                    plan.unreadable.append((f, f"cannot read the file ({exc.strerror or exc})"))
                    continue
            if f.path in removed and removed[f.path][0] == f.hash:
                plan.removed.append(f)
                continue
            to_hash.append(f)
        with self._mutex:
            known = self.catalog.ids_by_hashes({f.hash for f in to_hash})
        first: set[str] = set()
        for f in to_hash:
            if f.hash in known or f.hash in first:
                plan.duplicates.append(f)
            else:
                first.add(f.hash)
                plan.to_encode.append(f)
        return plan

    def world_counts(self) -> tuple[int, int]:
        """``(checked, outside)``: of the images held now, how many were checked against the demo
        model's world when they were committed, and how many of those are outside it."""
        with self._mutex:  # every search response carries the demo-world warning: count once per catalog version
            version = self.catalog.version()
            cached = getattr(self, "_world_counts_cache", None)
            if cached is None or cached[0] != version:
                cached = self._world_counts_cache = (version, self.catalog.world_counts())
            return cached[1]

    # ------------------------------------------------------------------ searching

    def search(
        self,
        query: np.ndarray,
        k: int = 10,
        filter: dict[str, Any] | None = None,
        offset: int = 0,
        min_score: float | None = None,
        exclude_ids: Iterable[int] | None = None,
    ) -> list[Hit]:
        """Top-``k`` images for one query embedding (D,), best first, after skipping ``offset``.

        ``filter`` is a metadata filter (see ``parse_filter``); ``min_score`` drops weaker hits.
        """
        q = np.asarray(query, dtype=np.float32)
        if q.ndim == 2 and q.shape[0] != 1:
            raise ValueError(f"search takes one query (D,), got {q.shape[0]}; use search_batch for several")
        return self.search_batch(q.reshape(1, -1), k, filter, offset, min_score, exclude_ids)[0]

    def search_batch(
        self,
        queries: np.ndarray,
        k: int = 10,
        filter: dict[str, Any] | None = None,
        offset: int = 0,
        min_score: float | None = None,
        exclude_ids: Iterable[int] | None = None,
    ) -> list[list[Hit]]:
        """``search`` for several queries (q, D) at once; one hit list per query."""
        if k < 0 or offset < 0:
            raise ValueError("k and offset must not be negative")
        q = self._check_query(queries)
        excluded = {int(i) for i in exclude_ids or ()}
        with self._mutex:
            self._refresh()
            allowed = self.catalog.filter_ids(filter) if filter else None
            if allowed is not None:
                allowed -= excluded
            want = offset + k
            if want == 0:
                return [[] for _ in range(len(q))]
            fetch = want + len(self._extra) + (len(excluded) if allowed is None else 0)
            if not self.index.exact_scores:
                fetch = max(fetch * 4, 64)
            found = self.index.search(q, fetch, allowed)
            if self._pending is not None and len(self._pending):
                extra = self._pending.search(q, fetch, allowed)
                found = [a + b for a, b in zip(found, extra)]
            found = [[(i, s) for i, s in row if i not in self._extra and i not in excluded] for row in found]
            if not self.index.exact_scores:
                found = self._rescore(q, found)
            ranked = [sorted(row, key=lambda t: (-t[1], t[0]))[offset:want] for row in found]
            if min_score is not None:
                ranked = [[(i, s) for i, s in row if s >= min_score] for row in ranked]
            return self._hits(ranked)

    def similar(self, image_id: int, k: int = 10, filter: dict[str, Any] | None = None, offset: int = 0,
                min_score: float | None = None) -> list[Hit]:
        """"More like this": images nearest to a stored image's embedding, itself excluded."""
        return self.search(self.embedding(image_id), k, filter, offset, min_score, exclude_ids=[image_id])

    def _rescore(self, q: np.ndarray, found: list[list[tuple[int, float]]]) -> list[list[tuple[int, float]]]:
        """Replace approximate (PQ) scores by exact inner products with the stored embeddings."""
        ids = sorted({i for row in found for i, _ in row})
        if not ids:
            return found
        vecs = dict(zip(ids, self.tokens.get_embeddings(ids)))
        return [[(i, float(vecs[i] @ qv)) for i, _ in row] for qv, row in zip(q, found)]

    def _hits(self, ranked: list[list[tuple[int, float]]]) -> list[list[Hit]]:
        ids = sorted({i for row in ranked for i, _ in row})
        rows = {r.id: r for r in self.catalog.images(ids)}
        return [[Hit(i, rows[i].path, s, rows[i].metadata) for i, s in row if i in rows] for row in ranked]

    def _check_query(self, queries: np.ndarray) -> np.ndarray:
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(
                f"query has shape {tuple(np.shape(queries))} but collection {self.path} stores {self.dim}-d "
                f"embeddings from {self.manifest.describe_model()}; embed the query with that model"
            )
        return normalize(q, "query")

    # ------------------------------------------------------------------ reading images

    def get(self, image_id: int) -> ImageRow | None:
        """The catalog record of an image, or None."""
        with self._mutex:
            return self.catalog.image(int(image_id))

    def resolve(self, id_or_path: int | str | os.PathLike[str]) -> ImageRow:
        """Find an image by id (int or digits) or by one of its paths; ``KeyError`` says which was missing."""
        with self._mutex:
            if isinstance(id_or_path, (int, np.integer)) or (isinstance(id_or_path, str) and id_or_path.isdigit()):
                row = self.catalog.image(int(id_or_path))
                if row is None:
                    raise KeyError(f"no image with id {id_or_path} in collection {self.path}")
                return row
            image_id = self.catalog.id_by_path(abs_path(id_or_path))
            if image_id is None:
                raise KeyError(f"{id_or_path} is not indexed in collection {self.path}")
            return self.catalog.image(image_id)  # type: ignore[return-value]

    def path_status(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        """``{"path", "status": "indexed"|"failed"|"unknown", ...}`` for one file path: the image id
        when indexed, the reason when it failed."""
        p = abs_path(path)
        with self._mutex:
            state = self.catalog.path_states([p]).get(p)
        if state is None:
            return {"path": p, "status": "unknown"}
        kind, size, mtime, detail = state
        key = "id" if kind == "indexed" else "reason"
        return {"path": p, "status": kind, "size": size, "mtime": mtime, key: detail}

    def list_images(self, offset: int = 0, limit: int = 100) -> list[ImageRow]:
        with self._mutex:
            return self.catalog.images(self.catalog.page_ids(offset, limit))

    def failures(self, limit: int | None = None) -> list[dict[str, Any]]:
        """Files that could not be indexed: ``{"path", "size", "mtime", "reason", "recorded"}``."""
        with self._mutex:
            return self.catalog.failures(limit)

    def get_tokens(self, image_id: int) -> np.ndarray:
        """The stored summary tokens of an image as float32 (T, H)."""
        return self.get_tokens_batch([image_id])[0]

    def get_tokens_batch(self, ids: Sequence[int]) -> np.ndarray:
        """float32 (n, T, H) for several images, in the order given."""
        return self._read(lambda: self.tokens.get_tokens_batch(ids))

    def embedding(self, image_id: int) -> np.ndarray:
        """The stored embedding (D,) of an image, e.g. for "more like this"."""
        return self.embeddings([image_id])[0]

    def embeddings(self, ids: Sequence[int]) -> np.ndarray:
        return self._read(lambda: self.tokens.get_embeddings(ids))

    def _read(self, fn: Any) -> np.ndarray:
        with self._mutex:
            try:
                return fn()
            except FileNotFoundError:
                # A writer compacted or removed the shard between our lookup and the read: retry once.
                self.tokens.close()
                return fn()

    # ------------------------------------------------------------------ health

    def info(self) -> dict[str, Any]:
        """Counts, sizes on disk and the identity of the collection (JSON-ready)."""
        with self._mutex:
            counts = self.catalog.counts()
            token_bytes = self.tokens.bytes_on_disk()
            index_bytes = self.index.bytes_on_disk()
            n = counts["images"]
            per = (lambda b: round(b / n, 1) if n and b is not None else None)
            m = self.manifest
            live = self.catalog.shard_live_rows()
            ledger = self.catalog.shard_ledger()  # rows recorded at commit: no need to open every shard
            total_rows = sum(ledger[s][1] if s in ledger and ledger[s][0] == "live" else self.tokens.shard_rows(s)
                             for s in live)
            return {
                "path": str(self.path), "model_name": m.model_name, "model_fingerprint": m.model_fingerprint,
                "strategy": m.strategy, "embed_dim": m.embed_dim, "token_count": m.token_count,
                "token_dim": m.token_dim, "token_dtype": m.token_dtype, "backend": m.backend,
                "backend_options": {k: v for k, v in m.backend_options.items() if k != "api_key"},
                "index": self.index.describe(), "indexed": n, "paths": counts["paths"],
                "failed": counts["failed"], "shards": len(live), "dead_rows": total_rows - n,
                "token_store_bytes": token_bytes, "index_bytes": index_bytes,
                "catalog_bytes": sum(disk_bytes(self.path / (CATALOG_NAME + s)) for s in ("", "-wal", "-shm")),
                "tokens_bytes_per_image": per(token_bytes), "index_bytes_per_image": per(index_bytes),
                "bytes_per_image": per(token_bytes + (index_bytes or 0)),
                "created": m.created, "updated": m.updated, "format_version": m.format_version,
                "writable": self.writable,
            }
