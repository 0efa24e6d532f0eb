"""Maintenance of a ``Collection``: compaction of token shards, moving the index to another backend,
export to Parquet. Each is one writer operation under the writer lock and crash-safe on its own."""

from __future__ import annotations

import os
from typing import Any

from .index import open_index
from .manifest import Manifest, utc_now
from .sync import fill, open_index_for_writer, remove_index_files
from .tokens import shard_row_bytes


class Maintenance:
    """The maintenance half of ``Collection`` (state lives there)."""

    def compact(self, min_dead_fraction: float = 0.25, small_rows: int = 256, max_rows: int = 4096,
                max_shard_bytes: int = 256 << 20) -> dict[str, int]:
        """Rewrite token shards that are mostly deleted rows, and merge small shards (one shard per
        indexed batch adds up; call this after an indexing run). New shards hold at most
        ``max_rows`` images and about ``max_shard_bytes``.

        Crash-safe: new shards are durable before the catalog points at them; old ones are marked
        doomed in that same commit and deleted after it (or, after a crash, by the next writer)."""
        m = self.manifest
        row_bytes = shard_row_bytes(m.token_count, m.token_dim, m.embed_dim, m.token_dtype)
        max_rows = max(1, min(max_rows, max_shard_bytes // row_bytes))
        with self._writing():
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
                name = self.tokens.new_shard_name()
                self.catalog.shard_pending(name, len(part))
                name, order = self.tokens.copy_rows(groups.items(), describe=self.catalog.describe, name=name)
                with self.catalog.transaction():
                    before = set(self.catalog.shard_live_rows())
                    self.catalog.shard_live(name, len(order), self.tokens.checksum(name))
                    self.catalog.update_locations([(image_id, name, r) for r, image_id in enumerate(order)])
                    self.catalog.shards_doomed(before - set(self.catalog.shard_live_rows()))
                written += 1
            self._delete_leftovers()
            return {"rewritten": len(chosen), "written": written}

    def change_backend(self, backend: str, backend_options: dict[str, Any] | None = None) -> None:
        """Move the vector index to another backend, rebuilt from the stored embeddings (no re-encoding)."""
        with self._writing():
            old_backend = self.manifest.backend
            options = dict(backend_options or {})
            if backend == old_backend:  # same files: embedded engines cannot be opened twice
                self.index.close()
            try:
                new_index = open_index(backend, self.path, self.dim, options)
                try:
                    new_index.clear()
                    fill(new_index, self.tokens)
                    new_index.save()
                except BaseException:
                    new_index.close()
                    raise
            except BaseException:
                if backend == old_backend:
                    self.index = open_index_for_writer(self.manifest, self.path, self.manifest.backend_options)
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
            self._manifest_seen = None
            if old_backend != backend:
                remove_index_files(self.path, old_backend)
                self._write_state()

    def export_parquet(self, path: str | os.PathLike[str]) -> int:
        """Export id, path, hash, metadata, embedding and tokens (float32, T x H) to one Parquet file."""
        with self._mutex:
            self._refresh()
            return self.tokens.export_parquet(path, self.catalog.export_rows())
