"""What a catalog remembers besides its images: paths a user removed, and demo-world checks.

Why a module of its own: both are small ledgers beside the images (a mixin of ``Catalog``), written in
the same SQLite transaction as the change they describe, so a crash never leaves one without the other:

- ``removed``: a path ``f2b remove`` took out, with the content hash it had. The next ``index`` of the
  folder skips that path while its content is unchanged (a removal sticks), and indexes it again once
  the file changed or the caller asks (``include_removed``).
- ``world_checks``: for images checked against the demo model's procedural world when they were
  committed, whether they are outside it. Rows go with their image (``ON DELETE CASCADE``), so the
  collection always knows whether it *still* holds images the demo model cannot see, also after an
  interrupted run.

Catalogs written before these tables existed read as "nothing remembered" (a read-only open cannot
create them); a writable open creates them (``CREATE TABLE IF NOT EXISTS``: no format change).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .manifest import utc_now

SCHEMA = """
CREATE TABLE IF NOT EXISTS removed (
    path TEXT PRIMARY KEY,
    hash TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime REAL NOT NULL,
    image_id INTEGER NOT NULL,
    removed TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS removed_image ON removed(image_id);
CREATE TABLE IF NOT EXISTS world_checks (
    image_id INTEGER PRIMARY KEY REFERENCES images(id) ON DELETE CASCADE,
    outside INTEGER NOT NULL
);
"""

_CHUNK = 500


def _chunks(items: list[Any]) -> Iterable[list[Any]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


class Remembered:
    """Mixin of ``Catalog`` (uses its ``_db``); every write runs inside the caller's transaction."""

    _db: Any

    # ------------------------------------------------------------------ removed paths

    def remember_removed_images(self, ids: Iterable[int]) -> None:
        """Before ``delete_images(ids)``: every path of these images is recorded as removed."""
        for chunk in _chunks([int(i) for i in ids]):
            self._db.execute(
                "INSERT OR REPLACE INTO removed(path, hash, size, mtime, image_id, removed) "
                f"SELECT p.path, i.hash, p.size, p.mtime, i.id, ? FROM paths p JOIN images i ON i.id = p.image_id "
                f"WHERE i.id IN ({','.join('?' * len(chunk))})", [utc_now(), *chunk])

    def remember_removed_paths(self, paths: Iterable[str]) -> None:
        """Before ``delete_paths(paths)``: these (indexed) paths are recorded as removed."""
        for chunk in _chunks(list(paths)):
            self._db.execute(
                "INSERT OR REPLACE INTO removed(path, hash, size, mtime, image_id, removed) "
                f"SELECT p.path, i.hash, p.size, p.mtime, i.id, ? FROM paths p JOIN images i ON i.id = p.image_id "
                f"WHERE p.path IN ({','.join('?' * len(chunk))})", [utc_now(), *chunk])

    def removed_states(self, paths: Iterable[str]) -> dict[str, tuple[str, int, float]]:
        """``path -> (hash, size, mtime)`` for the given paths that a user removed."""
        out: dict[str, tuple[str, int, float]] = {}
        try:
            for chunk in _chunks(list(paths)):
                for p, h, s, m in self._db.execute(
                    f"SELECT path, hash, size, mtime FROM removed WHERE path IN ({','.join('?' * len(chunk))})", chunk
                ):
                    out[p] = (h, int(s), float(m))
        except sqlite3.OperationalError:  # a catalog from before the table, opened read-only
            return {}
        return out

    def forget_removed(self, path: str) -> None:
        """``path`` is indexed again (it changed, or the user asked): it is no longer a removal."""
        self._db.execute("DELETE FROM removed WHERE path=?", (path,))

    def removed_count(self) -> int:
        try:
            return int(self._db.execute("SELECT COUNT(*) FROM removed").fetchone()[0])
        except sqlite3.OperationalError:
            return 0

    def ever_assigned(self, image_id: int) -> bool:
        """Whether ``image_id`` was ever given to an image (ids are never reused: AUTOINCREMENT), so
        that removing a gone id is a no-op while removing one that never existed is an error."""
        row = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name='images'").fetchone()
        if row is not None and 1 <= int(image_id) <= int(row[0]):
            return True
        try:
            return self._db.execute("SELECT 1 FROM removed WHERE image_id=? LIMIT 1", (int(image_id),)).fetchone() \
                is not None
        except sqlite3.OperationalError:
            return False

    # ------------------------------------------------------------------ demo-world checks

    def record_world_checks(self, outside: Mapping[int, bool]) -> None:
        """For committed images: ``image id -> True`` when the image is not from the demo world."""
        self._db.executemany("INSERT OR REPLACE INTO world_checks(image_id, outside) VALUES (?, ?)",
                             [(int(i), int(bool(o))) for i, o in outside.items()])

    def world_counts(self) -> tuple[int, int]:
        """``(checked, outside)`` over the images the collection holds now."""
        try:
            row = self._db.execute("SELECT COUNT(*), COALESCE(SUM(outside), 0) FROM world_checks "
                                   "WHERE image_id IN (SELECT id FROM images)").fetchone()
        except sqlite3.OperationalError:
            return 0, 0
        return int(row[0]), int(row[1])


def peek_world_counts(folder: str | Path) -> tuple[str | None, int, int] | None:
    """``(model name, checked, outside)`` of the collection at ``folder``, read from its manifest and
    catalog only (no index, no token store: cheap enough for every CLI command); None when there is no
    readable collection there."""
    from .catalog import CATALOG_NAME, Catalog
    from .errors import CollectionError
    from .manifest import Manifest

    folder = Path(folder)
    if not (folder / CATALOG_NAME).is_file():
        return None
    try:
        manifest = Manifest.load(folder)
        catalog = Catalog(folder / CATALOG_NAME, readonly=True)
    except (CollectionError, OSError, ValueError):
        return None
    try:
        return (manifest.model_name, *catalog.world_counts())
    except (CollectionError, sqlite3.Error):
        return None
    finally:
        catalog.close()
