"""`f2b ask` through a running `f2b serve` of the same collection: the server's model answers, the CLI
loads none; the answer is the one a local run gives, streamed or not; mistakes stay one-line errors."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from fwd2bot_index.cli.main import app
from fwd2bot_index.model.tiny import TinySpec, save_tiny_llava
from fwd2bot_index.synthetic import write_demo_data

runner = CliRunner()


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    root = tmp_path_factory.mktemp("remote-ask")
    model_dir = save_tiny_llava(root / "tiny64", TinySpec(image_size=64), seed=0)
    write_demo_data(root / "d", n=6, seed=3)
    coll = root / "c"
    result = runner.invoke(app, ["index", str(root / "d" / "images"), "-c", str(coll), "-m", str(model_dir),
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return coll, model_dir, sorted((root / "d" / "images").iterdir())


def test_ask_goes_through_a_running_server(indexed, tmp_path, monkeypatch):
    from fwd2bot_index.api import make_server
    from fwd2bot_index.api.testing import LiveServer, free_port
    from fwd2bot_index.cli.remote import announce

    coll, model_dir, files = indexed
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    question = ["what color is the circle?", "-c", str(coll), "--max-new-tokens", "6"]
    local = runner.invoke(app, ["ask", "2", *question, "--json"])
    local_stream = runner.invoke(app, ["ask", "2", *question, "--stream"])
    assert local.exit_code == 0 and "answered by" not in local.stderr, local.output
    expected = json.loads(local.stdout)
    assert expected["answer"]  # a random model's answer, but not empty: the comparisons below have teeth
    assert local_stream.stdout.strip() == expected["answer"]
    port = free_port()
    live = LiveServer(server=make_server(coll, model=str(model_dir), port=port, writable=False, log_level="warning"))
    with live, announce(coll, "127.0.0.1", port):
        live.wait_ready()
        served = runner.invoke(app, ["ask", "2", *question, "--json"])
        by_path = runner.invoke(app, ["ask", str(expected["path"]), *question])
        streamed = runner.invoke(app, ["ask", "2", *question, "--stream"])
        forced = runner.invoke(app, ["ask", "2", *question, "--local"])
        unknown = runner.invoke(app, ["ask", "999", *question])
        blank = runner.invoke(app, ["ask", "2", "  ", "-c", str(coll)])
    assert served.exit_code == 0 and "answered by the running f2b serve" in served.stderr, served.output
    assert json.loads(served.stdout) == expected  # same id, path, question and answer
    assert by_path.exit_code == 0 and by_path.stdout.strip() == expected["answer"]
    assert streamed.exit_code == 0 and "answered by" in streamed.stderr
    assert streamed.stdout.strip() == expected["answer"]
    assert forced.exit_code == 0 and "answered by" not in forced.stderr
    assert forced.stdout.strip() == expected["answer"]
    for bad, words in ((unknown, "999"), (blank, "the question is empty")):
        assert bad.exit_code == 1 and words in bad.stderr and "Traceback" not in bad.output
        assert len(bad.stderr.strip().splitlines()) == 1
    assert "no image with id 999" in unknown.stderr  # the server's own 404, one line
