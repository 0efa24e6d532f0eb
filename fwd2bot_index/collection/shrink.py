"""Shrinking the stored summary tokens of a collection in place (``f2b migrate --tokens k``).

A nested compressor's first k summary tokens are a complete stored form (``model.budgets``), so a
collection stored at K tokens per image becomes a collection at k < K by truncating every image's
tokens and recomputing its embedding from those k tokens. The embedding function is passed in (the
service layer runs the model's contrastive head): this package never imports torch.

Crash safety, in the project's one pattern (new immutable shards are durable before the catalog
points at them; the catalog commit is the switch; everything after it is redone until done):

1. under the writer lock, for every shard holding live images: record a new shard as ``pending``,
   then write it (ids, recomputed embeddings, the first k tokens byte for byte, the catalog's
   self-describing columns). A kill here leaves pending shards, which the next writer deletes; a
   rerun starts over. Nothing in the collection has changed yet.
2. write the journal ``shrink.json`` (target token count and strategy, the new shard names).
3. one SQLite transaction: the new shards become ``live`` with their checksums, every image points at
   its new row, the old shards are ``doomed``, the catalog version moves. This commit *is* the switch.
4. write the manifest at k, rebuild the vector index from the new embeddings, remove the journal,
   delete the doomed shards.

Between 3 and 4 the manifest still says K while the catalog's live shards hold k tokens. Whoever
reads the collection then takes the manifest through ``current_manifest``: a journal whose shards
the catalog holds as live is the truth (the switch happened), so readers read the new shards
correctly and the next writable open finishes step 4 (``finish_shrink``). A journal whose shards the
catalog does not hold as live is stale (killed before the switch) and is removed. Ids, paths,
metadata, hashes and failures live in the catalog and are never touched.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ._fs import atomic_write_bytes
from .catalog import Catalog
from .errors import CollectionError
from .manifest import MANIFEST_NAME, Manifest, utc_now
from .tokens import shard_row_bytes

if TYPE_CHECKING:
    from .store import Collection

log = logging.getLogger(__name__)

JOURNAL_NAME = "shrink.json"
#: (n, k, H) float32 stored tokens -> (n, D) float32 normalized embeddings (the model's head)
EmbedFn = Callable[[np.ndarray], np.ndarray]


def _step(name: str) -> None:
    """A named point of the migration (tests kill the process at one of them; a no-op otherwise)."""


def read_journal(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(folder) / JOURNAL_NAME).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"shards": [], "damaged": True}  # written atomically, so only an edit gets here: stale


def _switched(journal: dict[str, Any], catalog: Catalog) -> bool:
    """True when the catalog committed the switch the journal describes (its new shards are live)."""
    names = journal.get("shards") or []
    if not names or journal.get("damaged"):
        return False
    ledger = catalog.shard_ledger()
    return all(ledger.get(n, ("",))[0] == "live" for n in names[:1] + names[-1:])


def target_manifest(manifest: Manifest, journal: dict[str, Any]) -> Manifest:
    return Manifest.model_validate({**manifest.model_dump(), "token_count": int(journal["token_count"]),
                                    "strategy": dict(journal["strategy"]), "updated": utc_now()})


def current_manifest(folder: Path, manifest: Manifest, catalog: Catalog) -> Manifest:
    """The manifest to read the collection with: ``manifest`` itself, or the shrunk one when an
    interrupted shrink already switched the catalog (step 3 done, step 4 not)."""
    journal = read_journal(folder)
    if journal is None or not _switched(journal, catalog):
        return manifest
    return target_manifest(manifest, journal)


def finish_shrink(col: "Collection") -> bool:
    """Writer, under the lock, at open: finish a shrink killed after its switch (manifest, index,
    journal), or drop the journal of one killed before it. True when one was finished."""
    journal = read_journal(col.path)
    if journal is None:
        return False
    if not _switched(journal, col.catalog):
        (col.path / JOURNAL_NAME).unlink(missing_ok=True)  # its pending shards are deleted as leftovers
        return False
    _finish(col, target_manifest(col.manifest, journal))
    log.warning("finished shrinking the stored tokens to %s per image (an interrupted f2b migrate --tokens)",
                journal["token_count"])
    return True


def _finish(col: "Collection", target: Manifest) -> None:
    from .sync import token_store

    target.save(col.path)
    _step("after-manifest")
    col.manifest = target
    col._manifest_seen = os.stat(col.path / MANIFEST_NAME).st_mtime_ns
    col.tokens.close()
    col.tokens = token_store(col.path, target, col.catalog)
    col._rebuild_index()
    _step("after-index")
    (col.path / JOURNAL_NAME).unlink(missing_ok=True)
    col._delete_leftovers()


def _runs(part: list[tuple[int, str, int]]) -> list[tuple[str, np.ndarray]]:
    """Consecutive locations of one shard as (shard, rows), in order."""
    runs: list[tuple[str, list[int]]] = []
    for _, shard, row in part:
        if not runs or runs[-1][0] != shard:
            runs.append((shard, []))
        runs[-1][1].append(row)
    return [(shard, np.asarray(rows, dtype=np.int64)) for shard, rows in runs]


def shrink_tokens(col: "Collection", token_count: int, strategy: dict[str, Any], embed: EmbedFn | None,
                  progress: Callable[[int, int], None] | None = None, max_rows: int = 4096,
                  max_shard_bytes: int = 256 << 20) -> dict[str, Any]:
    """Keep the first ``token_count`` stored tokens of every image and re-embed it with ``embed``
    (None: keep each stored embedding; see the module docstring). Live rows are written into new shards
    of at most ``max_rows`` images and about ``max_shard_bytes`` (as ``compact`` does), so the rewrite also
    drops deleted rows and merges the small shards of many indexing batches. ``strategy`` is what the
    manifest records afterwards. Returns counts and timings; a collection already at ``token_count`` is
    left alone."""
    from .sync import token_store

    started = time.perf_counter()
    with col._writing():
        old = col.manifest
        if token_count == old.token_count and strategy == old.strategy:
            return {"images": len(col.catalog.ids()), "token_count": token_count, "changed": False,
                    "seconds": 0.0}
        if not 0 < token_count < old.token_count:
            raise CollectionError(f"collection {col.path} stores {old.token_count} tokens per image; shrinking keeps "
                                  f"the first k of them, so k must be below {old.token_count}, not {token_count}")
        col._delete_leftovers()  # pending shards of an earlier, interrupted attempt
        (col.path / JOURNAL_NAME).unlink(missing_ok=True)
        target = Manifest.model_validate({**old.model_dump(), "token_count": token_count, "strategy": dict(strategy),
                                          "updated": utc_now()})
        out = token_store(col.path, target, col.catalog)
        locations = col.catalog.locations()  # (id, shard, row), ordered by shard then row
        old_shards = sorted({shard for _, shard, _ in locations})
        per_shard = max(1, min(max_rows, max_shard_bytes // shard_row_bytes(token_count, old.token_dim,
                                                                             old.embed_dim, old.token_dtype)))
        total = len(locations)
        written: list[tuple[str, list[int]]] = []
        for start in range(0, total, per_shard):  # few, large new shards: one fsync'd write each
            part = locations[start:start + per_shard]
            ids = np.array([i for i, _, _ in part], dtype=np.int64)
            raws, scales, embeddings = [], [], []
            for shard, rows in _runs(part):
                source = col.tokens._shard(shard)
                raws.append(source.tokens[rows][:, :token_count])
                if source.scale is not None:
                    scales.append(source.scale[rows][:, :token_count])
                if embed is None:  # an embedding that does not read the summary tokens (prompt) stays as it is
                    embeddings.append(source.embeddings[rows])
                else:
                    embeddings.append(np.asarray(embed(source.tokens_f32(rows)[:, :token_count]), dtype=np.float32))
            emb = np.ascontiguousarray(np.concatenate(embeddings), dtype=np.float32)
            if emb.shape != (len(ids), old.embed_dim):
                raise CollectionError(f"the embedding function returned {emb.shape[1:]} per image, expected "
                                      f"({old.embed_dim},)")
            name = out.new_shard_name()
            col.catalog.shard_pending(name, len(ids))
            out._write(ids, emb, np.ascontiguousarray(np.concatenate(raws)),
                       np.ascontiguousarray(np.concatenate(scales)) if scales else None, name,
                       col.catalog.describe(ids.tolist()))
            written.append((name, ids.tolist()))
            _step("after-shard")
            if progress is not None:
                progress(start + len(part), total)
        if not written:  # an empty collection: nothing to switch, the manifest alone changes
            target.save(col.path)
            col.manifest = target
            col.tokens.close()
            col.tokens = out
            return {"images": 0, "token_count": token_count, "changed": True,
                    "seconds": time.perf_counter() - started}
        journal = {"token_count": token_count, "strategy": dict(strategy), "from_token_count": old.token_count,
                   "shards": [n for n, _ in written], "started": utc_now()}
        atomic_write_bytes(col.path / JOURNAL_NAME, json.dumps(journal, indent=2).encode())
        _step("before-switch")
        with col.catalog.transaction():
            for name, ids in written:
                col.catalog.shard_live(name, len(ids), out.checksum(name))
                col.catalog.update_locations([(i, name, r) for r, i in enumerate(ids)])
            col.catalog.shards_doomed(old_shards)
            col.catalog.bump_version()
        _step("after-switch")
        out.close()
        _finish(col, target)
    return {"images": total, "token_count": token_count, "changed": True, "from_token_count": old.token_count,
            "seconds": time.perf_counter() - started}
