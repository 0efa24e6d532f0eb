"""One thread owns the model: every model call (load, encode, answer, index) runs there, in order.

Why a single thread instead of a lock: the model switches LoRA adapters around calls and streams
answers from a helper thread, so two calls at once are not safe; and a queue lets concurrent text
queries be *batched*: while the model is busy, text requests pile up and the next turn encodes them
all in one ``encode_texts`` call (no added wait at low load, higher throughput under load).

Dynamic batching: a turn first takes every text already waiting. Under load (the previous turn
encoded more than one text, more than one is waiting now, or the app has admitted more requests
than there are jobs here: they are being parsed and may send a text) it then waits up to ``batch_wait``
seconds for more, stopping early at ``max_batch`` texts, at a job that is not a text, or when no
admitted request is left that could still send one (``expected``). A lone query at low load never
waits: its turn starts at once. On a small CPU model one call of 32 texts costs about as much as
eight calls of one; texts that pile up while the model runs already fill the batches under load, so
the window is off unless asked for (``DEFAULT_BATCH_WAIT``).

A text search without a filter (``search_text``) is searched on this thread too, right after its
batch is encoded: one ``search_batch`` call for the batch's queries with the same k, offset and
min_score, which costs far less than one search per request on the event loop.

Non-streaming questions (``answer``) are batched too, without any wait: asks already queued one
after another with the same ``max_new_tokens`` and token kind go to one ``model.answer_batch`` call
(greedy decoding, so each answer is the one it would get alone). Verified searches (``relevance``) are
batched the same way: the top hits of the searches queued one after another go to one
``model.relevance`` call (one prefill per chunk of hits, each scored as it would be alone).

The queue is bounded (``max_queue`` jobs waiting or running): a job beyond it raises ``Overloaded``
at once, which the app answers with 503 and ``Retry-After``. A job whose future was cancelled (its
client left) frees its place at once and is skipped when its turn comes.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import math
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import numpy as np

from .limits import Overloaded

log = logging.getLogger("fwd2bot_index.api")


class _TextJob:
    """A text to encode; with ``search`` (k, offset, min_score) its hits are wanted, not its vector."""

    __slots__ = ("text", "search", "future")

    def __init__(self, text: str, search: tuple[int, int, float | None] | None = None) -> None:
        self.text, self.search = text, search
        self.future: Future = Future()


class _AskJob:
    """A question about one image's stored tokens; asks with the same ``key`` can share one call."""

    __slots__ = ("tokens", "question", "key", "future")

    def __init__(self, tokens: Any, question: str, max_new_tokens: int, kind: str | None) -> None:
        self.tokens, self.question, self.key = tokens, question, (max_new_tokens, kind)
        self.future: Future = Future()


class _VerifyJob:
    """A verified search's top hits: their stored tokens and the query, to be scored by ``model.relevance``;
    jobs with the same token ``kind`` queued one after another share one call."""

    __slots__ = ("tokens", "query", "kind", "future")

    def __init__(self, tokens: list[Any], query: str, kind: str | None) -> None:
        self.tokens, self.query, self.kind = tokens, query, kind
        self.future: Future = Future()


class _CallJob:
    __slots__ = ("fn", "args", "kwargs", "future")

    def __init__(self, fn: Callable[..., Any], args: tuple, kwargs: dict) -> None:
        self.fn, self.args, self.kwargs = fn, args, kwargs
        self.future: Future = Future()


_STOP = object()
# Queries per search_batch call from this thread. The collection holds its lock for a whole call, and a
# cheap search by id may run on the event loop: chunks bound how long the loop can wait for that lock
# (demo collection: 8 queries 0.16 ms, 32 queries 0.65 ms; per query the same from 8 on).
SEARCH_CHUNK = 8
# Seconds a turn under load may wait for more texts (see the module docstring). Off by default: on the
# demo model (2 CPU cores, bench/bench_service.py, 3 alternating rounds) a 2 ms window gave the same texts
# per call (about 6, 15 and 31 at 8, 32 and 200 clients: texts pile up while the model runs) and the same
# server CPU per request as none. It may pay where a model call is cheap next to the gap between requests.
DEFAULT_BATCH_WAIT = 0.0
# Hits scored per model.relevance call across queued verified searches (each asks for at most MAX_VERIFY,
# 100): the model itself prefills them in chunks, so this bounds one turn's length, not its memory.
MAX_VERIFY_PAIRS = 128


class ModelWorker:
    """Serializes model use on one thread; reports readiness once the model has loaded."""

    def __init__(self, service: Any, max_batch: int = 32, on_batch: Callable[[int], None] | None = None,
                 max_queue: int = 64, batch_wait: float = DEFAULT_BATCH_WAIT,
                 expected: Callable[[], int] | None = None) -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {max_queue}")
        if not 0 <= batch_wait <= 1:
            raise ValueError(f"batch_wait must be between 0 and 1 second, got {batch_wait}")
        self.service = service
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.batch_wait = batch_wait
        self.on_batch = on_batch
        # How many requests may still send a text (admitted, not yet queued here); None: unknown.
        self._expected = expected
        self.turns = self.waited_turns = 0  # text turns, and those that waited for more texts
        self.answer_calls = self.answers = 0  # answer_batch calls, and the questions they answered
        self.verify_calls = self.verified = 0  # model.relevance calls, and the hits they scored
        self.last_waited = False  # whether the latest text turn waited (tests read the decision, not a time)
        self.gathering = False  # a turn is waiting for more texts right now
        self._last_batch = 0
        self.pending = 0  # jobs queued or running (not counting the model load)
        self.refused = 0
        self._turn_seconds = 0.05  # a running average of one turn of the loop, for Retry-After
        self._count_lock = threading.Lock()
        self.state = "loading"
        self.detail: str | None = None
        self.load_seconds: float | None = None
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._held: Any = None  # a job taken while gathering a text batch, run next
        self.on_ready: Callable[[], None] | None = None  # called on this thread once the model has loaded
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, preload: bool = True) -> None:
        """Start the thread; with ``preload`` the model loads first (readiness waits for it)."""
        if self._thread is not None:
            return
        if preload:
            self._queue.put(_CallJob(self._preload, (), {}))  # not counted: it is not a client's job
        else:
            self.state = "ready"
        self._thread = threading.Thread(target=self._loop, name="f2b-model", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread is None:
            return
        self._queue.put(_STOP)
        self._thread.join(timeout)
        self._thread = None

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def _preload(self) -> None:
        started = time.perf_counter()
        try:
            self.service.preload()
        except Exception as exc:  # noqa: BLE001 - reported by /readyz and every model route
            self.state, self.detail = "failed", f"the model could not be loaded: {exc}"
            log.error("%s", self.detail)
            return
        self.load_seconds = time.perf_counter() - started
        if self.on_ready is not None:
            self.on_ready()
        self.state = "ready"
        log.info("model ready in %.1f s", self.load_seconds)

    # -- submitting --------------------------------------------------------------------------
    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
        """Run ``fn(*args, **kwargs)`` on the model thread; ``Overloaded`` if the queue is full."""
        return self._submit(_CallJob(fn, args, kwargs))

    def encode_text(self, text: str) -> Future:
        """The embedding of one text, encoded together with whatever other texts are waiting."""
        return self._submit(_TextJob(text))

    def search_text(self, text: str, k: int, offset: int = 0, min_score: float | None = None) -> Future:
        """The hits for a text query without a filter: encoded with the texts waiting, then searched in one
        ``collection.search_batch`` call with the other queries of that batch that share ``k``, ``offset``
        and ``min_score`` (one index call and one catalog read for all, instead of one each on the loop)."""
        return self._submit(_TextJob(text, (k, offset, min_score)))

    def answer(self, tokens: Any, question: str, max_new_tokens: int, kind: str | None) -> Future:
        """The answer to ``question`` from one image's stored ``tokens``, decoded together with the asks
        queued right behind it that share ``max_new_tokens`` and ``kind``."""
        return self._submit(_AskJob(tokens, question, max_new_tokens, kind))

    def relevance(self, tokens: list[Any], query: str, kind: str | None) -> Future:
        """P(yes) per stored-token set that its image shows ``query`` (an array), scored in one
        ``model.relevance`` call with the verifications queued right behind it (same ``kind``)."""
        return self._submit(_VerifyJob(tokens, query, kind))

    def _submit(self, job: Any) -> Future:
        with self._count_lock:
            if self.pending >= self.max_queue:
                self.refused += 1
                turns = math.ceil(self.pending / self.max_batch) + 1
                raise Overloaded("the model queue", self.max_queue, retry_after=turns * self._turn_seconds)
            self.pending += 1
        job.future.add_done_callback(self._finished)  # also runs on cancel: the place frees at once
        self._queue.put(job)
        return job.future

    def _finished(self, _future: Future) -> None:
        with self._count_lock:
            self.pending -= 1

    async def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await asyncio.wrap_future(self.call(fn, *args, **kwargs))

    async def embed_text(self, text: str) -> np.ndarray:
        return await asyncio.wrap_future(self.encode_text(text))

    # -- the thread --------------------------------------------------------------------------
    def _next(self) -> Any:
        if self._held is not None:
            job, self._held = self._held, None
            return job
        return self._queue.get()

    def _loop(self) -> None:
        while True:
            job = self._next()
            if job is _STOP:
                return
            started = time.perf_counter()
            if isinstance(job, _TextJob):
                self._run_texts(self._gather(job))
            elif isinstance(job, _AskJob):
                self._run_asks(self._gather_asks(job))
            elif isinstance(job, _VerifyJob):
                self._run_verifies(self._gather_verifies(job))
            else:
                self._run_call(job)
            if not (isinstance(job, _CallJob) and job.fn == self._preload):
                self._turn_seconds = 0.8 * self._turn_seconds + 0.2 * (time.perf_counter() - started)

    def _gather(self, first: _TextJob) -> list[_TextJob]:
        batch = [first]
        self._take(batch, None)
        waited = bool(self.batch_wait) and len(batch) < self.max_batch and self._held is None \
            and self._under_load(batch) and self._more_may_come(batch)
        if waited:
            self.gathering = True
            deadline = time.perf_counter() + self.batch_wait
            while len(batch) < self.max_batch and self._held is None and self._more_may_come(batch):
                left = deadline - time.perf_counter()
                if left <= 0 or not self._take(batch, left):
                    break
            self.gathering = False
        self.turns += 1
        self.waited_turns += waited
        self.last_waited = waited
        self._last_batch = len(batch)
        return batch

    def _under_load(self, batch: list[_TextJob]) -> bool:
        """Load seen: several texts now or last turn, or more requests admitted than jobs queued here."""
        return len(batch) > 1 or self._last_batch > 1 or (self._expected is not None and self._more_may_come(batch))

    def _more_may_come(self, batch: list[_TextJob]) -> bool:
        """False when every admitted request already has its job here: waiting could gather nothing."""
        return self._expected is None or self._expected() > self.pending

    def _take(self, batch: list[_TextJob], timeout: float | None) -> bool:
        """Add waiting texts to ``batch`` (up to ``max_batch``): all there now, or with ``timeout`` the
        next one to arrive within it. Stops at a job that is not a text (held for the next turn).
        False if nothing arrived in time."""
        while len(batch) < self.max_batch:
            try:
                job = self._queue.get(timeout=timeout) if timeout is not None else self._queue.get_nowait()
            except queue.Empty:
                return timeout is None
            if not isinstance(job, _TextJob):
                self._held = job
                return True
            batch.append(job)
            if timeout is not None:
                return True
        return True

    def _run_call(self, job: _CallJob) -> None:
        if not job.future.set_running_or_notify_cancel():
            return
        try:
            job.future.set_result(job.fn(*job.args, **job.kwargs))
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting request
            job.future.set_exception(exc)

    def _gather_asks(self, first: _AskJob) -> list[_AskJob]:
        """``first`` and the asks queued right behind it with the same key (no waiting: answers are long)."""
        batch = [first]
        while len(batch) < self.max_batch:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if not (isinstance(job, _AskJob) and job.key == first.key):
                self._held = job
                break
            batch.append(job)
        return batch

    def _run_texts(self, batch: list[_TextJob]) -> None:
        def encode(jobs: list[_TextJob]) -> list[Any]:
            unique = list(dict.fromkeys(j.text for j in jobs))
            vectors = np.asarray(self.service.encode_texts(unique), dtype=np.float32)
            if self.on_batch is not None:
                self.on_batch(len(unique))
            row = {text: i for i, text in enumerate(unique)}
            out: list[Any] = [vectors[row[j.text]] for j in jobs]
            groups: dict[tuple, list[int]] = {}
            for n, job in enumerate(jobs):
                if job.search is not None:
                    groups.setdefault(job.search, []).append(n)
            for (k, offset, min_score), members in groups.items():
                for i in range(0, len(members), SEARCH_CHUNK):
                    chunk = members[i:i + SEARCH_CHUNK]
                    found = self.service.collection.search_batch(np.stack([out[n] for n in chunk]), k, None, offset,
                                                                 min_score)
                    for n, hits in zip(chunk, found):
                        out[n] = hits
            return out

        self._run_batch(batch, encode)

    def _run_asks(self, batch: list[_AskJob]) -> None:
        max_new_tokens, kind = batch[0].key

        def answer(jobs: list[_AskJob]) -> list[str]:
            answers = self.service.model.answer_batch([j.tokens for j in jobs], [j.question for j in jobs],
                                                      max_new_tokens, kind)
            self.answer_calls += 1
            self.answers += len(jobs)
            return list(answers)

        self._run_batch(batch, answer)

    def _gather_verifies(self, first: _VerifyJob) -> list[_VerifyJob]:
        """``first`` and the verifications queued right behind it with the same kind, up to
        ``MAX_VERIFY_PAIRS`` (token sets) in all; no waiting, as for asks."""
        batch, pairs = [first], len(first.tokens)
        while len(batch) < self.max_batch:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if not (isinstance(job, _VerifyJob) and job.kind == first.kind
                    and pairs + len(job.tokens) <= MAX_VERIFY_PAIRS):
                self._held = job
                break
            batch.append(job)
            pairs += len(job.tokens)
        return batch

    def _run_verifies(self, batch: list[_VerifyJob]) -> None:
        kind = batch[0].kind

        def score(jobs: list[_VerifyJob]) -> list[np.ndarray]:
            tokens = [t for j in jobs for t in j.tokens]
            queries = [j.query for j in jobs for _ in j.tokens]
            relevance = np.asarray(self.service.model.relevance(tokens, queries, kind)) if tokens else np.zeros(0)
            self.verify_calls += 1
            self.verified += len(tokens)
            bounds = np.cumsum([0] + [len(j.tokens) for j in jobs])
            return [relevance[a:b] for a, b in zip(bounds[:-1], bounds[1:])]

        self._run_batch(batch, score)

    @staticmethod
    def _run_batch(batch: list[Any], run: Callable[[list[Any]], list[Any]]) -> None:
        """``run`` the jobs whose clients still wait in one call; if it fails, one by one, so that one bad
        input fails alone."""
        live = [j for j in batch if j.future.set_running_or_notify_cancel()]
        if not live:
            return
        try:
            results = run(live)
        except Exception:  # noqa: BLE001 - retried one by one below
            for j in live:
                try:
                    j.future.set_result(run([j])[0])
                except Exception as exc:  # noqa: BLE001 - handed to the waiting request
                    j.future.set_exception(exc)
            return
        for j, result in zip(live, results):
            j.future.set_result(result)
