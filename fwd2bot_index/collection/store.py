"""``Collection``: a folder holding one image collection, and the crash-safe protocol that keeps it whole.

Layout of the folder (default ``./.f2b``)::

    manifest.json        model, strategy, shapes, backend (written last on create)
    catalog.sqlite       the source of truth (WAL)
    tokens/*.arrow       immutable token-store shards (summary tokens + embeddings per batch)
    index.faiss | qdrant-edge/ | qdrant-local/     the vector index, a derived cache
    index.state.json     which catalog version the saved index reflects
    lock                 the writer lock

Crash safety. The catalog and the shards are the truth; the index is rebuilt from shard embeddings
whenever it disagrees. Per batch: (1) insert the images in an open SQLite transaction, (2) write the
batch's shard atomically and durably, (3) commit, (4) add the vectors to the index, which is saved
every ``save_every`` changes and on close. On a writable open: shards no catalog row points at are
deleted (a batch that never committed), index ids missing from the catalog are removed, catalog ids
missing from the index are added from their shards. ``kill -9`` at any instant therefore loses at
most the batch in flight, and a rerun sees no duplicates and no orphans. Readers never write: they
cover any lag between index and catalog in memory (see ``_sync_overlay``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ._fs import atomic_write_bytes, disk_bytes
from .catalog import CATALOG_NAME, Catalog, ImageRow
from .errors import (
    CollectionError,
    CollectionExistsError,
    CollectionFormatError,
    CollectionLockedError,
    CollectionReadOnlyError,
)
from .index import ExactIndex, VectorIndex, index_location, normalize, open_index
from .lock import WriterLock
from .manifest import MANIFEST_NAME, Manifest, utc_now
from .tokens import TOKENS_DIR, TokenStore, shard_row_bytes

__all__ = [
    "DEFAULT_COLLECTION",
    "Collection",
    "FileStat",
    "Hit",
    "IndexPlan",
    "NewImage",
    "VerifyReport",
]

log = logging.getLogger(__name__)

DEFAULT_COLLECTION = ".f2b"
STATE_NAME = "index.state.json"
_QDRANT_DIRS = ("qdrant-edge", "qdrant-local")


# ------------------------------------------------------------------------------------ records


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

    def __iter__(self) -> Iterator[Any]:
        return iter((self.to_encode, self.already_indexed, self.duplicates))

    def summary(self) -> dict[str, int]:
        return {"to_encode": len(self.to_encode), "already_indexed": len(self.already_indexed),
                "duplicates": len(self.duplicates), "failed_unchanged": len(self.failed_unchanged),
                "unreadable": len(self.unreadable)}


@dataclass
class VerifyReport:
    """Whether catalog, token store and index agree. ``ok`` is False when anything is off."""

    ok: bool
    problems: list[str]
    counts: dict[str, int]
    missing_in_index: list[int] = field(default_factory=list)
    extra_in_index: list[int] = field(default_factory=list)
    orphan_shards: list[str] = field(default_factory=list)
    missing_shards: list[str] = field(default_factory=list)
    bad_rows: list[int] = field(default_factory=list)

    def __bool__(self) -> bool:
        return self.ok

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------- collection


class Collection:
    """An image collection folder: catalog + token store + vector index + manifest + writer lock.

    Open with ``Collection.open(path, writable=...)`` or make one with ``Collection.create``; use it
    as a context manager so the index is saved and the lock released. Thread-safe (one mutex).
    """

    def __init__(
        self,
        folder: Path,
        manifest: Manifest,
        catalog: Catalog,
        tokens: TokenStore,
        index: VectorIndex,
        lock: WriterLock | None,
        save_every: int = 10_000,
    ) -> None:
        self.path = folder
        self.manifest = manifest
        self.catalog = catalog
        self.tokens = tokens
        self.index = index
        self._lock = lock
        self.save_every = save_every
        self._mutex = threading.RLock()
        self._unsaved = 0
        self._changed = False
        self._closed = False
        self._extra: set[int] = set()
        self._pending: ExactIndex | None = None
        self._synced_version = -1
        self._state_seen: float | None = None

    # ------------------------------------------------------------------ opening

    @property
    def writable(self) -> bool:
        return self._lock is not None

    @property
    def dim(self) -> int:
        return self.manifest.embed_dim

    @staticmethod
    def exists(path: str | os.PathLike[str]) -> bool:
        return (Path(path) / MANIFEST_NAME).is_file()

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        manifest: Manifest,
        backend: str | None = None,
        backend_options: dict[str, Any] | None = None,
        overwrite: bool = False,
        save_every: int = 10_000,
    ) -> Collection:
        """Make a new, empty collection at ``path`` (opened writable, locked).

        An existing collection there is an error unless ``overwrite`` (used by ``--reindex``),
        which deletes its catalog, tokens and index first.
        """
        folder = Path(path).absolute()
        folder.mkdir(parents=True, exist_ok=True)
        lock = WriterLock(folder).acquire()
        try:
            if (folder / MANIFEST_NAME).exists() and not overwrite:
                raise CollectionExistsError(
                    f"{folder} already holds a collection; open it, pick another --collection folder, or "
                    f"re-encode everything with --reindex"
                )
            _wipe(folder)
            updates: dict[str, Any] = {"created": utc_now(), "updated": utc_now()}
            if backend is not None:
                updates["backend"] = backend
            if backend_options is not None:
                updates["backend_options"] = dict(backend_options)
            manifest = Manifest.model_validate({**manifest.model_dump(), **updates})
            catalog = Catalog(folder / CATALOG_NAME)
            tokens = _token_store(folder, manifest, catalog)
            (folder / TOKENS_DIR).mkdir(exist_ok=True)
            index = open_index(manifest.backend, folder, manifest.embed_dim, manifest.backend_options)
            if len(index) and not overwrite:  # only a remote (server) index can hold data here
                n = len(index)
                index.close()
                raise CollectionExistsError(
                    f"the Qdrant collection for {folder} already holds {n} vectors; pick another "
                    f"collection_name, or pass --reindex to replace them"
                )
            index.clear()
            col = cls(folder, manifest, catalog, tokens, index, lock, save_every)
            col._save_index()
            manifest.save(folder)  # last: a folder without manifest is not a collection yet
            return col
        except BaseException:
            lock.release()
            raise

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str] = DEFAULT_COLLECTION,
        writable: bool = False,
        backend_options: dict[str, Any] | None = None,
        save_every: int = 10_000,
    ) -> Collection:
        """Open an existing collection. ``writable`` takes the writer lock and repairs crash leftovers;
        read-only opens never write and may run while a writer is active. ``backend_options`` adds
        or overrides options for this session only (e.g. a Qdrant ``api_key``)."""
        folder = Path(path).absolute()
        manifest = Manifest.load(folder)
        options = {**manifest.backend_options, **(backend_options or {})}
        lock = WriterLock(folder).acquire() if writable else None
        try:
            if not (folder / CATALOG_NAME).exists():
                raise CollectionFormatError(f"collection {folder} has no {CATALOG_NAME}; it cannot be opened")
            catalog = Catalog(folder / CATALOG_NAME, readonly=not writable)
            tokens = _token_store(folder, manifest, catalog)
            if writable:
                removed = tokens.cleanup(set(catalog.shard_live_rows()))
                if removed:
                    log.warning("removed %d token shard(s) left by an interrupted run", len(removed))
                index = _open_index_for_writer(manifest, folder, options)
            else:
                index = _open_index_for_reader(manifest, folder, options, tokens)
            col = cls(folder, manifest, catalog, tokens, index, lock, save_every)
            if writable:
                col._reconcile()
            else:
                state_file = folder / STATE_NAME
                col._state_seen = state_file.stat().st_mtime if state_file.exists() else None
                col._sync_overlay()
            return col
        except BaseException:
            if lock is not None:
                lock.release()
            raise

    def close(self) -> None:
        """Save the index (writers), release files and the lock. Safe to call twice."""
        with self._mutex:
            if self._closed:
                return
            self._closed = True
            try:
                if self.writable:
                    self._save_index()
                    if self._changed:
                        self.manifest.touch()
                        self.manifest.save(self.path)
            finally:
                self.index.close()
                self.tokens.close()
                self.catalog.close()
                if self._lock is not None:
                    self._lock.release()

    def __enter__(self) -> Collection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return self.catalog.counts()["images"]

    def __repr__(self) -> str:
        mode = "writable" if self.writable else "read-only"
        return f"Collection({str(self.path)!r}, {mode}, backend={self.manifest.backend!r})"

    def check_compatible(self, model_fingerprint: str, strategy: dict[str, Any] | None = None,
                         model_name: str | None = None) -> None:
        """Raise ``CollectionMismatchError`` if this collection was built with another model/strategy."""
        self.manifest.check_compatible(model_fingerprint, strategy, model_name, collection=self.path)

    # ------------------------------------------------------------------ planning and adding

    def plan(self, files: Iterable[FileStat | tuple[Any, ...] | str | os.PathLike[str]],
             on_checked: Callable[[int], None] | None = None) -> IndexPlan:
        """Sort scanned files into what needs encoding, what is done, and what is a duplicate.

        Files are ``FileStat``s, ``(path, size, mtime[, hash])`` tuples or plain paths (stat'ed
        here). Only new or changed files are hashed. Nothing is written. ``on_checked(1)`` is called
        per file (hashing a large new folder takes a while: it drives a progress bar).
        """
        from ..imaging import file_sha256

        stats = [_as_stat(f) for f in files]
        plan = IndexPlan()
        with self._mutex:
            states = self.catalog.path_states([f.path for f in stats])
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
            if f.hash is None:
                try:
                    f = FileStat(f.path, f.size, f.mtime, file_sha256(f.path))
                except OSError as exc:
                    plan.unreadable.append((f, f"cannot read the file ({exc.strerror or exc})"))
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

    def add_batch(self, items: Sequence[NewImage], embeddings: np.ndarray, tokens: np.ndarray) -> list[int]:
        """Commit one encoded batch; returns the image id of each item (in order).

        ``embeddings`` float32 (n, D), ``tokens`` float32 (n, T, H). Items whose content (hash) is
        already in the collection, or repeated within the batch, become extra paths of that image.
        """
        self._require_writable()
        n = len(items)
        emb, tok = self._check_batch(items, embeddings, tokens)
        metas = [_metadata_json(it) for it in items]
        with self._mutex:
            known = self.catalog.ids_by_hashes({it.hash for it in items})
            new_rows: list[int] = []
            seen: set[str] = set()
            for i, it in enumerate(items):
                if it.hash not in known and it.hash not in seen:
                    seen.add(it.hash)
                    new_rows.append(i)
            shard = self.tokens.new_shard_name() if new_rows else None
            with self.catalog.transaction():
                ids_by_hash = dict(known)
                new_ids = []
                for row, i in enumerate(new_rows):
                    image_id = self.catalog.insert_image(items[i].hash, items[i].size, metas[i], shard, row)
                    ids_by_hash[items[i].hash] = image_id
                    new_ids.append(image_id)
                displaced = {
                    old for it in items
                    if (old := self.catalog.set_path(_abs(it.path), ids_by_hash[it.hash], it.size, it.mtime)) is not None
                }
                orphans = self.catalog.delete_images(self.catalog.pathless(displaced))
                if new_ids or orphans:
                    self.catalog.bump_version()
                if new_rows:
                    # Durable *before* the commit that makes these ids count.
                    self.tokens.write_shard(np.asarray(new_ids, np.int64), emb[new_rows], tok[new_rows], name=shard)
            self._apply_to_index(np.asarray(new_ids, np.int64), emb[new_rows] if new_rows else None, orphans)
            return [ids_by_hash[it.hash] for it in items] if n else []

    def add_path_alias(self, path: str | os.PathLike[str], hash: str, size: int, mtime: float) -> int | None:
        """Record ``path`` as another location of already indexed content; returns the image id,
        or None when no image has this hash (e.g. its twin failed to decode)."""
        self._require_writable()
        with self._mutex:
            image_id = self.catalog.id_by_hash(hash)
            if image_id is None:
                return None
            with self.catalog.transaction():
                old = self.catalog.set_path(_abs(path), image_id, size, mtime)
                orphans = self.catalog.delete_images(self.catalog.pathless([old] if old is not None else []))
                if orphans:
                    self.catalog.bump_version()
            self._apply_to_index(None, None, orphans)
            return image_id

    def record_failure(self, path: str | os.PathLike[str], size: int, mtime: float, reason: str) -> None:
        """Remember that ``path`` (at this size and mtime) cannot be indexed, and why. It is retried
        only once it changes. If the path held an image before, that image loses this path."""
        self._require_writable()
        with self._mutex:
            with self.catalog.transaction():
                old = self.catalog.record_failure(_abs(path), size, mtime, str(reason))
                orphans = self.catalog.delete_images(self.catalog.pathless([old] if old is not None else []))
                if orphans:
                    self.catalog.bump_version()
            self._apply_to_index(None, None, orphans)

    # ------------------------------------------------------------------ removing

    def remove(self, ids: Iterable[int]) -> list[int]:
        """Delete images (all their paths); returns the ids that existed."""
        self._require_writable()
        with self._mutex:
            with self.catalog.transaction():
                gone = self.catalog.delete_images(ids)
                if gone:
                    self.catalog.bump_version()
            self._apply_to_index(None, None, gone)
            return gone

    def remove_paths(self, paths: Iterable[str | os.PathLike[str]]) -> list[int]:
        """Forget paths; images left without any path are deleted (their ids are returned)."""
        self._require_writable()
        with self._mutex:
            with self.catalog.transaction():
                touched = self.catalog.delete_paths([_abs(p) for p in paths])
                gone = self.catalog.delete_images(self.catalog.pathless(touched))
                if gone:
                    self.catalog.bump_version()
            self._apply_to_index(None, None, gone)
            return gone

    def prune(
        self,
        existing_paths: Iterable[str | os.PathLike[str]] | None = None,
        roots: Iterable[str | os.PathLike[str]] | None = None,
    ) -> dict[str, list[Any]]:
        """Forget vanished files. With ``existing_paths`` (a fresh scan), every known path under
        ``roots`` that the scan did not see is dropped (pass ``roots``, or paths indexed from other
        folders count as vanished); without it, each known path under ``roots`` (all when None) is
        checked on disk. Images whose last path vanished are removed.
        Returns ``{"paths": [...], "images": [...]}``."""
        self._require_writable()
        prefixes = [_abs(r) for r in roots] if roots is not None else None
        with self._mutex:
            known = self.catalog.all_paths(prefixes)
        if existing_paths is not None:
            present = {_abs(p) for p in existing_paths}
            vanished = [p for p in known if p not in present]
        else:
            vanished = [p for p in known if not os.path.exists(p)]
        images = self.remove_paths(vanished) if vanished else []
        return {"paths": vanished, "images": images}

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
            image_id = self.catalog.id_by_path(_abs(id_or_path))
            if image_id is None:
                raise KeyError(f"{id_or_path} is not indexed in collection {self.path}")
            return self.catalog.image(image_id)  # type: ignore[return-value]

    def path_status(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        """``{"path", "status": "indexed"|"failed"|"unknown", ...}`` for one file path: the image id
        when indexed, the reason when it failed."""
        p = _abs(path)
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
            total_rows = sum(self.tokens.shard_rows(s) for s in live)
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

    def verify(self) -> VerifyReport:
        """Check that catalog, token shards and index agree (same ids, no orphans, no lost rows).

        On a read-only open while a writer is active, a batch being written shows up as an orphan
        shard; the writer's own ``verify`` is authoritative."""
        with self._mutex:
            self._refresh()
            problems: list[str] = []
            cat_ids = set(self.catalog.ids().tolist())
            locations = self.catalog.locations()
            referenced = {s for _, s, _ in locations}
            on_disk = set(self.tokens.list_shards())
            missing_shards = sorted(referenced - on_disk)
            orphan_shards = sorted(on_disk - referenced)
            bad_rows = self._bad_rows(locations, on_disk, problems)
            idx = self.index.ids()
            idx_set = set(idx.tolist())
            if self._pending is not None:
                idx_set |= set(self._pending.ids().tolist())
            idx_set -= self._extra
            missing_in_index = sorted(cat_ids - idx_set)
            extra_in_index = sorted(idx_set - cat_ids)
            counts = self.catalog.counts()
            if missing_shards:
                problems.append(f"{len(missing_shards)} token shard(s) referenced by the catalog are missing")
            if orphan_shards:
                problems.append(f"{len(orphan_shards)} token shard(s) are not referenced by the catalog")
            if missing_in_index:
                problems.append(f"{len(missing_in_index)} image(s) are missing from the vector index")
            if extra_in_index:
                problems.append(f"{len(extra_in_index)} vector(s) in the index have no catalog entry")
            if len(idx) != len(set(idx.tolist())):
                problems.append("the vector index holds duplicate ids")
            if counts["pathless_images"]:
                problems.append(f"{counts['pathless_images']} image(s) have no path")
            if self.writable and self.tokens.temp_files():
                problems.append("temporary token files are left over")
            report_counts = {
                "images": counts["images"], "paths": counts["paths"], "failed": counts["failed"],
                "shards": len(on_disk), "index_vectors": len(idx),
                "pending_in_memory": len(self._pending) if self._pending is not None else 0,
            }
            return VerifyReport(not problems, problems, report_counts, missing_in_index, extra_in_index,
                                orphan_shards, missing_shards, bad_rows)

    def _bad_rows(self, locations: list[tuple[int, str, int]], on_disk: set[str], problems: list[str]) -> list[int]:
        bad: list[int] = []
        by_shard: dict[str, list[tuple[int, int]]] = {}
        for image_id, shard, row in locations:
            by_shard.setdefault(shard, []).append((image_id, row))
        for shard, entries in by_shard.items():
            if shard not in on_disk:
                bad.extend(i for i, _ in entries)
                continue
            try:
                ids = self.tokens.shard_ids(shard)
            except (CollectionFormatError, OSError, ValueError) as exc:
                problems.append(f"token shard {shard} is unreadable: {exc}")
                bad.extend(i for i, _ in entries)
                continue
            wrong = [i for i, r in entries if r >= len(ids) or int(ids[r]) != i]
            if wrong:
                problems.append(f"token shard {shard}: {len(wrong)} row(s) do not hold the image the catalog expects")
            bad.extend(wrong)
        return sorted(bad)

    def repair(self) -> VerifyReport:
        """Make everything agree again: drop leftover shards, forget images whose tokens are lost
        (their files will be re-encoded by the next index run), rebuild the index from the stored
        embeddings. Returns the verification afterwards."""
        self._require_writable()
        with self._mutex:
            report = self.verify()
            lost = sorted(set(report.bad_rows))
            if lost:
                with self.catalog.transaction():
                    self.catalog.delete_images(lost)
                    self.catalog.bump_version()
                log.warning("forgot %d image(s) whose tokens were lost; re-index to restore them", len(lost))
            self.tokens.cleanup(set(self.catalog.shard_live_rows()))
            self._rebuild_index()
            return self.verify()

    def compact(self, min_dead_fraction: float = 0.25, small_rows: int = 256, max_rows: int = 4096,
                max_shard_bytes: int = 256 << 20) -> dict[str, int]:
        """Rewrite token shards that are mostly deleted rows, and merge small shards (one shard per
        indexed batch adds up; call this after an indexing run). New shards hold at most
        ``max_rows`` images and about ``max_shard_bytes``.

        Crash-safe: new shards are durable before the catalog points at them; old ones are deleted
        only after that commit (or, after a crash, by the next writable open)."""
        self._require_writable()
        m = self.manifest
        row_bytes = shard_row_bytes(m.token_count, m.token_dim, m.embed_dim, m.token_dtype)
        max_rows = max(1, min(max_rows, max_shard_bytes // row_bytes))
        with self._mutex:
            live = self.catalog.shard_live_rows()
            chosen = []
            for shard, n_live in sorted(live.items()):
                total = self.tokens.shard_rows(shard)
                if (total - n_live) / max(total, 1) >= min_dead_fraction or n_live < small_rows:
                    chosen.append(shard)
            if len(chosen) < 2 and not any(self.tokens.shard_rows(s) > live[s] for s in chosen):
                return {"rewritten": 0, "written": 0}
            locations = [loc for loc in self.catalog.locations() if loc[1] in set(chosen)]
            written = 0
            for start in range(0, len(locations), max_rows):
                part = locations[start : start + max_rows]
                groups: dict[str, list[int]] = {}
                for _, shard, row in part:
                    groups.setdefault(shard, []).append(row)
                name, order = self.tokens.copy_rows(groups.items())
                with self.catalog.transaction():
                    self.catalog.update_locations([(image_id, name, r) for r, image_id in enumerate(order)])
                written += 1
            self.tokens.cleanup(set(self.catalog.shard_live_rows()))
            return {"rewritten": len(chosen), "written": written}

    def change_backend(self, backend: str, backend_options: dict[str, Any] | None = None) -> None:
        """Move the vector index to another backend, rebuilt from the stored embeddings (no re-encoding)."""
        self._require_writable()
        with self._mutex:
            old_backend = self.manifest.backend
            options = dict(backend_options or {})
            if backend == old_backend:  # same files: embedded engines cannot be opened twice
                self.index.close()
            try:
                new_index = open_index(backend, self.path, self.dim, options)
                try:
                    new_index.clear()
                    _fill(new_index, self.tokens)
                    new_index.save()
                except BaseException:
                    new_index.close()
                    raise
            except BaseException:
                if backend == old_backend:
                    self.index = _open_index_for_writer(self.manifest, self.path, self.manifest.backend_options)
                    self._reconcile()
                raise
            if backend != old_backend:
                self.index.close()
            self.index = new_index
            self.manifest = Manifest.model_validate(
                {**self.manifest.model_dump(), "backend": backend, "backend_options": options, "updated": utc_now()}
            )
            self._write_state()
            self.manifest.save(self.path)
            if old_backend != backend:
                _remove_index_files(self.path, old_backend)

    def export_parquet(self, path: str | os.PathLike[str]) -> int:
        """Export id, path, hash, metadata, embedding and tokens (float32, T x H) to one Parquet file."""
        with self._mutex:
            return self.tokens.export_parquet(path, self.catalog.export_rows())

    def save(self) -> None:
        """Make the index durable now (it is also saved every ``save_every`` changes and on close)."""
        self._require_writable()
        with self._mutex:
            self._save_index()

    # ------------------------------------------------------------------ internals

    def _require_writable(self) -> None:
        if self._closed:
            raise CollectionError(f"collection {self.path} is closed")
        if not self.writable:
            raise CollectionReadOnlyError(f"collection {self.path} was opened read-only; open it with writable=True")

    def _check_batch(self, items: Sequence[NewImage], embeddings: np.ndarray, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n, m = len(items), self.manifest
        emb = np.asarray(embeddings, dtype=np.float32)
        tok = np.asarray(tokens, dtype=np.float32)
        if emb.shape != (n, m.embed_dim):
            raise ValueError(f"embeddings have shape {emb.shape}, expected ({n}, {m.embed_dim}) for "
                             f"{n} images in collection {self.path} ({m.describe_model()})")
        if tok.shape != (n, m.token_count, m.token_dim):
            raise ValueError(f"tokens have shape {tok.shape}, expected ({n}, {m.token_count}, {m.token_dim}) "
                             f"for collection {self.path} ({m.describe_model()})")
        bad = ~np.isfinite(emb).all(axis=1) | ~np.isfinite(tok.reshape(n, -1)).all(axis=1)
        if bad.any():
            raise ValueError(f"{items[int(np.flatnonzero(bad)[0])].path}: its embedding or tokens contain NaN/inf; "
                             "nothing of this batch was stored")
        return (normalize(emb, "embedding") if n else emb.reshape(0, m.embed_dim)), tok

    def _apply_to_index(self, new_ids: np.ndarray | None, new_vecs: np.ndarray | None, removed: list[int]) -> None:
        """After a commit: mirror the change into the index, drop unreferenced shards, save periodically."""
        changed = 0
        if new_ids is not None and len(new_ids):
            self.index.add(new_ids, new_vecs)
            changed += len(new_ids)
        if removed:
            self.index.remove(removed)
            self.tokens.cleanup(set(self.catalog.shard_live_rows()))
            changed += len(removed)
        if changed:
            self._changed = True
            self._unsaved += changed
            if self._unsaved >= self.save_every:
                self._save_index()

    def _save_index(self) -> None:
        self.index.save()
        self._write_state()
        self._unsaved = 0

    def _write_state(self) -> None:
        state = {"catalog_version": self.catalog.version(), "backend": self.manifest.backend,
                 "vectors": len(self.index), "saved": utc_now()}
        atomic_write_bytes(self.path / STATE_NAME, json.dumps(state).encode())

    def _read_state(self) -> dict[str, Any]:
        try:
            return json.loads((self.path / STATE_NAME).read_text())
        except (OSError, ValueError):
            return {}

    def _reconcile(self) -> None:
        """Writer open: make the index hold exactly the catalog's ids (see module docstring)."""
        state = self._read_state()
        version = self.catalog.version()
        count = self.catalog.counts()["images"]
        if state.get("catalog_version") == version and state.get("backend") == self.manifest.backend \
                and len(self.index) == count:
            return
        cat_ids = self.catalog.ids()
        idx_ids = self.index.ids()
        extra = np.setdiff1d(idx_ids, cat_ids)
        missing = np.setdiff1d(cat_ids, idx_ids)
        if len(extra):
            self.index.remove(extra.tolist())
        if len(missing):
            _fill(self.index, self.tokens, missing.tolist())
        if len(extra) or len(missing):
            log.warning("index resynchronised with the catalog: %d added, %d removed", len(missing), len(extra))
        self._save_index()

    def _rebuild_index(self) -> None:
        self.index.clear()
        _fill(self.index, self.tokens)
        self._save_index()

    def _sync_overlay(self) -> None:
        """Reader: cover the gap between the loaded index and the catalog without writing anything.
        Index ids the catalog no longer has are hidden; catalog ids the index lacks are searched
        exactly from their stored embeddings."""
        try:
            self._sync_overlay_once()
        except FileNotFoundError:  # a writer compacted a shard under us: look again
            self.tokens.close()
            self._sync_overlay_once()

    def _sync_overlay_once(self) -> None:
        self._synced_version = self.catalog.version()
        cat_ids = self.catalog.ids()
        idx_ids = self.index.ids()
        self._extra = set(np.setdiff1d(idx_ids, cat_ids).tolist())
        missing = np.setdiff1d(cat_ids, idx_ids)
        self._pending = None
        if len(missing):
            pending = ExactIndex(self.dim)
            _fill(pending, self.tokens, missing.tolist())
            self._pending = pending

    def _refresh(self) -> None:
        """Reader: pick up commits made by a writer since the last search."""
        if self.writable:
            return
        if self.catalog.version() == self._synced_version:
            return
        if self.manifest.backend == "faiss":
            state_file = self.path / STATE_NAME
            seen = state_file.stat().st_mtime if state_file.exists() else None
            if seen != self._state_seen:
                self._state_seen = seen
                fresh = _open_index_for_reader(self.manifest, self.path, self.manifest.backend_options, self.tokens)
                self.index.close()
                self.index = fresh
        self._sync_overlay()


# ------------------------------------------------------------------------------------ helpers


def _token_store(folder: Path, manifest: Manifest, catalog: Catalog) -> TokenStore:
    def locate(ids: Sequence[int] | None) -> list[tuple[int, str, int]]:
        return catalog.locations(ids)

    return TokenStore(folder / TOKENS_DIR, manifest.token_count, manifest.token_dim, manifest.embed_dim,
                      manifest.token_dtype, locate)


def _open_index_for_writer(manifest: Manifest, folder: Path, options: dict[str, Any]) -> VectorIndex:
    try:
        return open_index(manifest.backend, folder, manifest.embed_dim, options)
    except CollectionFormatError as exc:
        log.warning("%s; rebuilding the index from the token store", exc)
        _remove_index_files(folder, manifest.backend)
        return open_index(manifest.backend, folder, manifest.embed_dim, options)


def _open_index_for_reader(manifest: Manifest, folder: Path, options: dict[str, Any], tokens: TokenStore) -> VectorIndex:
    """Open the index to read; when it is unusable (held by a writer, damaged), search exactly from
    the stored embeddings instead of failing."""
    try:
        return open_index(manifest.backend, folder, manifest.embed_dim, options, readonly=True)
    except (CollectionLockedError, CollectionFormatError) as exc:
        log.warning("%s; searching the stored embeddings exactly instead", exc)
        return ExactIndex(manifest.embed_dim)


def _fill(index: VectorIndex, tokens: TokenStore, ids: Sequence[int] | None = None, chunk: int = 8192) -> None:
    """Add stored embeddings (all, or ``ids``) to ``index`` in chunks."""
    if ids is None:
        for part_ids, vecs in tokens.iter_embeddings(chunk):
            index.add(part_ids, vecs)
        return
    assert tokens.locate is not None
    for start in range(0, len(ids), chunk):
        # Locate through the catalog and skip ids deleted meanwhile (a reader racing a writer).
        found = tokens.locate([int(i) for i in ids[start : start + chunk]])
        if found:
            part = np.asarray([i for i, _, _ in found], dtype=np.int64)
            index.add(part, tokens.read_embeddings([(s, r) for _, s, r in found]))


def _remove_index_files(folder: Path, backend: str) -> None:
    location = index_location(backend, folder)
    if location is None:
        return
    if location.is_dir():
        shutil.rmtree(location, ignore_errors=True)
    for p in (location, location.with_name(location.name + ".tombstones.npy")):
        if p.is_file():
            p.unlink()
    (folder / STATE_NAME).unlink(missing_ok=True)


def _wipe(folder: Path) -> None:
    """Delete this package's files in ``folder`` (manifest first, so a crash never leaves a
    manifest pointing at half-deleted data); other files are left alone."""
    (folder / MANIFEST_NAME).unlink(missing_ok=True)
    for suffix in ("", "-wal", "-shm", "-journal"):
        (folder / (CATALOG_NAME + suffix)).unlink(missing_ok=True)
    shutil.rmtree(folder / TOKENS_DIR, ignore_errors=True)
    for name in ("faiss", *("qdrant-edge", "qdrant-local")):
        _remove_index_files(folder, name)
    (folder / STATE_NAME).unlink(missing_ok=True)  # the lock file stays: we hold it


def _as_stat(item: FileStat | tuple[Any, ...] | str | os.PathLike[str]) -> FileStat:
    if isinstance(item, FileStat):
        return FileStat(_abs(item.path), int(item.size), float(item.mtime), item.hash)
    if isinstance(item, tuple):
        path, size, mtime, *rest = item
        return FileStat(_abs(path), int(size), float(mtime), rest[0] if rest else None)
    return FileStat.of(item)


def _abs(path: str | os.PathLike[str]) -> str:
    return os.path.abspath(os.fspath(path))


def _metadata_json(item: NewImage) -> str:
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
