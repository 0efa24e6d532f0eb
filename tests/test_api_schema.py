"""schemathesis against the running server's own /openapi.json, with every check: no mismatch.

``schemathesis run --checks all`` over real HTTP on a loopback port, all four phases (the schema's
examples, boundary "coverage" cases, random fuzzing, and stateful sequences such as upload -> get ->
delete -> get), valid and invalid requests. Every check must pass: no 5xx, every status documented,
bodies and headers as documented (server-sent events included), valid requests accepted, invalid ones
refused, ``Allow`` right on OPTIONS and 405. It runs on a private writable copy of the demo collection
(the generated requests upload and delete), deterministically, and the collection must verify after.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fwd2bot_index.api import create_app
from fwd2bot_index.api.testing import LiveServer, demo_collection
from fwd2bot_index.service import open_service

HOOKS = Path(__file__).with_name("schemathesis_hooks.py")  # uploads are real images, not random bytes


@pytest.mark.slow
def test_schemathesis_all_checks_find_no_mismatch(tmp_path_factory):
    demo = demo_collection(tmp_path_factory.getbasetemp() / "api-demo", n=40, seed=0)
    work = tmp_path_factory.mktemp("schema")
    copy = demo.copy(work / "collection")
    with open_service(collection=copy, model=str(demo.model_dir), writable=True) as service:
        live = LiveServer(create_app(service, max_upload_bytes=256 * 1024, max_pixels=1_000_000))
        with live as url:
            live.wait_ready()
            run = subprocess.run(
                [sys.executable, "-m", "schemathesis.cli", "run", f"{url}/openapi.json", "--checks", "all",
                 "--phases", "examples,coverage,fuzzing,stateful", "--max-examples", "8", "--workers", "1",
                 "--generation-deterministic", "--continue-on-failure", "--request-timeout", "60", "--no-color"],
                cwd=work, env={**os.environ, "SCHEMATHESIS_HOOKS": str(HOOKS)}, capture_output=True, text=True,
                timeout=600)
        assert service.collection.verify().ok, "generated requests left the collection inconsistent"
    report = run.stdout + run.stderr
    assert run.returncode == 0, report[-6000:]
    assert "No issues found" in report and "15 selected" in report, report[-3000:]  # 15: with POST /v1/embeddings
