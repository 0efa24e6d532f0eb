"""The `f2b` command line, end to end, in-process (typer's runner) and as a real killed subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fwd2bot_index import __version__
from fwd2bot_index.cli.main import app
from fwd2bot_index.collection import Collection
from fwd2bot_index.model.tiny import TinySpec, save_tiny_llava
from fwd2bot_index.synthetic import write_demo_data

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llava(tmp_path_factory.mktemp("m") / "tiny64", TinySpec(image_size=64), seed=0)


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, model_dir):
    root = tmp_path_factory.mktemp("cli")
    write_demo_data(root / "data", n=16, seed=1)
    (root / "data" / "images" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    coll = root / "coll"
    result = runner.invoke(app, ["index", str(root / "data" / "images"), "--collection", str(coll),
                                 "--model", str(model_dir), "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    return root, coll


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and __version__ in result.stdout


def test_index_json_report(indexed):
    root, coll = indexed
    result = runner.invoke(app, ["index", str(root / "data" / "images"), "--collection", str(coll), "--json"])
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    # the broken file is not "unchanged": it is still failing, and said so (issue 14)
    assert report["indexed"] == 0 and report["unchanged"] == 16 and len(report["still_failing"]) == 1


def test_search_json_is_only_the_hit_list(indexed):
    _, coll = indexed
    result = runner.invoke(app, ["search", "a small blue square", "--collection", str(coll), "-k", "4", "--json"])
    assert result.exit_code == 0, result.output
    hits = json.loads(result.stdout)
    assert len(hits) == 4
    assert all(set(h) == {"id", "path", "score"} and isinstance(h["id"], int) for h in hits)
    assert all(os.path.isabs(h["path"]) for h in hits)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    empty = runner.invoke(app, ["search", "x", "--collection", str(coll), "--min-score", "2", "--json"])
    assert empty.exit_code == 0 and json.loads(empty.stdout) == []


def test_search_by_image_and_filter(indexed):
    root, coll = indexed
    image = root / "data" / "images" / "000003.png"
    result = runner.invoke(app, ["search", "--image", str(image), "--collection", str(coll), "-k", "1", "--json"])
    assert json.loads(result.stdout)[0]["path"] == str(image)
    bad = runner.invoke(app, ["search", "x", "--collection", str(coll), "--filter", "novalue"])
    assert bad.exit_code == 2 and "--filter" in bad.output


def test_ask_and_info_and_verify(indexed):
    _, coll = indexed
    result = runner.invoke(app, ["ask", "1", "what color?", "--collection", str(coll), "--json",
                                 "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert answer["id"] == 1 and isinstance(answer["answer"], str)
    info = json.loads(runner.invoke(app, ["info", "--collection", str(coll), "--json"]).stdout)
    assert {"indexed", "failed", "model", "strategy", "bytes_per_image"} <= set(info)
    assert info["indexed"] == 16 and info["failed"] == 1
    text = runner.invoke(app, ["info", "--collection", str(coll)]).stdout
    assert "16" in text
    assert runner.invoke(app, ["verify", "--collection", str(coll)]).exit_code == 0


def test_user_errors_are_one_clear_line(tmp_path, indexed):
    result = runner.invoke(app, ["search", "x", "--collection", str(tmp_path / "none")])
    assert result.exit_code == 1 and "no collection at" in result.output and "Traceback" not in result.output
    _, coll = indexed
    missing = runner.invoke(app, ["ask", "4242", "what?", "--collection", str(coll)])
    assert missing.exit_code == 1 and "not in the collection" in missing.output
    nodir = runner.invoke(app, ["index", str(tmp_path / "nope"), "--collection", str(tmp_path / "c2"),
                                "--model", "demo-does-not-exist-here"])
    # an unknown model is a bad argument, refused before anything is created (issue 14)
    assert nodir.exit_code == 2 and "Traceback" not in nodir.output and not (tmp_path / "c2").exists()


def test_verify_fails_when_tokens_are_lost(tmp_path, model_dir):
    write_demo_data(tmp_path / "d", n=4, seed=2)
    coll = tmp_path / "c"
    assert runner.invoke(app, ["index", str(tmp_path / "d" / "images"), "-c", str(coll), "-m", str(model_dir)]).exit_code == 0
    for shard in (coll / "tokens").glob("*.arrow"):
        shard.unlink()
    result = runner.invoke(app, ["verify", "-c", str(coll)])
    assert result.exit_code == 1 and "problems" in result.output


def test_sigkill_during_index_then_rerun_is_consistent(tmp_path, model_dir):
    """kill -9 in the middle of `f2b index`: the rerun finishes with every image exactly once."""
    write_demo_data(tmp_path / "d", n=80, seed=4)
    images, coll = tmp_path / "d" / "images", tmp_path / "c"
    cmd = [sys.executable, "-m", "fwd2bot_index.cli", "index", str(images), "-c", str(coll),
           "-m", str(model_dir), "--batch-size", "2", "--device", "cpu"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((coll / "tokens").glob("*.arrow"))) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with Collection.open(coll) as col:
        partial = len(col)
    assert 0 < partial < 80, "the kill should land mid-run"
    # the same command again, in this process: what is checked is the collection it leaves, not a process
    # (a second interpreter importing torch and loading the model cost ~10 s more here)
    rerun = runner.invoke(app, cmd[3:] + ["--json"])
    assert rerun.exit_code == 0, rerun.output
    report = json.loads(rerun.stdout)
    assert report["indexed"] + report["unchanged"] == 80
    with Collection.open(coll) as col:
        assert len(col) == 80 and col.verify().ok
        assert sorted(Path(p).name for p in col.catalog.all_paths()) == sorted(p.name for p in images.iterdir())


def test_backends_agree_through_the_cli(indexed, model_dir, tmp_path):
    """The same images through FAISS HNSW and qdrant-edge give the same top-k as the default."""
    root, coll = indexed
    query = ["search", "a large green star", "-k", "5", "--json"]
    reference = json.loads(runner.invoke(app, query + ["-c", str(coll)]).stdout)
    for name, extra in (("hnsw", ["--faiss-index", "hnsw"]), ("edge", ["--backend", "qdrant-edge"])):
        other = tmp_path / name
        made = runner.invoke(app, ["index", str(root / "data" / "images"), "-c", str(other), "-m", str(model_dir)] + extra)
        assert made.exit_code == 0, made.output
        hits = json.loads(runner.invoke(app, query + ["-c", str(other)]).stdout)
        assert [h["id"] for h in hits] == [h["id"] for h in reference]
        assert [h["score"] for h in hits] == pytest.approx([h["score"] for h in reference], abs=1e-5)


def test_export_parquet_and_migrate_backend(tmp_path, model_dir):
    import pyarrow.parquet as pq

    write_demo_data(tmp_path / "d", n=6, seed=8)
    coll = tmp_path / "c"
    assert runner.invoke(app, ["index", str(tmp_path / "d" / "images"), "-c", str(coll), "-m", str(model_dir)]).exit_code == 0
    before = json.loads(runner.invoke(app, ["search", "a red star", "-c", str(coll), "--json"]).stdout)
    out = runner.invoke(app, ["export", str(tmp_path / "x.parquet"), "-c", str(coll), "--json"])
    assert out.exit_code == 0 and json.loads(out.stdout)["rows"] == 6
    table = pq.read_table(tmp_path / "x.parquet")
    assert table.num_rows == 6 and {"id", "path", "embedding"} <= set(table.column_names)
    moved = runner.invoke(app, ["migrate", "--backend", "qdrant-edge", "-c", str(coll)])
    assert moved.exit_code == 0 and "verified" in moved.stdout
    assert json.loads(runner.invoke(app, ["info", "-c", str(coll), "--json"]).stdout)["backend"] == "qdrant-edge"
    after = json.loads(runner.invoke(app, ["search", "a red star", "-c", str(coll), "--json"]).stdout)
    assert [h["id"] for h in after] == [h["id"] for h in before]
