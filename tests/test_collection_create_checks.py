"""``Collection.create`` without ``--reindex`` over a folder that has a part of the wrong kind: the odd part is
named first (one line, nothing changed), not taken for a collection that "already holds" or lost its manifest.
No model, no torch."""

from __future__ import annotations

import pytest

from fwd2bot_index.collection import Collection, CollectionExistsError, CollectionFormatError
from fwd2bot_index.collection.manifest import Manifest


def manifest() -> Manifest:
    return Manifest(model_name="demo", model_fingerprint="fp", strategy={"embed": "prompt", "tokens": "pool"},
                    embed_dim=4, token_count=2, token_dim=3)


@pytest.mark.parametrize("part", ["manifest.json", "catalog.sqlite"])
def test_a_folder_where_a_file_goes_is_named_not_taken_for_a_collection(tmp_path, part):
    folder = tmp_path / "col"
    (folder / part).mkdir(parents=True)
    (folder / part / "mine.txt").write_text("someone's")
    with pytest.raises(CollectionFormatError) as refused:
        Collection.create(folder, manifest())
    text = str(refused.value)
    assert f"{part} is a folder where a file should be" in text and "\n" not in text
    assert "already holds" not in text and "verify --repair" not in text and "--collection" in text
    assert {p.name for p in folder.iterdir()} <= {part, "lock"}  # nothing written but the writer lock file
    assert (folder / part / "mine.txt").read_text() == "someone's"


def test_an_odd_part_beside_a_collection_says_repair_or_reindex(tmp_path):
    folder = tmp_path / "col"
    Collection.create(folder, manifest()).close()
    (folder / "index.faiss").unlink()
    (folder / "index.faiss").mkdir()
    with pytest.raises(CollectionFormatError) as refused:
        Collection.create(folder, manifest())
    text = str(refused.value)
    assert "index.faiss is a folder where a file should be" in text and "\n" not in text
    assert "f2b verify --repair" in text and "--reindex" in text


def test_a_sound_collection_or_its_remains_are_still_refused_as_before(tmp_path):
    folder = tmp_path / "col"
    Collection.create(folder, manifest()).close()
    with pytest.raises(CollectionExistsError, match="already holds a collection"):
        Collection.create(folder, manifest())
    (folder / "manifest.json").unlink()
    with pytest.raises(CollectionExistsError, match="no manifest.json; run f2b verify --repair"):
        Collection.create(folder, manifest())
