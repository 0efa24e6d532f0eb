"""Small filesystem helpers: atomic writes that survive a crash at any instant, and disk usage."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """Make a rename inside ``folder`` durable (the directory entry itself must reach the disk)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Flush a closed file's data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tmp_name(path: Path) -> Path:
    """The temporary sibling used while ``path`` is being written (``.tmp-`` prefix, same folder)."""
    return path.with_name(f".tmp-{os.getpid()}-{path.name}")


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new content, never a mix."""
    target = Path(path)
    tmp = tmp_name(target)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)  # e.g. a full disk: leave no half-written file behind
        raise
    fsync_dir(target.parent)


def commit_tmp(tmp: Path, target: Path) -> None:
    """fsync an already written temporary file, then rename it into place durably."""
    fsync_file(tmp)
    os.replace(tmp, target)
    fsync_dir(target.parent)


def disk_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes actually allocated on disk for a file or a folder tree (sparse files count as used)."""
    p = Path(path)
    if not p.exists():
        return 0
    if p.is_file():
        return _allocated(p)
    total = 0
    for dirpath, _dirs, files in os.walk(p):
        for name in files:
            total += _allocated(Path(dirpath) / name)
    return total


def _allocated(p: Path) -> int:
    try:
        st = p.stat()
    except OSError:
        return 0
    blocks = getattr(st, "st_blocks", None)
    return min(st.st_size, blocks * 512) if blocks is not None else st.st_size
