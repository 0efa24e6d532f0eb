"""Issue 23, small items: a collection whose creation is stopped before its manifest leaves nothing
half-made behind (a Ctrl-C while the index is set up left catalog.sqlite and lock, which `info` called
"no collection" and the next `index` refused as a lost manifest)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fwd2bot_index.collection import Collection, CollectionNotFoundError, Manifest


def _manifest() -> Manifest:
    return Manifest(model_name="demo", model_fingerprint="fp", strategy={"embed": "prompt", "tokens": "pool",
                    "budget": 4}, embed_dim=16, token_count=4, token_dim=8)


def _create_stopped_in_the_middle(folder: Path) -> None:
    """A create that fails after its catalog was written: the index (a Qdrant server nobody runs) refuses.
    The same path a Ctrl-C takes (every BaseException)."""
    with pytest.raises(Exception, match="(?i)refused"):
        Collection.create(folder, _manifest(), backend="qdrant-server",
                          backend_options={"url": "http://127.0.0.1:9", "timeout": 5})


def test_an_interrupted_create_leaves_no_half_collection(tmp_path):
    folder = tmp_path / "new" / ".f2b"
    _create_stopped_in_the_middle(folder)
    assert not folder.exists()
    with pytest.raises(CollectionNotFoundError):
        Collection.open(folder)
    with Collection.create(folder, _manifest()) as col:  # the next try is a plain first run
        assert len(col) == 0


def test_a_folder_that_existed_keeps_its_other_files(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    _create_stopped_in_the_middle(folder)
    assert sorted(p.name for p in folder.iterdir()) in (["notes.txt"], ["lock", "notes.txt"])
    assert (folder / "notes.txt").read_text() == "mine"


def test_serve_on_all_addresses_without_a_collection_says_only_that(tmp_path):
    """The collection is checked before the two warnings about binding every address without a key."""
    import subprocess
    import sys

    from fwd2bot_index.api.testing import free_port

    done = subprocess.run([sys.executable, "-m", "fwd2bot_index.cli", "serve", "--host", "0.0.0.0", "-c",
                           str(tmp_path / "nope"), "--port", str(free_port("0.0.0.0"))],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [f"error: no collection at {tmp_path / 'nope'}; create one with "
                                                f"`f2b index DIR --collection {tmp_path / 'nope'}`"]


def test_a_photo_folder_given_as_the_collection_is_explained(tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from fwd2bot_index.cli.main import app

    photos = tmp_path / "Pictures"
    photos.mkdir()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(photos / "IMG_1.jpg")
    result = CliRunner().invoke(app, ["search", "a cat", "-c", str(photos)])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert "is a folder of images, not a collection" in lines[0]
    assert f"f2b index {photos} --collection {photos / '.f2b'}" in lines[0]
    assert not (photos / "catalog.sqlite").exists() and not (photos / "manifest.json").exists()
