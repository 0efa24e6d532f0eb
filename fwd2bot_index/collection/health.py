"""Verify, repair and recovery: damage is found and named, and never turned into loss.

Rules (after SQLite and Qdrant, see ARCHITECTURE.md "Examples to follow for damage resistance"):

- Nothing is deleted because the catalog "doesn't reference it" unless the catalog is proven healthy
  (``PRAGMA quick_check``, it references the shards on disk, the manifest agrees with the shards' own
  schema); otherwise a writable open is refused with one line saying what is wrong and how to recover.
- ``verify`` checks every shard against the SHA-256 recorded at commit and its per-row checks, the
  saved index against the checksum in ``index.state.json``, and that catalog, shards and index agree.
- ``recover_folder`` (``verify --repair``, before opening) rebuilds a lost or damaged manifest from
  the shards' schema and a lost, damaged or foreign catalog from the shards' own columns, keeping the
  damaged file aside. ``repair`` then salvages the intact rows of damaged shards, imports images only
  a shard still knows, rebuilds the index from the embeddings, and forgets an image only when its
  stored data is gone *and* its file exists (the next ``f2b index`` re-encodes it); an image with
  neither is kept and reported.
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
from .lock import WriterLock
from .manifest import MANIFEST_NAME, Manifest
from .records import VerifyReport
from .sync import index_damage, token_store
from .tokens import TOKENS_DIR, TokenStore

log = logging.getLogger(__name__)

DAMAGED_DIR = "damaged"


def _ids_text(ids: list[int], limit: int = 8) -> str:
    head = ", ".join(str(i) for i in ids[:limit])
    return head + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def trust_problem(folder: Path, manifest: Manifest, catalog: Catalog, tokens: TokenStore, deep: bool) -> str | None:
    """Why this catalog and manifest must not drive deletions (None when they may)."""
    if deep:
        bad = catalog.quick_check()
        if bad is not None:
            return f"{folder / CATALOG_NAME} fails SQLite's quick_check ({bad})"
    on_disk = tokens.list_shards()
    ledger = catalog.shard_ledger()
    mismatch = manifest_mismatch(folder, manifest, tokens, ledger, quick=not deep)
    if mismatch is not None:
        return mismatch
    candidates = [s for s in on_disk if ledger.get(s, ("live",))[0] not in ("pending", "doomed")]
    # A healthy catalog references every live shard: sampling a few (newest first) is enough to tell
    # an empty or foreign catalog, without a scan of a large one.
    if candidates and not any(catalog.references(s) for s in _sample(candidates[::-1], 8)):
        return (f"{folder / CATALOG_NAME} references none of the {len(candidates)} token shard(s) in "
                f"{folder / TOKENS_DIR} (it is empty, damaged or belongs to another collection)")
    return None


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
                      ledger: dict[str, tuple[str, int, str | None]], quick: bool = False) -> str | None:
    """Whether the manifest contradicts the shards' own schema (shapes, model). A shard that
    disagrees is trusted over the manifest only when it is proven (its checksum is the one the
    catalog recorded), or when no shard at all agrees with the manifest; otherwise it is a damaged
    or foreign shard, which ``verify`` reports. ``quick`` looks at a sample of shards (an edited
    manifest disagrees with all of them), for opens of large collections."""
    want = _identity(manifest)
    agree, disagree = [], []
    names = tokens.list_shards()
    for name in _sample(names, 5) if quick else names:
        try:
            s = tokens.schema_of(name)
        except CollectionFormatError:
            continue  # a damaged shard is verify's business, not a reason to distrust the manifest
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


def set_aside(path: Path) -> Path:
    """Rename a damaged file out of the way (kept, never deleted): ``<name>.damaged-<time>``."""
    target = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
    os.replace(path, target)
    return target


# ------------------------------------------------------------------------------ folder recovery


def recover_folder(path: str | os.PathLike[str], lock_timeout: float = 60.0) -> list[str]:
    """Before a writable open for repair: rebuild a missing, damaged or mismatched manifest and
    catalog from the token shards. Returns one line per action (empty when both were sound)."""
    folder = Path(path).absolute()
    if not folder.is_dir():
        raise CollectionNotFoundError(f"no collection at {folder}")
    lock = WriterLock(folder).acquire(timeout=lock_timeout)
    try:
        actions: list[str] = []
        manifest = _recover_manifest(folder, actions)
        _recover_catalog(folder, manifest, actions)
        for line in actions:
            log.warning(line)
        return actions
    finally:
        lock.release()


def _shard_schemas(folder: Path) -> dict[str, dict[str, Any]]:
    probe = TokenStore(folder / TOKENS_DIR, 1, 1, 1)
    out = {}
    for name in probe.list_shards():
        try:
            out[name] = probe.schema_of(name)
        except CollectionFormatError:
            pass
    return out


def _recover_manifest(folder: Path, actions: list[str]) -> Manifest:
    schemas = _shard_schemas(folder)
    shapes = Counter((s["D"], s["T"], s["H"], s["dtype"]) for s in schemas.values())
    manifest: Manifest | None = None
    try:
        manifest = Manifest.load(folder)
        why = None
    except CollectionNotFoundError:
        if not schemas:
            raise
        why = f"{MANIFEST_NAME} was missing"
    except CollectionFormatError as exc:
        why = str(exc)
    ledger = _readable_ledger(folder)
    if manifest is not None and shapes:
        probe = TokenStore(folder / TOKENS_DIR, 1, 1, 1)
        if manifest_mismatch(folder, manifest, probe, ledger) is not None:
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
    fresh = Manifest(**identity, embed_dim=d, token_count=t, token_dim=h, token_dtype=dtype, backend=backend,
                     backend_options=manifest.backend_options if manifest is not None else {})
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


def _recover_catalog(folder: Path, manifest: Manifest, actions: list[str]) -> None:
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
        tokens = token_store(folder, manifest, catalog)
        names = tokens.list_shards()
        n, skipped = import_shards(catalog, tokens, names)
        note = f" ({len(skipped)} shard(s) of an older format cannot describe their images: re-index them)" if skipped else ""
        actions.append(f"rebuilt {CATALOG_NAME} from {len(names)} token shard(s): {n} image(s) ({problem}){kept}{note}; "
                       "images removed since their shard was last compacted may be back (remove them again), "
                       "and the list of failed files starts empty")
    finally:
        catalog.close()


def import_shards(catalog: Catalog, tokens: TokenStore, names: list[str], known_ok: bool = False) -> tuple[int, list[str]]:
    """Add to the catalog every intact image the given shards describe and the catalog lacks
    (newer shards win for a repeated id, hash or path). Returns (images added, shards that could
    not describe themselves)."""
    added, skipped = 0, []
    with catalog.transaction():
        for name in sorted(names):  # names start with the write time: oldest first
            try:
                theirs = tokens.schema_of(name)["identity"].get("model_fingerprint")
                rows = tokens.describe_rows(name)
                good = tokens.good_rows(name)
            except (CollectionFormatError, OSError):
                skipped.append(name)
                continue
            if theirs and theirs != tokens.identity.get("model_fingerprint"):
                skipped.append(name)  # another model's embeddings never join this collection
                continue
            if rows is None:
                skipped.append(name)
                continue
            have = set(catalog.ids().tolist())
            intact = 0
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
                intact += 1
            if good is None or good.all():
                catalog.shard_live(name, len(rows), tokens.checksum(name))
        replaced = catalog.pathless(catalog.ids().tolist())
        catalog.delete_images(replaced)  # versions whose every path now shows newer content
        added -= len(replaced)
        catalog.bump_version()
    return added, skipped


# ------------------------------------------------------------------------------ the mixin


class Health:
    """``verify`` and ``repair`` of ``Collection`` (state lives there)."""

    def verify(self) -> VerifyReport:
        """Check that catalog, token shards and index are undamaged and agree (same ids, no orphans,
        no lost rows, checksums as recorded at commit).

        On a read-only open while a writer is active, a batch being written shows up as an orphan
        shard; the writer's own ``verify`` is authoritative."""
        with self._mutex:
            self._refresh()
            problems: list[str] = []
            bad = self.catalog.quick_check()
            if bad is not None:
                problems.append(f"{self.path / CATALOG_NAME} fails SQLite's quick_check ({bad})")
            cat_ids = set(self.catalog.ids().tolist())
            locations = self.catalog.locations()
            ledger = self.catalog.shard_ledger()
            by_shard: dict[str, list[tuple[int, int]]] = {}
            for image_id, shard, row in locations:
                by_shard.setdefault(shard, []).append((image_id, row))
            on_disk = set(self.tokens.list_shards())
            missing_shards = sorted(set(by_shard) - on_disk)
            orphan_shards = sorted(on_disk - set(by_shard))
            damaged, bad_rows = self._damaged_shards(by_shard, on_disk, ledger, problems)
            for name in missing_shards:
                ids = sorted(i for i, _ in by_shard[name])
                problems.append(f"token shard {name} is missing; it held {len(ids)} image(s): ids {_ids_text(ids)}")
                bad_rows.extend(ids)
            leftovers = [s for s in orphan_shards if ledger.get(s, ("",))[0] in ("pending", "doomed")]
            if leftovers:
                problems.append(f"{len(leftovers)} token shard(s) left by an interrupted write (the next writer deletes them)")
            for name in sorted(set(orphan_shards) - set(leftovers)):
                problems.append(f"token shard {name} is not referenced by the catalog; it is kept (verify --repair "
                                "imports the images only it holds)")
            idx = self.index.ids()
            idx_set = set(idx.tolist())
            if self._pending is not None:
                idx_set |= set(self._pending.ids().tolist())
            idx_set -= self._extra
            missing_in_index = sorted(cat_ids - idx_set)
            extra_in_index = sorted(idx_set - cat_ids)
            counts = self.catalog.counts()
            damage = index_damage(self.path, self.manifest.backend) or self._index_damage
            if damage:
                problems.append(f"the vector index: {damage}; verify --repair rebuilds it from the stored embeddings")
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
                                orphan_shards, missing_shards, sorted(set(bad_rows)), damaged)

    def _damaged_shards(self, by_shard: dict[str, list[tuple[int, int]]], on_disk: set[str],
                        ledger: dict[str, tuple[str, int, str | None]], problems: list[str]) -> tuple[list[str], list[int]]:
        """Shards whose checksum, rows or ids are not what was committed; and the images affected."""
        damaged: list[str] = []
        bad: list[int] = []
        for shard in sorted(set(by_shard) & on_disk):
            entries = by_shard[shard]
            ids_here = sorted(i for i, _ in entries)
            want = ledger.get(shard, ("", 0, None))[2]
            why = None
            if want is not None and self.tokens.checksum(shard) != want:
                why = "its content differs from the checksum recorded at commit"
            try:
                stored = self.tokens.describe_rows(shard)  # opens it unchecked
                good = self.tokens.good_rows(shard)
                shard_ids = [r["id"] for r in stored] if stored is not None else self.tokens.raw_ids(shard)
            except (CollectionFormatError, OSError, ValueError) as exc:
                why = f"it cannot be read ({exc})"
                damaged.append(shard)
                bad.extend(ids_here)
                problems.append(f"token shard {shard} is damaged ({why}); it holds {len(ids_here)} image(s): ids "
                                f"{_ids_text(ids_here)}")
                continue
            hashes = self.catalog.hashes(ids_here) if stored is not None else {}
            wrong = [i for i, r in entries if r >= len(shard_ids) or int(shard_ids[r]) != i
                     or (good is not None and not good[r]) or (stored is not None and stored[r]["hash"] != hashes.get(i))]
            if wrong and why is None:
                why = f"{len(wrong)} row(s) do not hold the image the catalog expects"
            if why is not None:
                damaged.append(shard)
                hit = sorted(wrong) if wrong else ids_here
                bad.extend(hit)
                problems.append(f"token shard {shard} is damaged ({why}); it holds {len(ids_here)} image(s), "
                                f"{len(hit)} affected: ids {_ids_text(hit)}")
        return damaged, bad

    def repair(self) -> VerifyReport:
        """Make everything agree again from what survives: import images only a shard still knows,
        salvage the intact rows of damaged shards, forget images whose stored data is gone and whose
        files exist (the next ``f2b index`` re-encodes them), keep and report the others, delete
        interrupted writes' leftovers, rebuild the index from the stored embeddings. Returns the
        verification afterwards, with ``actions`` saying what was done."""
        with self._writing():
            actions: list[str] = []
            report = self.verify()
            unknown = [s for s in report.orphan_shards
                       if self.catalog.shard_ledger().get(s, ("",))[0] not in ("pending", "doomed")]
            if unknown:
                n, _ = import_shards(self.catalog, self.tokens, unknown)
                actions.append(f"imported {n} image(s) that only unreferenced token shard(s) still held")
                still = [s for s in unknown if not self.catalog.references(s)]
                redundant = [s for s in still if self._redundant(s)]
                if redundant:  # every image in them lives on in another shard: copies, safe to drop
                    with self.catalog.transaction():
                        self.catalog.shards_doomed(redundant)
                for shard in sorted(set(still) - set(redundant)):  # cannot describe themselves: kept aside
                    actions.append(f"token shard {shard} holds images this catalog cannot take in; it is kept as "
                                   f"{self._set_aside(shard)}")
            kept: set[int] = set()
            for shard in report.damaged_shards + report.missing_shards:
                actions.extend(self._salvage(shard, kept))
            self._delete_leftovers()
            self._rebuild_index(without=kept)
            self._changed = True
            final = self.verify()
            final.actions = actions + ["rebuilt the vector index from the stored embeddings"]
            for line in actions:
                log.warning(line)
            return final

    def _redundant(self, shard: str) -> bool:
        """Every image of this shard is in the catalog with the same content: the shard is a copy."""
        try:
            rows = self.tokens.describe_rows(shard)
        except (CollectionFormatError, OSError):
            return False
        if not rows:
            return False
        known = self.catalog.ids_by_hashes({r["hash"] for r in rows})
        return all(known.get(r["hash"]) == r["id"] for r in rows)

    def _salvage(self, shard: str, kept_ids: set[int]) -> list[str]:
        entries = [(i, r) for i, s, r in self.catalog.locations() if s == shard]
        good_mask = None
        shard_ids: list[int] = []
        stored_hash: list[str] = []
        if (self.tokens.folder / shard).exists():
            try:
                good_mask = self.tokens.good_rows(shard)
                shard_ids = self.tokens.raw_ids(shard)
                stored_hash = [r["hash"] for r in self.tokens.describe_rows(shard) or []]
            except (CollectionFormatError, OSError):
                pass
        hashes = self.catalog.hashes([i for i, _ in entries])
        good = [(i, r) for i, r in entries if good_mask is not None and r < len(shard_ids) and r < len(stored_hash)
                and shard_ids[r] == i and good_mask[r] and stored_hash[r] == hashes.get(i)]
        lost = sorted({i for i, _ in entries} - {i for i, _ in good})
        actions: list[str] = []
        if good:
            name = self.tokens.new_shard_name()
            self.catalog.shard_pending(name, len(good))
            name, order = self.tokens.copy_rows([(shard, [r for _, r in good])], describe=self.catalog.describe,
                                                checked=False, name=name)
            with self.catalog.transaction():
                self.catalog.shard_live(name, len(order), self.tokens.checksum(name))
                self.catalog.update_locations([(image_id, name, r) for r, image_id in enumerate(order)])
                self.catalog.bump_version()
            actions.append(f"token shard {shard}: copied {len(good)} intact image(s) into {name}")
        paths = self.catalog.paths_of(lost)
        refile = [i for i in lost if any(os.path.exists(p) for p in paths.get(i, []))]
        kept = sorted(set(lost) - set(refile))
        kept_ids.update(kept)
        if refile:
            with self.catalog.transaction():
                self.catalog.delete_images(refile)
                self.catalog.bump_version()
            actions.append(f"token shard {shard}: {len(refile)} image(s) lost their stored data; their files exist "
                           f"and are re-encoded by the next f2b index (ids {_ids_text(refile)})")
        if kept:
            actions.append(f"token shard {shard}: {len(kept)} image(s) lost their stored data and their files are "
                           f"gone; kept in the catalog so nothing is forgotten (ids {_ids_text(kept)})")
        elif (self.tokens.folder / shard).exists():
            actions.append(f"token shard {shard}: the damaged file is kept as {self._set_aside(shard)}")
        return actions

    def _set_aside(self, shard: str) -> Path:
        """Move a shard out of ``tokens/`` into ``damaged/`` (kept, never deleted) and forget it."""
        aside = self.path / DAMAGED_DIR
        aside.mkdir(exist_ok=True)
        self.tokens.close()
        os.replace(self.tokens.folder / shard, aside / shard)
        self.catalog.forget_shards([shard])
        return aside / shard
