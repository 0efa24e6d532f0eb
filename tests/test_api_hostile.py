"""Hostile requests over real HTTP (uvicorn on a loopback port, the real app and collection): images of
extreme shape are 413 before decoding, many-key and deep JSON bodies are 422 before parsing while
/healthz keeps answering, and a second Host header is 400.

No timed assertions: "in flight" is made a state the test controls (the body is sent in two parts over a
raw socket, and /healthz is asked in between).
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
from pathlib import Path

import httpx
import pytest
from PIL import Image

from fwd2bot_index.api import create_app
from fwd2bot_index.api.testing import LiveServer

from .test_hostile_images import HOSTILE, flat_png

DEADLINE = 60.0


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("hostile-api")
    return [flat_png(folder / f"wide-{w}x{h}.png", w, h) for w, h in HOSTILE]


def _raw(url: str, request: bytes) -> tuple[int, bytes]:
    """Send ``request`` as is on a new connection; the status and body of the answer (read to the close)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=DEADLINE) as sock:
        sock.sendall(request)
        return _answer(sock)


def _answer(sock: socket.socket) -> tuple[int, bytes]:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def _kind(body: bytes) -> str:
    return json.loads(body)["type"].rsplit("/", 1)[-1]


def test_extreme_images_are_413_on_upload_image_search_and_embed(writable, hostile):
    before = len(writable.collection)
    with LiveServer(create_app(writable)) as url:
        for path in hostile:
            files = {"file": (path.name, path.read_bytes(), "image/png")}
            for route in ("/v1/images", "/v1/search/image"):
                answer = httpx.post(url + route, files=files, timeout=DEADLINE)
                assert answer.status_code == 413, (route, answer.text)
                assert answer.headers["content-type"] == "application/problem+json"
                assert _kind(answer.content) == "image-too-large" and "too elongated" in answer.json()["detail"]
            embed = httpx.post(url + "/v1/embed", json={"images": [base64.b64encode(path.read_bytes()).decode()]},
                               timeout=DEADLINE)
            assert embed.status_code == 413 and "too elongated" in embed.json()["detail"]
        assert httpx.get(url + "/healthz", timeout=DEADLINE).status_code == 200
    assert len(writable.collection) == before  # nothing was added
    assert not list((Path(writable.collection.path) / "uploads").glob("*.png"))


def test_healthz_answers_while_a_many_key_body_is_in_flight(service):
    body = json.dumps({f"k{i:06d}": 1 for i in range(500_000)}).encode()  # ~7 MB, 500,000 unknown keys
    with LiveServer(create_app(service)) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=DEADLINE) as sock:
            sock.sendall(b"POST /v1/search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body))
            sock.sendall(body[:-1024])  # the body is in flight: most of it sent, the server still reading
            assert httpx.get(url + "/healthz", timeout=DEADLINE).status_code == 200
            sock.sendall(body[-1024:])
            assert httpx.get(url + "/healthz", timeout=DEADLINE).status_code == 200
            status, answer = _answer(sock)
        assert status == 422 and _kind(answer) == "json-too-complex"
        assert "1,000 keys" in json.loads(answer)["detail"]
        deep = httpx.post(url + "/v1/search", content=b"[" * 5000 + b"]" * 5000,
                          headers={"content-type": "application/json"}, timeout=DEADLINE)
        assert deep.status_code == 422 and _kind(deep.content) == "json-too-complex"
        # ordinary bodies still work, small (parsed inline) and large (parsed on a worker thread)
        ok = httpx.post(url + "/v1/search", json={"query": "a red circle", "k": 2, "filter": {"split": ["train", "test"]}},
                        timeout=DEADLINE)
        assert ok.status_code == 200 and len(ok.json()["results"]) <= 2
        noise = io.BytesIO()
        Image.frombytes("RGB", (96, 96), os.urandom(96 * 96 * 3)).save(noise, format="PNG")
        big = {"images": [base64.b64encode(noise.getvalue()).decode()]}
        assert len(json.dumps(big)) > 16 * 1024
        embedded = httpx.post(url + "/v1/embed", json=big, timeout=DEADLINE)
        assert embedded.status_code == 200 and len(embedded.json()["embeddings"]) == 1
        # a body that is not JSON at all keeps FastAPI's own answer
        broken = httpx.post(url + "/v1/search", content=b'{"query": ', headers={"content-type": "application/json"},
                            timeout=DEADLINE)
        assert broken.status_code == 422


@pytest.mark.parametrize("path", ["/v1/images/1", "/healthz"])
def test_two_host_headers_are_400(service, path):
    with LiveServer(create_app(service)) as url:
        port = url.rsplit(":", 1)[1].encode()
        status, body = _raw(url, b"GET %s HTTP/1.1\r\nHost: evil.example\r\nHost: 127.0.0.1:%s\r\n"
                                 b"Connection: close\r\n\r\n" % (path.encode(), port))
        assert status == 400 and _kind(body) == "duplicate-host"
        single, _ = _raw(url, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:%s\r\nConnection: close\r\n\r\n" % port)
        assert single == 200
