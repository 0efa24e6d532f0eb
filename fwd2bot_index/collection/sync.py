"""Keeping the vector index, a derived cache, in step with the catalog: in one process or several.

The catalog and the token shards are the truth; the index is rebuilt from shard embeddings whenever
it disagrees. ``index.state.json`` records which catalog version the saved index reflects and the
SHA-256 of the saved index files, so a damaged index is noticed (and rebuilt) instead of searched.

Several processes share a collection (an indexing run beside a server): each catches up with the
catalog before it writes (under the writer lock) and before it searches (without writing), by
reloading the saved index when another process saved a newer one and then adding or hiding the ids
that still differ, read from the shards.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ._fs import atomic_write_bytes
from .catalog import CATALOG_NAME, Catalog
from .errors import CollectionError, CollectionFormatError, CollectionLockedError
from .identity import ID_KEY, describe_foreign, identity_of
from .index import INDEX_LOCATIONS, ExactIndex, VectorIndex, index_location, open_index
from .manifest import MANIFEST_NAME, Manifest, utc_now
from .parts import odd_parts, set_aside_into
from .tokens import TOKENS_DIR, TokenStore, file_sha256

log = logging.getLogger(__name__)

STATE_NAME = "index.state.json"
EMBEDDED_QDRANT = ("qdrant-edge", "qdrant-local")


# ------------------------------------------------------------------------------ parts of a folder


def token_store(folder: Path, manifest: Manifest, catalog: Catalog) -> TokenStore:
    """The token store of ``folder``, locating images through ``catalog`` and checking each shard
    against the checksum the catalog recorded for it. New shards record the model and collection id."""
    return TokenStore(folder / TOKENS_DIR, manifest.token_count, manifest.token_dim, manifest.embed_dim,
                      manifest.token_dtype, catalog.locations, identity_of(manifest), catalog.shard_sha256)


def index_part_names(backend: str) -> tuple[str, ...]:
    """The names of the derived index parts of ``backend`` (with the state file)."""
    location = INDEX_LOCATIONS.get(backend)
    extra = (location, location + ".tombstones.npy") if backend == "faiss" else (location,) if location else ()
    return (STATE_NAME, *extra)


def set_aside_index(folder: Path, backend: str, why: str = "damaged") -> list[str]:
    """Move the saved index of ``backend`` (files, folder, tombstones, state) into ``damaged/``: a
    derived part is rebuilt from the stored embeddings, and the old one is kept, never deleted (it may
    be someone's only copy of another collection's index). One line per part moved."""
    moved = []
    for name in index_part_names(backend):
        path = folder / name
        if path.exists() or path.is_symlink():
            kept = set_aside_into(folder, path, why)
            moved.append(f"{name} set aside as {kept.relative_to(folder)}")
    return moved


def index_files(folder: Path, backend: str) -> list[Path]:
    """The files whose checksums the state records (FAISS only: Qdrant engines manage their own)."""
    if backend != "faiss":
        return []
    from .faiss_index import FaissIndex

    return [p for p in FaissIndex.files(folder / INDEX_LOCATIONS["faiss"]) if p.is_file()]


def read_state(folder: Path) -> dict[str, Any]:
    try:
        state = json.loads((folder / STATE_NAME).read_text())
        return state if isinstance(state, dict) else {}
    except (OSError, ValueError):
        return {}


def index_damage(folder: Path, backend: str, collection_id: str | None = None) -> str | None:
    """Why the saved index cannot be trusted (a part of the wrong kind, another collection's, missing,
    or not what was saved), or None. ``collection_id``: this collection's (see ``identity``)."""
    odd = odd_parts(folder, index_part_names(backend))
    if odd:
        return odd[0][1]
    state = read_state(folder)
    theirs = state.get(ID_KEY)
    if collection_id and theirs and theirs != collection_id:
        return describe_foreign(f"{folder / STATE_NAME} (and the index it vouches for)", theirs, collection_id)
    if backend != "faiss":
        return None
    if not (folder / STATE_NAME).exists():
        return f"{folder / STATE_NAME} is missing"
    recorded = state.get("files")
    if not isinstance(recorded, dict):
        return f"{folder / STATE_NAME} is unreadable" if not state else None
    present = {p.name: p for p in index_files(folder, backend)}
    for name, digest in recorded.items():
        if name not in present:
            return f"{folder / name} is missing"
        if file_sha256(present[name]) != digest:
            return f"{folder / name} is damaged (its content differs from the checksum recorded when it was saved)"
    return None


def open_index_for_writer(manifest: Manifest, folder: Path, options: dict[str, Any],
                          notes: list[str] | None = None) -> VectorIndex:
    """Open the index to write; a missing, damaged, foreign or unreadable one is set aside in
    ``damaged/`` and starts empty (refilled from the shards by the caller's reconcile). ``notes``
    receives one line per thing set aside (``repair`` reports them)."""
    damage = index_damage(folder, manifest.backend, manifest.collection_id)
    if damage is None:
        try:
            return open_index(manifest.backend, folder, manifest.embed_dim, options)
        except CollectionFormatError as exc:
            damage = str(exc)
    log.warning("%s; rebuilding the index from the token store", damage)
    moved = set_aside_index(folder, manifest.backend, "foreign" if "another collection" in damage else "damaged")
    if notes is not None and moved:
        notes.append(f"the vector index: {damage}; " + ", ".join(moved))
    return open_index(manifest.backend, folder, manifest.embed_dim, options)


def open_index_for_reader(manifest: Manifest, folder: Path, options: dict[str, Any]) -> tuple[VectorIndex, str | None]:
    """Open the index to read; when it is unusable (held by a writer, damaged), search exactly from
    the stored embeddings instead of failing. Returns the index and what was wrong with the saved one."""
    damage = index_damage(folder, manifest.backend, manifest.collection_id)
    if damage is None:
        try:
            return open_index(manifest.backend, folder, manifest.embed_dim, options, readonly=True), None
        except CollectionLockedError as exc:
            log.warning("%s; searching the stored embeddings exactly instead", exc)
            return ExactIndex(manifest.embed_dim), None
        except CollectionFormatError as exc:
            damage = str(exc)
    log.warning("%s; searching the stored embeddings exactly instead", damage)
    return ExactIndex(manifest.embed_dim), damage


def fill(index: VectorIndex, tokens: TokenStore, ids: Sequence[int] | None = None, chunk: int = 8192) -> list[int]:
    """Add stored embeddings (all, or ``ids``) to ``index`` in chunks. Images whose shard is missing
    or damaged are skipped (``verify`` names them) and returned, so one bad shard never stops the
    rest of the collection from being searchable."""
    assert tokens.locate is not None
    if ids is None:
        ids = [i for i, _, _ in tokens.locate(None)]
    skipped: list[int] = []
    for start in range(0, len(ids), chunk):
        # Locate through the catalog and skip ids deleted meanwhile (a reader racing a writer).
        found = tokens.locate([int(i) for i in ids[start : start + chunk]])
        by_shard: dict[str, list[tuple[int, int]]] = {}
        for i, s, r in found:
            by_shard.setdefault(s, []).append((i, r))
        for shard, rows in by_shard.items():
            part = [(i, shard, r) for i, r in rows]
            for attempt in range(2):
                try:
                    vecs = tokens.read_embeddings([(s, r) for _, s, r in part])
                    index.add(np.asarray([i for i, _, _ in part], dtype=np.int64), vecs)
                    break
                except FileNotFoundError:
                    moved = tokens.locate([i for i, _, _ in part])  # compacted meanwhile: look again
                    if attempt == 0 and moved and all(s != shard for _, s, _ in moved):
                        part = moved
                        continue
                    log.warning("token shard %s is missing; its %d image(s) are left out of the index", shard, len(rows))
                except CollectionFormatError as exc:
                    log.warning("%s; its %d image(s) are left out of the index", exc, len(rows))
                skipped.extend(i for i, _, _ in part)
                break
    return skipped


def remove_index_files(folder: Path, backend: str) -> None:
    location = index_location(backend, folder)
    if location is None:
        return
    if location.is_dir():
        shutil.rmtree(location, ignore_errors=True)
    for p in (location, location.with_name(location.name + ".tombstones.npy")):
        if p.is_file():
            p.unlink()
    (folder / STATE_NAME).unlink(missing_ok=True)


def wipe(folder: Path) -> None:
    """Delete this package's files in ``folder`` (manifest first, so a crash never leaves a
    manifest pointing at half-deleted data); other files are left alone."""
    (folder / MANIFEST_NAME).unlink(missing_ok=True)
    for suffix in ("", "-wal", "-shm", "-journal"):
        (folder / (CATALOG_NAME + suffix)).unlink(missing_ok=True)
    shutil.rmtree(folder / TOKENS_DIR, ignore_errors=True)
    for name in INDEX_LOCATIONS:
        remove_index_files(folder, name)
    (folder / STATE_NAME).unlink(missing_ok=True)  # the lock file stays: we hold it


def undo_create(folder: Path, catalog: Catalog | None, made_folder: bool) -> None:
    """A ``create`` stopped before its manifest was written (Ctrl-C while the index was set up): delete
    what it wrote, and the folder (lock file included) when it made it, so that no half-made collection
    is left that ``info`` calls "no collection" and the next ``index`` refuses as a lost manifest."""
    from .lock import LOCK_NAME

    if catalog is not None:
        try:
            catalog.close()
        except Exception:  # noqa: BLE001  (the interruption is the error to report)
            pass
    wipe(folder)
    if made_folder:
        (folder / LOCK_NAME).unlink(missing_ok=True)  # released right after; nobody else waits on a new folder
        try:
            folder.rmdir()
        except OSError:
            pass  # something else was put there meanwhile: left alone


def clean_litter(folder: Path, backend: str) -> list[str]:
    """Writer, under the lock: delete what interrupted runs leave behind: ``.tmp-*`` files (a write
    that never got renamed into place) and the index files of a backend other than the manifest's
    (a migration killed half way). Returns one line per thing removed."""
    removed: list[str] = []
    for where in (folder, folder / TOKENS_DIR):
        if where.is_dir():
            for p in where.iterdir():
                if p.name.startswith(".tmp-") and p.is_file():
                    p.unlink(missing_ok=True)
                    removed.append(f"removed the temporary file {p} left by an interrupted write")
    for other in INDEX_LOCATIONS:
        location = index_location(other, folder)
        if other != backend and location is not None and location.exists():
            kept = set_aside_into(folder, location, "unused")  # derived, but never deleted on a guess
            removed.append(f"set aside {location} as {kept.relative_to(folder)}: the index of another backend "
                           f"(an interrupted change to {other}, or copied in)")
    for line in removed:
        log.warning(line)
    return removed


def disk_full(exc: BaseException, what: str, folder: Path, committed: bool = False) -> CollectionError | None:
    """A one-line error for a full disk (``ENOSPC``/``EDQUOT``), or None for any other failure."""
    code = getattr(exc, "errno", None)
    text = str(exc)
    if code not in (errno.ENOSPC, errno.EDQUOT) and "No space left" not in text:
        return None
    kept = ("the images committed so far are safe and the index is rebuilt from them on the next run"
            if committed else "nothing of this batch was stored")
    return CollectionError(f"the disk holding {folder} is full while writing {what}: {kept}; free some space "
                           "and rerun")


# ------------------------------------------------------------------------------ the mixin


class IndexSync:
    """The index-keeping half of ``Collection`` (see the module docstring); state lives there."""

    path: Path
    manifest: Manifest
    catalog: Catalog
    tokens: TokenStore
    index: VectorIndex

    def _save_index(self) -> None:
        try:
            self.index.save()
            self._write_state()
        except (OSError, RuntimeError) as exc:
            full = disk_full(exc, "the vector index", self.path, committed=True)
            if full is None:
                raise
            raise full from None
        self._unsaved = 0

    def _write_state(self) -> None:
        files = {p.name: file_sha256(p) for p in index_files(self.path, self.manifest.backend)}
        state = {"catalog_version": self.catalog.version(), "backend": self.manifest.backend,
                 "vectors": len(self.index), "saved": utc_now(), "files": files}
        if self.manifest.collection_id:
            state[ID_KEY] = self.manifest.collection_id
        atomic_write_bytes(self.path / STATE_NAME, json.dumps(state).encode())
        self._state_seen = _mtime(self.path / STATE_NAME)

    def _reconcile(self, save: bool = True) -> None:
        """Make the in-memory index hold exactly the catalog's ids (adding from the shards, removing
        extras); ``save`` writes it back (writers only)."""
        state = read_state(self.path)
        version = self.catalog.version()
        count = self.catalog.counts()["images"]
        if state.get("catalog_version") == version and state.get("backend") == self.manifest.backend \
                and len(self.index) == count and not self._unsaved:
            self._synced_version = version
            return
        cat_ids = self.catalog.ids()
        idx_ids = self.index.ids()
        extra = np.setdiff1d(idx_ids, cat_ids)
        missing = np.setdiff1d(cat_ids, idx_ids)
        if len(extra):
            self.index.remove(extra.tolist())
        if len(missing):
            fill(self.index, self.tokens, missing.tolist())
        if (len(extra) or len(missing)) and save:
            log.warning("index resynchronised with the catalog: %d added, %d removed", len(missing), len(extra))
        self._synced_version = version
        if save:
            self._save_index()

    def _catch_up(self) -> None:
        """A writer that does not hold the lock for its life: take in what other processes committed
        (a newer manifest or saved index, new or removed images). Writes nothing."""
        if self.catalog.version() == self._synced_version and _mtime(self.path / MANIFEST_NAME) == self._manifest_seen:
            return
        self.tokens.close()  # another writer may have compacted shards away
        if _mtime(self.path / MANIFEST_NAME) != self._manifest_seen:
            fresh = Manifest.load(self.path)
            self._manifest_seen = _mtime(self.path / MANIFEST_NAME)
            if fresh.backend != self.manifest.backend:
                self.index.close()
                self.manifest = fresh
                self.index = open_index_for_writer(fresh, self.path, self._options())
                self._state_seen = None
            self.manifest = fresh
        self._follow_tokens()
        if self.manifest.backend == "faiss" and _mtime(self.path / STATE_NAME) != self._state_seen \
                and not self._unsaved:
            self._state_seen = _mtime(self.path / STATE_NAME)
            self.index.close()
            self.index = open_index_for_writer(self.manifest, self.path, self._options())
        try:
            self._reconcile(save=False)
        except FileNotFoundError:  # a shard compacted away between our lookup and the read
            self.tokens.close()
            self._reconcile(save=False)

    def _follow_tokens(self) -> None:
        """Another process shrank the stored tokens (``shrink``): read the shards at the new token count
        from now on (the manifest on disk, or an interrupted shrink's journal once its switch committed)."""
        from .shrink import current_manifest

        on_disk = self.manifest
        if _mtime(self.path / MANIFEST_NAME) != self._manifest_seen:
            try:
                on_disk = Manifest.load(self.path)
            except CollectionError:
                return  # being replaced: the next refresh looks again
        fresh = current_manifest(self.path, on_disk, self.catalog)
        if (fresh.token_count, fresh.strategy) != (self.manifest.token_count, self.manifest.strategy):
            self.manifest = Manifest.model_validate({**self.manifest.model_dump(), "token_count": fresh.token_count,
                                                     "strategy": fresh.strategy})
            self.tokens.close()
            self.tokens = token_store(self.path, self.manifest, self.catalog)

    def _rebuild_index(self, without: set[int] | None = None) -> None:
        """Refill the index from the stored embeddings (all, or all but ``without``: images whose
        stored data is lost)."""
        self.index.clear()
        if without:
            fill(self.index, self.tokens, [i for i in self.catalog.ids().tolist() if i not in without])
        else:
            fill(self.index, self.tokens)
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
            pending = ExactIndex(self.manifest.embed_dim)
            fill(pending, self.tokens, missing.tolist())
            self._pending = pending

    def _refresh(self) -> None:
        """Before a search: pick up commits made by other processes since the last one."""
        if self.writable:
            if not self._lock.held:
                self._catch_up()
            return
        if self.catalog.version() == self._synced_version:
            return
        self._follow_tokens()
        if self.manifest.backend == "faiss":
            seen = _mtime(self.path / STATE_NAME)
            if seen != self._state_seen:
                self._state_seen = seen
                fresh, self._index_damage = open_index_for_reader(self.manifest, self.path, self._options())
                self.index.close()
                self.index = fresh
        self._sync_overlay()


def _mtime(path: Path) -> int | None:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None
