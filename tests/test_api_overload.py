"""Overload and abuse, over real HTTP: bounded queues answer 503 at once, departed clients' work is
dropped, /healthz never waits, image decoding is bounded, and per-request model limits hold.

No timed assertions: the model thread is held by a real job that waits on an event, so "queued" and
"refused" are states the test can see; every wait has a deadline that fails loudly instead.
"""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

import anyio.to_thread
import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from fwd2bot_index.api import create_app
from fwd2bot_index.api.testing import LiveServer

LOCAL = "http://127.0.0.1:8000"
DEADLINE = 30.0


class Recording:
    """The real service, with a record of the texts the model was asked to encode."""

    def __init__(self, inner):
        self._inner = inner
        self.texts: list[str] = []

    def encode_texts(self, texts):
        self.texts.extend(texts)
        return self._inner.encode_texts(texts)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def until(condition, what: str, deadline: float = DEADLINE) -> None:
    """Wait for ``condition()``; fail loudly (naming ``what``) if it does not hold within the deadline."""
    end = time.monotonic() + deadline
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"gave up waiting for: {what}")
        time.sleep(0.01)


class HeldModel:
    """Occupies the app's model thread with a real job until released (``with HeldModel(app): ...``)."""

    def __init__(self, app):
        self.worker = app.state.f2b.worker
        self.release = threading.Event()

    def __enter__(self):
        self.job = self.worker.call(self.release.wait, DEADLINE)
        until(lambda: self.job.running(), "the model thread to pick up the holding job")
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.job.result(DEADLINE)


def big_png(side: int = 2400, color=(30, 120, 200)) -> bytes:
    out = io.BytesIO()
    im = Image.new("RGB", (side, side), (250, 250, 250))
    im.paste(color, (side // 4, side // 4, side // 2, side // 2))
    im.save(out, format="PNG", compress_level=1)
    return out.getvalue()


# ------------------------------------------------------------------------------------ model queue


def test_a_flood_beyond_the_model_queue_gets_503_with_retry_after_at_once(service):
    app = create_app(service, max_queue=4)
    with TestClient(app, base_url=LOCAL) as c, ThreadPoolExecutor(12) as pool:
        c.get("/readyz")
        with HeldModel(app) as held:  # 1 of the 4 places
            futures = [pool.submit(c.post, "/v1/search", json={"query": f"a red circle {n}", "k": 3})
                       for n in range(12)]
            refused = []
            for future in as_completed(futures, timeout=DEADLINE):
                response = future.result()
                assert not held.release.is_set()
                assert response.status_code == 503, response.text  # answered while the model is still held
                refused.append(response)
                if len(refused) == 9:  # 12 sent, 3 queued behind the held job
                    break
            assert app.state.f2b.worker.pending == 4
        statuses = sorted(f.result(DEADLINE).status_code for f in futures)
    assert statuses == [200] * 3 + [503] * 9
    for response in refused:
        body = response.json()
        assert body["type"].endswith("/overloaded") and "busy" in body["detail"]
        assert int(response.headers["retry-after"]) >= 1
    assert app.state.f2b.worker.refused == 9 and app.state.f2b.worker.pending == 0


def test_healthz_and_readyz_answer_while_the_model_and_the_thread_pool_are_busy(writable):
    app = create_app(writable)
    with TestClient(app, base_url=LOCAL) as c, ThreadPoolExecutor(4) as pool:
        c.get("/readyz")
        limiter = c.portal.call(anyio.to_thread.current_default_thread_limiter)
        c.portal.call(setattr, limiter, "total_tokens", 2)
        with HeldModel(app):
            # Two uploads each hold a pool thread, waiting on the held model thread: the pool is full.
            uploads = [pool.submit(c.post, "/v1/images", files={"file": (f"{n}.png", big_png(64, (n, 9, 9)),
                                                                          "image/png")}) for n in (1, 2)]
            until(lambda: limiter.borrowed_tokens == 2, "both pool threads to be taken by the uploads")
            assert c.get("/healthz").json() == {"status": "ok"}
            assert c.get("/readyz").json()["status"] == "ready"
            assert limiter.borrowed_tokens == 2 and not any(u.done() for u in uploads)
        assert sorted(u.result(DEADLINE).status_code for u in uploads) == [201, 201]


# ------------------------------------------------------------------------------------ departed clients


def _send(url: str, path: str, body: dict) -> socket.socket:
    """Send a whole request over a raw socket and return the socket (closing it is the client leaving)."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)), timeout=DEADLINE)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def test_work_for_a_client_that_left_is_dropped(service):
    recording = Recording(service)
    app = create_app(recording)
    worker = app.state.f2b.worker
    with LiveServer(app) as url:
        httpx.get(url + "/readyz", timeout=DEADLINE)
        texts = [f"a dropped text number {n}" for n in range(16)]
        with HeldModel(app):
            for path, body, queued in [("/v1/search", {"query": "a dropped query", "k": 3}, 1),
                                       ("/v1/embed", {"texts": texts}, 1)]:  # embed: one chunk queued at a time
                client = _send(url, path, body)
                until(lambda: worker.pending == 1 + queued, f"{path}: its job to be queued")
                client.close()  # the client leaves
                until(lambda: worker.pending == 1, f"{path}: its job to be dropped after the client left")
        # The model thread has moved on; a later request is answered and nothing of the above was encoded.
        assert httpx.post(url + "/v1/search", json={"query": "a kept query", "k": 3}, timeout=DEADLINE).status_code == 200
    assert recording.texts == ["a kept query"]


# ------------------------------------------------------------------------------------ image decoding


def test_concurrent_large_image_searches_respect_the_decode_bound(service):
    app = create_app(service, decode_slots=2)
    gate = app.state.f2b.decodes
    data = big_png()
    with TestClient(app, base_url=LOCAL) as c, ThreadPoolExecutor(12) as pool:
        c.get("/readyz")
        with HeldModel(app):
            send = lambda: c.post("/v1/search/image", files={"file": ("big.png", data, "image/png")},  # noqa: E731
                                  data={"k": "2"})
            first = [pool.submit(send) for _ in range(6)]
            until(lambda: gate.active == 2 and gate.waiting == 4, "2 decodes holding slots and 4 waiting")
            more = [pool.submit(send) for _ in range(6)]  # the waiting room holds 8: 4 more wait, 2 are refused
            refused = []
            for future in as_completed(more, timeout=DEADLINE):  # only the refused can finish while held
                refused.append(future.result())
                if len(refused) == 2:
                    break
            assert [r.status_code for r in refused] == [503, 503] and refused[0].headers["retry-after"]
            until(lambda: gate.waiting == 8, "8 image searches waiting for a decode slot")
            assert gate.active == 2
        statuses = [f.result(DEADLINE).status_code for f in first + more]
    assert sorted(statuses) == [200] * 10 + [503] * 2
    assert gate.peak == 2 and gate.active == 0 and gate.waiting == 0


# ------------------------------------------------------------------------------------ per-request limits


def test_embed_limits_texts_per_call_and_characters(service):
    with TestClient(create_app(service, max_embed_chars=1000), base_url=LOCAL) as c:
        assert c.post("/v1/embed", json={"texts": ["a"] * 16}).status_code == 200
        assert c.post("/v1/embed", json={"texts": ["a"] * 17}).status_code == 422
        too_much = c.post("/v1/embed", json={"texts": ["x" * 600, "y" * 600]})
        assert too_much.status_code == 413 and "split" in too_much.json()["detail"]
        assert "1,200" in too_much.json()["detail"]
        assert c.post("/v1/embed", json={"texts": ["x" * 500, "y" * 500]}).status_code == 200


@pytest.mark.parametrize("method,path,body", [
    ("POST", "/v1/embed", {"texts": ["fine", "\ud800"]}),
    ("POST", "/v1/search", {"query": "a \ud800 b"}),
    ("POST", "/v1/search", {"like": 1, "filter": {"split": "\udfff"}}),
    ("POST", "/v1/search", {"like": 1, "filter": {"split": {"in": ["\ud800"]}}}),
    ("POST", "/v1/images/1/ask", {"question": "\ud800?"}),
])
def test_a_lone_surrogate_is_422_everywhere(service, method, path, body):
    with TestClient(create_app(service), base_url=LOCAL) as c:
        response = c.request(method, path, content=json.dumps(body),  # the JSON escape "\ud800", as a client sends it
                             headers={"content-type": "application/json"})
        assert response.status_code == 422, response.text
        assert "surrogate" in response.text
        form = c.post("/v1/search/image", files={"file": ("a.png", big_png(32), "image/png")},
                      data={"filter": '{"split": "\\ud800"}'})
        assert form.status_code == 422 and "surrogate" in form.text
        pair = c.post("/v1/search", json={"query": "a \U0001F600 smile", "k": 1})  # a valid pair is text
        assert pair.status_code == 200


def test_requests_in_flight_are_bounded_even_when_they_need_no_model(service):
    """Three image searches wait on the held model: with max_queue=3 a fourth request of any heavy kind,
    even a search by id that needs no model, is refused at once; /healthz and reads still answer."""
    app = create_app(service, max_queue=3)
    with TestClient(app, base_url=LOCAL) as c, ThreadPoolExecutor(3) as pool:
        c.get("/readyz")
        like = c.post("/v1/search", json={"query": "a red circle", "k": 1}).json()["results"][0]["id"]
        with HeldModel(app):
            waiting = [pool.submit(c.post, "/v1/search/image", files={"file": ("a.png", big_png(40), "image/png")})
                       for _ in range(3)]
            until(lambda: app.state.f2b.in_flight.active == 3, "3 image searches in flight")
            refused = c.post("/v1/search", json={"like": like, "k": 3})
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            assert "request queue" in refused.json()["detail"]
            assert c.get("/healthz").status_code == 200 and c.get(f"/v1/images/{like}").status_code == 200
        assert [f.result(DEADLINE).status_code for f in waiting] == [200, 200, 200]
        assert c.post("/v1/search", json={"like": like, "k": 3}).status_code == 200


def test_embed_in_bounded_jobs_gives_the_same_vectors_as_one_by_one(service, demo):
    """/v1/embed cuts texts (by characters) and images (by pixels) into model jobs; the vectors do not change."""
    import base64

    import numpy as np

    texts = ["a red circle", "x" * 1500, "two blue squares", "y" * 1900]  # three jobs: 1+1 texts, 1, 1
    images = [base64.b64encode(p.read_bytes()).decode() for p in demo.images[:3]]
    with TestClient(create_app(service), base_url=LOCAL) as c:
        together = c.post("/v1/embed", json={"texts": texts}).json()["embeddings"]
        alone = [c.post("/v1/embed", json={"texts": [t]}).json()["embeddings"][0] for t in texts]
        assert np.allclose(together, alone, atol=1e-4)
        together = c.post("/v1/embed", json={"images": images}).json()["embeddings"]
        alone = [c.post("/v1/embed", json={"images": [i]}).json()["embeddings"][0] for i in images]
        assert np.allclose(together, alone, atol=1e-4)
