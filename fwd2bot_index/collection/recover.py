"""Folder recovery, the first step of ``verify --repair`` (before any open): set aside parts of the
wrong file-system kind, then rebuild a lost, damaged, edited or foreign manifest and catalog from the
token shards of *this* collection (shards carrying another collection's id never count, see
``identity``). Damaged and foreign files are kept aside, never deleted.

Split from ``health`` (verify and repair of an open collection) to keep each file readable.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

from .catalog import CATALOG_NAME, Catalog
from .errors import CollectionFormatError, CollectionNotFoundError
from .identity import ID_KEY, describe_foreign, home_id
from .lock import WriterLock
from .manifest import MANIFEST_NAME, Manifest, lost_manifest_message, lost_manifest_remains
from .parts import set_aside_odd
from .sync import read_state, token_store
from .tokens import TOKENS_DIR, TokenStore
from .trust import manifest_mismatch, trust_problem

__all__ = ["import_shards", "recover_folder", "set_aside"]

log = logging.getLogger(__name__)


def set_aside(path: Path) -> Path:
    """Rename a damaged file out of the way (kept, never deleted): ``<name>.damaged-<time>``."""
    target = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
    os.replace(path, target)
    return target


def recover_folder(path: str | os.PathLike[str], lock_timeout: float = 60.0) -> list[str]:
    """Before a writable open for repair: set aside odd parts, rebuild a missing, damaged, mismatched
    or foreign manifest and catalog from the token shards. Returns one line per action (empty when
    all were sound)."""
    folder = Path(path).absolute()
    if not folder.is_dir():
        raise CollectionNotFoundError(f"no collection at {folder}")
    actions = set_aside_odd(folder)  # before the lock: the lock file itself may be the odd part
    lock = WriterLock(folder).acquire(timeout=lock_timeout)
    try:
        home = _recover_home(folder)
        manifest = _recover_manifest(folder, actions, home)
        _recover_catalog(folder, manifest, actions, home)
        for line in actions:
            log.warning(line)
        return actions
    finally:
        lock.release()


def _probe(folder: Path) -> TokenStore:
    return TokenStore(folder / TOKENS_DIR, 1, 1, 1)


def _recover_home(folder: Path) -> str | None:
    """This collection's id from every part that still says one (``identity.home_id``)."""
    try:
        manifest_id = Manifest.load(folder).collection_id or None
    except CollectionFormatError:
        manifest_id = None
    catalog_id = None
    try:
        catalog = Catalog(folder / CATALOG_NAME, readonly=True) if (folder / CATALOG_NAME).exists() else None
    except CollectionFormatError:
        catalog = None
    if catalog is not None:
        try:
            catalog_id = catalog.collection_id()
        except CollectionFormatError:
            pass
        finally:
            catalog.close()
    votes = [s["identity"].get(ID_KEY) for s in _shard_schemas(folder, None).values()]
    return home_id(manifest_id, catalog_id, votes + [read_state(folder).get(ID_KEY)])


def _shard_schemas(folder: Path, home: str | None) -> dict[str, dict[str, Any]]:
    """Readable shards' schemas, without those of another collection (their id is not ``home``)."""
    probe = _probe(folder)
    out = {}
    for name in probe.list_shards():
        try:
            schema = probe.schema_of(name)
        except CollectionFormatError:
            continue
        theirs = schema["identity"].get(ID_KEY)
        if home and theirs and theirs != home:
            continue
        out[name] = schema
    return out


def _recover_manifest(folder: Path, actions: list[str], home: str | None) -> Manifest:
    schemas = _shard_schemas(folder, home)
    shapes = Counter((s["D"], s["T"], s["H"], s["dtype"]) for s in schemas.values())
    manifest: Manifest | None = None
    try:
        manifest = Manifest.load(folder)
        why = None
    except CollectionNotFoundError:
        remains = lost_manifest_remains(folder)
        if not schemas and remains:  # a catalog alone cannot say which model made it
            raise CollectionFormatError(lost_manifest_message(folder, remains)) from None
        if not schemas:
            raise
        why = f"{MANIFEST_NAME} was missing"
    except CollectionFormatError as exc:
        why = str(exc)
    ledger = _readable_ledger(folder)
    if manifest is not None and home and manifest.collection_id and manifest.collection_id != home:
        why = describe_foreign(MANIFEST_NAME, manifest.collection_id, home)
        manifest = None  # another collection's: nothing in it (model, options) is this one's
    if manifest is not None and shapes:
        probe = _probe(folder)
        if manifest_mismatch(folder, manifest, probe, ledger, home=home) is not None:
            why = f"{MANIFEST_NAME} disagreed with the token shards"
            proven = {n: s for n, s in schemas.items() if ledger.get(n, ("", 0, None))[2] == probe.checksum(n)}
            schemas = proven or schemas
            shapes = Counter((s["D"], s["T"], s["H"], s["dtype"]) for s in schemas.values())
            prints = {s["identity"].get("model_fingerprint") for s in schemas.values()}
            if manifest.model_fingerprint not in prints and any(prints):
                manifest = None  # its identity is the wrong one: take the shards'
    if why is None:
        assert manifest is not None
        return manifest
    if not shapes:
        raise CollectionFormatError(f"{why}, and no readable token shard says what it should hold; restore "
                                    f"{folder / MANIFEST_NAME} from a backup")
    (d, t, h, dtype), _ = shapes.most_common(1)[0]
    identity = next((s["identity"] for _, s in sorted(schemas.items(), reverse=True)
                     if s["identity"].get("model_fingerprint")), None)
    if manifest is not None:
        identity = {"model_name": manifest.model_name, "model_fingerprint": manifest.model_fingerprint,
                    "strategy": manifest.strategy, "image_options": manifest.image_options}
    if identity is None:
        raise CollectionFormatError(f"{why}, and these token shards predate recording the model; restore "
                                    f"{folder / MANIFEST_NAME} from a backup or re-encode with f2b index --reindex")
    backend = manifest.backend if manifest is not None else next(
        (b for b in ("qdrant-edge", "qdrant-local") if (folder / b).is_dir()), "faiss")
    identity = {k: v for k, v in identity.items() if k != ID_KEY}
    fresh = Manifest(**identity, embed_dim=d, token_count=t, token_dim=h, token_dtype=dtype, backend=backend,
                     backend_options=manifest.backend_options if manifest is not None else {},
                     collection_id=home or "")
    kept = f"; the old one is kept as {set_aside(folder / MANIFEST_NAME).name}" if (folder / MANIFEST_NAME).exists() else ""
    fresh.save(folder)
    actions.append(f"rebuilt {MANIFEST_NAME} from the token shards ({why}){kept}")
    return fresh


def _readable_ledger(folder: Path) -> dict[str, tuple[str, int, str | None]]:
    try:
        catalog = Catalog(folder / CATALOG_NAME, readonly=True)
    except CollectionFormatError:
        return {}
    try:
        return catalog.shard_ledger()
    except CollectionFormatError:
        return {}
    finally:
        catalog.close()


def _recover_catalog(folder: Path, manifest: Manifest, actions: list[str], home: str | None) -> None:
    path = folder / CATALOG_NAME
    problem = None if path.exists() else f"{CATALOG_NAME} was missing"
    if problem is None:
        try:
            catalog = Catalog(path, readonly=True)
        except CollectionFormatError as exc:
            problem = str(exc).split("; nothing was changed")[0]
        else:
            try:
                problem = trust_problem(folder, manifest, catalog, token_store(folder, manifest, catalog), deep=True)
            except CollectionFormatError as exc:
                problem = str(exc).split("; nothing was changed")[0]
            finally:
                catalog.close()
    if problem is None:
        return
    kept = ""
    for suffix in ("", "-wal", "-shm", "-journal"):
        part = folder / (CATALOG_NAME + suffix)
        if part.exists():
            aside = set_aside(part)
            kept = kept or f"; the damaged file is kept as {aside.name}"
    catalog = Catalog(path)
    try:
        cid = home or manifest.collection_id
        if cid:
            catalog.set_collection_id(cid)
        tokens = token_store(folder, manifest, catalog)
        names = tokens.list_shards()
        n, skipped = import_shards(catalog, tokens, names)
        foreign = [s for s in skipped if _is_foreign(tokens, s)]
        note = (f" ({len(skipped) - len(foreign)} shard(s) of an older format or another model cannot join: "
                "re-index them)") if len(skipped) > len(foreign) else ""
        if foreign:
            note += f" ({len(foreign)} shard(s) of another collection left out; verify --repair sets them aside)"
        actions.append(f"rebuilt {CATALOG_NAME} from {len(names) - len(foreign)} token shard(s): {n} image(s) "
                       f"({problem}){kept}{note}; images removed since their shard was last compacted may be back "
                       "(remove them again), and the list of failed files starts empty")
    finally:
        catalog.close()


def _is_foreign(tokens: TokenStore, name: str) -> bool:
    mine = tokens.identity.get(ID_KEY)
    try:
        theirs = tokens.schema_of(name)["identity"].get(ID_KEY)
    except (CollectionFormatError, OSError):
        return False
    return bool(mine and theirs and theirs != mine)


def import_shards(catalog: Catalog, tokens: TokenStore, names: list[str], known_ok: bool = False) -> tuple[int, list[str]]:
    """Add to the catalog every intact image the given shards describe and the catalog lacks
    (newer shards win for a repeated id, hash or path). Shards of another model or another
    collection never join. Returns (images added, shards that could not or must not join)."""
    added, skipped = 0, []
    mine = tokens.identity.get(ID_KEY)
    with catalog.transaction():
        for name in sorted(names):  # names start with the write time: oldest first
            try:
                identity = tokens.schema_of(name)["identity"]
                rows = tokens.describe_rows(name)
                good = tokens.good_rows(name)
            except (CollectionFormatError, OSError):
                skipped.append(name)
                continue
            theirs = identity.get("model_fingerprint")
            if theirs and theirs != tokens.identity.get("model_fingerprint"):
                skipped.append(name)  # another model's embeddings never join this collection
                continue
            if mine and identity.get(ID_KEY) and identity[ID_KEY] != mine:
                skipped.append(name)  # another collection's images never join this one
                continue
            if rows is None:
                skipped.append(name)
                continue
            have = set(catalog.ids().tolist())
            for r, row in enumerate(rows):
                if (good is not None and not good[r]) or row["id"] in have:
                    continue
                twin = catalog.id_by_hash(row["hash"])
                if twin is not None:
                    catalog.delete_images([twin])  # the same content under an older id
                catalog.import_image(row["id"], row["hash"], row["size"], row["metadata"], name, r)
                for p, size, mtime in row["paths"]:
                    catalog.set_path(p, row["id"], size, mtime)
                added += 1
            if good is None or good.all():
                catalog.shard_live(name, len(rows), tokens.checksum(name))
        replaced = catalog.pathless(catalog.ids().tolist())
        catalog.delete_images(replaced)  # versions whose every path now shows newer content
        added -= len(replaced)
        catalog.bump_version()
    return added, skipped
