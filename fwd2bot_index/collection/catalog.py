"""``catalog.sqlite``: the source of truth of a collection.

An image exists once its row is committed here, and its row points at the token-store shard that
holds its summary tokens and embedding. Images are keyed by an int64 id (never reused, thanks to
AUTOINCREMENT) with the content hash UNIQUE, so identical files are one image with several paths.
Files that failed to decode are kept with their reason, keyed by path with size and mtime so they
are retried only when they change. WAL mode lets readers search while one writer commits;
``synchronous=FULL`` makes each commit durable before the derived vector index is touched.

The ``shards`` table is the ledger of token-store files: a shard is ``pending`` (committed before its
file is written, so a crash leaves a file the catalog *knows* was never used), ``live`` (with the
SHA-256 of its content, recorded in the same transaction as the images that point at it) or
``doomed`` (its last image left in that transaction). Only pending and doomed files are ever deleted
as leftovers: a file the catalog has never heard of is kept, whatever state the catalog is in.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._sqlite import _Checked, _damaged
from .errors import CollectionFormatError
from .filters import FilterError, _compile_filter, parse_filter
from .manifest import utc_now
from .remembered import SCHEMA as _REMEMBERED_SCHEMA
from .remembered import Remembered

__all__ = ["CATALOG_NAME", "Catalog", "FilterError", "ImageRow", "parse_filter"]

CATALOG_NAME = "catalog.sqlite"
SCHEMA_VERSION = 1
_CHUNK = 500  # SQLite host-parameter batches

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    hash TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    metadata TEXT NOT NULL DEFAULT '{}',
    shard TEXT NOT NULL,
    row INTEGER NOT NULL,
    added TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS images_shard ON images(shard, row);
CREATE TABLE IF NOT EXISTS paths (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    path TEXT NOT NULL UNIQUE,
    image_id INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
    size INTEGER NOT NULL,
    mtime REAL NOT NULL,
    added TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS paths_image ON paths(image_id);
{metadata_indexes}
CREATE TABLE IF NOT EXISTS shards (
    name TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    rows INTEGER NOT NULL,
    sha256 TEXT
);
CREATE TABLE IF NOT EXISTS failures (
    path TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime REAL NOT NULL,
    reason TEXT NOT NULL,
    recorded TEXT NOT NULL
);
"""


#: Metadata keys written by ``imaging.image_metadata``; filters on them use an expression index
#: instead of parsing every row's JSON.
INDEXED_KEYS = ("camera_make", "camera_model", "date_taken", "width", "height", "format", "gps_lat", "gps_lon")
_SCHEMA = _SCHEMA.replace("{metadata_indexes}", "\n".join(
    f"CREATE INDEX IF NOT EXISTS meta_{k} ON images(json_extract(metadata, '$.\"{k}\"'));" for k in INDEXED_KEYS
)) + _REMEMBERED_SCHEMA


@dataclass(frozen=True)
class ImageRow:
    """One committed image as the catalog knows it."""

    id: int
    hash: str
    size: int
    metadata: dict[str, Any]
    shard: str
    row: int
    added: str
    paths: tuple[str, ...]

    @property
    def path(self) -> str:
        """The first path this content was indexed under (the one shown in results)."""
        return self.paths[0] if self.paths else ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view (without the token-store location)."""
        return {"id": self.id, "path": self.path, "paths": list(self.paths), "hash": self.hash,
                "size": self.size, "metadata": self.metadata, "added": self.added, "status": "indexed"}


class Catalog(Remembered):
    """Thin typed layer over the SQLite file; the ``Collection`` orchestrates transactions."""

    def __init__(self, path: str | Path, readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self._local = threading.RLock()
        self._depth = 0
        self._touched: set[str] = set()
        try:
            if readonly:
                db = sqlite3.connect(
                    f"file:{self.path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
                )
            else:
                db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
            self._db = _Checked(db, self.path)
            self._db.execute("PRAGMA busy_timeout=10000")
            self._db.execute("PRAGMA foreign_keys=ON")
            if not readonly:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")
                self._db.executescript(_SCHEMA)
                self._init_meta()
            self._check_schema()
        except sqlite3.DatabaseError as exc:
            raise CollectionFormatError(_damaged(self.path, exc)) from None

    def close(self) -> None:
        self._db.close()

    def quick_check(self) -> str | None:
        """``PRAGMA quick_check`` plus a read of every row: None when the file is sound, else the
        first complaint (O(size of the catalog): run before a catalog may drive deletions)."""
        try:
            rows = self._db.execute("PRAGMA quick_check(3)").fetchall()
        except CollectionFormatError as exc:
            return str(exc)
        first = rows[0][0] if rows else "no answer"
        if first != "ok":  # SQLite's complaints span lines; a user's message is one line
            return "; ".join(" ".join(str(r[0]).split()) for r in rows)
        try:  # quick_check proves the structure; reading every row proves the text decodes too
            for table in ("images", "paths", "failures", "meta"):
                self._db.execute(f"SELECT * FROM {table}")
        except CollectionFormatError as exc:
            return str(exc).split(" is not a readable catalog (")[-1].split("); nothing")[0]
        except sqlite3.OperationalError as exc:
            return str(exc)
        return None

    # ------------------------------------------------------------------ the shard ledger

    def shard_pending(self, name: str, rows: int) -> None:
        """Record, durably and before the file exists, that ``name`` is about to be written."""
        with self.transaction():
            self._db.execute("INSERT OR REPLACE INTO shards(name, state, rows, sha256) VALUES (?, 'pending', ?, NULL)",
                             (name, int(rows)))

    def shard_live(self, name: str, rows: int, sha256: str) -> None:
        """Inside the transaction that points images at ``name``: it is live, with this checksum."""
        self._db.execute("INSERT OR REPLACE INTO shards(name, state, rows, sha256) VALUES (?, 'live', ?, ?)",
                         (name, int(rows), sha256))

    def shards_doomed(self, names: Iterable[str]) -> None:
        """Inside the transaction in which these shards lost their last image."""
        self._db.executemany("INSERT OR REPLACE INTO shards(name, state, rows, sha256) VALUES (?, 'doomed', 0, NULL)",
                             [(n,) for n in names])

    def forget_shards(self, names: Iterable[str]) -> None:
        """After their files are gone (or set aside)."""
        with self.transaction():
            self._db.executemany("DELETE FROM shards WHERE name=?", [(n,) for n in names])

    def shard_ledger(self) -> dict[str, tuple[str, int, str | None]]:
        """``name -> (state, rows, sha256)``; empty for a catalog written before the ledger existed."""
        try:
            return {r[0]: (r[1], int(r[2]), r[3]) for r in self._db.execute("SELECT name, state, rows, sha256 FROM shards")}
        except sqlite3.OperationalError:
            return {}

    def shard_sha256(self, name: str) -> str | None:
        try:
            row = self._db.execute("SELECT sha256 FROM shards WHERE name=? AND state='live'", (name,)).fetchone()
        except sqlite3.OperationalError:
            return None
        return row[0] if row else None

    def import_image(self, image_id: int, hash: str, size: int, metadata_json: str, shard: str, row: int) -> None:
        """Insert an image under a known id (rebuilding a catalog from the shards)."""
        self._db.execute(
            "INSERT INTO images(id, hash, size, metadata, shard, row, added) VALUES (?,?,?,?,?,?,?)",
            (int(image_id), hash, int(size), metadata_json, shard, int(row), utc_now()),
        )

    def describe(self, ids: Sequence[int]) -> list[dict[str, Any]]:
        """What a shard stores about each image (for the self-describing columns), in the order given."""
        rows = {r.id: r for r in self.images(ids)}
        states = self.path_states([p for r in rows.values() for p in r.paths])
        return [{"hash": rows[i].hash, "size": rows[i].size, "metadata": json.dumps(rows[i].metadata, sort_keys=True),
                 "paths": [[p, states[p][1], states[p][2]] for p in rows[i].paths if p in states]}
                for i in ids]

    # ------------------------------------------------------------------ transactions

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One atomic, durable write (``BEGIN IMMEDIATE`` ... ``COMMIT``); nested calls join it."""
        with self._local:
            if self._depth:
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            self._db.execute("BEGIN IMMEDIATE")
            self._depth = 1
            try:
                yield
            except BaseException:
                self._depth = 0
                self._touched = set()
                self._db.execute("ROLLBACK")
                raise
            self._depth = 0
            self._db.execute("COMMIT")

    def _init_meta(self) -> None:
        self._db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        self._db.execute("INSERT OR IGNORE INTO meta VALUES ('version', '0')")

    def _check_schema(self) -> None:
        try:
            row = self._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        except sqlite3.OperationalError:
            row = None
        if row is None:
            raise CollectionFormatError(_damaged(self.path, "it holds no catalog: empty, or not written by fwd2bot-index"))
        if int(row[0]) > SCHEMA_VERSION:
            raise CollectionFormatError(
                f"{self.path}: catalog schema version {row[0]} is newer than this fwd2bot-index understands "
                f"({SCHEMA_VERSION}); upgrade fwd2bot-index"
            )

    def version(self) -> int:
        """Change counter: bumped by every transaction that changes the set of images."""
        return int(self._db.execute("SELECT value FROM meta WHERE key='version'").fetchone()[0])

    def bump_version(self) -> int:
        with self.transaction():
            self._db.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key='version'")
            return self.version()

    def collection_id(self) -> str | None:
        """The id of the collection this catalog belongs to (None: written before ids, see ``identity``)."""
        row = self._db.execute("SELECT value FROM meta WHERE key='collection_id'").fetchone()
        return row[0] if row and row[0] else None

    def set_collection_id(self, cid: str) -> None:
        """Record the collection id (at creation, a rebuild from the shards, or the first writable open)."""
        with self.transaction():
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('collection_id', ?)", (cid,))

    # ------------------------------------------------------------------ writes

    def insert_image(self, hash: str, size: int, metadata_json: str, shard: str, row: int) -> int:
        cur = self._db.execute(
            "INSERT INTO images(hash, size, metadata, shard, row, added) VALUES (?,?,?,?,?,?)",
            (hash, int(size), metadata_json, shard, int(row), utc_now()),
        )
        return int(cur.lastrowid)

    def set_path(self, path: str, image_id: int, size: int, mtime: float) -> int | None:
        """Point ``path`` at ``image_id`` (insert or move); returns the image it pointed at before."""
        old = self._db.execute("SELECT image_id FROM paths WHERE path=?", (path,)).fetchone()
        self._db.execute(
            "INSERT INTO paths(path, image_id, size, mtime, added) VALUES (?,?,?,?,?) "
            "ON CONFLICT(path) DO UPDATE SET image_id=excluded.image_id, size=excluded.size, mtime=excluded.mtime",
            (path, int(image_id), int(size), float(mtime), utc_now()),
        )
        self._db.execute("DELETE FROM failures WHERE path=?", (path,))
        self.forget_removed(path)
        return int(old[0]) if old and int(old[0]) != int(image_id) else None

    def record_failure(self, path: str, size: int, mtime: float, reason: str) -> int | None:
        """Remember a failed file; a path that held an image before loses it (returns that image id)."""
        old = self._db.execute("SELECT image_id FROM paths WHERE path=?", (path,)).fetchone()
        self._db.execute("DELETE FROM paths WHERE path=?", (path,))
        self._db.execute(
            "INSERT INTO failures(path, size, mtime, reason, recorded) VALUES (?,?,?,?,?) "
            "ON CONFLICT(path) DO UPDATE SET size=excluded.size, mtime=excluded.mtime, "
            "reason=excluded.reason, recorded=excluded.recorded",
            (path, int(size), float(mtime), reason, utc_now()),
        )
        return int(old[0]) if old else None

    def delete_paths(self, paths: Iterable[str]) -> set[int]:
        """Forget paths (and their failure records); returns the image ids they pointed at."""
        touched: set[int] = set()
        for chunk in _chunks(list(paths)):
            marks = _marks(chunk)
            touched.update(
                r[0] for r in self._db.execute(f"SELECT image_id FROM paths WHERE path IN ({marks})", chunk)
            )
            self._db.execute(f"DELETE FROM paths WHERE path IN ({marks})", chunk)
            self._db.execute(f"DELETE FROM failures WHERE path IN ({marks})", chunk)
        return touched

    def pathless(self, ids: Iterable[int]) -> list[int]:
        """Of ``ids``, those images no path points at any more (to be removed)."""
        out: list[int] = []
        for chunk in _chunks([int(i) for i in ids]):
            rows = self._db.execute(
                f"SELECT id FROM images WHERE id IN ({_marks(chunk)}) "
                "AND NOT EXISTS (SELECT 1 FROM paths WHERE paths.image_id = images.id)",
                chunk,
            )
            out.extend(r[0] for r in rows)
        return sorted(out)

    def delete_images(self, ids: Iterable[int]) -> list[int]:
        """Delete images (their paths go with them); returns the ids that existed."""
        gone: list[int] = []
        for chunk in _chunks([int(i) for i in ids]):
            marks = _marks(chunk)
            rows = self._db.execute(f"SELECT id, shard FROM images WHERE id IN ({marks})", chunk)
            gone.extend(r[0] for r in rows)
            self._touched.update(r[1] for r in rows)
            self._db.execute(f"DELETE FROM images WHERE id IN ({marks})", chunk)
        return sorted(gone)

    def emptied_shards(self) -> list[str]:
        """Shards that lost images since the last call and now hold none (inside a transaction:
        mark them doomed in it). Uses the (shard, row) index: no scan of the whole catalog."""
        touched, self._touched = self._touched, set()
        return sorted(s for s in touched
                      if self._db.execute("SELECT 1 FROM images WHERE shard=? LIMIT 1", (s,)).fetchone() is None)

    def references(self, shard: str) -> bool:
        return self._db.execute("SELECT 1 FROM images WHERE shard=? LIMIT 1", (shard,)).fetchone() is not None

    def update_locations(self, moves: Iterable[tuple[int, str, int]]) -> None:
        """Re-point images at new token-store rows (after compaction)."""
        self._db.executemany(
            "UPDATE images SET shard=?, row=? WHERE id=?", [(s, int(r), int(i)) for i, s, r in moves]
        )

    def set_metadata(self, image_id: int, metadata_json: str) -> None:
        self._db.execute("UPDATE images SET metadata=? WHERE id=?", (metadata_json, int(image_id)))

    # ------------------------------------------------------------------ reads

    def image(self, image_id: int) -> ImageRow | None:
        rows = self.images([image_id])
        return rows[0] if rows else None

    def images(self, ids: Sequence[int]) -> list[ImageRow]:
        """Full records for ``ids`` (missing ids are skipped), in the order given."""
        found: dict[int, tuple] = {}
        for chunk in _chunks([int(i) for i in ids]):
            for r in self._db.execute(
                f"SELECT id, hash, size, metadata, shard, row, added FROM images WHERE id IN ({_marks(chunk)})",
                chunk,
            ):
                found[r[0]] = r
        paths = self.paths_of(list(found))
        out = []
        for i in ids:
            r = found.get(int(i))
            if r is not None:
                out.append(ImageRow(r[0], r[1], r[2], json.loads(r[3]), r[4], r[5], r[6], tuple(paths.get(r[0], ()))))
        return out

    def hashes(self, ids: Iterable[int]) -> dict[int, str]:
        out: dict[int, str] = {}
        for chunk in _chunks([int(i) for i in ids]):
            out.update(self._db.execute(f"SELECT id, hash FROM images WHERE id IN ({_marks(chunk)})", chunk))
        return out

    def id_by_hash(self, hash: str) -> int | None:
        row = self._db.execute("SELECT id FROM images WHERE hash=?", (hash,)).fetchone()
        return int(row[0]) if row else None

    def ids_by_hashes(self, hashes: Iterable[str]) -> dict[str, int]:
        out: dict[str, int] = {}
        for chunk in _chunks(list(hashes)):
            out.update(self._db.execute(f"SELECT hash, id FROM images WHERE hash IN ({_marks(chunk)})", chunk))
        return out

    def id_by_path(self, path: str) -> int | None:
        row = self._db.execute("SELECT image_id FROM paths WHERE path=?", (path,)).fetchone()
        return int(row[0]) if row else None

    def paths_of(self, ids: Iterable[int]) -> dict[int, list[str]]:
        """All paths of each image, first-indexed first."""
        out: dict[int, list[str]] = {}
        for chunk in _chunks([int(i) for i in ids]):
            for image_id, path in self._db.execute(
                f"SELECT image_id, path FROM paths WHERE image_id IN ({_marks(chunk)}) ORDER BY seq", chunk
            ):
                out.setdefault(image_id, []).append(path)
        return out

    def path_states(self, paths: Iterable[str]) -> dict[str, tuple[str, int, float, Any]]:
        """For each known path: ``("indexed", size, mtime, image_id)`` or ``("failed", size, mtime, reason)``."""
        out: dict[str, tuple[str, int, float, Any]] = {}
        for chunk in _chunks(list(paths)):
            marks = _marks(chunk)
            for p, s, m, reason in self._db.execute(
                f"SELECT path, size, mtime, reason FROM failures WHERE path IN ({marks})", chunk
            ):
                out[p] = ("failed", s, m, reason)
            for p, s, m, image_id in self._db.execute(
                f"SELECT path, size, mtime, image_id FROM paths WHERE path IN ({marks})", chunk
            ):
                out[p] = ("indexed", s, m, image_id)
        return out

    def all_paths(self, prefixes: Sequence[str] | None = None) -> list[str]:
        """Every indexed or failed path, optionally only those under one of ``prefixes`` (folders)."""
        rows = self._db.execute("SELECT path FROM paths UNION SELECT path FROM failures ORDER BY 1").fetchall()
        paths = [r[0] for r in rows]
        if prefixes is None:
            return paths
        heads = [p.rstrip("/") + "/" for p in prefixes]
        exact = set(prefixes)
        return [p for p in paths if p in exact or any(p.startswith(h) for h in heads)]

    def failures(self, limit: int | None = None) -> list[dict[str, Any]]:
        sql = "SELECT path, size, mtime, reason, recorded FROM failures ORDER BY path"
        rows = self._db.execute(sql + (f" LIMIT {int(limit)}" if limit else "")).fetchall()
        return [dict(zip(("path", "size", "mtime", "reason", "recorded"), r)) for r in rows]

    def ids(self) -> np.ndarray:
        return np.fromiter((r[0] for r in self._db.execute("SELECT id FROM images ORDER BY id")), dtype=np.int64)

    def locations(self, ids: Iterable[int] | None = None) -> list[tuple[int, str, int]]:
        """``(id, shard, row)`` for the given ids (all when None), ordered by shard then row."""
        if ids is None:
            return list(self._db.execute("SELECT id, shard, row FROM images ORDER BY shard, row"))
        out: list[tuple[int, str, int]] = []
        for chunk in _chunks([int(i) for i in ids]):
            out.extend(self._db.execute(f"SELECT id, shard, row FROM images WHERE id IN ({_marks(chunk)})", chunk))
        out.sort(key=lambda t: (t[1], t[2]))
        return out

    def shard_live_rows(self) -> dict[str, int]:
        return dict(self._db.execute("SELECT shard, COUNT(*) FROM images GROUP BY shard"))

    def export_rows(self) -> Iterator[tuple[int, str, str, str, str, int]]:
        """``(id, first path, hash, metadata JSON, shard, row)`` for every image, in shard order."""
        yield from self._db.execute(
            "SELECT i.id, COALESCE((SELECT p.path FROM paths p WHERE p.image_id = i.id ORDER BY p.seq LIMIT 1), ''), "
            "i.hash, i.metadata, i.shard, i.row FROM images i ORDER BY i.shard, i.row"
        )

    def page_ids(self, offset: int = 0, limit: int = 100) -> list[int]:
        """Image ids in id order, one page at a time (listing)."""
        rows = self._db.execute("SELECT id FROM images ORDER BY id LIMIT ? OFFSET ?", (int(limit), int(offset)))
        return [int(r[0]) for r in rows]

    def counts(self) -> dict[str, int]:
        one = lambda sql: int(self._db.execute(sql).fetchone()[0])  # noqa: E731
        return {
            "images": one("SELECT COUNT(*) FROM images"),
            "paths": one("SELECT COUNT(*) FROM paths"),
            "failed": one("SELECT COUNT(*) FROM failures"),
            "pathless_images": one(
                "SELECT COUNT(*) FROM images WHERE NOT EXISTS (SELECT 1 FROM paths WHERE image_id = images.id)"
            ),
        }

    # ------------------------------------------------------------------ filters

    def filter_ids(self, filters: dict[str, Any]) -> set[int]:
        """Image ids matching every condition of ``filters`` (see ``parse_filter`` for the forms)."""
        where, params = _compile_filter(filters)
        sql = "SELECT id FROM images" + (f" WHERE {where}" if where else "")
        return {int(r[0]) for r in self._db.execute(sql, params)}


def _marks(items: Sequence[Any]) -> str:
    return ",".join("?" * len(items))


def _chunks(items: list[Any], size: int = _CHUNK) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
