"""Issue 14: a new user's first hour with `f2b`. One-line errors before any model loads, no litter,
help that names defaults and values, `remove` by path, summaries that add up, the demo-model warning."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from fwd2bot_index.cli.main import app
from fwd2bot_index.model.tiny import TinySpec, save_tiny_llava
from fwd2bot_index.synthetic import write_demo_data
from fwd2bot_index.synthetic.detect import looks_like_demo_world

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llava(tmp_path_factory.mktemp("m") / "tiny64", TinySpec(image_size=64), seed=0)


def _one_line_error(result, code: int, *needles: str) -> None:
    assert result.exit_code == code, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize(("args", "needles"), [
    (["index", "IMGS", "--backend", "nope"], ["--backend", "nope", "faiss"]),
    (["index", "IMGS", "--device", "tpu"], ["--device", "tpu", "cpu"]),
    (["index", "IMGS", "--dtype", "fp8"], ["--dtype", "fp8", "bf16"]),
    (["index", "IMGS", "--token-dtype", "int4"], ["--token-dtype", "int4", "int8"]),
    (["index", "IMGS", "--faiss-index", "lsh"], ["--faiss-index", "lsh", "hnsw"]),
    (["index", "IMGS", "--strategy", "bogus"], ["--strategy", "bogus"]),
    (["search", "x", "--device", "cuda:7"], ["--device", "cuda:7"]),
    (["migrate", "--backend", "bogus"], ["--backend", "bogus"]),
    (["index", "IMGS", "--model", "someone/not-cached-here"], ["someone/not-cached-here", "HF_HUB_OFFLINE"]),
    (["index", "IMGS", "--model", "./no/such/folder"], ["no such folder"]),
])
def test_bad_options_are_one_line_before_anything_loads(tmp_path, args, needles):
    (tmp_path / "imgs").mkdir()
    args = [str(tmp_path / "imgs") if a == "IMGS" else a for a in args]
    started = time.perf_counter()
    result = runner.invoke(app, args + ["--collection", str(tmp_path / "c")])
    _one_line_error(result, 2, *needles)
    assert not (tmp_path / "c").exists(), "a refused command must not leave a collection folder"
    assert time.perf_counter() - started < 30  # generous: the point is no hub retries (~25 s before)


def test_index_missing_folder_leaves_nothing_and_info_on_empty_collection(tmp_path, model_dir):
    missing = runner.invoke(app, ["index", str(tmp_path / "missing"), "-c", str(tmp_path / "c"), "-m", str(model_dir)])
    _one_line_error(missing, 1, str(tmp_path / "missing"))
    assert not (tmp_path / "c").exists()
    (tmp_path / "empty").mkdir()
    made = runner.invoke(app, ["index", str(tmp_path / "empty"), "-c", str(tmp_path / "c"), "-m", str(model_dir),
                               "--device", "cpu"])
    assert made.exit_code == 0 and "indexed 0 new" in made.stdout
    assert "indexing" not in made.stderr  # no empty progress bar
    info = runner.invoke(app, ["info", "-c", str(tmp_path / "c")])
    assert info.exit_code == 0 and "no images yet" in info.stdout, info.output


def _rendered_help(command: list[str]) -> str:
    result = runner.invoke(app, command + ["--help"], terminal_width=200, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result.stdout


def _all_commands(group=None, prefix=()):
    import click

    group = group or typer.main.get_command(app)
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _all_commands(command, prefix + (name,))
        else:
            yield prefix + (name,), command


def test_help_describes_every_option_without_python_types():
    seen = 0
    for path, command in _all_commands():
        for param in command.params:
            if param.name != "help":
                assert getattr(param, "help", None), f"f2b {' '.join(path)}: {param.name} has no description"
        text = _rendered_help(list(path))
        for leak in ("<bool>", "<str>", "<int", "<float", "<path>", "list[", "<list", "{dirs}", "{ref}", "{text}"):
            assert leak not in text, f"f2b {' '.join(path)} --help shows {leak!r}"
        seen += 1
    assert seen >= 12
    index_help = _rendered_help(["index"])
    assert "./.f2b" in index_help and "F2B_COLLECTION" in index_help and "F2B_MODEL" in index_help
    assert "pool[@N]" in index_help  # rich markup used to eat "[@N]"
    search_help = _rendered_help(["search"])
    assert "--limit" in search_help and "-k" in search_help and "--k " not in search_help


def test_remove_by_path_keeps_the_image_until_its_last_path(tmp_path, model_dir):
    write_demo_data(tmp_path / "d", n=4, seed=2)
    images = tmp_path / "d" / "images"
    shutil.copy(images / "000001.png", images / "copy.png")
    coll = str(tmp_path / "c")
    assert runner.invoke(app, ["index", str(images), "-c", coll, "-m", str(model_dir), "--device", "cpu"]).exit_code == 0
    one = runner.invoke(app, ["remove", str(images / "copy.png"), "-c", coll])
    assert one.exit_code == 0 and "stays under 1 other path" in one.stdout, one.output
    still = runner.invoke(app, ["info", "-c", coll, "--json"])
    assert json.loads(still.stdout)["indexed"] == 4
    kept = runner.invoke(app, ["search", "--like", str(images / "000001.png"), "-c", coll, "--json"])
    assert kept.exit_code == 0, kept.output  # the original path still resolves
    last = runner.invoke(app, ["remove", str(images / "000001.png"), "-c", coll, "--json"])
    data = json.loads(last.stdout)
    assert len(data["removed"]) == 1 and data["details"][0]["image_removed"] is True
    by_id = runner.invoke(app, ["remove", "0", "-c", coll]).output  # ids start at 1 here? either way one line
    assert "Traceback" not in by_id
    gone = runner.invoke(app, ["info", "-c", coll, "--json"])
    assert json.loads(gone.stdout)["indexed"] in (2, 3)


def test_rerun_summary_counts_still_failing_moved_and_pruned(tmp_path, model_dir):
    write_demo_data(tmp_path / "d", n=5, seed=3)
    images = tmp_path / "d" / "images"
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    coll = str(tmp_path / "c")
    args = ["index", str(images), "-c", coll, "-m", str(model_dir), "--device", "cpu"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0 and "1 failed" in first.stdout, first.output
    (images / "000002.png").rename(images / "renamed.png")
    (images / "000003.png").unlink()
    again = runner.invoke(app, args + ["--prune", "--json"])
    report = json.loads(again.stdout)
    assert report["still_failing"][0]["path"].endswith("broken.jpg") and report["failed"] == []
    assert [Path(m["from"]).name for m in report["moved"]] == ["000002.png"] and report["duplicates"] == 0
    assert [Path(p).name for p in report["pruned_paths"]] == ["000003.png"]
    text = runner.invoke(app, args).stdout
    assert "+1 still failing" in text and "0 failed" in text
    search = runner.invoke(app, ["search", "--like", str(images / "renamed.png"), "-c", coll, "-k", "10", "--json"])
    paths = [Path(h["path"]).name for h in json.loads(search.stdout)]
    assert "000002.png" not in paths and "000003.png" not in paths  # no ghosts of moved or vanished files
    # a file rewritten in place with the same bytes (regenerated, copied over) is unchanged, not a duplicate
    (images / "000004.png").write_bytes((images / "000004.png").read_bytes())
    os.utime(images / "000004.png", (1, 1))
    rewritten = json.loads(runner.invoke(app, args + ["--json"]).stdout)
    assert rewritten["duplicates"] == 0 and rewritten["indexed"] == 0 and rewritten["unchanged"] == 4


def test_demo_world_detector_on_generated_scenes_and_photos(tmp_path, write_photo):
    write_demo_data(tmp_path / "a", n=40, seed=11)
    write_demo_data(tmp_path / "b", n=10, seed=12, image_size=160)
    scenes = sorted((tmp_path / "a" / "images").glob("*.png")) + sorted((tmp_path / "b" / "images").glob("*.png"))
    assert all(looks_like_demo_world(Image.open(p)) for p in scenes)  # no false alarm, any --image-size
    photos = [write_photo(tmp_path / f"p{i}.png", size=(64, 64), seed=i) for i in range(5)]
    assert not any(looks_like_demo_world(Image.open(p)) for p in photos)
    assert not looks_like_demo_world(Image.new("RGB", (64, 64), (128, 128, 128)))  # a blank page


def test_index_with_demo_warns_once_on_photos_only(tmp_path, write_photo):
    write_demo_data(tmp_path / "world", n=6, seed=1)
    quiet = runner.invoke(app, ["index", str(tmp_path / "world" / "images"), "-c", str(tmp_path / "c1"),
                                "--device", "cpu"])
    assert quiet.exit_code == 0 and "warning" not in quiet.output, quiet.output
    (tmp_path / "photos").mkdir()
    for i in range(3):
        write_photo(tmp_path / "photos" / f"IMG_{i}.jpg", seed=i)
    loud = runner.invoke(app, ["index", str(tmp_path / "photos"), "-c", str(tmp_path / "c2"), "--device", "cpu"])
    assert loud.exit_code == 0, loud.output
    warnings = [line for line in loud.stderr.splitlines() if line.startswith("warning")]
    assert len(warnings) == 1 and "3 of the 3" in warnings[0] and "--model" in warnings[0], loud.stderr


def test_ctrl_c_during_index_says_what_was_kept(tmp_path, model_dir, interrupt_after_first_commit):
    """SIGINT lands after the first commit and before the end on any machine: the run holds after its
    first commit (test hook) and says so through a marker file, so nothing races with the run's end."""
    write_demo_data(tmp_path / "d", n=12, seed=4)
    coll, marker = tmp_path / "c", tmp_path / "held"
    cmd = [sys.executable, "-m", "fwd2bot_index.cli", "index", str(tmp_path / "d" / "images"), "-c", str(coll),
           "-m", str(model_dir), "--batch-size", "2", "--device", "cpu"]
    returncode, stderr, committed = interrupt_after_first_commit(cmd, marker, {"HF_HUB_OFFLINE": "1"})
    assert returncode == 130, stderr
    assert "Traceback" not in stderr and "run the same command again" in stderr
    assert f"interrupted: {committed} new image(s) were committed and are kept" in stderr, stderr
    rerun = subprocess.run(cmd + ["--json"], env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True,
                           text=True, timeout=300)
    report = json.loads(rerun.stdout)
    assert report["unchanged"] == committed and report["indexed"] == 12 - committed


def test_search_goes_through_a_running_server_and_falls_back(tmp_path, model_dir, monkeypatch):
    """Cold start: with `f2b serve` of the collection running, `f2b search` asks it (same hits as a local
    search); a record left by a dead server is ignored and removed."""
    from fwd2bot_index.api import make_server
    from fwd2bot_index.api.testing import LiveServer, free_port
    from fwd2bot_index.cli.remote import announce, find_server

    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    write_demo_data(tmp_path / "d", n=12, seed=6)
    coll = tmp_path / "c"
    assert runner.invoke(app, ["index", str(tmp_path / "d" / "images"), "-c", str(coll), "-m", str(model_dir),
                               "--device", "cpu"]).exit_code == 0
    query = ["search", "a red circle", "-c", str(coll), "-k", "5", "--json"]
    local = runner.invoke(app, query + ["--local"])
    assert local.exit_code == 0 and "answered by" not in local.stderr
    port = free_port()
    live = LiveServer(server=make_server(coll, model=str(model_dir), port=port, writable=False, log_level="warning"))
    with live, announce(coll, "127.0.0.1", port):
        live.wait_ready()
        served = runner.invoke(app, query)
        assert served.exit_code == 0 and "answered by the running f2b serve" in served.stderr, served.output
        like = runner.invoke(app, ["search", "--like", "1", "-c", str(coll), "-k", "3", "--json"])
        assert like.exit_code == 0 and "answered by" in like.stderr
    mine, theirs = json.loads(local.stdout), json.loads(served.stdout)
    assert [h["id"] for h in mine] == [h["id"] for h in theirs]
    assert np.allclose([h["score"] for h in mine], [h["score"] for h in theirs], atol=1e-4)
    with announce(coll, "127.0.0.1", free_port()) as record:  # a record whose process then dies
        data = json.loads(record.read_text())
    record.write_text(json.dumps({**data, "pid": 2 ** 22 + 12345}))  # beyond pid_max: no such process
    assert find_server(coll) is None and not record.exists()
    fallback = runner.invoke(app, query)
    assert fallback.exit_code == 0 and "answered by" not in fallback.stderr
    assert [h["id"] for h in json.loads(fallback.stdout)] == [h["id"] for h in mine]


def test_serve_on_a_taken_port_and_export_to_a_missing_folder(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        busy = runner.invoke(app, ["serve", "-c", str(tmp_path / "c"), "--port", str(port)])
    _one_line_error(busy, 1, f"127.0.0.1:{port}", "--port")
    nowhere = runner.invoke(app, ["export", str(tmp_path / "no" / "such" / "x.parquet"), "-c", str(tmp_path / "c")])
    _one_line_error(nowhere, 1, str(tmp_path / "no" / "such"))
    bad_port = runner.invoke(app, ["serve", "--port", "99999"])
    assert bad_port.exit_code == 2 and "Traceback" not in bad_port.output


def test_hub_id_in_the_cache_loads_offline_without_retries(tmp_path, model_dir, monkeypatch):
    """A cached hub id on a machine that cannot reach the hub: offline mode, so transformers reads the
    cache at once (it retried every file for minutes); an uncached one is refused in a line."""
    from huggingface_hub import constants

    from fwd2bot_index.api.testing import free_port
    from fwd2bot_index.options import OptionError, check_model_reference

    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny"
    shutil.copytree(model_dir, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises(OptionError, match="cannot be reached"):
        check_model_reference("someone/not-cached")
    assert constants.HF_HUB_OFFLINE is False
    check_model_reference("someone/tiny")
    assert constants.HF_HUB_OFFLINE is True and os.environ["HF_HUB_OFFLINE"] == "1"
    from fwd2bot_index.model import load_model

    model = load_model("someone/tiny", device="cpu")
    assert model.encode_texts(["a red circle"]).shape[0] == 1
