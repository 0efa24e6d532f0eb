"""Issue 23, ecosystem conventions: an OpenAI-compatible POST /v1/embeddings (texts; images as data URLs and
stored images as id:N, a documented extension) against its documented shape, and /metrics names that
follow Prometheus' conventions. Through HTTP on the shared demo collection (tiny model)."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from fwd2bot_index.api import create_app

LOCAL = "http://127.0.0.1:8000"


@pytest.fixture(scope="module")
def client(service):
    with TestClient(create_app(service), base_url=LOCAL) as c:
        c.get("/readyz")
        yield c


def _data_url(color=(200, 30, 30)) -> tuple[str, Image.Image]:
    picture = Image.new("RGB", (48, 40), color)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode(), picture


def test_embeddings_have_openais_shape_and_the_models_vectors(client, service):
    model = str(service.model_name)
    one = client.post("/v1/embeddings", json={"model": model, "input": "a red circle"})
    assert one.status_code == 200, one.text
    body = one.json()
    assert body["object"] == "list" and body["model"] == model and len(body["data"]) == 1
    assert body["data"][0]["object"] == "embedding" and body["data"][0]["index"] == 0
    assert np.allclose(body["data"][0]["embedding"], service.encode_texts(["a red circle"])[0], atol=1e-5)
    usage = body["usage"]
    assert usage["prompt_tokens"] == usage["total_tokens"] > 0

    url, picture = _data_url()
    mixed = client.post("/v1/embeddings", json={"model": model, "input": ["two shapes", url, "id:3"]}).json()
    assert [d["index"] for d in mixed["data"]] == [0, 1, 2]
    vectors = np.array([d["embedding"] for d in mixed["data"]], dtype=np.float32)
    assert np.allclose(vectors[0], service.encode_texts(["two shapes"])[0], atol=1e-5)
    assert np.allclose(vectors[1], service.encode_images([picture])[0], atol=1e-4)
    assert np.allclose(vectors[2], service.query_vector(like=3), atol=1e-6)  # the stored embedding
    assert mixed["usage"]["prompt_tokens"] < usage["prompt_tokens"] + 10  # only the text counts

    packed = client.post("/v1/embeddings", json={"model": model, "input": ["two shapes"],
                                                 "encoding_format": "base64", "user": "ignored"}).json()
    decoded = np.frombuffer(base64.b64decode(packed["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(decoded, vectors[0], atol=1e-6)


@pytest.mark.parametrize(("body", "status", "needle"), [
    ({"model": "text-embedding-3-small", "input": "x"}, 404, "is not served here"),
    ({"model": "MODEL", "input": []}, 422, ""),
    ({"model": "MODEL", "input": ["ok", "  "]}, 422, ""),
    ({"model": "MODEL", "input": "data:image/png;base64,@@@"}, 400, "base64"),
    ({"model": "MODEL", "input": "id:999999"}, 404, "no image with id 999999"),
    ({"model": "MODEL", "input": "x", "dimensions": 7}, 400, "not truncated"),
    ({"model": "MODEL", "input": [[1, 2, 3]]}, 422, ""),
])
def test_embeddings_refusals(client, service, body, status, needle):
    body = {**body, "model": str(service.model_name) if body["model"] == "MODEL" else body["model"]}
    refused = client.post("/v1/embeddings", json=body)
    assert refused.status_code == status, refused.text
    assert needle in refused.json().get("detail", "") or not needle


def test_embeddings_are_in_the_openapi_document(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert "post" in paths["/v1/embeddings"]


def test_metrics_follow_prometheus_naming(client):
    client.post("/v1/search", json={"query": "a red circle", "k": 2})
    text = client.get("/metrics").text
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    assert len(types) >= 10
    for name, kind in types.items():
        assert re.fullmatch(r"f2b_[a-z0-9_]+", name), name
        assert (kind == "counter") == name.endswith("_total"), f"{name} is a {kind}"
        assert not re.search(r"_(ms|milliseconds|kb|mb|minutes)(_|$)", name), f"{name}: use base units"
        if kind == "histogram" and ("latency" in name or "duration" in name):
            assert name.endswith("_seconds"), name
    for counted in ("f2b_model_queue_refused_total", "f2b_model_text_turns_total", "f2b_model_answers_total",
                    "f2b_http_requests_total", "f2b_searches_total"):
        assert types.get(counted) == "counter", counted
    samples = {line.split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    assert all(s.split("{")[0].removesuffix("_bucket").removesuffix("_sum").removesuffix("_count") in types
               for s in samples), "every sample belongs to a declared metric"
