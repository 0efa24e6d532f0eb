"""Collection identity: every part of a collection carries the id the collection got at creation.

Why: the parts of a collection are plain files, and a file copied in from another collection (its
``index.faiss`` + ``index.state.json``, a token shard, a catalog) is well-formed, checksums and all.
Before ids, such a part passed ``verify`` (another collection's ranking served under this one's
paths) or, worse, was adopted by ``verify --repair`` over a sound catalog. With an id in the manifest,
the catalog's ``meta`` table (which also holds the shard ledger), each shard's schema metadata and
``index.state.json``, a part whose id differs is *foreign*: ``verify`` names it, opens refuse a foreign
manifest or catalog, readers never search a foreign index, and ``--repair`` sets foreign parts aside
(``damaged/``) and never imports them.

Which id is this collection's (``home_id``): manifest and catalog agree, or else the one most token
shards and the index state carry; a tie goes to the catalog, the source of truth.

Collections written before ids get one on their first writable open (``adopt``): the catalog first
(one SQLite commit), then the manifest (atomic rename). A kill between the two leaves a catalog with
an id and a manifest without; the next writable open copies the catalog's. Parts without an id
(legacy shards, an old state file) are never called foreign: they are checked as before (checksums,
model fingerprints, shapes).
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import CollectionFormatError

if TYPE_CHECKING:
    from .catalog import Catalog
    from .manifest import Manifest
    from .tokens import TokenStore

__all__ = ["ID_KEY", "adopt", "foreign_shards", "home_id", "new_id", "shard_id", "short"]

ID_KEY = "collection_id"


def new_id() -> str:
    """A fresh collection id (random, 32 hex digits)."""
    return uuid.uuid4().hex


def short(cid: str | None) -> str:
    return (cid or "none")[:12]


def home_id(manifest_id: str | None, catalog_id: str | None, votes: Iterable[str | None] = ()) -> str | None:
    """This collection's id from its parts' ids (None when no part has one: a legacy collection).
    ``votes``: the ids the token shards and the index state carry."""
    counted = Counter(v for v in votes if v)
    candidates = [c for c in (catalog_id, manifest_id) if c]
    if not candidates:
        return counted.most_common(1)[0][0] if counted else None
    if len(set(candidates)) == 1:
        only = candidates[0]
        if len(candidates) == 1 and counted and counted[only] == 0 and counted.most_common(1)[0][1] >= 2:
            # the one part left (the other lost) is the odd one out: another collection's catalog or
            # manifest beside several shards that all say otherwise
            return counted.most_common(1)[0][0]
        return only
    return max(candidates, key=lambda c: counted[c])  # max keeps the first (the catalog) on a tie


def shard_id(tokens: TokenStore, name: str) -> str | None:
    """The collection id in a shard's schema (None: a shard from before ids, or unreadable)."""
    try:
        return tokens.schema_of(name)["identity"].get(ID_KEY) or None
    except (CollectionFormatError, OSError):
        return None


def foreign_shards(tokens: TokenStore, home: str | None, names: Iterable[str] | None = None) -> dict[str, str]:
    """``name -> its id`` for the shards (all, or ``names``) that carry another collection's id."""
    if not home:
        return {}
    out = {}
    for name in tokens.list_shards() if names is None else names:
        theirs = shard_id(tokens, name)
        if theirs and theirs != home:
            out[name] = theirs
    return out


def unproven_shards(tokens: TokenStore, catalog_id: str | None, ledger: dict[str, Any],
                    names: Iterable[str]) -> list[str]:
    """Readable shards with no collection id that a catalog with an id (and a ledger) never recorded.
    Why they are not imported: every shard this collection wrote since it got its id carries the id,
    and every older one is in its ledger; such a shard comes from another collection that predates
    ids (the issue's "another collection's shard in place of the only one", between old collections)."""
    if not catalog_id or not ledger:
        return []
    out = []
    for name in names:
        if name in ledger:
            continue
        try:
            if not tokens.schema_of(name)["identity"].get(ID_KEY):
                out.append(name)
        except (CollectionFormatError, OSError):
            continue  # unreadable: verify names it as such
    return out


def part_votes(folder: Path, tokens: TokenStore, sample: list[str]) -> list[str | None]:
    """The ids that sampled shards and the index state carry (for ``home_id``)."""
    from .sync import read_state

    return [shard_id(tokens, n) for n in sample] + [read_state(folder).get(ID_KEY)]


def adopt(folder: Path, manifest: Manifest, catalog: Catalog, tokens: TokenStore) -> str | None:
    """Writer, under the lock, after the parts were found trustworthy: give a collection from before
    ids its id, catalog first, then manifest (see the module docstring). When neither has one but the
    shards do (a manifest and catalog restored from before ids), the shards' id is taken, so they do
    not all turn foreign. Returns the id when one was written (None when both already had it)."""
    cat = catalog.collection_id()
    if cat and manifest.collection_id == cat:
        return None
    names = tokens.list_shards()
    cid = cat or manifest.collection_id or home_id(None, None, part_votes(folder, tokens, names[-8:])) or new_id()
    if not cat:
        catalog.set_collection_id(cid)
    if manifest.collection_id != cid:
        manifest.collection_id = cid
        manifest.save(folder)
    return cid


def describe_foreign(what: str, theirs: str | None, home: str | None) -> str:
    """The words every foreign-part message shares."""
    return f"{what} belongs to another collection (its collection id {short(theirs)}, this collection's {short(home)})"


def identity_of(manifest: Manifest) -> dict[str, Any]:
    """What each new token shard records about the collection (a lost manifest is rebuilt from it)."""
    out: dict[str, Any] = {"model_name": manifest.model_name, "model_fingerprint": manifest.model_fingerprint,
                           "strategy": manifest.strategy, "image_options": manifest.image_options}
    if manifest.collection_id:
        out[ID_KEY] = manifest.collection_id
    return out
