"""The parts of a collection folder as file-system objects: what kind each must be, and setting aside.

Why a module of its own: every command opens some of these parts, and a part of the wrong kind (a
*file* named ``tokens`` where the shard folder should be, a *folder* named ``lock``) used to surface as
whatever ``open()`` or ``os.replace`` raised deep inside: a 50-line traceback, and in the worst case a
repair that deleted what it could not open. Here each part's kind is known up front, so a command says
in one line which part is wrong and what to do, and ``verify --repair`` moves the odd object into
``damaged/`` and rebuilds the part.

Nothing is ever deleted here: damaged, foreign or odd parts are *set aside* (moved into ``damaged/``
with a time stamp), like damaged token shards, so a user can look at them or put them back.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from ._fs import fsync_dir

__all__ = ["DAMAGED_DIR", "ESSENTIAL", "WRITER_ESSENTIAL", "odd_parts", "odd_shards", "set_aside_into", "set_aside_odd",
           "set_aside_held", "set_aside_note"]

DAMAGED_DIR = "damaged"
FILE, FOLDER = "file", "folder"

#: Every part a collection folder may hold, and the kind of object it must be.
KINDS: dict[str, str] = {
    "manifest.json": FILE, "catalog.sqlite": FILE, "catalog.sqlite-wal": FILE, "catalog.sqlite-shm": FILE,
    "catalog.sqlite-journal": FILE, "tokens": FOLDER, "index.faiss": FILE, "index.faiss.tombstones.npy": FILE,
    "index.state.json": FILE, "qdrant-edge": FOLDER, "qdrant-local": FOLDER, "lock": FILE, "shrink.json": FILE,
    DAMAGED_DIR: FOLDER,
}
#: Parts without which nothing can be read: any open refuses while one of these is the wrong kind.
ESSENTIAL = ("manifest.json", "catalog.sqlite", "catalog.sqlite-wal", "catalog.sqlite-shm", "tokens")
#: ...and those a writer must also be able to use (the lock says so itself, when it is taken).
WRITER_ESSENTIAL = (*ESSENTIAL, "shrink.json", "catalog.sqlite-journal")


def _kind(path: Path) -> str | None:
    """``file``, ``folder``, or another word for what is at ``path`` (None when nothing is there)."""
    try:
        st = path.lstat()
    except OSError:
        return None
    import stat

    if stat.S_ISLNK(st.st_mode):
        return FOLDER if path.is_dir() else FILE if path.is_file() else "broken link"
    if stat.S_ISDIR(st.st_mode):
        return FOLDER
    if stat.S_ISREG(st.st_mode):
        return FILE
    return "special file"


def odd_parts(folder: Path, names: tuple[str, ...] | None = None) -> list[tuple[str, str]]:
    """``(part name, one-line description)`` for each part that is not the kind it must be (of
    ``names``; all parts by default, and then also the token shards that are not plain files: those
    are ``verify``'s to name, not a reason to refuse an open)."""
    out = []
    for name in names if names is not None else tuple(KINDS):
        found = _kind(folder / name)
        if found is not None and found != KINDS[name]:
            out.append((name, f"{folder / name} is a {found} where a {KINDS[name]} should be"))
    if names is None:
        out += [(f"tokens/{n}", f"{folder / 'tokens' / n} is a {k} where a token shard file should be")
                for n, k in odd_shards(folder)]
    return out


def odd_shards(folder: Path) -> list[tuple[str, str]]:
    """Entries of ``tokens/`` named like shards that are not files: ``(name, kind)``."""
    tokens = folder / "tokens"
    if _kind(tokens) != FOLDER:
        return []
    out = []
    for p in sorted(tokens.iterdir()):
        if p.suffix == ".arrow" and not p.name.startswith("."):
            kind = _kind(p)
            if kind != FILE:
                out.append((p.name, kind or "missing object"))
    return out


def odd_message(folder: Path, odd: list[tuple[str, str]]) -> str:
    """One line: what is wrong and the command that sets it aside and rebuilds."""
    more = f" (and {len(odd) - 1} more odd part(s))" if len(odd) > 1 else ""
    return (f"{odd[0][1]}{more}; nothing was changed. Run f2b verify --repair --collection {folder} to set it "
            "aside in damaged/ (nothing is deleted) and rebuild it")


def set_aside_into(folder: Path, path: Path, why: str = "damaged") -> Path:
    """Move ``path`` (file or folder) into ``<folder>/damaged/`` under a time-stamped name; kept, never
    deleted. When ``damaged`` itself is not a folder it is first set aside in place (renamed)."""
    aside = folder / DAMAGED_DIR
    if _kind(aside) not in (None, FOLDER):
        os.replace(aside, folder / f"{DAMAGED_DIR}.{why}-{_stamp()}")
    aside.mkdir(exist_ok=True)
    target = aside / f"{path.name}.{why}-{_stamp()}"
    n = 1
    while target.exists() or target.is_symlink():
        target = aside / f"{path.name}.{why}-{_stamp()}-{n}"
        n += 1
    os.replace(path, target)
    fsync_dir(folder)
    return target


def set_aside_odd(folder: Path) -> list[str]:
    """Set aside every odd part (``verify --repair``'s first step, before the writer lock: the lock
    itself may be the odd part). One action line per part; the parts are rebuilt by the steps after
    (an empty ``tokens/``, a fresh lock file, the catalog or manifest from the shards, the index)."""
    actions = []
    if _kind(folder / DAMAGED_DIR) not in (None, FOLDER):  # first: everything else goes into it
        kept = folder / f"{DAMAGED_DIR}.odd-{_stamp()}"
        os.replace(folder / DAMAGED_DIR, kept)
        actions.append(f"{DAMAGED_DIR} was not a folder: set aside as {kept.name}")
    for name, what in odd_parts(folder):
        path = folder / name
        try:
            kept = set_aside_into(folder, path, "odd")
        except FileNotFoundError:
            continue  # another repair moved it meanwhile
        actions.append(f"{what.replace(str(folder) + os.sep, '')}: set aside as {kept.relative_to(folder)}")
        if name == "tokens":
            (folder / "tokens").mkdir()
    return actions


def set_aside_held(folder: Path) -> dict[str, object] | None:
    """What ``damaged/`` holds: ``{"path", "entries", "bytes"}`` (entries: the things set aside in it;
    bytes: their total size, links not followed), or None when it is absent or empty. A ``damaged``
    that is not a folder is an odd part, reported as one."""
    aside = folder / DAMAGED_DIR
    if _kind(aside) != FOLDER:
        return None
    try:
        entries = list(aside.iterdir())
    except OSError:
        return None
    if not entries:
        return None
    files = []
    for entry in entries:
        if _kind(entry) == FOLDER and not entry.is_symlink():
            files += [os.path.join(root, name) for root, _, names in os.walk(entry) for name in names]
        else:
            files.append(str(entry))
    total = 0
    for path in files:
        try:
            total += os.lstat(path).st_size
        except OSError:
            pass  # removed meanwhile
    return {"path": str(aside), "entries": len(entries), "bytes": total}


def set_aside_note(held: dict[str, object]) -> str:
    """One line for ``verify``: what ``damaged/`` holds and that it may go once the user is satisfied."""
    n, size = held["entries"], _size_text(int(held["bytes"]))  # type: ignore[arg-type]
    return (f"{held['path']} holds {n} thing(s) set aside (damaged, foreign or of the wrong kind: {size} in all), "
            "unused by the collection; look through them, and delete that folder once you are satisfied nothing in "
            "it is needed")


def _size_text(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} bytes"  # pragma: no cover


def _stamp() -> str:
    return f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
