"""Browser attacks on a key-less local server, refused: DNS rebinding (Host) and cross-site writes (Origin).

Also OPTIONS and 405 answers that list every method of a path in ``Allow``.
"""

from __future__ import annotations

import io

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from fwd2bot_index.api import create_app, make_server
from fwd2bot_index.api.testing import LiveServer, free_port

LOCAL = "http://127.0.0.1:8000"
EVIL = {"Origin": "https://evil.example"}


def png(color=(200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (40, 32), color).save(out, format="PNG")
    return out.getvalue()


def upload(c, color, **headers):
    return c.post("/v1/images", files={"file": ("x.png", png(color), "image/png")}, headers=headers)


def test_dns_rebinding_host_is_refused_before_anything_runs(writable):
    with TestClient(create_app(writable), base_url=LOCAL) as c:
        first = c.post("/v1/search", json={"query": "a circle", "k": 1}).json()["results"][0]["id"]
        rebind = {"Host": "rebind.evil.example"}
        for response in (c.get("/v1/collection", headers=rebind), c.get(f"/v1/images/{first}/file", headers=rebind),
                         c.get(f"/v1/images/{first}", headers=rebind), c.delete(f"/v1/images/{first}", headers=rebind),
                         c.post("/v1/search", json={"like": first}, headers=rebind), c.get("/", headers=rebind),
                         upload(c, (1, 2, 3), **rebind)):
            assert response.status_code == 400, response.text
            body = response.json()
            assert body["type"].endswith("/host-not-allowed") and "--allowed-host rebind.evil.example" in body["detail"]
        assert c.get(f"/v1/images/{first}").status_code == 200 and c.get("/v1/collection").json()["indexed"] == 40
        # Probes answer any Host (orchestrators probe by IP) and reveal nothing.
        assert c.get("/healthz", headers=rebind).status_code == 200
        # The loopback names, with or without a port, are this server; so is any IP address (a browser sends
        # one only for a page loaded from that address: nothing to rebind).
        for host in ("localhost", "localhost:8000", "127.0.0.1", "[::1]:8000", "192.168.1.20:8000", "[fe80::1]"):
            assert c.get("/v1/collection", headers={"Host": host}).status_code == 200, host


def test_cross_site_writes_are_refused_and_same_origin_ones_pass(writable):
    with TestClient(create_app(writable), base_url=LOCAL) as c:
        refused = upload(c, (9, 9, 9), **EVIL)  # a multipart form posted by a page on evil.example
        assert refused.status_code == 403 and refused.json()["type"].endswith("/cross-origin-refused")
        assert "https://evil.example" in refused.json()["detail"]
        first = c.post("/v1/search", json={"query": "a circle", "k": 1}).json()["results"][0]["id"]
        for origin in ("null", "http://127.0.0.1:3000", "http://localhost:8000", "file://",
                       "http://127.0.0.1:8000.evil.example"):
            assert c.delete(f"/v1/images/{first}", headers={"Origin": origin}).status_code == 403, origin
            assert c.post("/v1/embed", json={"texts": ["x"]}, headers={"Origin": origin}).status_code == 403, origin
        assert c.get("/v1/collection").json()["indexed"] == 40  # nothing was added or removed
        # Reads are not changes; the browser keeps their answers from the other page (no CORS).
        assert c.get("/v1/collection", headers=EVIL).status_code == 200
        # The server's own page, and clients that send no Origin (curl, scripts), may change things.
        assert upload(c, (10, 20, 30), Origin="http://127.0.0.1:8000").status_code == 201
        assert upload(c, (11, 21, 31)).status_code == 201
        assert c.delete(f"/v1/images/{first}", headers={"Origin": "http://127.0.0.1:8000"}).status_code == 204
        assert c.get("/v1/collection").json()["indexed"] == 41


def test_allowed_hosts_and_cors_origins_for_a_reverse_proxy(writable):
    app = create_app(writable, allowed_hosts=["photos.example.org", "*.lan"], cors_origins=["https://app.example"])
    with TestClient(app, base_url=LOCAL) as c:
        assert c.get("/v1/collection", headers={"Host": "photos.example.org"}).status_code == 200
        assert c.get("/v1/collection", headers={"Host": "nas.lan:8000"}).status_code == 200
        assert c.get("/v1/collection", headers={"Host": "lan"}).status_code == 400
        assert c.get("/v1/collection", headers={"Host": "evil-lan"}).status_code == 400
        # Behind a TLS proxy that rewrites Host to the upstream address, the public origin is trusted by name.
        assert upload(c, (1, 1, 1), Origin="https://photos.example.org").status_code == 201
        assert upload(c, (2, 2, 2), Origin="https://app.example").status_code == 201  # a CORS origin
        assert upload(c, (3, 3, 3), **EVIL).status_code == 403
        preflight = c.options("/v1/images", headers={"Origin": "https://app.example",
                                                     "Access-Control-Request-Method": "POST"})
        assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == "https://app.example"
    with TestClient(create_app(writable, host="192.168.7.7", allowed_hosts=["*"]), base_url=LOCAL) as c:
        assert c.get("/v1/collection", headers={"Host": "anything.example"}).status_code == 200
        assert upload(c, (4, 4, 4), **EVIL).status_code == 403  # "*" opens Host only, never Origin


def test_make_server_answers_its_own_address_and_refuses_others_over_http(demo):
    port = free_port()
    server = make_server(demo.collection, host="127.0.0.1", port=port, writable=False, log_level="warning",
                         allowed_hosts=["search.internal"])
    live = LiveServer(server=server)
    with live as url:
        assert httpx.get(url + "/v1/collection").status_code == 200
        assert httpx.get(url + "/v1/collection", headers={"Host": "search.internal"}).status_code == 200
        refused = httpx.get(url + "/v1/collection", headers={"Host": "rebind.evil.example"})
        assert refused.status_code == 400 and refused.headers["content-type"] == "application/problem+json"
        assert httpx.post(url + "/v1/search", json={"like": 1}, headers=EVIL).status_code == 403


def test_options_and_405_list_every_method_of_the_path(service):
    with TestClient(create_app(service), base_url=LOCAL) as c:
        options = c.options("/v1/images/7")
        assert options.status_code == 204 and options.headers["allow"] == "DELETE, GET, OPTIONS"
        wrong = c.put("/v1/images/7")
        assert wrong.status_code == 405 and wrong.headers["allow"] == "DELETE, GET, OPTIONS"
        assert wrong.headers["content-type"] == "application/problem+json"
        assert c.options("/v1/images/7/ask").headers["allow"] == "GET, OPTIONS, POST"
        assert c.patch("/v1/search", json={}).headers["allow"] == "OPTIONS, POST"
        assert c.options("/no/such/path").status_code == 404
