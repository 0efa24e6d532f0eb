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
- Parts of another collection (``identity``) are named foreign and set aside, never imported; parts
  of the wrong file-system kind (``parts``) are named and set aside; nothing is deleted.

``trust`` (may this catalog drive deletions?) and ``recover`` (rebuild manifest and catalog from the
shards) live in modules of their own; this one is the ``Health`` mixin of ``Collection``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .catalog import CATALOG_NAME
from .errors import CollectionFormatError
from .identity import describe_foreign, foreign_shards, shard_id, unproven_shards
from .parts import DAMAGED_DIR, odd_parts, set_aside_held, set_aside_into, set_aside_note, set_aside_odd
from .records import VerifyReport
from .recover import import_shards, recover_folder, set_aside
from .sync import index_damage, index_part_names
from .trust import collection_home, manifest_mismatch, refuse, trust_problem

__all__ = ["DAMAGED_DIR", "Health", "manifest_mismatch", "recover_folder", "refuse", "set_aside", "trust_problem"]

log = logging.getLogger(__name__)


def _ids_text(ids: list[int], limit: int = 8) -> str:
    head = ", ".join(str(i) for i in ids[:limit])
    return head + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


# ------------------------------------------------------------------------------ the mixin


class Health:
    """``verify`` and ``repair`` of ``Collection`` (state lives there)."""

    def verify(self, deep: bool = False) -> VerifyReport:
        """Check that catalog, token shards and index are undamaged and agree (same ids, no orphans,
        no lost rows, checksums as recorded at commit), that every part is this collection's (no
        foreign id) and the right kind of file-system object. ``deep`` also re-hashes every indexed
        source file and names paths that no longer hold their image's content (see ``paths_check``).

        On a read-only open while a writer is active, a batch being written shows up as an orphan
        shard; the writer's own ``verify`` is authoritative."""
        with self._mutex:
            self._refresh()
            problems: list[str] = []
            bad = self.catalog.quick_check()
            if bad is not None:
                problems.append(f"{self.path / CATALOG_NAME} fails SQLite's quick_check ({bad})")
            index_parts = set(index_part_names(self.manifest.backend))
            odd = [what for name, what in odd_parts(self.path) if name not in index_parts]
            problems += [f"{what}; verify --repair sets it aside in {DAMAGED_DIR}/" for what in odd]
            home = collection_home(self.path, self.manifest, self.catalog, self.tokens, self.tokens.list_shards())
            foreign = foreign_shards(self.tokens, home)
            for name, theirs in sorted(foreign.items()):
                problems.append(describe_foreign(f"token shard {name}", theirs, home)
                                + f"; it is never imported (verify --repair sets it aside in {DAMAGED_DIR}/)")
            cat_ids = set(self.catalog.ids().tolist())
            locations = self.catalog.locations()
            ledger = self.catalog.shard_ledger()
            by_shard: dict[str, list[tuple[int, int]]] = {}
            for image_id, shard, row in locations:
                by_shard.setdefault(shard, []).append((image_id, row))
            on_disk = set(self.tokens.list_shards())
            missing_shards = sorted(set(by_shard) - on_disk)
            orphan_shards = sorted(on_disk - set(by_shard))
            orphan_shards = [s for s in orphan_shards if s not in foreign]
            unproven = unproven_shards(self.tokens, self.catalog.collection_id(), ledger, orphan_shards)
            for name in unproven:
                problems.append(f"token shard {name} carries no collection id and this catalog never recorded it "
                                "(another collection's, from before ids); it is never imported (verify --repair sets "
                                f"it aside in {DAMAGED_DIR}/)")
                foreign[name] = ""
            orphan_shards = [s for s in orphan_shards if s not in unproven]
            damaged, bad_rows = self._damaged_shards(by_shard, on_disk, ledger, problems, set(foreign))
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
            damage = index_damage(self.path, self.manifest.backend, home) or self._index_damage
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
            mismatched: list[dict] = []
            if deep:
                from .paths_check import describe_mismatches, path_mismatches

                mismatched = path_mismatches(self.catalog)
                problems += describe_mismatches(mismatched)
            held = set_aside_held(self.path)
            return VerifyReport(not problems, problems, report_counts, missing_in_index, extra_in_index,
                                orphan_shards, missing_shards, sorted(set(bad_rows)), damaged,
                                foreign_shards=sorted(foreign), odd_parts=odd, mismatched_paths=mismatched,
                                set_aside=held, notes=[set_aside_note(held)] if held else [])

    def _damaged_shards(self, by_shard: dict[str, list[tuple[int, int]]], on_disk: set[str],
                        ledger: dict[str, tuple[str, int, str | None]], problems: list[str],
                        foreign: set[str]) -> tuple[list[str], list[int]]:
        """Shards whose checksum, rows or ids are not what was committed (or that another collection's
        shard replaced); and the images affected."""
        damaged: list[str] = []
        bad: list[int] = []
        for shard in sorted(set(by_shard) & on_disk):
            entries = by_shard[shard]
            ids_here = sorted(i for i, _ in entries)
            want = ledger.get(shard, ("", 0, None))[2]
            why = None
            if shard in foreign:
                damaged.append(shard)
                bad.extend(ids_here)
                problems.append(f"token shard {shard} was replaced by another collection's; the {len(ids_here)} "
                                f"image(s) it held are lost here: ids {_ids_text(ids_here)}")
                continue
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

    def repair(self, deep: bool = False) -> VerifyReport:
        """Make everything agree again from what survives: set aside odd and foreign parts, import
        images only a shard of this collection still knows, salvage the intact rows of damaged shards,
        forget images whose stored data is gone and whose files exist (the next ``f2b index``
        re-encodes them), keep and report the others, delete interrupted writes' leftovers, rebuild the
        index from the stored embeddings. ``deep`` also re-links paths whose file holds another
        image's content (``paths_check``). Returns the verification afterwards (deep when asked), with
        ``actions`` saying what was done."""
        with self._writing():
            actions: list[str] = self.opened_notes + set_aside_odd(self.path)
            self.opened_notes = []
            report = self.verify(deep=deep)
            if deep and report.mismatched_paths:
                from .paths_check import relink

                actions += relink(self, report.mismatched_paths)
            for shard in report.foreign_shards:
                if not self.catalog.references(shard):
                    why = "belongs to another collection" if shard_id(self.tokens, shard) else \
                        "cannot be shown to belong to this collection"
                    actions.append(f"token shard {shard} {why}: never imported, kept as {self._set_aside(shard)}")
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
                actions.extend(self._salvage(shard, kept, foreign=shard in report.foreign_shards))
            self._delete_leftovers()
            self._rebuild_index(without=kept)
            self._changed = True
            final = self.verify(deep=deep)
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

    def _salvage(self, shard: str, kept_ids: set[int], foreign: bool = False) -> list[str]:
        """Copy the intact rows of a damaged shard into a new one; none of a foreign shard's rows (its
        embeddings may come from another model, its tokens from other pixels). The file is set aside."""
        entries = [(i, r) for i, s, r in self.catalog.locations() if s == shard]
        good_mask = None
        shard_ids: list[int] = []
        stored_hash: list[str] = []
        if (self.tokens.folder / shard).exists() and not foreign:
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
        if (self.tokens.folder / shard).exists() and (foreign or not kept):
            what = "another collection's file" if foreign else "the damaged file"
            actions.append(f"token shard {shard}: {what} is kept as {self._set_aside(shard)}")
        return actions

    def _set_aside(self, shard: str) -> Path:
        """Move a shard out of ``tokens/`` into ``damaged/`` (kept, never deleted) and forget it."""
        aside = self.path / DAMAGED_DIR
        self.tokens.close()
        if not (aside / shard).exists() and (aside.is_dir() or not aside.exists()):
            aside.mkdir(exist_ok=True)
            os.replace(self.tokens.folder / shard, aside / shard)
            kept = aside / shard
        else:  # a shard of that name was set aside before (or damaged/ is odd): a time-stamped name
            kept = set_aside_into(self.path, self.tokens.folder / shard)
        self.catalog.forget_shards([shard])
        return kept
