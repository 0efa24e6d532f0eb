"""The indexing pipeline behind ``ImageService.index``: its report, the decode pool, the writer thread.

Why a module of its own: the pipeline's threads and process-wide settings (GIL switch interval, a
frozen heap) are the part of the facade that is about speed, not about what indexing means; the
facade (``service``) keeps the plan, the failure records and the commit order.
"""

from __future__ import annotations

import contextlib
import gc
import os
import queue
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

from .collection import FileStat
from .image_shape import held_bytes
from .imaging import ImageDecodeError, image_metadata, load_image


@dataclass
class IndexReport:
    """What one ``index`` run did."""

    scanned: int = 0
    indexed: int = 0
    duplicates: int = 0
    unchanged: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    pruned: int = 0
    seconds: float = 0.0
    encode_seconds: float = 0.0
    #: files that failed in an earlier run and have not changed since (not retried, still failing)
    still_failing: list[tuple[str, str]] = field(default_factory=list)
    #: (old path, new path) of files found under a new name whose old path is gone (re-linked)
    moved: list[tuple[str, str]] = field(default_factory=list)
    pruned_paths: list[str] = field(default_factory=list)
    #: images checked against the demo model's world, and how many of them are not from it
    world_checked: int = 0
    world_foreign: int = 0
    #: paths skipped because a user removed them and they have not changed since
    skipped_removed: int = 0
    interrupted: bool = False
    #: where the time went (seconds): hashing new files, the main thread waiting for decoded images,
    #: the writer committing batches (overlapped with encoding), the writer holding up the encoder
    #: (the queue was full, or the last commits at the end), compaction and saving
    check_seconds: float = 0.0
    decode_wait_seconds: float = 0.0
    commit_seconds: float = 0.0
    commit_wait_seconds: float = 0.0
    finish_seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.indexed / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "scanned": self.scanned, "indexed": self.indexed, "duplicates": self.duplicates,
            "unchanged": self.unchanged, "failed": [{"path": p, "reason": r} for p, r in self.failed],
            "pruned": self.pruned, "seconds": round(self.seconds, 3),
            "images_per_second": round(self.images_per_second, 2),
            "still_failing": [{"path": p, "reason": r} for p, r in self.still_failing],
            "moved": [{"from": a, "to": b} for a, b in self.moved], "pruned_paths": self.pruned_paths,
            "demo_world_check": {"checked": self.world_checked, "not_from_world": self.world_foreign},
            "skipped_removed": self.skipped_removed,
            "interrupted": self.interrupted,
            "timings": {k: round(v, 3) for k, v in (
                ("check", self.check_seconds), ("decode_wait", self.decode_wait_seconds),
                ("encode", self.encode_seconds), ("commit", self.commit_seconds),
                ("commit_wait", self.commit_wait_seconds), ("finish", self.finish_seconds))},
        }


class IndexInterrupted(KeyboardInterrupt):
    """Ctrl-C during ``index``: every batch committed before it is kept; ``report`` says how many."""

    def __init__(self, report: IndexReport):
        super().__init__("indexing interrupted")
        self.report = report


#: how many new images `index` checks against the demo model's world: 8 tell a folder of photos from
#: shapes-world scenes as surely as 32 did, and each test costs ~1.8 ms of CPU (measured on a 2-core
#: machine) that a small model's encoder competes with
WORLD_CHECK_IMAGES = 8

#: decoded pixels an `index` run may hold at once (``--max-inflight-mb``): half for the batch being filled,
#: half for the read-ahead. Why bytes and not only counts: a batch of 16 plus a read-ahead of 2 x 16 +
#: workers held ~52 decoded images, ~5 GB of 24 MP photos (Pillow keeps RGB in 4 bytes a pixel); with
#: 1 GiB the same run holds 10 of them (batches of 5), while photos up to 8 MP still fill batches of 16.
DEFAULT_MAX_INFLIGHT_BYTES = 1 << 30


@dataclass
class _Prepared:
    """One file after the I/O half of indexing (hash, decode, metadata), done in a worker thread."""

    path: str
    size: int
    mtime: float
    hash: str | None = None
    image: Any = None
    metadata: dict | None = None
    error: str | None = None
    #: bytes the decoded image holds (``image_shape.held_bytes``): what the in-flight budget counts
    held: int = 0
    #: the demo-world check of this image, when it is one of those checked: a Future or a bool
    #: (True = not from the demo world), recorded with the image's commit
    world: Any = None


def world_flags(batch: list[_Prepared]) -> dict[int, bool]:
    """``position in batch -> not from the demo world`` for the checked images of a batch (waits for
    checks still running in the decode pool: ~2 ms each, on the writer thread)."""
    return {i: bool(item.world.result() if isinstance(item.world, Future) else item.world)
            for i, item in enumerate(batch) if item.world is not None}


def _prepare(stat: FileStat, sidecar: dict[str, dict], max_pixels: int | None) -> _Prepared:
    item = _Prepared(stat.path, stat.size, stat.mtime, stat.hash)
    path = stat.path
    try:
        item.image = load_image(path, **({"max_pixels": max_pixels} if max_pixels else {}))
        item.held = held_bytes(*item.image.size, item.image.mode)
        meta = image_metadata(path)
        meta.update(sidecar.get(path, {}))
        item.metadata = meta
    except ImageDecodeError as exc:
        item.error = exc.reason if hasattr(exc, "reason") else str(exc)
    except OSError as exc:
        item.error = f"unreadable: {exc.strerror or exc}"
    return item


def _prefetch(pool: ThreadPoolExecutor, jobs: Iterable[tuple], fn: Callable, depth: int,
              max_bytes: int | None = None, size: Callable[[Any], int] | None = None) -> Iterator[Any]:
    """Run ``fn(*job)`` in the pool, in order, keeping at most ``depth`` results in flight and, with
    ``max_bytes``, at most that many bytes (``size(result)``) of results not yet taken.

    A job still running counts as large as the largest result so far (before the first, as the whole
    budget: one job at a time until a size is known), so a folder of like-sized images never passes the
    budget; a larger image than any before can pass it by its difference. The next job starts only when
    it fits beside what is held; with nothing held it starts whatever its size (an image larger than the
    budget goes through, alone). Files are read only as results are taken: nothing runs ahead unbounded.
    """
    if max_bytes is not None and size is None:
        raise ValueError("a byte budget needs size(result)")
    pending: deque[Future] = deque()
    sizes: dict[Future, int] = {}  # results measured while pending (each measured once: no rescans)
    largest = 0

    def full() -> bool:
        nonlocal largest
        if len(pending) >= depth:
            return True
        if max_bytes is None or not pending:
            return False
        held = running = 0
        for future in pending:
            n = sizes.get(future)
            if n is None and future.done() and future.exception() is None:
                n = sizes[future] = size(future.result())
                largest = max(largest, n)
            if n is None:
                running += 1  # still running (or about to raise): counted at its likely size below
            else:
                held += n
        guess = largest or max(max_bytes, 1)  # nothing measured yet (or only failures): the whole budget
        return held + (running + 1) * guess > max_bytes

    def take() -> Any:
        nonlocal largest
        future = pending.popleft()
        result = future.result()
        measured = sizes.pop(future, None)
        if measured is None and size is not None:
            largest = max(largest, size(result))
        return result

    plan, end = iter(jobs), object()
    while True:
        while full():
            yield take()
        job = next(plan, end)  # the next job is taken from the plan only once there is room for it
        if job is end:
            break
        pending.append(pool.submit(fn, *job))
    while pending:
        yield take()


def decoded_batches(pool: ThreadPoolExecutor, todo: Sequence[FileStat], sidecar: dict[str, dict],
                    max_pixels: int | None, batch_size: int, workers: int, max_inflight_bytes: int | None,
                    report: IndexReport, on_decoded: Callable[[_Prepared], None] | None = None,
                    ) -> Iterator[tuple[_Prepared | None, list[_Prepared] | None]]:
    """Decode ``todo`` in the pool and yield, in plan order, ``(failed item, None)`` for a file that could
    not be decoded and ``(None, batch)`` for a batch ready for the model.

    A batch is cut at ``batch_size`` images, or earlier when the next image of the same size would take
    its decoded bytes past half of ``max_inflight_bytes``; the read-ahead holds the other half
    (``_prefetch``). So a run holds about ``max_inflight_bytes`` of decoded pixels at once (None: counts
    only, as before). The caller frees a batch's pixels once it is encoded (``ImageService._commit``).
    ``on_decoded`` sees each image as it joins a batch (the demo-world check).
    """
    ahead = batch_budget = None
    if max_inflight_bytes is not None:
        ahead = max_inflight_bytes // 2
        batch_budget = max_inflight_bytes - ahead
    batch: list[_Prepared] = []
    held = 0
    jobs = ((stat, sidecar, max_pixels) for stat in todo)
    waited = time.perf_counter()
    for item in _prefetch(pool, jobs, _prepare, depth=2 * batch_size + workers, max_bytes=ahead,
                          size=_held_by):
        report.decode_wait_seconds += time.perf_counter() - waited
        if item.error:
            yield item, None
        else:
            if on_decoded is not None:
                on_decoded(item)
            batch.append(item)
            held += item.held
            if len(batch) >= batch_size or (batch_budget is not None and held + item.held > batch_budget):
                yield None, batch
                batch, held = [], 0
        waited = time.perf_counter()
    if batch:
        yield None, batch


def _held_by(item: _Prepared) -> int:
    return item.held


def _not_from_world(image: Any) -> bool:
    from .synthetic.detect import looks_like_demo_world

    return not looks_like_demo_world(image)


_SETTINGS_LOCK = threading.Lock()
_settings_runs = 0
_saved_interval = 0.005
_froze = False


@contextlib.contextmanager
def _index_settings(interval: float = 0.0005) -> Iterator[None]:
    """Two process-wide settings for the length of an ``index`` run (overlapping runs share them; the
    last one to finish restores the previous state, also on Ctrl-C or an error).

    The GIL goes back to the model within ``interval`` seconds instead of CPython's default 5 ms:
    every torch op runs without the GIL, and when it returns the model's thread waits for whichever
    decode or writer thread took it meanwhile, thousands of times per batch for a small model.
    Measured on 2 cores (demo model, 256 images, one torch thread, 5 alternating runs): `index` /
    model-only 0.93 with 5 ms, 1.02 with 0.5 ms.

    The objects alive at the start (torch, transformers, a loaded model: millions) are frozen out of
    the garbage collector's generations (``gc.freeze``), so the full collections that the run's own
    allocations trigger do not walk them all again: measured, one 0.22 s pause in every 256-image
    demo-model run (~10% of it) right after the model loaded. They are unfrozen at the end, unless the
    process had frozen its heap itself (a server does once its model loaded): that is left as it was.
    """
    global _settings_runs, _saved_interval, _froze
    with _SETTINGS_LOCK:
        if _settings_runs == 0:
            _saved_interval = sys.getswitchinterval()
            sys.setswitchinterval(min(interval, _saved_interval))
            _froze = gc.get_freeze_count() == 0
            if _froze:
                gc.freeze()
        _settings_runs += 1
    try:
        yield
    finally:
        with _SETTINGS_LOCK:
            _settings_runs -= 1
            if _settings_runs == 0:
                sys.setswitchinterval(_saved_interval)
                if _froze:
                    gc.unfreeze()


#: test hook: a file path; the first ``submit`` after the run's first commit writes it and then waits
#: until the process is interrupted (see ``_Committer._hold_after_first_commit``)
HOLD_ENV = "F2B_TEST_HOLD_AFTER_FIRST_COMMIT"
_held = False


class _Committer:
    """The one writer of an ``index`` run: a background thread that commits batches in the order they
    were submitted while the caller encodes the next one.

    Why a thread and not inline commits: a commit (token shard written and fsynced, its checksum, one
    catalog transaction, the vector index) is disk waits and storage work that can run beside the
    model's compute instead of after it (inline, it was ~15-20% of a demo-model run). At most ``depth`` commits wait in the queue (backpressure: encoded
    batches never pile up in memory). The first error stops the writer: nothing submitted after the
    failing commit is committed, and ``submit`` or ``close`` re-raises that same exception in the caller,
    so a run stops with every earlier commit kept, exactly as when it committed inline.
    """

    def __init__(self, report: IndexReport, depth: int = 1):
        self._report = report
        self._jobs: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._submitted = 0
        self._done = 0  # jobs the writer finished (the test hook waits for them)
        self._thread = threading.Thread(target=self._run, name="f2b-commit", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            if self._error is not None:
                continue  # after a failed commit nothing later is committed (the caller learns at once)
            t0 = time.perf_counter()
            try:
                job[0](*job[1:])
            except BaseException as exc:  # noqa: BLE001  (re-raised in the caller's thread)
                self._error = exc
            self._report.commit_seconds += time.perf_counter() - t0
            self._done += 1

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, fn: Callable, *args: Any) -> None:
        """Queue ``fn(*args)``; waits while ``depth`` commits are already waiting."""
        self._raise()
        if self._submitted and os.environ.get(HOLD_ENV):
            self._hold_after_first_commit(os.environ[HOLD_ENV])
        t0 = time.perf_counter()
        self._jobs.put((fn, *args))
        self._submitted += 1
        self._report.commit_wait_seconds += time.perf_counter() - t0

    def _hold_after_first_commit(self, marker: str) -> None:
        """The test hook behind ``HOLD_ENV``: at a later submit, once a batch of images is committed,
        write ``marker`` (the count committed) and wait in the caller's (main) thread until a signal
        (Ctrl-C) ends the wait.

        Why: a test of Ctrl-C mid-run must interrupt *after* a commit and *before* the end, whatever
        the machine's speed; timing it from outside raced with the run's end on a busy machine. The wait
        is in the submitting thread (where SIGINT lands) and the writer is idle, so ``close`` returns.
        """
        global _held
        if _held:
            return
        while self._done < self._submitted and self._error is None and self._thread.is_alive():
            time.sleep(0.01)  # what was submitted is still being written
        if self._report.indexed == 0:
            return  # only failures recorded so far: hold after a batch of images
        _held = True
        with open(marker, "w", encoding="utf-8") as fh:
            fh.write(str(self._report.indexed))
        while True:
            time.sleep(0.1)  # until SIGINT raises KeyboardInterrupt here

    def close(self) -> None:
        """Wait until every submitted commit is done (also on Ctrl-C: the report then counts exactly
        what was committed); raise the writer's error, if any."""
        t0 = time.perf_counter()
        self._jobs.put(None)
        self._thread.join()
        self._report.commit_wait_seconds += time.perf_counter() - t0
        self._raise()
