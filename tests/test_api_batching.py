"""Dynamic batching in the server, over real HTTP: concurrent text queries share model calls and get
the same hits as alone, a lone query never waits for a batch, a turn under load gathers texts that
arrive within its window, and searches that need no model never wait for the model thread.

No timed assertions: the model thread is held by a real job that waits on an event, and the
worker's recorded decisions (texts per call, whether a turn waited) are read instead of clocks.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import pytest
from fastapi.testclient import TestClient

from fwd2bot_index.api import create_app
from fwd2bot_index.api.worker import ModelWorker

from .test_api_overload import DEADLINE, LOCAL, HeldModel, until

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QUERIES = ["a red circle", "a blue square", "a small green triangle", "a large yellow star", "a purple circle",
           "two shapes"]


class CountingCalls:
    """The real service, with a record of each ``encode_texts`` call (the texts encoded together)."""

    def __init__(self, inner):
        self._inner = inner
        self.calls: list[list[str]] = []

    def encode_texts(self, texts):
        self.calls.append(list(texts))
        return self._inner.encode_texts(texts)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def _metric(text: str, name: str) -> float:
    return next(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " "))


def _hits(response) -> list[tuple[int, float]]:
    assert response.status_code == 200, response.text
    return [(h["id"], h["score"]) for h in response.json()["results"]]


def test_concurrent_text_queries_share_one_model_call_and_get_the_same_hits_as_alone(service, monkeypatch):
    """Queued together, six queries are encoded in one call and searched per (k, offset, min_score) group in
    the same turn, in chunks (of 2 here, so a group of 3 spans two); each gets the hits it gets alone."""
    import fwd2bot_index.api.worker as worker_module

    monkeypatch.setattr(worker_module, "SEARCH_CHUNK", 2)
    counting = CountingCalls(service)
    k = {q: 3 + 2 * (n % 2) for n, q in enumerate(QUERIES)}  # two groups that search apart
    app = create_app(counting)
    worker = app.state.f2b.worker
    with TestClient(app, base_url=LOCAL) as c, ThreadPoolExecutor(len(QUERIES)) as pool:
        c.get("/readyz")
        alone = {q: _hits(c.post("/v1/search", json={"query": q, "k": k[q]})) for q in QUERIES}
        assert counting.calls == [[q] for q in QUERIES]  # sent one after another: one text per call
        assert worker.waited_turns == 0
        counting.calls.clear()
        with HeldModel(app):
            futures = [pool.submit(c.post, "/v1/search", json={"query": q, "k": k[q]}) for q in QUERIES]
            until(lambda: worker.pending == 1 + len(QUERIES), "every query queued behind the held job")
        together = {q: _hits(f.result(DEADLINE)) for q, f in zip(QUERIES, futures)}
        metrics = c.get("/metrics").text
    assert len(counting.calls) == 1 and sorted(counting.calls[0]) == sorted(QUERIES)
    for q in QUERIES:
        assert len(together[q]) == k[q] and [i for i, _ in together[q]] == [i for i, _ in alone[q]], q
        assert [s for _, s in together[q]] == pytest.approx([s for _, s in alone[q]], abs=1e-5), q
    calls, texts = _metric(metrics, "f2b_model_text_batch_size_count"), _metric(metrics, "f2b_model_text_batch_size_sum")
    assert (calls, texts) == (len(QUERIES) + 1, 2 * len(QUERIES))  # six calls of one, then one of six


def test_a_lone_query_never_waits_for_a_batch(service):
    app = create_app(service, batch_wait_ms=1000)  # a window long enough that a wait could not go unseen
    worker = app.state.f2b.worker
    with TestClient(app, base_url=LOCAL) as c:
        c.get("/readyz")
        for q in QUERIES[:3]:
            assert c.post("/v1/search", json={"query": q, "k": 3}).status_code == 200
            assert worker.last_waited is False
        metrics = c.get("/metrics").text
    assert worker.turns == 3 and worker.waited_turns == 0
    assert _metric(metrics, "f2b_model_batch_wait_seconds") == 1.0
    assert _metric(metrics, "f2b_model_text_turns_waited_total") == 0


@contextmanager
def held_worker(service, **options):
    """A started ``ModelWorker`` whose thread is held by a job until the yielded event is set. Its batch
    window is a minute (not reachable through the constructor): only ``max_batch`` or ``expected`` may end
    a wait, and a wait that should not happen would hang the test past its deadline."""
    worker = ModelWorker(service, batch_wait=1.0, **options)
    worker.batch_wait = 60.0
    worker.start(preload=False)
    release = threading.Event()
    try:
        held = worker.call(release.wait, DEADLINE)
        until(held.running, "the model thread to pick up the holding job")
        yield worker, release
    finally:
        release.set()
        worker.stop()


def test_a_turn_under_load_waits_for_texts_that_arrive_within_its_window(service):
    """Two texts queued behind a held job make the next turn one 'under load'; with more requests admitted
    than queued (``expected``) it waits, and a third text sent while it waits joins the same call (the batch
    closes at ``max_batch`` = 3, not at a clock)."""
    counting = CountingCalls(service)
    with held_worker(counting, max_batch=3, expected=lambda: 3) as (worker, release):
        first = [worker.encode_text(q) for q in QUERIES[:2]]
        release.set()
        until(lambda: worker.gathering, "the next turn to wait for more texts")
        late = worker.encode_text(QUERIES[2])
        vectors = [f.result(DEADLINE) for f in [*first, late]]
    assert counting.calls == [QUERIES[:3]]
    assert worker.turns == 1 and worker.waited_turns == 1 and worker.last_waited and not worker.gathering
    for q, v in zip(QUERIES, vectors):
        np.testing.assert_allclose(v, service.encode_texts([q])[0], atol=1e-5)


def test_no_wait_when_every_admitted_request_is_already_queued(service):
    """Under load but with nothing more to come (``expected`` == jobs queued), the turn starts at once."""
    counting = CountingCalls(service)
    with held_worker(counting, expected=lambda: 2) as (worker, release):
        futures = [worker.encode_text(q) for q in QUERIES[:2]]
        release.set()
        for f in futures:
            f.result(DEADLINE)
    assert counting.calls == [QUERIES[:2]] and worker.waited_turns == 0


def test_searches_without_the_model_complete_while_the_model_thread_is_blocked(service):
    app = create_app(service)
    with TestClient(app, base_url=LOCAL) as c, ThreadPoolExecutor(8) as pool:
        c.get("/readyz")
        ids = [h["id"] for h in c.post("/v1/search", json={"query": "shapes", "k": 8}).json()["results"]]
        vector = c.post("/v1/embed", json={"texts": ["a red circle"]}).json()["embeddings"][0]
        expected = {i: _hits(c.post("/v1/search", json={"like": i, "k": 4})) for i in ids}
        with HeldModel(app) as held:
            likes = {i: pool.submit(c.post, "/v1/search", json={"like": i, "k": 4}) for i in ids}
            by_vector = pool.submit(c.post, "/v1/search", json={"embedding": vector, "k": 4})
            filtered = pool.submit(c.post, "/v1/search", json={"like": ids[0], "k": 4, "filter": {"split": "test"}})
            got = {i: _hits(f.result(DEADLINE)) for i, f in likes.items()}
            assert _hits(by_vector.result(DEADLINE)) and filtered.result(DEADLINE).status_code == 200
            assert not held.release.is_set()  # all answered while the model thread was still blocked
    assert got == expected


def test_batch_wait_is_checked():
    with pytest.raises(ValueError, match="batch_wait must be between 0 and 1 second"):
        ModelWorker(object(), batch_wait=2.0)


class CountingAnswers:
    """The real service whose model records each ``answer_batch`` call (the questions answered together)."""

    def __init__(self, inner):
        self._inner = inner
        self.calls: list[tuple[list[str], int]] = []
        outer = self

        class Model:
            def answer_batch(self, tokens, questions, max_new_tokens=32, kind=None):
                outer.calls.append((list(questions), max_new_tokens))
                return inner.model.answer_batch(tokens, questions, max_new_tokens, kind)

            def __getattr__(self, name):
                return getattr(inner.model, name)

        self.model = Model()

    def __getattr__(self, name):
        return getattr(self._inner, name)


def test_concurrent_json_asks_share_a_call_per_length_and_answer_as_alone(service):
    counting = CountingAnswers(service)
    app = create_app(counting)
    worker = app.state.f2b.worker
    questions = ["What color is the circle?", "How many shapes are there?", "Is there a star?", "What is on the left?"]
    with TestClient(app, base_url=LOCAL) as c, ThreadPoolExecutor(6) as pool:
        c.get("/readyz")
        ids = [h["id"] for h in c.post("/v1/search", json={"query": "shapes", "k": 4}).json()["results"]]
        asks = [(i, q, 6) for i, q in zip(ids, questions)] + [(ids[0], questions[1], 3), (ids[1], questions[0], 3)]

        def ask(image_id, question, n):
            return c.post(f"/v1/images/{image_id}/ask", json={"question": question, "max_new_tokens": n})

        alone = [ask(*a).json()["answer"] for a in asks]
        assert len(set(alone)) > 1 and [len(q) for q, _ in counting.calls] == [1] * len(asks)
        counting.calls.clear()
        with HeldModel(app):
            first = [pool.submit(ask, *a) for a in asks[:4]]  # the same max_new_tokens: one call
            until(lambda: worker.pending == 5, "four asks queued behind the held job")
            shorter = [pool.submit(ask, *a) for a in asks[4:]]  # another length: a call of their own
            until(lambda: worker.pending == 7, "two more asks queued")
        together = [f.result(DEADLINE) for f in first + shorter]
        metrics = c.get("/metrics").text
    assert all(r.status_code == 200 for r in together), [r.text for r in together]
    assert [r.json()["answer"] for r in together] == alone
    assert sorted((sorted(q), n) for q, n in counting.calls) == sorted(
        [(sorted(questions), 6), (sorted([questions[1], questions[0]]), 3)])
    assert _metric(metrics, "f2b_model_answer_calls_total") == len(asks) + 2
    assert _metric(metrics, "f2b_model_answers_total") == 2 * len(asks)


def test_the_server_freezes_the_heap_once_the_model_has_loaded(demo):
    """``make_server`` (what ``f2b serve`` runs) moves the loaded model out of the garbage collector's view,
    so a full collection no longer pauses every request for hundreds of milliseconds."""
    import gc

    from fwd2bot_index.api import make_server
    from fwd2bot_index.api.server import freeze_heap
    from fwd2bot_index.api.testing import LiveServer, free_port

    gc.unfreeze()
    server = make_server(demo.collection, model=str(demo.model_dir), port=free_port(), writable=False,
                         log_level="warning")
    assert server.config.app.state.f2b.worker.on_ready is freeze_heap
    live = LiveServer(server=server)
    try:
        with live:
            live.wait_ready()
            assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
