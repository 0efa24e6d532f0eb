"""``Collection``: a folder holding one image collection, and the crash-safe protocol that keeps it whole.

Layout of the folder (default ``./.f2b``)::

    manifest.json        model, strategy, shapes, backend (written last on create)
    catalog.sqlite       the source of truth (WAL), with the ledger of shards and their checksums
    tokens/*.arrow       immutable, self-describing token-store shards (summary tokens + embeddings per batch)
    index.faiss | qdrant-edge/ | qdrant-local/     the vector index, a derived cache
    index.state.json     which catalog version the saved index reflects, and its checksums
    lock                 the writer lock, held only while writing
    damaged/             parts set aside by repair (damaged, foreign or of the wrong kind): kept, never deleted

Identity. Manifest, catalog, each shard and the state carry the collection id (``identity``): a part
copied in from another collection is foreign, never searched or imported. Each part's file-system kind
is checked (``parts``): a file named ``tokens`` is one line, not a traceback.

Crash safety. Per batch: (1) record the shard as pending, (2) insert the images in an open SQLite
transaction, (3) write the batch's shard atomically and durably, (4) commit with the shard's checksum,
(5) add the vectors to the index, saved every ``save_every`` changes and on close. A writer deletes
only shards the catalog itself marked pending or doomed, and only once the catalog is proven healthy
(see ``health``). ``kill -9`` at any instant loses at most the batch in flight; a rerun sees no
duplicates and no orphans.

Sharing. The writer lock is taken around each write and released after, so ``f2b index`` runs while
a server has the collection open: a writer waits for the lock (up to ``lock_timeout`` seconds), then
catches up with what others committed before it writes; searches catch up without the lock (see
``sync``). Embedded Qdrant engines can be opened by one process only, so with those backends a
writable open keeps the lock for its life. This file is the facade; ``creating`` makes a new folder,
``sync`` keeps the index in step, ``health`` verifies and repairs, ``maintenance`` compacts, migrates and exports.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from .catalog import CATALOG_NAME, Catalog
from .creating import create_collection
from .errors import CollectionError, CollectionFormatError, CollectionReadOnlyError
from .health import Health
from .identity import ID_KEY, adopt
from .parts import ESSENTIAL, WRITER_ESSENTIAL, odd_message, odd_parts
from .recover import recover_folder
from .trust import refuse, trust_problem
from .index import ExactIndex, VectorIndex
from .lock import WriterLock
from .maintenance import Maintenance
from .reading import Reading
from .removing import Removing
from .shrink import current_manifest, finish_shrink
from .manifest import MANIFEST_NAME, Manifest, lost_manifest_remains
from .records import FileStat, Hit, IndexPlan, NewImage, VerifyReport, abs_path, check_batch, metadata_json
from .sync import (
    EMBEDDED_QDRANT,
    STATE_NAME,
    IndexSync,
    _mtime,
    clean_litter,
    disk_full,
    open_index_for_reader,
    open_index_for_writer,
    read_state,
    token_store,
)

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
#: How long a writer waits for another process's write (a batch, an upload) before giving up.
DEFAULT_LOCK_TIMEOUT = 120.0


class Collection(Reading, Removing, IndexSync, Health, Maintenance):
    """An image collection folder: catalog + token store + vector index + manifest + writer lock.

    Open with ``Collection.open(path, writable=...)`` or make one with ``Collection.create``; use it
    as a context manager so the index is saved. Thread-safe (one mutex); several processes may
    write (one at a time, each write under the lock) and read.
    """

    def __init__(
        self,
        folder: Path,
        manifest: Manifest,
        catalog: Catalog,
        tokens: Any,
        index: VectorIndex,
        lock: WriterLock | None,
        save_every: int = 10_000,
        hold_lock: bool = False,
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
        options: dict[str, Any] | None = None,
    ) -> None:
        self.path = folder
        self.manifest = manifest
        self.catalog = catalog
        self.tokens = tokens
        self.index = index
        self._lock = lock
        self.save_every = save_every
        self.lock_timeout = lock_timeout
        self._hold = hold_lock or manifest.backend in EMBEDDED_QDRANT
        self._session_options = dict(options or {})
        self._mutex = threading.RLock()
        self._depth = 0
        self._unsaved = 0
        self._changed = False
        self._closed = False
        self._extra: set[int] = set()
        self._pending: ExactIndex | None = None
        self._synced_version = -1
        self._state_seen: int | None = _mtime(folder / STATE_NAME)
        self._manifest_seen: int | None = _mtime(folder / MANIFEST_NAME)
        self._index_damage: str | None = None
        #: What a writable open set aside or cleaned (a damaged or foreign index...): ``repair`` reports it.
        self.opened_notes: list[str] = []

    # ------------------------------------------------------------------ opening

    @property
    def writable(self) -> bool:
        return self._lock is not None

    @property
    def dim(self) -> int:
        return self.manifest.embed_dim

    @staticmethod
    def exists(path: str | os.PathLike[str]) -> bool:
        """A collection is there: its manifest (of whatever kind: opening says what is wrong with it),
        or what remains of one whose manifest was lost (so no command offers to create one over it)."""
        folder = Path(path)
        return (folder / MANIFEST_NAME).exists() or (folder.is_dir() and lost_manifest_remains(folder) is not None)

    @staticmethod
    def recover(path: str | os.PathLike[str], lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> list[str]:
        """Rebuild a lost, damaged or mismatched manifest or catalog from the token shards (the first
        step of ``verify --repair``; then open writable and call ``repair``). One line per action."""
        return recover_folder(path, lock_timeout)

    def _options(self) -> dict[str, Any]:
        return {**self.manifest.backend_options, **self._session_options}

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        manifest: Manifest,
        backend: str | None = None,
        backend_options: dict[str, Any] | None = None,
        overwrite: bool = False,
        save_every: int = 10_000,
        hold_lock: bool = False,
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
    ) -> Collection:
        """Make a new, empty collection at ``path`` (opened writable).

        An existing collection there is an error unless ``overwrite`` (used by ``--reindex``),
        which deletes its catalog, tokens and index first; a part of the wrong kind (a folder named
        ``catalog.sqlite``, a file named ``tokens``) is set aside in ``damaged/`` as ``verify --repair``
        does, never deleted. Without ``overwrite`` such a part is refused (the folder is no collection).
        """
        return create_collection(cls, Path(path).absolute(), manifest, backend, backend_options, overwrite,
                                 save_every, hold_lock, lock_timeout)

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str] = DEFAULT_COLLECTION,
        writable: bool = False,
        backend_options: dict[str, Any] | None = None,
        save_every: int = 10_000,
        hold_lock: bool = False,
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
    ) -> Collection:
        """Open an existing collection. ``writable`` prepares for writing: under the writer lock it
        checks that catalog and manifest can be trusted (else refuses, saying how to recover), clears
        crash leftovers and brings the index up to date. The lock is then released and taken again
        around each write, unless ``hold_lock`` (or an embedded Qdrant backend). Read-only opens never
        write and may run beside writers. ``backend_options`` adds or overrides options for this
        session only (e.g. a Qdrant ``api_key``)."""
        folder = Path(path).absolute()
        odd = odd_parts(folder, WRITER_ESSENTIAL if writable else ESSENTIAL)
        if odd:
            raise CollectionFormatError(odd_message(folder, odd))
        manifest = Manifest.load(folder)
        options = {**manifest.backend_options, **(backend_options or {})}
        lock = WriterLock(folder).acquire(timeout=lock_timeout) if writable else None
        catalog = None
        try:
            if not (folder / CATALOG_NAME).exists():
                raise refuse(folder, f"collection {folder} has no {CATALOG_NAME}")
            catalog = Catalog(folder / CATALOG_NAME, readonly=not writable)
            manifest = current_manifest(folder, manifest, catalog)  # an interrupted shrink past its switch
            tokens = token_store(folder, manifest, catalog)
            problem = trust_problem(folder, manifest, catalog, tokens, deep=False)
            if problem is not None:
                raise refuse(folder, problem)
            notes: list[str] = []
            if writable:
                if adopt(folder, manifest, catalog, tokens):  # a collection from before ids gets its id now
                    tokens.identity[ID_KEY] = manifest.collection_id
                notes += clean_litter(folder, manifest.backend)
                index = open_index_for_writer(manifest, folder, options, notes)
                damage = None
            else:
                index, damage = open_index_for_reader(manifest, folder, options)
            col = cls(folder, manifest, catalog, tokens, index, lock, save_every, hold_lock, lock_timeout,
                      backend_options)
            col._index_damage = damage
            col.opened_notes = notes
            if writable:
                col._delete_leftovers(check=True)
                finish_shrink(col)
                col._reconcile()
                if manifest.collection_id and read_state(folder).get(ID_KEY) != manifest.collection_id:
                    col._save_index()  # the state vouches for this collection's index from now on
                if not col._hold:
                    lock.release()
            else:
                col._sync_overlay()
            return col
        except BaseException:
            if catalog is not None and (lock is None or lock.held):
                catalog.close()
            if lock is not None:
                lock.release()
            raise

    def close(self) -> None:
        """Save the index (writers that changed something), release files and the lock. Safe to call twice."""
        with self._mutex:
            if self._closed:
                return
            try:
                if self.writable and (self._changed or self._unsaved):
                    with self._writing():
                        self._save_index()
                        self.manifest.touch()
                        self.manifest.save(self.path)
            finally:
                self._closed = True
                self.index.close()
                self.tokens.close()
                self.catalog.close()
                if self._lock is not None:
                    self._lock.release()

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """One write: hold the writer lock (waiting for another process's write to finish), after
        catching up with what others committed; nested writes join the outer one."""
        self._require_writable()
        with self._mutex:
            assert self._lock is not None
            outer = self._depth == 0
            if outer and not self._lock.held:
                self._lock.acquire(timeout=self.lock_timeout)
            try:
                if outer:
                    self._catch_up()
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
            except BaseException:
                if outer:
                    self._synced_version = -1  # the index may be off: compare in full next time
                raise
            finally:
                if outer and not self._hold:
                    self._lock.release()

    def _delete_leftovers(self, check: bool = False) -> None:
        """Under the lock: delete the shard files the catalog itself marked pending (never committed)
        or doomed (emptied by a committed remove or compaction). Nothing else is ever deleted. With
        ``check`` (leftovers of another run, found at open) the catalog must first pass SQLite's
        ``quick_check``: a damaged catalog never drives a deletion."""
        ledger = self.catalog.shard_ledger()
        gone = [name for name, (state, _, _) in ledger.items()
                if state in ("pending", "doomed") and not self.catalog.references(name)]
        if gone and check:
            bad = self.catalog.quick_check()
            if bad is not None:
                raise refuse(self.path, f"{self.path / CATALOG_NAME} fails SQLite's quick_check ({bad})")
        if gone:
            deleted = self.tokens.delete_shards(gone)
            self.catalog.forget_shards(gone)
            if deleted and any(ledger[n][0] == "pending" for n in deleted):
                log.warning("removed %d token shard(s) left by an interrupted run", len(deleted))
        self.tokens.remove_temp_files()

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

    def add_batch(self, items: Sequence[NewImage], embeddings: np.ndarray, tokens: np.ndarray,
                  outside_world: dict[int, bool] | None = None) -> list[int]:
        """Commit one encoded batch; returns the image id of each item (in order).

        ``embeddings`` float32 (n, D), ``tokens`` float32 (n, T, H). Items whose content (hash) is
        already in the collection, or repeated within the batch, become extra paths of that image.
        ``outside_world`` (item position -> not from the demo world) is recorded in the same commit.
        """
        self._require_writable()
        n = len(items)
        emb, tok = check_batch(self.manifest, self.path, items, embeddings, tokens)
        metas = [metadata_json(it) for it in items]
        with self._writing():
            known = self.catalog.ids_by_hashes({it.hash for it in items})
            new_rows: list[int] = []
            seen: set[str] = set()
            for i, it in enumerate(items):
                if it.hash not in known and it.hash not in seen:
                    seen.add(it.hash)
                    new_rows.append(i)
            shard = self.tokens.new_shard_name() if new_rows else None
            if shard is not None:
                self.catalog.shard_pending(shard, len(new_rows))  # a crash now leaves a known leftover
            with self._transaction():
                ids_by_hash = dict(known)
                new_ids = []
                for row, i in enumerate(new_rows):
                    image_id = self.catalog.insert_image(items[i].hash, items[i].size, metas[i], shard, row)
                    ids_by_hash[items[i].hash] = image_id
                    new_ids.append(image_id)
                displaced = {
                    old for it in items
                    if (old := self.catalog.set_path(abs_path(it.path), ids_by_hash[it.hash], it.size, it.mtime)) is not None
                }
                orphans = self.catalog.delete_images(self.catalog.pathless(displaced))
                if new_ids or orphans:
                    self.catalog.bump_version()
                if new_rows:
                    # Durable *before* the commit that makes these ids count.
                    describe = [{"hash": items[i].hash, "size": items[i].size, "metadata": metas[i],
                                 "paths": [[abs_path(it.path), it.size, it.mtime] for it in items
                                           if it.hash == items[i].hash]} for i in new_rows]
                    try:
                        self.tokens.write_shard(np.asarray(new_ids, np.int64), emb[new_rows], tok[new_rows],
                                                name=shard, describe=describe)
                    except OSError as exc:
                        full = disk_full(exc, f"the token shard of a batch of {len(new_rows)} image(s)", self.path)
                        if full is None:
                            raise
                        raise full from None
                    self.catalog.shard_live(shard, len(new_rows), self.tokens.checksum(shard))
                if outside_world:
                    self.catalog.record_world_checks({ids_by_hash[items[i].hash]: o for i, o in outside_world.items()})
            self._apply_to_index(np.asarray(new_ids, np.int64), emb[new_rows] if new_rows else None, orphans)
            return [ids_by_hash[it.hash] for it in items] if n else []

    def add_path_alias(self, path: str | os.PathLike[str], hash: str, size: int, mtime: float) -> int | None:
        """Record ``path`` as another location of already indexed content; returns the image id,
        or None when no image has this hash (e.g. its twin failed to decode)."""
        with self._writing():
            image_id = self.catalog.id_by_hash(hash)
            if image_id is None:
                return None
            with self._transaction():
                old = self.catalog.set_path(abs_path(path), image_id, size, mtime)
                orphans = self.catalog.delete_images(self.catalog.pathless([old] if old is not None else []))
                if orphans:
                    self.catalog.bump_version()
            self._apply_to_index(None, None, orphans)
            return image_id

    def add_path_aliases(self, stats: Sequence[FileStat]) -> list[int | None]:
        """``add_path_alias`` for many files in one transaction; the image id of each (None: no image
        has its content yet). Why one transaction: two files that swapped content (or names) each
        displace the other's image; linked one by one, the first link left the second image without a
        path, it was deleted as an orphan, and the second file was then recorded as failed forever.
        Linked together, an image is an orphan only if no file of the batch holds it any more."""
        if not stats:
            return []
        with self._writing():
            ids = self.catalog.ids_by_hashes({s.hash for s in stats if s.hash})
            with self._transaction():
                displaced = set()
                for s in stats:
                    image_id = ids.get(s.hash) if s.hash else None
                    if image_id is not None:
                        old = self.catalog.set_path(abs_path(s.path), image_id, s.size, s.mtime)
                        if old is not None:
                            displaced.add(old)
                orphans = self.catalog.delete_images(self.catalog.pathless(displaced))
                if orphans:
                    self.catalog.bump_version()
            self._apply_to_index(None, None, orphans)
            return [ids.get(s.hash) if s.hash else None for s in stats]

    def record_failure(self, path: str | os.PathLike[str], size: int, mtime: float, reason: str) -> None:
        """Remember that ``path`` (at this size and mtime) cannot be indexed, and why. It is retried
        only once it changes. If the path held an image before, that image loses this path."""
        with self._writing():
            with self._transaction():
                old = self.catalog.record_failure(abs_path(path), size, mtime, str(reason))
                orphans = self.catalog.delete_images(self.catalog.pathless([old] if old is not None else []))
                if orphans:
                    self.catalog.bump_version()
            self._apply_to_index(None, None, orphans)

    def save(self) -> None:
        """Make the index durable now (it is also saved every ``save_every`` changes and on close)."""
        with self._writing():
            self._save_index()

    # ------------------------------------------------------------------ internals

    def _require_writable(self) -> None:
        if self._closed:
            raise CollectionError(f"collection {self.path} is closed")
        if not self.writable:
            raise CollectionReadOnlyError(f"collection {self.path} was opened read-only; open it with writable=True")

    def _apply_to_index(self, new_ids: np.ndarray | None, new_vecs: np.ndarray | None, removed: list[int]) -> None:
        """After a commit: mirror the change into the index, drop unreferenced shards, save periodically."""
        changed = 0
        if new_ids is not None and len(new_ids):
            self.index.add(new_ids, new_vecs)
            changed += len(new_ids)
        if removed:
            self.index.remove(removed)
            self._delete_leftovers()
            changed += len(removed)
        self._synced_version = self.catalog.version()
        if changed:
            self._changed = True
            self._unsaved += changed
            if self._unsaved >= self.save_every:
                self._save_index()

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """A catalog transaction that also marks the shards it empties as doomed (deleted after it)."""
        with self.catalog.transaction():
            self.catalog.emptied_shards()  # start counting from here
            yield
            self.catalog.shards_doomed(self.catalog.emptied_shards())

