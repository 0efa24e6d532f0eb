"""The REST service through TestClient: every endpoint and every error status, on a real collection.

The collection is real (tiny random LLaVA, synthetic demo images, FAISS, SQLite); tests that write
work on private copies so the shared one stays as built.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from fwd2bot_index.api import create_app, is_loopback
from fwd2bot_index.api.testing import LiveServer
from fwd2bot_index.collection import Collection

PROBLEM = "application/problem+json"
LOCAL = "http://127.0.0.1:8000"  # the Host a browser or client on this machine sends (the server refuses others)


def local_client(app, **kwargs) -> TestClient:
    return TestClient(app, base_url=LOCAL, **kwargs)


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def client(service):
    with local_client(create_app(service)) as c:
        c.get("/readyz")
        yield c


def problem(response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM), response.headers["content-type"]
    body = response.json()
    assert body["status"] == status and body["title"] and body["detail"] and body["type"].startswith("http")
    assert "Traceback" not in response.text and 'File "' not in response.text
    return body


def png_bytes(color=(200, 30, 30), size=(48, 40)) -> bytes:
    out = io.BytesIO()
    im = Image.new("RGB", size, (245, 245, 245))
    im.paste(color, (8, 8, size[0] - 8, size[1] - 8))
    im.save(out, format="PNG")
    return out.getvalue()


# ------------------------------------------------------------------------------------ health


def test_health_ready_and_collection(client, demo):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    info = client.get("/v1/collection").json()
    assert info["indexed"] == 40
    assert info["strategy"] and info["model"] and info["bytes_per_image"] > 0
    assert info["ready"] == "ready" and "backend_options" not in info


def test_page_and_static_files(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert 'id="query"' in page.text and 'for="query"' in page.text
    script = client.get("/static/app.js")
    assert script.status_code == 200 and "sseEvents" in script.text
    assert client.get("/static/app.css").status_code == 200
    assert page.headers["x-content-type-options"] == "nosniff"


# ------------------------------------------------------------------------------------ search


def test_text_search_returns_ranked_hits_with_cosine_scores(client, demo):
    body = client.post("/v1/search", json={"query": "a red circle", "k": 5}).json()
    hits = body["results"]
    assert body["kind"] == "text" and len(hits) == 5
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True) and all(-1.0001 <= s <= 1.0001 for s in scores)
    for h in hits:
        assert Path(h["path"]).is_absolute() and Path(h["path"]).exists()
        assert h["thumbnail_url"] == f"/v1/images/{h['id']}/thumbnail" and h["url"] == f"/v1/images/{h['id']}"
    # The score is the cosine between the query embedding and the image embedding.
    q = np.asarray(client.post("/v1/embed", json={"texts": ["a red circle"]}).json()["embeddings"][0])
    img = base64.b64encode(Path(hits[0]["path"]).read_bytes()).decode()
    v = np.asarray(client.post("/v1/embed", json={"images": [img]}).json()["embeddings"][0])
    cosine = float(q @ v / np.linalg.norm(q) / np.linalg.norm(v))
    assert cosine == pytest.approx(hits[0]["score"], abs=1e-3)
    # Searching by that embedding gives the same ranking.
    same = client.post("/v1/search", json={"embedding": q.tolist(), "k": 5}).json()
    assert [h["id"] for h in same["results"]] == [h["id"] for h in hits] and same["kind"] == "embedding"


def test_pagination_min_score_like_and_filter(client):
    full = client.post("/v1/search", json={"query": "a blue square", "k": 10}).json()["results"]
    page2 = client.post("/v1/search", json={"query": "a blue square", "k": 5, "offset": 5}).json()["results"]
    assert [h["id"] for h in page2] == [h["id"] for h in full[5:10]]
    cut = full[3]["score"]
    kept = client.post("/v1/search", json={"query": "a blue square", "k": 10, "min_score": cut}).json()["results"]
    assert kept and all(h["score"] >= cut for h in kept) and len(kept) <= 10
    first = full[0]["id"]
    like = client.post("/v1/search", json={"like": first, "k": 5}).json()
    assert like["kind"] == "like" and first not in [h["id"] for h in like["results"]] and len(like["results"]) == 5
    name = Path(full[2]["path"]).name
    only = client.post("/v1/search", json={"query": "a blue square", "k": 10,
                                           "filter": {"path": f"*/{name}"}}).json()["results"]
    assert [h["id"] for h in only] == [full[2]["id"]]
    none = client.post("/v1/search", json={"query": "x", "k": 3, "filter": {"id": {"in": []}}}).json()
    assert none["results"] == []


@pytest.mark.parametrize("payload", [
    {}, {"k": 3}, {"query": "a", "like": 1}, {"query": "a", "k": 0}, {"query": "a", "k": 100000},
    {"query": ""}, {"query": "a", "offset": -1}, {"query": "a", "unknown": 1}, {"like": -5},
    {"query": "a", "min_score": 3}, {"embedding": []}, {"like": 2**64},
])
def test_search_validation_errors_are_422(client, payload):
    body = problem(client.post("/v1/search", json=payload), 422)
    assert body["errors"]


def test_search_bad_input_is_400_or_404(client):
    assert "pattern" in problem(client.post("/v1/search", json={"query": "   "}), 422)["detail"]  # blank: the schema
    assert problem(client.post("/v1/search", json={"embedding": [0.1, 0.2]}), 400)["detail"]
    assert client.post("/v1/search", json={"embedding": [1e300] * 64}).status_code == 200  # only the direction counts
    assert "zeros" in problem(client.post("/v1/search", json={"embedding": [0.0] * 64}), 400)["detail"]
    # Filters follow the schema's filter grammar, checked before the collection sees them: 422 naming the key.
    assert "'bad key!'" in problem(client.post("/v1/search", json={"query": "a", "filter": {"bad key!": 1}}), 422)["detail"]
    problem(client.post("/v1/search", json={"query": "a", "filter": {"size": 2**70}}), 422)
    assert "nope" in problem(client.post("/v1/search", json={"query": "a", "filter": {"x": {"nope": 1}}}), 422)["detail"]
    problem(client.post("/v1/search", json={"query": "a", "filter": {"width>=": True}}), 422)
    problem(client.post("/v1/search", json={"query": "a", "filter": {"path>=": "a"}}), 422)
    assert "999999" in problem(client.post("/v1/search", json={"like": 999999}), 404)["detail"]
    problem(client.post("/v1/search", content=b"{not json", headers={"content-type": "application/json"}), 422)


def test_search_by_uploaded_image_finds_that_image(client, demo):
    path = demo.images[7]
    response = client.post("/v1/search/image", files={"file": (path.name, path.read_bytes(), "image/png")},
                           data={"k": "3", "filter": ""})
    body = response.json()
    assert response.status_code == 200 and body["kind"] == "image"
    assert Path(body["results"][0]["path"]).name == path.name
    assert body["results"][0]["score"] == pytest.approx(1.0, abs=1e-3)
    problem(client.post("/v1/search/image", files={"file": ("a.png", path.read_bytes(), "image/png")},
                        data={"filter": "[1]"}), 422)
    problem(client.post("/v1/search/image", data={"k": "3"}), 422)


# ------------------------------------------------------------------------------------ upload limits


def test_upload_limits_413_415_422(writable):
    app = create_app(writable, max_upload_bytes=4000, max_pixels=64 * 64)
    with local_client(app) as c:
        big = png_bytes(size=(60, 60)) + b"\0" * 5000
        assert "limit" in problem(c.post("/v1/search/image", files={"file": ("big.png", big, "image/png")}), 413)["detail"]
        # A declared body far over the limit is refused before it is read.
        problem(c.post("/v1/images", content=b"x" * 10, headers={"content-length": "99999999",
                                                                  "content-type": "multipart/form-data; boundary=x"}), 413)
        wide = png_bytes(size=(200, 100))
        assert "pixels" in problem(c.post("/v1/images", files={"file": ("wide.png", wide, "image/png")}), 413)["detail"]
        problem(c.post("/v1/images", files={"file": ("notes.txt", b"hello, not an image", "text/plain")}), 415)
        problem(c.post("/v1/images", files={"file": ("notes.png", b"hello, not an image", "image/png")}), 415)
        problem(c.post("/v1/images", files={"file": ("big.png", big, "image/png")}), 413)
        assert c.get("/v1/collection").json()["indexed"] == 40  # nothing refused was added
        problem(c.post("/v1/search/image", files={"file": ("fake.png", b"GIF89a-nope" * 10, "image/png")}), 415)
        truncated = png_bytes()[:-30]
        assert "truncated" in problem(c.post("/v1/search/image", files={"file": ("t.png", truncated, "image/png")}),
                                      422)["detail"]
        problem(c.post("/v1/search/image", files={"file": ("e.png", b"", "image/png")}), 422)
        # Embedding images: the same checks.
        problem(c.post("/v1/embed", json={"images": ["!!!"]}), 400)
        problem(c.post("/v1/embed", json={"images": [base64.b64encode(wide).decode()]}), 413)
        problem(c.post("/v1/embed", json={"images": [base64.b64encode(b"plain text").decode()]}), 415)


def test_chunked_body_over_limit_is_413(service):
    app = create_app(service, max_upload_bytes=1000)

    def chunks():  # no Content-Length: counted as it arrives (limit: 4/3 x 1000 + 256 KiB of overhead)
        for _ in range(40):
            yield b"a" * 10_000

    with local_client(app) as c:
        problem(c.post("/v1/search", content=chunks(), headers={"content-type": "application/json"}), 413)


# ------------------------------------------------------------------------------------ images


def test_upload_get_search_duplicate_delete(writable, demo):
    with local_client(create_app(writable)) as c:
        data = png_bytes(color=(20, 160, 40))
        created = c.post("/v1/images", files={"file": ("../../etc/My Photo.png", data, "image/png")})
        assert created.status_code == 201, created.text
        image = created.json()["image"]
        new_id = image["id"]
        assert created.headers["location"] == f"/v1/images/{new_id}"
        assert image["hash"] == hashlib.sha256(data).hexdigest()
        stored = Path(image["path"])
        assert stored.parent == (Path(writable.collection.path) / "uploads").resolve() and stored.read_bytes() == data
        assert image["metadata"]["original_name"] == "My Photo.png" and image["metadata"]["source"] == "upload"
        assert c.get("/v1/collection").json()["indexed"] == 41
        assert c.get(f"/v1/images/{new_id}").json() == image
        found = c.post("/v1/search/image", files={"file": ("q.png", data, "image/png")}, data={"k": "1"}).json()
        assert found["results"][0]["id"] == new_id
        dup = problem(c.post("/v1/images", files={"file": ("again.png", data, "image/png")}), 409)
        assert dup["existing_id"] == new_id and dup["url"] == f"/v1/images/{new_id}"
        existing = demo.images[0].read_bytes()
        assert problem(c.post("/v1/images", files={"file": ("x.png", existing, "image/png")}), 409)["existing_id"] >= 0
        assert c.delete(f"/v1/images/{new_id}").status_code == 204
        assert not stored.exists()
        problem(c.get(f"/v1/images/{new_id}"), 404)
        problem(c.delete(f"/v1/images/{new_id}"), 404)
        problem(c.get(f"/v1/images/{new_id}/thumbnail"), 404)
        assert c.get("/v1/collection").json()["indexed"] == 40
    assert writable.collection.verify().ok


def test_a_collection_open_for_writing_elsewhere_is_served_writable(demo, tmp_path):
    """The writer lock is taken per write, not for a process's life: a server and another writer share it."""
    copy = demo.copy(tmp_path / "busy")
    with Collection.open(copy, writable=True):  # another process has it open for writing (e.g. `f2b index`)
        with local_client(create_app(copy, preload=False)) as c:
            assert c.get("/v1/collection").json()["writable"] is True
            assert c.post("/v1/images", files={"file": ("a.png", png_bytes(), "image/png")}).status_code == 201
            assert c.post("/v1/search", json={"like": 1, "k": 3}).status_code == 200
    with Collection.open(copy, writable=True) as reopened:
        assert len(reopened) == 41


def test_writes_on_a_read_only_collection_are_409(client, demo):
    assert problem(client.post("/v1/images", files={"file": ("a.png", png_bytes(), "image/png")}), 409)["detail"]
    first = client.post("/v1/search", json={"query": "a", "k": 1}).json()["results"][0]["id"]
    problem(client.delete(f"/v1/images/{first}"), 409)


def test_get_image_thumbnail_and_file(client, demo):
    hit = client.post("/v1/search", json={"query": "a green triangle", "k": 1}).json()["results"][0]
    record = client.get(f"/v1/images/{hit['id']}").json()
    assert record["path"] == hit["path"] and record["size"] == Path(hit["path"]).stat().st_size
    thumb = client.get(hit["thumbnail_url"], params={"size": 32})
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(thumb.content)) as im:
        assert im.format == "JPEG" and max(im.size) <= 32
    again = client.get(hit["thumbnail_url"], params={"size": 32}, headers={"if-none-match": thumb.headers["etag"]})
    assert again.status_code == 304
    original = client.get(record["file_url"])
    assert original.status_code == 200 and original.content == Path(hit["path"]).read_bytes()
    assert original.headers["content-type"] == "image/png"
    problem(client.get(hit["thumbnail_url"], params={"size": 5000}), 422)


@pytest.mark.parametrize("url", [
    "/v1/images/..%2F..%2Fetc%2Fpasswd/thumbnail",
    "/v1/images/..%2F..%2F..%2Fetc%2Fpasswd",
    "/v1/images/%2Fetc%2Fpasswd/file",
    "/v1/images/../../etc/passwd",
    "/v1/images/1/../../../../etc/passwd",
    "/v1/images/-1/thumbnail",
    "/v1/images/99999999999999999999999/file",
    "/v1/images/1e3/file",
    "/static/..%2F..%2F..%2F..%2Fetc%2Fpasswd",
    "/static/../../../../etc/passwd",
    "/static/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "/v1/images/%00/thumbnail",
])
def test_path_traversal_never_serves_files(client, url):
    response = client.get(url)
    assert response.status_code in (404, 422), (url, response.status_code)
    assert "root:" not in response.text
    problem(response, response.status_code)


def test_unknown_id_is_404(client):
    for url in ("/v1/images/987654", "/v1/images/987654/thumbnail", "/v1/images/987654/file"):
        assert "987654" in problem(client.get(url), 404)["detail"]


def test_symlink_swap_or_changed_file_is_not_served(writable, tmp_path):
    with local_client(create_app(writable)) as c:
        # Tamper only with files of this private copy: two uploads kept in its uploads folder.
        ids = [c.post("/v1/images", files={"file": (f"{n}.png", png_bytes(color=(n, 9, 9)), "image/png")}).json()
               ["image"]["id"] for n in (11, 12)]
        paths = [Path(c.get(f"/v1/images/{i}").json()["path"]) for i in ids]
        assert all(c.get(f"/v1/images/{i}/file").status_code == 200 for i in ids)
        secret = tmp_path / "secret.txt"
        secret.write_text("root:x:0:0:secret\n")
        paths[0].unlink()
        paths[0].symlink_to(secret)
        for url in (f"/v1/images/{ids[0]}/file", f"/v1/images/{ids[0]}/thumbnail"):
            response = c.get(url)
            assert "changed on disk" in problem(response, 404)["detail"] and "root:" not in response.text
        paths[1].write_bytes(png_bytes(color=(1, 2, 3)))
        problem(c.get(f"/v1/images/{ids[1]}/file"), 404)
        problem(c.get(f"/v1/images/{ids[1]}/thumbnail", params={"size": 64}), 404)


# ------------------------------------------------------------------------------------ answers


def sse_events(text: str) -> list[tuple[str, dict]]:
    events = []
    for block in text.strip().split("\n\n"):
        lines = [ln for ln in block.split("\n") if not ln.startswith(":")]
        if not lines:
            continue
        kind = next(ln[6:].strip() for ln in lines if ln.startswith("event:"))
        data = json.loads("".join(ln[5:].strip() for ln in lines if ln.startswith("data:")))
        events.append((kind, data))
    return events


def test_ask_json_stream_and_get_variant_agree(client):
    image_id = client.post("/v1/search", json={"query": "a circle", "k": 1}).json()["results"][0]["id"]
    question = {"question": "What color is the circle?", "max_new_tokens": 8}
    answer = client.post(f"/v1/images/{image_id}/ask", json=question).json()
    assert answer["id"] == image_id and isinstance(answer["answer"], str)
    streamed = client.post(f"/v1/images/{image_id}/ask", json={**question, "stream": True})
    assert streamed.headers["content-type"].startswith("text/event-stream")
    events = sse_events(streamed.text)
    assert events[-1][0] == "done" and all(kind == "token" for kind, _ in events[:-1])
    assert events[-1][1]["answer"] == answer["answer"]
    assert "".join(d["text"] for k, d in events[:-1]).strip() == answer["answer"]
    got = client.get(f"/v1/images/{image_id}/ask", params=question)
    assert sse_events(got.text)[-1][1]["answer"] == answer["answer"]


def test_ask_errors(client):
    problem(client.post("/v1/images/987654/ask", json={"question": "what?"}), 404)
    problem(client.get("/v1/images/987654/ask", params={"question": "what?"}), 404)
    hit = client.post("/v1/search", json={"query": "a", "k": 1}).json()["results"][0]["id"]
    problem(client.post(f"/v1/images/{hit}/ask", json={"question": "   "}), 422)  # blank: refused by the schema
    problem(client.post(f"/v1/images/{hit}/ask", json={"question": "q", "max_new_tokens": 0}), 422)
    problem(client.post(f"/v1/images/{hit}/ask", json={}), 422)
    problem(client.get(f"/v1/images/{hit}/ask"), 422)


def test_client_leaving_mid_stream_leaves_the_model_usable(service):
    """Over a real socket: the client drops an answer stream after its first line; the model thread
    finishes that generation alone and the next answers are unchanged."""
    live = LiveServer(create_app(service))
    with live as url:
        live.wait_ready()
        image_id = httpx.post(url + "/v1/search", json={"query": "a circle", "k": 1}).json()["results"][0]["id"]
        question = {"question": "What is in the picture?", "max_new_tokens": 64}
        expected = httpx.post(f"{url}/v1/images/{image_id}/ask", json=question).json()["answer"]
        for _ in range(3):
            with httpx.stream("POST", f"{url}/v1/images/{image_id}/ask", json={**question, "stream": True}) as r:
                assert r.headers["content-type"].startswith("text/event-stream")
                assert next(r.iter_lines()).startswith(":")
        assert httpx.post(f"{url}/v1/images/{image_id}/ask", json=question).json()["answer"] == expected
        assert httpx.get(url + "/readyz").status_code == 200


def test_client_leaving_mid_answer_stops_the_generation(service):
    """The answering loop runs in the model thread and stops once its stream is abandoned: a client that
    leaves costs the tokens up to the next piece of text, not the whole answer."""
    import time

    lm_head = service.model.backbone.hf.lm_head
    calls, release = [], threading.Event()

    def hook(*_):
        calls.append(1)
        if len(calls) == 2:
            release.wait(10)  # hold the generation until the client has gone

    live = LiveServer(create_app(service))
    with live as url:
        live.wait_ready()
        image_id = httpx.post(url + "/v1/search", json={"query": "a circle", "k": 1}).json()["results"][0]["id"]
        question = {"question": "Describe the picture in detail.", "max_new_tokens": 200}
        handle = lm_head.register_forward_hook(lambda *_: calls.append(1))
        try:
            httpx.post(f"{url}/v1/images/{image_id}/ask", json=question, timeout=60)
        finally:
            handle.remove()
        whole = len(calls)
        assert whole > 20  # the model does not stop by itself early: leaving has something to save
        calls.clear()
        handle = lm_head.register_forward_hook(hook)
        try:
            with httpx.stream("POST", f"{url}/v1/images/{image_id}/ask", json={**question, "stream": True}) as r:
                assert next(r.iter_lines()).startswith(":")
            time.sleep(1.0)  # the server sees the closed socket (milliseconds; a wide margin)
            release.set()
            httpx.post(f"{url}/v1/images/{image_id}/ask", json={**question, "max_new_tokens": 1}, timeout=60)
        finally:
            handle.remove()
    assert len(calls) < whole  # stopped early (the one-token answer after it adds one call)


# ------------------------------------------------------------------------------------ embed


def test_embed_texts_and_errors(client):
    body = client.post("/v1/embed", json={"texts": ["a red circle", "two blue squares"]}).json()
    assert len(body["embeddings"]) == 2 and all(len(v) == body["dim"] for v in body["embeddings"])
    assert body["model"] and body["strategy"]
    problem(client.post("/v1/embed", json={}), 422)
    problem(client.post("/v1/embed", json={"texts": ["a"], "images": ["b"]}), 422)
    problem(client.post("/v1/embed", json={"texts": ["ok", "  "]}), 422)
    problem(client.post("/v1/embed", json={"texts": ["x"] * 17}), 422)


# ------------------------------------------------------------------------------------ metrics


def test_metrics_count_requests_by_route_template(client):
    client.post("/v1/search", json={"query": "metrics check", "k": 1})
    client.get("/v1/images/987654")
    text = client.get("/metrics").text
    assert '# TYPE f2b_http_requests_total counter' in text
    assert 'f2b_http_requests_total{method="GET",route="/v1/images/{image_id}",status="404"}' in text
    assert 'f2b_searches_total{kind="text"}' in text
    assert "f2b_http_request_duration_seconds_bucket{" in text and 'le="+Inf"' in text
    assert "f2b_model_ready 1" in text and "f2b_collection_images 40" in text
    assert "987654" not in text  # raw paths never become labels
    for line in text.splitlines():
        assert line.startswith("#") or len(line.rsplit(" ", 1)) == 2


# ------------------------------------------------------------------------------------ security


def test_api_key_guards_writes_and_optionally_reads(service):
    with local_client(create_app(service, api_key="s3cret")) as c:
        body = problem(c.post("/v1/images", files={"file": ("a.png", png_bytes(), "image/png")}), 401)
        assert "X-API-Key" in body["detail"]
        assert "bearer" in c.post("/v1/images", files={"file": ("a.png", png_bytes(), "image/png")}).headers[
            "www-authenticate"].lower()
        problem(c.delete("/v1/images/1", headers={"X-API-Key": "wrong"}), 403)
        problem(c.delete("/v1/images/1", headers={"Authorization": "Bearer wrong"}), 403)
        # With the key the request gets past auth (and meets the read-only collection: 409).
        problem(c.delete("/v1/images/1", headers={"X-API-Key": "s3cret"}), 409)
        problem(c.delete("/v1/images/1", headers={"Authorization": "Bearer s3cret"}), 409)
        assert c.post("/v1/search", json={"query": "a", "k": 1}).status_code == 200
        assert "X-API-Key" in json.dumps(c.get("/openapi.json").json()["components"]["securitySchemes"])
    with local_client(create_app(service, api_key="s3cret", protect_reads=True)) as c:
        problem(c.post("/v1/search", json={"query": "a", "k": 1}), 401)
        problem(c.get("/v1/collection"), 401)
        problem(c.get("/metrics"), 401)
        problem(c.get("/v1/images/1/thumbnail", headers={"X-API-Key": "nope"}), 403)
        assert c.post("/v1/search", json={"query": "a", "k": 1}, headers={"X-API-Key": "s3cret"}).status_code == 200
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
        assert c.get("/").status_code == 200


def test_cors_is_off_unless_configured(service):
    origin = {"Origin": "http://example.test"}
    with local_client(create_app(service)) as c:
        assert "access-control-allow-origin" not in c.get("/healthz", headers=origin).headers
    with local_client(create_app(service, cors_origins=["http://example.test"])) as c:
        assert c.get("/healthz", headers=origin).headers["access-control-allow-origin"] == "http://example.test"
        other = c.get("/healthz", headers={"Origin": "http://evil.test"})
        assert "access-control-allow-origin" not in other.headers


def test_loopback_check():
    assert is_loopback("127.0.0.1") and is_loopback("127.8.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2") and not is_loopback("example.com")


def test_unexpected_errors_are_500_problems_without_internals(service):
    app = create_app(service)

    @app.get("/boom")
    def boom():
        raise RuntimeError("secret internal state /etc/shadow")

    with local_client(app, raise_server_exceptions=False) as c:
        response = c.get("/boom")
        body = problem(response, 500)
        assert "secret" not in response.text and "shadow" not in response.text
        assert "server log" in body["detail"]
        problem(c.get("/no/such/route"), 404)
        problem(c.put("/v1/search", json={}), 405)


# ------------------------------------------------------------------------------------ readiness


class _GatedService:
    """A real service whose model load waits for a signal (or fails), to observe the loading window."""

    def __init__(self, inner, gate: threading.Event, fail: bool = False):
        self._inner, self._gate, self._fail = inner, gate, fail

    def preload(self):
        self._gate.wait(30)
        if self._fail:
            raise RuntimeError("weights file is corrupt")
        self._inner.preload()

    def __getattr__(self, name):
        return getattr(self._inner, name)


def test_not_ready_is_503_until_the_model_loads(service):
    gate = threading.Event()
    with local_client(create_app(_GatedService(service, gate))) as c:
        assert c.get("/healthz").status_code == 200
        waiting = c.get("/readyz")
        assert waiting.status_code == 503 and waiting.json()["status"] == "loading"
        body = problem(c.post("/v1/search", json={"query": "a red circle"}), 503)
        assert "loading" in body["detail"]
        assert c.post("/v1/search", json={"query": "a red circle"}).headers["retry-after"]
        problem(c.post("/v1/embed", json={"texts": ["a"]}), 503)
        # Searches that need no model work while it loads.
        first = c.post("/v1/search", json={"like": 1, "k": 2})
        assert first.status_code in (200, 404)
        gate.set()
        for _ in range(200):
            if c.get("/readyz").status_code == 200:
                break
            threading.Event().wait(0.05)
        assert c.get("/readyz").json()["status"] == "ready"
        assert c.post("/v1/search", json={"query": "a red circle", "k": 2}).status_code == 200


def test_failed_model_load_is_reported(service):
    gate = threading.Event()
    gate.set()
    with local_client(create_app(_GatedService(service, gate, fail=True))) as c:
        for _ in range(200):
            if c.get("/readyz").json()["status"] != "loading":
                break
            threading.Event().wait(0.02)
        ready = c.get("/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "failed"
        assert "corrupt" in ready.json()["detail"]
        assert "corrupt" in problem(c.post("/v1/search", json={"query": "x"}), 503)["detail"]


# ------------------------------------------------------------------------------------ concurrency


def test_concurrent_searches_match_sequential_ones(client):
    queries = [f"a {c} {s}" for c in ("red", "blue", "green", "yellow") for s in ("circle", "square", "triangle")]
    expected = {q: client.post("/v1/search", json={"query": q, "k": 5}).json()["results"] for q in queries}
    with ThreadPoolExecutor(12) as pool:
        got = list(pool.map(lambda q: (q, client.post("/v1/search", json={"query": q, "k": 5}).json()["results"]),
                            queries * 3))
    for q, results in got:
        assert [h["id"] for h in results] == [h["id"] for h in expected[q]]
        assert [h["score"] for h in results] == pytest.approx([h["score"] for h in expected[q]], abs=1e-4)


def test_concurrent_uploads_and_reads_keep_the_collection_whole(writable):
    with local_client(create_app(writable)) as c:
        colors = [(i * 37 % 256, i * 91 % 256, i * 53 % 256) for i in range(8)]
        payloads = [png_bytes(color=col) for col in colors] + [png_bytes(color=colors[0])]

        def upload(data):
            return c.post("/v1/images", files={"file": ("u.png", data, "image/png")}).status_code

        def read(_):
            return c.post("/v1/search", json={"query": "a shape", "k": 3}).status_code

        with ThreadPoolExecutor(8) as pool:
            ups = pool.map(upload, payloads)
            reads = pool.map(read, range(12))
            statuses, read_statuses = list(ups), list(reads)
        assert sorted(statuses) == [201] * 8 + [409]
        assert set(read_statuses) == {200}
        assert c.get("/v1/collection").json()["indexed"] == 48
    assert writable.collection.verify().ok


# ------------------------------------------------------------------------------------ OpenAPI


def test_openapi_documents_every_route_with_examples_and_problems(client):
    schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    for path, method in [("/healthz", "get"), ("/readyz", "get"), ("/v1/collection", "get"), ("/v1/search", "post"),
                         ("/v1/search/image", "post"), ("/v1/images", "post"), ("/v1/images/{image_id}", "get"),
                         ("/v1/images/{image_id}", "delete"), ("/v1/images/{image_id}/thumbnail", "get"),
                         ("/v1/images/{image_id}/file", "get"), ("/v1/images/{image_id}/ask", "post"),
                         ("/v1/images/{image_id}/ask", "get"), ("/v1/embed", "post"), ("/metrics", "get")]:
        assert method in paths[path], (path, method)
    assert "application/problem+json" in paths["/v1/search"]["post"]["responses"]["422"]["content"]
    assert {"413", "415"} <= set(paths["/v1/images"]["post"]["responses"])
    assert schema["components"]["schemas"]["SearchRequest"]["examples"]
    assert "text/event-stream" in paths["/v1/images/{image_id}/ask"]["post"]["responses"]["200"]["content"]
    assert os.environ.get("HF_HUB_OFFLINE") == "1"


def test_openapi_tells_the_truth_about_bodies_events_and_statuses(client):
    schema = client.get("/openapi.json").json()
    components, paths = schema["components"]["schemas"], schema["paths"]
    search = components["SearchRequest"]
    assert search["oneOf"] == [{"required": ["query"]}, {"required": ["embedding"]}, {"required": ["like"]}]
    assert components["EmbedRequest"]["oneOf"] == [{"required": ["texts"]}, {"required": ["images"]}]
    assert "default" not in search["properties"]["query"] and search["properties"]["query"]["type"] == "string"
    vector = search["properties"]["embedding"]
    assert vector["minItems"] == vector["maxItems"] == 64 and vector["contains"] == {"not": {"const": 0}}
    example = next(e for e in search["examples"] if "embedding" in e)  # the schema's own example works
    assert client.post("/v1/search", json=example).status_code == 200
    assert search["properties"]["filter"]["anyOf"][0]["patternProperties"]
    # Server-sent events: one schema per event, with the JSON schema of its data.
    events = paths["/v1/images/{image_id}/ask"]["get"]["responses"]["200"]["content"]
    assert list(events) == ["text/event-stream"]
    names = [e["properties"]["event"]["const"] for e in events["text/event-stream"]["schema"]["oneOf"]]
    assert names == ["token", "done", "error"]
    # Uploads are images; the multipart filter is the same JSON object as in /v1/search.
    upload = paths["/v1/search/image"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert upload["encoding"]["file"]["contentType"].startswith("image/png") and \
        upload["encoding"]["filter"]["contentType"] == "application/json"
    # Statuses every route can give: a Host it does not answer to (400), a cross-site write (403).
    for path, item in paths.items():
        for method, operation in item.items():
            assert path in ("/healthz", "/readyz") or "400" in operation["responses"], (method, path)
            assert method == "get" or "403" in operation["responses"], (method, path)
    assert "503" in paths["/v1/embed"]["post"]["responses"] and "413" in paths["/v1/embed"]["post"]["responses"]
