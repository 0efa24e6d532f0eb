"""Making a new collection folder (``Collection.create``): what may be there first, and the first write.

Why a module of its own: what ``create`` must refuse (a collection already there, one that lost its
manifest, someone's file where a part goes) is a decision of its own, and it kept ``store`` over 500 lines.
The order of the checks matters: a part of the wrong kind (a *folder* named ``manifest.json`` or
``catalog.sqlite``) is named first, as every other command names it, instead of being taken for a
collection ("already holds a collection", "run f2b verify --repair") that it may not be.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .catalog import CATALOG_NAME, Catalog
from .errors import CollectionExistsError, CollectionFormatError
from .identity import ID_KEY, new_id
from .index import open_index
from .lock import WriterLock
from .manifest import MANIFEST_NAME, Manifest, utc_now
from .parts import DAMAGED_DIR, odd_message, odd_parts, set_aside_odd
from .sync import _mtime, token_store, undo_create, wipe
from .tokens import TOKENS_DIR

log = logging.getLogger(__name__)


def _holds_collection_parts(folder: Path) -> bool:
    """Whether a well-formed part of a collection is there (a manifest, a catalog or a shard file): then an
    odd part beside it is damage that ``verify --repair`` sets aside, not someone else's folder."""
    return ((folder / MANIFEST_NAME).is_file() or (folder / CATALOG_NAME).is_file()
            or any(p.is_file() for p in (folder / TOKENS_DIR).glob("*.arrow")))


def check_create_target(folder: Path, overwrite: bool) -> list[str]:
    """Refuse (one line) a folder that ``create`` must not write over, or with ``overwrite`` (``--reindex``)
    set its odd parts aside in ``damaged/``: a part of the wrong kind is never this package's to delete. Returns
    the set-aside lines (logged as warnings too)."""
    if overwrite:
        set_aside = [f"re-indexing: {line}" for line in set_aside_odd(folder)]
        for line in set_aside:
            log.warning(line)
        return set_aside
    odd = [o for o in odd_parts(folder) if o[0] != DAMAGED_DIR]  # damaged/ is never touched here
    if odd:  # first: a folder named manifest.json is not a collection to open or rebuild
        if _holds_collection_parts(folder):
            raise CollectionFormatError(f"{odd_message(folder, odd)}; or pass --reindex to replace everything")
        raise CollectionFormatError(f"{odd[0][1]}; nothing was changed. Move it out of the way, or pick another "
                                    "--collection folder")
    if (folder / MANIFEST_NAME).exists():
        raise CollectionExistsError(
            f"{folder} already holds a collection; open it, pick another --collection folder, or "
            f"re-encode everything with --reindex"
        )
    if (folder / CATALOG_NAME).exists() or any((folder / TOKENS_DIR).glob("*.arrow")):
        raise CollectionExistsError(  # a collection that lost its manifest: never wipe it
            f"{folder} holds a collection's catalog or token shards but no {MANIFEST_NAME}; run f2b verify "
            f"--repair --collection {folder} to rebuild it, or pass --reindex to replace everything"
        )
    return []


def create_collection(cls: Any, folder: Path, manifest: Manifest, backend: str | None,
                      backend_options: dict[str, Any] | None, overwrite: bool, save_every: int, hold_lock: bool,
                      lock_timeout: float) -> Any:
    """``Collection.create``'s body (``cls`` is the ``Collection`` class; see its docstring). Under the writer
    lock: the checks, then catalog, token store and index, and the manifest last, so a folder without a
    manifest is no collection yet; a failure before it undoes what was written."""
    made_folder = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    lock = WriterLock(folder).acquire(timeout=lock_timeout)
    catalog, started = None, False
    try:
        set_aside = check_create_target(folder, overwrite)
        wipe(folder)
        started = True  # from here on, a failure before the manifest undoes what was written
        updates: dict[str, Any] = {"created": utc_now(), "updated": utc_now(), ID_KEY: new_id()}
        if backend is not None:
            updates["backend"] = backend
        if backend_options is not None:
            updates["backend_options"] = dict(backend_options)
        manifest = Manifest.model_validate({**manifest.model_dump(), **updates})
        catalog = Catalog(folder / CATALOG_NAME)
        catalog.set_collection_id(manifest.collection_id)
        tokens = token_store(folder, manifest, catalog)
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
        col = cls(folder, manifest, catalog, tokens, index, lock, save_every, hold_lock, lock_timeout)
        col.opened_notes = set_aside
        col._save_index()
        manifest.save(folder)  # last: a folder without manifest is not a collection yet
        col._manifest_seen = _mtime(folder / MANIFEST_NAME)
        col._synced_version = catalog.version()
        if not col._hold:
            lock.release()
        return col
    except BaseException:
        if started and not (folder / MANIFEST_NAME).exists():
            undo_create(folder, catalog, made_folder)
        lock.release()
        raise
