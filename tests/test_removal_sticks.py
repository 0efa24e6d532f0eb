"""Issue 23: a removal sticks. `f2b remove` records what it took out, so the next `f2b index` of the same
folder skips those paths while their content is unchanged (and says how many), brings them back once
the file changed or with --include-removed; removing an id that never existed is an error."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from fwd2bot_index.cli.main import app
from fwd2bot_index.collection import Collection
from fwd2bot_index.model.tiny import TinySpec, save_tiny_llava
from fwd2bot_index.synthetic import write_demo_data

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llava(tmp_path_factory.mktemp("m") / "tiny64", TinySpec(image_size=64), seed=0)


def _index(images: Path, coll: str, model_dir: Path, *extra: str) -> dict:
    result = runner.invoke(app, ["index", str(images), "-c", coll, "-m", str(model_dir), "--device", "cpu",
                                 "--json", *extra])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _id_of(coll: str, path: Path) -> int:
    with Collection.open(coll) as col:
        return col.resolve(str(path)).id


def test_removed_paths_stay_out_until_changed_or_asked(tmp_path, model_dir):
    write_demo_data(tmp_path / "d", n=6, seed=3)
    images = tmp_path / "d" / "images"
    coll = str(tmp_path / "c")
    assert _index(images, coll, model_dir)["indexed"] == 6
    a, b = images / "000001.png", images / "000002.png"
    by_id = runner.invoke(app, ["remove", str(_id_of(coll, a)), "-c", coll])
    by_path = runner.invoke(app, ["remove", str(b), "-c", coll])
    assert by_id.exit_code == 0 and by_path.exit_code == 0, by_id.output + by_path.output

    again = runner.invoke(app, ["index", str(images), "-c", coll, "-m", str(model_dir), "--device", "cpu"])
    assert again.exit_code == 0, again.output
    assert "indexed 0 new" in again.stdout and "2 skipped as removed" in again.stdout, again.stdout
    with Collection.open(coll) as col:
        assert len(col) == 4

    os.utime(a, (1_000_000_000, 1_000_000_000))  # touched, same content: still the file that was removed
    Image.new("RGB", (64, 64), (200, 30, 30)).save(b)  # b's content changed: a new file, indexed again
    report = _index(images, coll, model_dir)
    assert report["indexed"] == 1 and report["skipped_removed"] == 1 and report["unchanged"] == 4
    assert _index(images, coll, model_dir)["skipped_removed"] == 1  # a's removal survives b's re-index

    forced = _index(images, coll, model_dir, "--include-removed")
    assert forced["indexed"] == 1 and forced["skipped_removed"] == 0
    after = _index(images, coll, model_dir)  # indexed again, so no longer a removal
    assert after["skipped_removed"] == 0 and after["unchanged"] == 6


def test_remove_unknown_id_is_an_error_already_removed_is_not(tmp_path, model_dir):
    write_demo_data(tmp_path / "d", n=3, seed=5)
    images = tmp_path / "d" / "images"
    coll = str(tmp_path / "c")
    _index(images, coll, model_dir)
    image_id = _id_of(coll, images / "000000.png")
    assert runner.invoke(app, ["remove", str(image_id), "-c", coll]).exit_code == 0
    again = runner.invoke(app, ["remove", str(image_id), "-c", coll])
    assert again.exit_code == 0 and "already removed" in again.stdout, again.output
    first = _id_of(coll, images / "000001.png")
    mixed = runner.invoke(app, ["remove", str(first), "9999", "-c", coll])
    assert mixed.exit_code == 1 and "9999" in mixed.output  # refused before anything was removed
    both = runner.invoke(app, ["remove", str(first), str(images / "000001.png"), "-c", coll])
    assert both.exit_code == 0 and "already removed" in both.stdout, both.output  # the id took the path too
    never = runner.invoke(app, ["remove", "9999", "-c", coll])
    assert never.exit_code == 1, never.output
    lines = [line for line in never.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "9999" in lines[0], never.output
    with Collection.open(coll) as col:
        assert len(col) == 1


def test_a_removal_is_recorded_in_the_same_commit(tmp_path, model_dir):
    """The record lives in the catalog (a fresh process sees it) and an image's every path is recorded."""
    write_demo_data(tmp_path / "d", n=3, seed=6)
    images = tmp_path / "d" / "images"
    twin = images / "twin.png"
    twin.write_bytes((images / "000001.png").read_bytes())  # one image, two paths
    coll = str(tmp_path / "c")
    _index(images, coll, model_dir)
    with Collection.open(coll, writable=True) as col:
        image_id = col.resolve(str(twin)).id
        assert col.remove([image_id], remember=True) == [image_id]
        assert col.remove([image_id], remember=True) == []
    with Collection.open(coll) as col:
        states = col.catalog.removed_states([str(twin), str(images / "000001.png"), str(images / "000000.png")])
        assert set(states) == {str(twin), str(images / "000001.png")}
        plan = col.plan([str(p) for p in images.iterdir()])
        assert sorted(Path(f.path).name for f in plan.removed) == ["000001.png", "twin.png"]
        assert not plan.to_encode and not plan.duplicates
