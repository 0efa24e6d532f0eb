"""Path/content agreement (``verify --deep``): does each indexed file still hold its image's content?

Why: the catalog knows a file by path, size and mtime, and ``f2b index`` re-hashes a file only when
size or mtime changed. Two rows whose paths were swapped (an edited catalog, a restore that mixed two
folders, files renamed into each other's names with their times kept) therefore pass every cheap
check: searches show each image under the other's path, answers describe the wrong picture. Only
re-hashing the files finds it; that reads every file, so it is ``--deep`` only.

``relink`` (``verify --deep --repair``) re-points each such path at the image whose content the file
now holds (one transaction, so a swap never leaves an image without a path half way), and marks a
path whose content is in no image as changed, so the next ``f2b index`` re-encodes it (its old image
then goes the way of any overwritten file). The file's size and mtime are taken before hashing: one
that changed between hashing and re-linking is marked changed as well, never linked by a stale hash.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from .tokens import file_sha256

if TYPE_CHECKING:
    from .catalog import Catalog
    from .store import Collection

__all__ = ["describe_mismatches", "path_mismatches", "relink"]


def path_mismatches(catalog: Catalog) -> list[dict[str, Any]]:
    """``{"path", "id", "found", "size", "mtime"}`` for each indexed path whose file exists and no
    longer holds the recorded content; ``found`` is the image whose content it holds, or None;
    ``size`` and ``mtime`` are the file's, taken *before* it was hashed (``relink`` records them only
    while the file still has them). Missing files are not mismatches (``index --prune`` deals with them)."""
    out = []
    ids = catalog.ids().tolist()
    hashes = catalog.hashes(ids)
    paths = catalog.paths_of(ids)
    for image_id in ids:
        for path in paths.get(image_id, []):
            try:
                st = os.stat(path)
                actual = file_sha256(path)
            except OSError:
                continue
            if actual != hashes[image_id]:
                out.append({"path": path, "id": image_id, "found": catalog.id_by_hash(actual),
                            "size": st.st_size, "mtime": st.st_mtime, "mtime_ns": st.st_mtime_ns})
    return out


def _unchanged(st: os.stat_result, m: dict[str, Any]) -> bool:
    """The file still has the size and mtime it had before it was hashed (a record without them,
    from an older caller, cannot be shown unchanged)."""
    if "size" not in m or "mtime_ns" not in m:
        return False
    return st.st_size == m["size"] and st.st_mtime_ns == m["mtime_ns"]


def describe_mismatches(found: list[dict[str, Any]], limit: int = 5) -> list[str]:
    """One problem line per mismatched path (the first ``limit``), then one line for the rest."""
    lines = []
    for m in found[:limit]:
        holds = f"image {m['found']}'s content" if m["found"] is not None else "content no image in the collection has"
        lines.append(f"{m['path']} is recorded as image {m['id']} but now holds {holds}; verify --deep --repair "
                     "re-links it (or has the next f2b index re-encode it)")
    if len(found) > limit:
        lines.append(f"{len(found) - limit} more path(s) no longer hold their recorded content")
    return lines


def relink(col: Collection, found: list[dict[str, Any]]) -> list[str]:
    """Under the writer lock: re-point mismatched paths at the image whose content they hold, and
    mark the others changed (size -1) so the next ``f2b index`` re-encodes them. A file whose size or
    mtime changed since it was hashed is marked changed too (its content is no longer what was
    hashed: re-linking it would record new content under an up-to-date stat that no index re-hashes).
    Images left with no path are removed, as for any overwritten file, and said so. One action line
    per kind of change."""
    if not found:
        return []
    relinked, stale, changed, gone = 0, 0, 0, []
    with col._transaction():
        touched = set()
        for m in found:
            try:
                st = os.stat(m["path"])
            except OSError:
                continue  # gone since it was hashed: index --prune deals with vanished files
            if not _unchanged(st, m):  # written since it was hashed: what it holds now is unknown
                col.catalog.set_path(m["path"], m["id"], -1, -1.0)  # re-read by the next index
                changed += 1
            elif m["found"] is not None:
                old = col.catalog.set_path(m["path"], m["found"], m["size"], m["mtime"])
                touched.update(x for x in (old, m["id"]) if x is not None)
                relinked += 1
            else:
                col.catalog.set_path(m["path"], m["id"], -1, -1.0)  # not what was hashed: re-read next time
                stale += 1
        gone = col.catalog.delete_images(col.catalog.pathless(touched))
        col.catalog.bump_version()
    col._apply_to_index(None, None, gone)
    actions = []
    if relinked:
        actions.append(f"re-linked {relinked} path(s) to the image whose content the file holds")
    if stale:
        actions.append(f"{stale} path(s) hold content no image has: the next f2b index re-encodes them")
    if changed:
        actions.append(f"{changed} path(s) changed while they were checked: not re-linked, the next f2b index "
                       "re-reads them")
    if gone:
        actions.append(f"{len(gone)} image(s) whose content no file holds any more were removed "
                       f"(ids {', '.join(map(str, gone[:8]))})")
    return actions
