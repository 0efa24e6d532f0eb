"""Removing from a ``Collection``: by id, by path, by a user's mixed list of refs, and pruning.

Why a module of its own (and why ``remove_refs`` lives here, not in the service): a user's one
``f2b remove`` command must be one catalog transaction. Removing ref by ref, each in its own commit,
let a SIGKILL half way leave 47 of 102 requested ids removed; now every ref is checked first, then all
of them go in one commit (all or nothing), and a rerun of the same command finishes or is a no-op
(refs already removed are said so, not refused). The vector index follows the commit; a kill between
the two is caught up at the next open (the index is derived).

A damaged catalog never drives a deletion (``_check_before_deleting``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from typing import Any

from .catalog import CATALOG_NAME
from .records import abs_path
from .trust import refuse

__all__ = ["HOLD_ENV", "Removing"]

#: test hook: ``<step>:<marker file>`` with step ``before-commit`` or ``after-commit``; ``remove_refs``
#: writes the marker at that step and waits there until the process is killed (see ``_hold``).
HOLD_ENV = "F2B_TEST_HOLD_IN_REMOVE"


def _hold(step: str) -> None:
    """The test hook behind ``HOLD_ENV``: a SIGKILL test must land inside the one transaction (or just
    after its commit) whatever the machine's speed; timing a kill from outside races with the end."""
    spec = os.environ.get(HOLD_ENV, "")
    if not spec.startswith(step + ":"):
        return
    with open(spec.split(":", 1)[1], "w", encoding="utf-8") as fh:
        fh.write(step)
    while True:
        time.sleep(0.1)  # until killed


def _is_id(ref: int | str | os.PathLike[str]) -> bool:
    return isinstance(ref, int) or (isinstance(ref, str) and ref.isdigit())


class Removing:
    """The removal half of ``Collection`` (state lives there)."""

    def remove_refs(self, refs: Iterable[int | str | os.PathLike[str]]) -> list[dict[str, Any]]:
        """Remove what a user named, in one transaction: an id removes the image (all its paths), a
        path removes that path (the image goes with its last path); every removal is remembered so the
        next ``index`` skips it. One record per ref: ``{"ref", "id", "path", "image_removed",
        "paths_left"}`` (+ ``"already_removed": True`` for a ref an earlier run or an earlier ref of
        this call removed: a no-op). A ref that was never in the collection raises ``KeyError(ref)``
        before anything is removed."""
        refs = list(refs)
        out: list[dict[str, Any]] = []
        with self._writing():
            self._check_before_deleting()
            for ref in refs:
                if _is_id(ref):
                    if self.catalog.image(int(ref)) is None and not self.catalog.ever_assigned(int(ref)):
                        raise KeyError(str(ref))
                elif self.catalog.id_by_path(abs_path(ref)) is None and not self.catalog.removed_states([abs_path(ref)]):
                    raise KeyError(str(ref))
            gone: list[int] = []
            with self._transaction():
                for ref in refs:
                    out.append(self._remove_one(ref, gone))
                if gone:
                    self.catalog.bump_version()
                _hold("before-commit")
            _hold("after-commit")
            self._apply_to_index(None, None, gone)
        return out

    def _remove_one(self, ref: int | str | os.PathLike[str], gone: list[int]) -> dict[str, Any]:
        """Inside ``remove_refs``'s transaction: one ref."""
        if _is_id(ref):
            image_id = int(ref)
            if self.catalog.image(image_id) is None:
                return {"ref": str(ref), "id": image_id, "path": None, "image_removed": False, "paths_left": 0,
                        "already_removed": True}
            self.catalog.remember_removed_images([image_id])
            gone += self.catalog.delete_images([image_id])
            return {"ref": str(ref), "id": image_id, "path": None, "image_removed": True, "paths_left": 0}
        path = abs_path(ref)
        image_id = self.catalog.id_by_path(path)
        if image_id is None:
            return {"ref": str(ref), "id": None, "path": path, "image_removed": False, "paths_left": 0,
                    "already_removed": True}
        self.catalog.remember_removed_paths([path])
        self.catalog.delete_paths([path])
        went = self.catalog.delete_images(self.catalog.pathless([image_id]))
        gone += went
        left = len(self.catalog.paths_of([image_id]).get(image_id, []))
        return {"ref": str(ref), "id": image_id, "path": path, "image_removed": bool(went), "paths_left": left}

    def remove(self, ids: Iterable[int], remember: bool = False) -> list[int]:
        """Delete images (all their paths); returns the ids that existed. ``remember``: record their
        paths as removed by the user, so the next ``index`` of their folder skips them (see ``plan``)."""
        with self._writing():
            self._check_before_deleting()
            with self._transaction():
                ids = list(ids)
                if remember:
                    self.catalog.remember_removed_images(ids)
                gone = self.catalog.delete_images(ids)
                if gone:
                    self.catalog.bump_version()
            self._apply_to_index(None, None, gone)
            return gone

    def remove_paths(self, paths: Iterable[str | os.PathLike[str]], remember: bool = False) -> list[int]:
        """Forget paths; images left without any path are deleted (their ids are returned).
        ``remember``: as for ``remove`` (a user's removal; pruning and re-linking do not remember)."""
        with self._writing():
            self._check_before_deleting()
            with self._transaction():
                paths = [abs_path(p) for p in paths]
                if remember:
                    self.catalog.remember_removed_paths(paths)
                touched = self.catalog.delete_paths(paths)
                gone = self.catalog.delete_images(self.catalog.pathless(touched))
                if gone:
                    self.catalog.bump_version()
            self._apply_to_index(None, None, gone)
            return gone

    def _check_before_deleting(self) -> None:
        """A damaged catalog never drives a deletion: before this session's first remove, the catalog
        must pass SQLite's ``quick_check`` (O(catalog), once per open collection). Why: a remove on a
        catalog with a damaged page commits, and the repair that must then rebuild the catalog from the
        shards brings the image back; refused, the user repairs first and removes after."""
        if getattr(self, "_checked_for_deletions", False):
            return
        bad = self.catalog.quick_check()
        if bad is not None:
            raise refuse(self.path, f"{self.path / CATALOG_NAME} fails SQLite's quick_check ({bad})")
        self._checked_for_deletions = True

    def prune(
        self,
        existing_paths: Iterable[str | os.PathLike[str]] | None = None,
        roots: Iterable[str | os.PathLike[str]] | None = None,
    ) -> dict[str, list[Any]]:
        """Forget vanished files. With ``existing_paths`` (a fresh scan), every known path under
        ``roots`` that the scan did not see is dropped (pass ``roots``, or paths indexed from other
        folders count as vanished); without it, each known path under ``roots`` (all when None) is
        checked on disk. Images whose last path vanished are removed.
        Returns ``{"paths": [...], "images": [...]}``."""
        self._require_writable()
        prefixes = [abs_path(r) for r in roots] if roots is not None else None
        with self._mutex:
            known = self.catalog.all_paths(prefixes)
        if existing_paths is not None:
            present = {abs_path(p) for p in existing_paths}
            vanished = [p for p in known if p not in present]
        else:
            vanished = [p for p in known if not os.path.exists(p)]
        images = self.remove_paths(vanished) if vanished else []
        return {"paths": vanished, "images": images}
