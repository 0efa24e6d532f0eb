"""schemathesis against the app's own OpenAPI schema: generated requests never get a 5xx.

Runs on a private writable copy of the demo collection (the generated requests upload and delete),
with a bounded, deterministic number of examples per operation.
"""

from __future__ import annotations

import time

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from fwd2bot_index.api import create_app
from fwd2bot_index.api.testing import demo_collection
from fwd2bot_index.service import open_service

EXAMPLES = 25  # per operation and mode; derandomized, so every run sends the same requests


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory):
    demo = demo_collection(tmp_path_factory.getbasetemp() / "api-demo", n=40, seed=0)
    copy = demo.copy(tmp_path_factory.mktemp("schema") / "collection")
    with open_service(collection=copy, model=str(demo.model_dir), writable=True) as service:
        app = create_app(service, max_upload_bytes=256 * 1024, max_pixels=1_000_000)
        with TestClient(app) as client:  # runs the lifespan: the model loads once, before the first case
            deadline = time.monotonic() + 60
            while client.get("/readyz").status_code != 200:
                assert time.monotonic() < deadline, "the model did not load"
                time.sleep(0.05)
            yield schemathesis.openapi.from_asgi("/openapi.json", app)
        assert service.collection.verify().ok, "generated requests left the collection inconsistent"


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
def test_generated_requests_never_get_a_server_error(api_schema, mode):
    """Every operation, valid and invalid generated requests: no 5xx (the reproducer is printed)."""
    failures: list[str] = []
    tried: list[str] = []
    for result in api_schema.get_all_operations():
        operation = result.ok()
        tried.append(operation.label)

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
        def run(case):
            response = case.call()
            if response.status_code >= 500:
                failures.append(f"{operation.label}: {response.status_code} {response.text[:300]}\n"
                                f"  reproduce: {case.as_curl_command()}")

        try:
            run()
        except Unsatisfiable:
            assert mode is GenerationMode.NEGATIVE, operation.label  # nothing to get wrong (no input)
    assert len(tried) >= 14, tried
    assert not failures, "\n".join(failures[:10])
