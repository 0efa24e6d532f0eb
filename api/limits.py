"""Overload protection: refuse at once what would queue too long, and drop work nobody waits for.

Three tools, shared by the routes:

- ``Overloaded``: raised when a bounded queue is full; it becomes 503 with ``Retry-After`` at once
  (a client learns in milliseconds to come back, instead of waiting tens of seconds in a queue).
- ``Gate``: at most ``slots`` holders at a time (image decoding: each holder keeps one upload and
  one decoded picture in memory, so memory is bounded by ``slots``), and at most ``max_waiting``
  requests waiting for a slot; beyond that, ``Overloaded``.
- ``result_or_drop``: await a model job, but if the client disconnects first, cancel it so the model
  thread skips it (a job not yet started costs nothing; one already running finishes alone).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from concurrent.futures import Future
from collections.abc import Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

from starlette.requests import Request


class Overloaded(Exception):
    """A bounded queue is full: answer 503 with ``Retry-After`` (seconds) instead of queueing."""

    def __init__(self, what: str, limit: int, retry_after: float = 1.0) -> None:
        self.what, self.limit = what, limit
        self.retry_after = max(1, min(60, math.ceil(retry_after)))
        super().__init__(f"the server is busy: {what} is full ({limit} requests); retry in {self.retry_after} s")


class ClientGone(Exception):
    """The client disconnected while its request waited; nothing is sent back."""


class Gate:
    """An async semaphore with a bounded waiting room and counters (``active``, ``waiting``, ``peak``).

    The asyncio semaphore is made on first use inside the running loop (an app may be served by
    several event loops in turn, as test clients do); ``reset`` forgets it at startup.
    """

    def __init__(self, what: str, slots: int, max_waiting: int) -> None:
        if slots < 1 or max_waiting < 0:
            raise ValueError(f"{what}: slots must be >= 1 and max_waiting >= 0 (got {slots}, {max_waiting})")
        self.what, self.slots, self.max_waiting = what, slots, max_waiting
        self.active = self.waiting = self.peak = 0
        self._sem: asyncio.Semaphore | None = None

    def reset(self) -> None:
        self._sem = None
        self.active = self.waiting = 0

    @asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.slots)
        if self.active >= self.slots and self.waiting >= self.max_waiting:
            raise Overloaded(self.what, self.slots + self.max_waiting)
        self.waiting += 1
        try:
            await self._sem.acquire()
        finally:
            self.waiting -= 1
        try:
            with self._counted():
                yield
        finally:
            self._sem.release()

    @contextmanager
    def hold_now(self) -> Iterator[None]:
        """A slot now or ``Overloaded``, never waiting: for the hot search route, a plain counter instead
        of the semaphore and an async context (the asyncio holders still count it, so the bound holds)."""
        if self.active >= self.slots:
            raise Overloaded(self.what, self.slots + self.max_waiting)
        with self._counted():
            yield

    @contextmanager
    def _counted(self) -> Iterator[None]:
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            yield
        finally:
            self.active -= 1


async def _disconnected(request: Request) -> None:
    """Return when the client has gone (the body was already read, so only a disconnect can arrive)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def result_or_drop(request: Request | None, job: Future) -> Any:
    """The job's result; if the client disconnects first, cancel the job and raise ``ClientGone``."""
    waiter = asyncio.wrap_future(job)
    if request is None:
        return await waiter
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({waiter, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if waiter in done:
        return waiter.result()
    job.cancel()  # skipped by the model thread unless it already started
    waiter.cancel()
    raise ClientGone()
