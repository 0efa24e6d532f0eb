"""Finding image files: a stable, sorted walk of folders with the scan policy (hidden files, excludes,
symbolic links, the collection folder) applied.

Why a module of its own: walking folders needs no image library; ``imaging`` (decoding) re-exports the
names, so ``from fwd2bot_index.imaging import scan_images`` keeps working.
"""

from __future__ import annotations

import fnmatch
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

__all__ = ["IMAGE_EXTENSIONS", "ScanError", "scan_images"]

log = logging.getLogger("fwd2bot_index.imaging")

#: File name endings treated as images by ``scan_images`` (lower case, with the dot). HEIC/HEIF and
#: AVIF are listed even without their decoders so such files are reported, not silently skipped.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".dib", ".gif", ".tif", ".tiff",
     ".heic", ".heif", ".avif"}
)


class ScanError(FileNotFoundError):
    """A folder given to ``scan_images`` that does not exist or cannot be listed."""


def scan_images(
    roots: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    exclude: Iterable[str] = (),
    include_hidden: bool = False,
    follow_symlinks: bool = False,
    skip_dirs: Iterable[str | os.PathLike[str]] = (),
    on_error: Callable[[Path, OSError], None] | None = None,
) -> Iterator[Path]:
    """Yield image files under ``roots`` as absolute resolved paths, in a stable sorted order.

    Hidden files/folders (name starting with ``.``) are skipped unless ``include_hidden``; folders in
    ``skip_dirs`` (the collection folder) are never entered; ``exclude`` holds glob patterns matched
    against each entry's path relative to its root and against its bare name (``"*.tmp"``,
    ``"raw/*"``, ``"thumbs"``). Symbolic links are skipped unless ``follow_symlinks``; then each
    folder is visited once, so link loops end. A file given directly as a root is yielded as is.
    A root that does not exist raises ``ScanError``; an unreadable sub-folder is reported to
    ``on_error`` (default: a logged warning) and skipped.
    """
    root_list = [roots] if isinstance(roots, (str, os.PathLike)) else list(roots)
    patterns = [p.rstrip("/") for p in exclude if p and p.strip()]
    skip = {Path(d).resolve() for d in skip_dirs}
    report = on_error or _warn_unreadable
    seen_files: set[Path] = set()
    seen_dirs: set[tuple[int, int]] = set()
    for raw in root_list:
        root = Path(raw).expanduser()
        if not root.exists():
            raise ScanError(f"folder to scan does not exist: {raw}")
        root = root.resolve()
        if root.is_file():
            if root not in seen_files:
                seen_files.add(root)
                yield root
            continue
        walker = _Walker(root, patterns, include_hidden, follow_symlinks, skip, report, seen_dirs)
        for path in walker.walk(root):
            if path not in seen_files:
                seen_files.add(path)
                yield path


def _warn_unreadable(path: Path, exc: OSError) -> None:
    log.warning("skipping unreadable folder %s: %s", path, exc.strerror or exc)


class _Walker:
    """Depth-first, name-sorted directory walk with the scan policy applied."""

    def __init__(
        self,
        root: Path,
        patterns: list[str],
        include_hidden: bool,
        follow_symlinks: bool,
        skip: set[Path],
        report: Callable[[Path, OSError], None],
        seen_dirs: set[tuple[int, int]],
    ) -> None:
        self.root = root
        self.patterns = patterns
        self.include_hidden = include_hidden
        self.follow = follow_symlinks
        self.skip = skip
        self.report = report
        self.seen_dirs = seen_dirs

    def walk(self, folder: Path) -> Iterator[Path]:
        if folder in self.skip or not self._first_visit(folder):
            return
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            self.report(folder, exc)
            return
        for entry in entries:
            yield from self._entry(folder, entry)

    def _first_visit(self, folder: Path) -> bool:
        try:
            st = folder.stat()
        except OSError:
            return False
        key = (st.st_dev, st.st_ino)
        if key in self.seen_dirs:
            return False
        self.seen_dirs.add(key)
        return True

    def _entry(self, folder: Path, entry: os.DirEntry[str]) -> Iterator[Path]:
        if not self.include_hidden and entry.name.startswith("."):
            return
        path = folder / entry.name
        if self._excluded(path):
            return
        try:
            is_link = entry.is_symlink()
            if is_link and not self.follow:
                return
            is_dir = entry.is_dir(follow_symlinks=True)
            is_file = not is_dir and entry.is_file(follow_symlinks=True)
        except OSError:
            return
        if is_dir:
            yield from self.walk(path.resolve() if is_link else path)
        elif is_file and Path(entry.name).suffix.lower() in IMAGE_EXTENSIONS:
            yield path.resolve() if is_link else path

    def _excluded(self, path: Path) -> bool:
        if not self.patterns:
            return False
        rel = path.relative_to(self.root).as_posix()
        return any(fnmatch.fnmatch(rel, pat) or fnmatch.fnmatch(path.name, pat) for pat in self.patterns)
