"""One writer at a time: an exclusive ``flock`` on ``<collection>/lock``, held only while writing.

A ``Collection`` takes it around each write (a batch, an upload, a delete, a repair) and releases it
after, so an indexing run and a server share a collection: a writer that finds the lock taken waits
(polling every 50 ms, up to its timeout) and then reads what the other one committed before writing.

``flock`` belongs to the open file, so the kernel drops it when the holder dies, even by ``kill -9``:
a stale lock file never blocks the next run. The holder's pid is written into the file only to make
the error message useful. Readers never take this lock (SQLite WAL lets them read during writes).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import TracebackType

from .errors import CollectionFormatError, CollectionLockedError

__all__ = ["LOCK_NAME", "WriterLock"]

LOCK_NAME = "lock"

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


class WriterLock:
    """Exclusive writer lock on a collection folder. Use as a context manager or acquire/release."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, timeout: float = 0.0) -> WriterLock:
        """Take the lock, waiting up to ``timeout`` seconds, or raise ``CollectionLockedError``."""
        if self._fd is not None:
            return self
        if fcntl is None:  # pragma: no cover
            raise CollectionLockedError("collection locking needs fcntl (Linux or macOS)")
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:  # a folder (or something else) named ``lock``: one line, not a traceback
            from .parts import odd_message, odd_parts

            odd = odd_parts(self.folder, ("lock",))
            if not odd:
                raise CollectionFormatError(f"cannot open the writer lock {self.path} ({exc.strerror or exc}); "
                                            "check the collection folder's permissions") from None
            raise CollectionFormatError(odd_message(self.folder, odd)) from None
        deadline = time.monotonic() + max(0.0, timeout)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise
                    time.sleep(0.05)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            pid = f"pid {holder}" if holder else "pid unknown"
            waited = f" (waited {timeout:g} s)" if timeout else ""
            raise CollectionLockedError(
                f"collection {self.folder} is being written by another process ({pid}){waited}; wait for it "
                f"to finish or stop it, then retry (searching does not need the lock: open it read-only)"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Drop the lock (closing the descriptor releases the flock)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        os.close(fd)

    def __enter__(self) -> WriterLock:
        return self.acquire()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None
