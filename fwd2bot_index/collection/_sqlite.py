"""The catalog's SQLite connection wrapper: damage turned into one clear error, wherever it surfaces.

Split from ``catalog`` (which keeps the schema and the queries) so that file stays readable.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from .errors import CollectionFormatError


def _damaged(path: Path, exc: BaseException | str) -> str:
    return (f"{path} is not a readable catalog ({exc}); nothing was changed. Run f2b verify --repair "
            f"--collection {path.parent} to rebuild it from the token shards (the damaged file is kept aside)")


class _Rows(list):
    """Fetched rows with the cursor methods the catalog uses."""

    def __init__(self, rows: list[Any], lastrowid: int | None) -> None:
        super().__init__(rows)
        self.lastrowid = lastrowid

    def fetchone(self) -> Any:
        return self[0] if self else None

    def fetchall(self) -> list[Any]:
        return list(self)


class _Checked:
    """The SQLite connection, with corruption turned into one clear ``CollectionFormatError``
    (a damaged page surfaces on whatever query first touches it, not only at open)."""

    def __init__(self, db: sqlite3.Connection, path: Path) -> None:
        self._raw, self._path = db, path

    def _call(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except (sqlite3.IntegrityError, sqlite3.ProgrammingError):
            raise
        except sqlite3.OperationalError as exc:
            if not any(w in str(exc) for w in ("decode", "malformed", "corrupt", "not a database")):
                raise
            raise CollectionFormatError(_damaged(self._path, exc)) from None
        except sqlite3.DatabaseError as exc:
            raise CollectionFormatError(_damaged(self._path, exc)) from None

    def execute(self, sql: str, params: Any = ()) -> _Rows:
        """Run ``sql`` and fetch its rows now, so damage met while reading them is caught here too."""
        def run() -> _Rows:
            cur = self._raw.execute(sql, params)
            return _Rows(cur.fetchall(), cur.lastrowid)

        return self._call(run)

    def executemany(self, sql: str, params: Any) -> Any:
        return self._call(self._raw.executemany, sql, params)

    def executescript(self, sql: str) -> Any:
        return self._call(self._raw.executescript, sql)

    def close(self) -> None:
        self._raw.close()
