"""Whether a collection's catalog and manifest may be trusted to drive deletions, and why not.

Split from ``health`` (verify and repair) because opening needs it too: a writable open refuses,
in one line, a catalog or manifest that is damaged, edited or another collection's (see ``identity``),
before anything is deleted on its say-so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .catalog import CATALOG_NAME, Catalog
from .errors import CollectionFormatError
from .identity import describe_foreign, home_id, part_votes, shard_id, unproven_shards
from .manifest import MANIFEST_NAME, Manifest
from .tokens import TOKENS_DIR, TokenStore

__all__ = ["collection_home", "manifest_mismatch", "refuse", "trust_problem"]


def collection_home(folder: Path, manifest: Manifest, catalog: Catalog, tokens: TokenStore,
                    names: list[str] | None = None) -> str | None:
    """This collection's id (``identity.home_id``): free when manifest and catalog agree, else decided
    by what a sample of the shards (all of ``names`` when given) and the index state carry."""
    cat = catalog.collection_id()
    if cat and cat == manifest.collection_id:
        return cat
    if not cat and not manifest.collection_id:
        return None  # a collection from before ids: nothing can be foreign by id yet
    sample = names if names is not None else _sample(tokens.list_shards()[::-1], 8)
    return home_id(manifest.collection_id, cat, part_votes(folder, tokens, sample))


def trust_problem(folder: Path, manifest: Manifest, catalog: Catalog, tokens: TokenStore, deep: bool) -> str | None:
    """Why this catalog and manifest must not drive deletions (None when they may)."""
    if deep:
        bad = catalog.quick_check()
        if bad is not None:
            return f"{folder / CATALOG_NAME} fails SQLite's quick_check ({bad})"
    home = collection_home(folder, manifest, catalog, tokens)
    if manifest.collection_id and manifest.collection_id != home:
        return describe_foreign(str(folder / MANIFEST_NAME), manifest.collection_id, home)
    if catalog.collection_id() and catalog.collection_id() != home:
        return describe_foreign(str(folder / CATALOG_NAME), catalog.collection_id(), home)
    on_disk = tokens.list_shards()
    ledger = catalog.shard_ledger()
    mismatch = manifest_mismatch(folder, manifest, tokens, ledger, quick=not deep, home=home)
    if mismatch is not None:
        return mismatch
    candidates = [s for s in on_disk if ledger.get(s, ("live",))[0] not in ("pending", "doomed")]
    # A healthy catalog references every live shard of its own: sampling a few (newest first) is enough
    # to tell an empty or foreign catalog, without a scan of a large one. Another collection's shard
    # copied in proves nothing about the catalog (verify names it; repair sets it aside).
    sample = [s for s in _sample(candidates[::-1], 8) if not _foreign(tokens, s, home)]
    sample = [s for s in sample if s not in unproven_shards(tokens, catalog.collection_id(), ledger, sample)]
    if sample and not any(catalog.references(s) for s in sample):
        return (f"{folder / CATALOG_NAME} references none of the {len(candidates)} token shard(s) in "
                f"{folder / TOKENS_DIR} (it is empty, damaged or belongs to another collection)")
    return None


def _foreign(tokens: TokenStore, name: str, home: str | None) -> bool:
    theirs = shard_id(tokens, name) if home else None
    return bool(theirs) and theirs != home


def _identity(manifest: Manifest) -> tuple[Any, ...]:
    return (manifest.embed_dim, manifest.token_count, manifest.token_dim, manifest.token_dtype, manifest.model_fingerprint)


def _shard_identity(schema: dict[str, Any], fallback: str) -> tuple[Any, ...]:
    return (schema["D"], schema["T"], schema["H"], schema["dtype"], schema["identity"].get("model_fingerprint") or fallback)


def _sample(items: list[str], n: int) -> list[str]:
    """Up to ``n`` items spread over the list, first and last included."""
    if len(items) <= n:
        return items
    return [items[round(k * (len(items) - 1) / (n - 1))] for k in range(n)]


def manifest_mismatch(folder: Path, manifest: Manifest, tokens: TokenStore,
                      ledger: dict[str, tuple[str, int, str | None]], quick: bool = False,
                      home: str | None = None) -> str | None:
    """Whether the manifest contradicts the shards' own schema (shapes, model). A shard that
    disagrees is trusted over the manifest only when it is proven (its checksum is the one the
    catalog recorded), or when no shard at all agrees with the manifest; otherwise it is a damaged
    or foreign shard, which ``verify`` reports. Shards carrying another collection's id (``home``)
    never count. ``quick`` looks at a sample of shards (an edited manifest disagrees with all of
    them), for opens of large collections."""
    want = _identity(manifest)
    agree, disagree = [], []
    names = tokens.list_shards()
    for name in _sample(names, 5) if quick else names:
        try:
            s = tokens.schema_of(name)
        except CollectionFormatError:
            continue  # a damaged shard is verify's business, not a reason to distrust the manifest
        theirs = s["identity"].get("collection_id")
        if home and theirs and theirs != home:
            continue  # another collection's shard says nothing about this manifest
        (agree if _shard_identity(s, want[4]) == want else disagree).append((name, s))
    if not disagree:
        return None
    proven = [(n, s) for n, s in disagree if ledger.get(n, ("", 0, None))[2] == tokens.checksum(n)]
    if not proven and agree:
        return None
    name, s = (proven or disagree)[0]
    return (f"{folder / MANIFEST_NAME} says embed_dim={want[0]}, token_count={want[1]}, token_dim={want[2]}, {want[3]}, "
            f"model {want[4][:12]}, but token shard {name} holds embed_dim={s['D']}, token_count={s['T']}, "
            f"token_dim={s['H']}, {s['dtype']}, model {_shard_identity(s, want[4])[4][:12]} (the manifest was edited "
            "or belongs to another collection)")


def refuse(folder: Path, problem: str) -> CollectionFormatError:
    return CollectionFormatError(f"{problem}; nothing was changed. Run f2b verify --repair --collection {folder} "
                                 "to rebuild it from the token shards (damaged files are kept aside)")
